"""`preflab judge`: a model votes on pairs as annotator `judge:<name>` (AI feedback).

    preflab judge --data comparisons --model smollm2
    preflab judge --data comparisons --model llama-8b --endpoints api_endpoints.json
    preflab judge --data comparisons --pairs pairs.jsonl --model llama-8b --endpoints eps.json --template t.txt

Which pairs: with `--pairs FILE` that file's (annotate/pairs.py); otherwise the store's
pool: every pair someone voted on (so that the judge can be compared with people), and
for a directory store the pairs a `serve --model` generated into `<DIR>/pairs/`, as serve
builds its pool. Pairs this judge already voted on (a standing vote by the same
`judge:<name>`) are skipped, so a stopped run goes on where it was when run again.

Each pair is asked twice, once with each answer first (annotate/judge_template.py fills
the prompt and reads the verdict), to cancel the judge's position bias: the two
verdicts, mapped back to the pair's a/b, make a vote when they agree; when they differ
the vote is a tie (the judge cannot tell them apart once the order is taken away). When
either answer has no verdict line, or a request failed, no vote is made: counted and
reported, and tried again on a rerun. The vote keeps both rationales in `rationale` (at
most annotate/service.py's MAX_RATIONALE_CHARS, as a person's) and in `gen_params["judge"]` the model, the
two verdicts, the template and the sampling settings. Votes are written with the
store's own writer (validated by trainer/store/record.py, durable when each batch's
append returns), a batch at a time.

Judge votes fill no pair's overlap K (annotate/queue.py) and are left out of training
and export unless asked for (`--judges`, trainer/judges.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from annotate.judge_template import FIELDS_HELP, load_template, parse_verdict
from annotate.pairs import MAX_NAME_CHARS, Pair
from trainer import endpoints
from trainer.errors import PreflabError
from trainer.judges import JUDGE_PREFIX, judge_name
from trainer.rows import storable_text
from trainer.store import DATA_HELP

# A verdict in the request's terms -> the pair's, for (a shown as A, b shown as A).
_CANONICAL = ({"a": "a", "b": "b", "tie": "tie"}, {"a": "b", "b": "a", "tie": "tie"})


class JudgeError(PreflabError):
    """`preflab judge` cannot run: a flag, a model, a file; the message says which."""


@dataclass
class JudgeReport:
    pool: int = 0
    already: int = 0  # judged by this judge before: skipped
    votes: int = 0  # stored: the two orders agreed (a, b or tie)
    disagreed: int = 0  # stored as ties: the two orders disagreed
    unparseable: int = 0  # no vote: an answer without a verdict line
    failures: int = 0  # no vote: a request failed
    problems: list[str] = field(default_factory=list)  # the first few failures, for the summary

    def lines(self, annotator: str) -> list[str]:
        return [
            f"pool      {self.pool} pairs; {self.already} judged by {annotator} before (skipped)",
            f"votes     {self.votes + self.disagreed} stored as {annotator}: {self.votes} where both orders "
            f"agreed, {self.disagreed} ties where they disagreed",
            f"no vote   {self.unparseable} unparseable (no 'Verdict: A|B|tie' last line), "
            f"{self.failures} failed requests (a rerun tries these again)",
        ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="STORE", help=DATA_HELP + "; the judge's votes go here")
    p.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="the judge: an --endpoints display name, or an in-process model (a model directory, "
        "a cached Hugging Face id, 'smollm2', 'tiny')",
    )
    endpoints.add_argument(p)
    p.add_argument(
        "--pairs",
        default=None,
        metavar="FILE",
        help="judge this pairs file's pairs (as serve --pairs reads it) instead of the store's pool",
    )
    p.add_argument(
        "--name",
        default=None,
        metavar="NAME",
        help="the judge's name: votes are by annotator judge:NAME (default: the model's name)",
    )
    p.add_argument(
        "--template",
        default=None,
        metavar="FILE",
        help=f"the judge's prompt, plain text with the fields {FIELDS_HELP}, filled in, never executed; "
        "its answer must end with the line 'Verdict: A', 'Verdict: B' or 'Verdict: tie' "
        "(default: the shipped trainer/data/judge.md)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=512, metavar="N", help="most tokens of each judgment"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of the judge (0: greedy, the same verdict on a rerun)",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the judge")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="pairs judged (2N requests) and stored together; an in-process model generates them in one batch",
    )
    p.add_argument(
        "--limit", type=int, default=0, metavar="N", help="judge at most N pairs this run (0: all)"
    )
    from annotate.generate import add_load_arguments

    add_load_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- which pairs ---------------------------------------------------------------------


def store_pool(target: str) -> list[Pair]:
    """The pairs of the store's standing votes (people's and others', chat turns left
    out), one per pair_id in the order first voted on; for a directory, then the
    generator's cached pairs (`<DIR>/pairs/*.jsonl`) that nobody voted on."""
    from annotate.pairs import PairsFileError, load_pairs, pair_from_vote
    from trainer.rows import BadRow
    from trainer.store import is_chat_vote, is_database, read_comparisons, store_exists

    if not store_exists(target):
        raise JudgeError(f"{target}: no such comparison store (give --pairs FILE to judge a pairs file)")
    columns = [
        "pair_id",
        "prompt_id",
        "prompt",
        "response_a",
        "response_b",
        "model_a",
        "model_b",
        "gen_params",
    ]
    votes = read_comparisons(target, columns=[*columns, "created_at", "conversation_a"]).sort_by("created_at")
    pairs: dict[str, Pair] = {}
    for vote in votes.to_pylist():
        # A chat turn's answers follow each side's own history, which a Pair and the
        # template do not carry: a verdict after the opening alone would judge what no
        # person judged. Left out.
        if not is_chat_vote(vote) and vote["pair_id"] not in pairs:
            try:
                pairs[vote["pair_id"]] = pair_from_vote(vote)
            except BadRow:  # a stored vote a pairs file could not hold (e.g. a longer answer)
                continue
    if not is_database(target):
        for cache in sorted((Path(target) / "pairs").glob("*.jsonl")):
            try:
                cached, _ = load_pairs(cache)  # a line half-written by a running server is skipped
            except PairsFileError:
                continue
            for pair in cached:
                pairs.setdefault(pair.pair_id, pair)
    return list(pairs.values())


def judged_by(target: str, annotator: str) -> set[str]:
    """The pairs `annotator` has a standing vote on."""
    import pyarrow.compute as pc

    from trainer.store import read_comparisons, store_exists

    if not store_exists(target):
        return set()
    votes = read_comparisons(target, columns=["pair_id", "annotator"])
    return set(votes.filter(pc.equal(votes["annotator"], annotator))["pair_id"].to_pylist())


# ---- judging -------------------------------------------------------------------------


def judge_vote(pair: Pair, outputs: tuple[str, str], annotator: str, meta: dict) -> tuple[dict | None, str]:
    """(the vote record, "agreed" | "disagreed"), or (None, "unparseable") from the two
    outputs: with a shown as A, then with b shown as A."""
    verdicts, rationales = [], []
    for order, output in enumerate(outputs):
        verdict, rationale = parse_verdict(output)
        if verdict is None:
            return None, "unparseable"
        verdicts.append(_CANONICAL[order][verdict])
        rationales.append(rationale)
    from annotate.service import MAX_RATIONALE_CHARS  # a judge's rationale is kept like a person's

    agreed = verdicts[0] == verdicts[1]
    rationale = storable_text(
        f"[a shown first: {verdicts[0]}] {rationales[0]}\n\n[b shown first: {verdicts[1]}] {rationales[1]}"
    )
    if len(rationale) > MAX_RATIONALE_CHARS:
        rationale = rationale[: MAX_RATIONALE_CHARS - 1] + "…"
    try:
        params = json.loads(pair.gen_params) if pair.gen_params else {}
    except ValueError:
        params = {}
    params = params if isinstance(params, dict) else {}
    params["judge"] = {**meta, "verdicts": verdicts, "agreed": agreed}
    record = {
        **pair.record_fields(),
        "event_id": str(uuid.uuid4()),
        "kind": "vote",
        "left": "a",  # both orders were shown; the first one had a as answer A
        "choice": verdicts[0] if agreed else "tie",
        "strength": None,
        "rationale": rationale,
        "annotator": annotator,
        "decision_ms": None,  # not a person's decision time
        "gen_params": json.dumps(params, sort_keys=True),
    }
    return record, "agreed" if agreed else "disagreed"


def _source(args: argparse.Namespace, remote: dict):
    """(the judge, its recorded name): an EndpointModel or an in-process (model, tokenizer)."""
    if args.model in remote:
        return remote[args.model], args.model
    from annotate.model_loading import announce_conversion, load_announced, quiet_transformers
    from trainer.models import ModelLoadError, canonical_name, check_model

    quiet_transformers()
    try:
        announce_conversion(args.model, args.cache_dir)
        check_model(args.model, args.cache_dir)
    except ModelLoadError as e:
        raise JudgeError(str(e)) from None
    return load_announced(args.model, device=args.device, cache_dir=args.cache_dir), canonical_name(
        args.model
    )


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise JudgeError(f"{flag} must be at least {low}, got {value}")
    if args.limit < 0:
        raise JudgeError(f"--limit must be 0 (all) or more, got {args.limit}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise JudgeError("--temperature must be >= 0 and --top-p in (0, 1]")


def _check_name(name: str) -> str:
    from trainer.rows import text_problem

    most = MAX_NAME_CHARS - len(JUDGE_PREFIX)  # the annotator judge:<name> is a name a pair may carry
    if not name or len(name) > most or any(c.isspace() for c in name):
        raise JudgeError(
            f"the judge's name {name[:60]!r} must be 1-{most} characters without spaces (--name)"
        )
    if problem := text_problem(name):
        raise JudgeError(f"--name: {problem}")
    return name


def run(args: argparse.Namespace) -> int:
    from annotate.pairs import PairsFileError, load_pairs
    from trainer.endpoint_client import close_all, connect

    _check_flags(args)
    template = load_template(args.template)  # JudgeTemplateError (a PreflabError): exit 2
    if args.pairs:
        try:
            pool, problems = load_pairs(args.pairs)
        except PairsFileError as e:
            raise JudgeError(str(e)) from None
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
    else:
        pool = store_pool(args.data)
    remote = connect(endpoints.load_endpoints(args.endpoints))  # a bad file: error now
    try:
        return _judge(args, template, pool, remote)
    finally:
        close_all(remote)


def _judge(args, template, pool: list[Pair], remote: dict) -> int:
    from tqdm.auto import tqdm

    from trainer.endpoint_client import EndpointFailure, answers_of, side_params
    from trainer.store import describe, open_store

    t0 = time.perf_counter()
    name = args.name
    if name is None and args.model not in remote:
        from trainer.models import canonical_name

        name = canonical_name(args.model)
    annotator = judge_name(_check_name(name or args.model))
    report = JudgeReport(pool=len(pool))
    done = judged_by(args.data, annotator)
    todo = [p for p in pool if p.pair_id not in done]
    report.already = len(pool) - len(todo)
    if args.limit:
        todo = todo[: args.limit]
    if not todo:
        for line in report.lines(annotator):
            print(line)
        print("nothing to judge")
        return 0
    source, model = _source(args, remote)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    meta = {
        "model": model,
        "template": "shipped" if args.template is None else Path(args.template).name,
        "sampling": side_params(source, sampling, args.seed),
    }
    bar = tqdm(total=len(todo), desc=annotator, unit="pair", disable=args.no_progress)
    with open_store(args.data) as store:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            prompts = []
            for pair in batch:  # each pair twice: a as answer A, then b as answer A
                prompts.append(
                    [
                        {
                            "role": "user",
                            "content": template.fill(pair.messages, pair.response_a, pair.response_b),
                        }
                    ]
                )
                prompts.append(
                    [
                        {
                            "role": "user",
                            "content": template.fill(pair.messages, pair.response_b, pair.response_a),
                        }
                    ]
                )
            answers = answers_of(source, prompts, batch_size=2 * len(batch), seed=args.seed, **sampling)
            records = []
            for i, pair in enumerate(batch):
                first, second = answers[2 * i], answers[2 * i + 1]
                failed = [a for a in (first, second) if isinstance(a, EndpointFailure)]
                if failed:
                    report.failures += 1
                    if len(report.problems) < 5:
                        report.problems.append(f"{pair.pair_id}: {failed[0]}")
                    continue
                record, outcome = judge_vote(pair, (first.text, second.text), annotator, meta)
                if record is None:
                    report.unparseable += 1
                    continue
                records.append(record)
                if outcome == "agreed":
                    report.votes += 1
                else:
                    report.disagreed += 1
            if records:
                store.append_many(records, where=f"judge {annotator}")  # durable when it returns
            bar.update(len(batch))
    bar.close()
    for problem in report.problems:
        print(f"failed    {problem}", file=sys.stderr)
    for line in report.lines(annotator):
        print(line)
    print(f"done      in {time.perf_counter() - t0:.1f}s into {describe(args.data)}")
    stored = report.votes + report.disagreed
    return 0 if stored or not (report.failures or report.unparseable) else 1
