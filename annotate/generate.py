"""`preflab generate` and `preflab model`: sample candidate pairs, and try a model out.

`preflab generate` reads a prompt pool and writes one candidate pair per prompt, as JSON
lines the annotation app serves:

    prompt        list of chat messages
    response_a/b  the two candidates, in canonical order: sorted by (model, response)
    model_a/b     the model that produced each (aliases spelled out to the full id)
    pair_id       trainer.store.pair_id_for(prompt JSON, response_a, response_b)
    prompt_id     the pool's id for the prompt
    gen_params    JSON string: {"a": {sampling settings}, "b": {...}}; each side's settings
                  say "pregenerated": true (made by this command, not by a running
                  server) and "cut": true where the token limit stopped the answer; a
                  side from an endpoint (--endpoints) also "endpoint" (its display name)
                  and "model_name" (the server's name), with its recommended_config's
                  settings where it has one. A pair with an answer whose request failed
                  is left out, with a warning saying why.

With one model the two candidates are two samples with different seeds (seed, seed+1);
with several, each prompt gets a random pair of two different models (drawn with the
seed), and each model answers only the prompts it was drawn for.

Only the command line: pairs are built by annotate/pair_building.py, models loaded (with
a word on stderr about what takes the time) by annotate/model_loading.py. torch /
transformers are imported inside the functions: `preflab --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

from annotate.model_loading import announce_conversion, load_announced, quiet_transformers
from annotate.pair_building import make_pair, plan_sides, write_jsonl_atomic
from trainer import endpoints
from trainer.models import DEFAULT_MODEL, canonical_name
from trainer.runs import CONFIG_FILE

MODEL_PROMPT = "What is the capital of France? Answer in one sentence."
# cli.py formats help with ArgumentDefaultsHelpFormatter, which appends "(default: None)"
# unless the help text mentions %(default); this mention prints nothing. For options
# whose help already says what happens by default.
OWN_DEFAULT = "%(default).0s"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {value}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --cache-dir, as every command that loads a model takes them."""
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help="where to run the model: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where converted models are kept (default: $PREFLAB_CACHE, else ~/.cache/preflab)" + OWN_DEFAULT,
    )


# --------------------------------------------------------------------------------------
# preflab generate
# --------------------------------------------------------------------------------------


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        metavar="M",
        default=None,
        help=f"model to sample from: a local model directory, a Hugging Face id already in "
        f"the local cache, 'smollm2' (the built-in {DEFAULT_MODEL}, works offline) or "
        f"'tiny' (random, for testing). Repeat to pair different models against "
        f"each other (default: smollm2)" + OWN_DEFAULT,
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="prompt pool (.jsonl, .csv or .parquet; see `preflab prompts`)" + OWN_DEFAULT,
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="K",
        help="use only the first K prompts of the pool (default: all)" + OWN_DEFAULT,
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PAIRS.jsonl",
        help="write the pairs here as JSON lines (default: print them readably)" + OWN_DEFAULT,
    )
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=256, metavar="N", help="longest answer, in tokens"
    )
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=0.8,
        metavar="T",
        help="sampling temperature; 0 = greedy (then one model gives two equal answers)",
    )
    p.add_argument(
        "--top-p",
        type=_top_p,
        default=0.95,
        metavar="P",
        help="nucleus sampling: keep this much probability mass",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="random seed: for sampling, and for drawing model pairs; same seed, same pairs",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        metavar="B",
        help="sequences generated together (lower it if memory runs out)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    endpoints.add_argument(p)
    add_load_arguments(p)


def print_pairs(rows: list[dict]) -> None:
    width = 88
    for k, row in enumerate(rows, start=1):
        print("=" * width)
        print(f"pair {k}/{len(rows)}  {row['prompt_id']}  {row['pair_id']}")
        for m in row["prompt"]:
            print(
                textwrap.fill(
                    m["content"], width, initial_indent=f"{m['role'].upper()}: ", subsequent_indent="    "
                )
            )
        params = json.loads(row["gen_params"])
        for side in ("a", "b"):
            print("-" * width)
            print(f"[{side.upper()}] {row['model_' + side]}  (seed {params[side]['seed']})")
            text = row["response_" + side] or "(empty answer)"
            for para in text.splitlines() or [""]:
                print(textwrap.fill(para, width, initial_indent="    ", subsequent_indent="    ") or "")
    print("=" * width)


def run_generate(args: argparse.Namespace) -> int:
    from trainer.endpoint_client import close_all, connect

    remote = connect(endpoints.load_endpoints(args.endpoints))  # a bad file: error now (exit 2)
    try:
        return _generate(args, remote)
    finally:
        close_all(remote)


def _generate(args: argparse.Namespace, remote: dict) -> int:
    from trainer.endpoint_client import EndpointFailure, answers_of, side_params
    from trainer.models import ModelLoadError, check_model
    from trainer.prompts import PromptPoolError, load_prompt_pool

    try:
        pool = load_prompt_pool(args.prompts)
    except PromptPoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(pool.report.summary(), file=sys.stderr)
    for problem in pool.report.problems[:10]:
        print(f"  {problem}", file=sys.stderr)
    prompts = pool.prompts[: args.limit] if args.limit else pool.prompts

    # The recorded name of a model is its canonical one (an endpoint's: its display name);
    # a model named twice counts once.
    given = args.model or [DEFAULT_MODEL]
    model_names = list(dict.fromkeys(m if m in remote else canonical_name(m) for m in given))
    quiet_transformers()
    try:
        for name in [n for n in model_names if n not in remote]:  # a bad name: now, not in an hour
            announce_conversion(name, args.cache_dir)
            check_model(name, args.cache_dir)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    sides = plan_sides(prompts, model_names, args.seed)
    # (model, seed) -> indices of the prompts it answers
    jobs: dict[tuple[str, int], list[int]] = {}
    for i, pair in enumerate(sides):
        for side in pair:
            jobs.setdefault(side, []).append(i)
    answers: dict = {}  # (prompt index, (model, seed)) -> trainer.sampling.Answer or EndpointFailure
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    for name in model_names:
        source = remote.get(name) or load_announced(name, device=args.device, cache_dir=args.cache_dir)
        for (job_model, seed), indices in sorted(jobs.items()):
            if job_model != name:
                continue
            texts = answers_of(
                source,
                [prompts[i].messages for i in indices],
                seed=seed,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                **sampling,
            )
            for i, answer in zip(indices, texts):
                answers[i, (name, seed)] = answer
        del source  # an in-process model's memory is freed before the next one loads

    failed = [a for a in answers.values() if isinstance(a, EndpointFailure)]
    for problem in dict.fromkeys(map(str, failed)):
        print(f"warning: {problem}; that pair is left out", file=sys.stderr)
    kept = [
        i
        for i, (x, y) in enumerate(sides)
        if not any(isinstance(answers[i, s], EndpointFailure) for s in (x, y))
    ]
    if not kept:
        print(f"error: no pair could be made ({len(failed)} answers failed)", file=sys.stderr)
        return 1
    rows = []
    for i in kept:
        x, y = sides[i]
        side_dicts = [
            {
                "model": m,
                "response": answers[i, (m, s)].text,
                "params": {
                    **side_params(remote.get(m), sampling, s),
                    # Votes on these answers record that they were made ahead of time (a
                    # server may serve them as if its generator had: annotate/pregenerated.py).
                    "pregenerated": True,
                    # the token limit stopped it: the page marks it, the dashboard counts it
                    **({"cut": True} if answers[i, (m, s)].cut else {}),
                },
            }
            for m, s in (x, y)
        ]
        rows.append(make_pair(prompts[i], *side_dicts))

    same = sum(r["response_a"] == r["response_b"] for r in rows)
    if same:
        print(
            f"warning: {same} of {len(rows)} pairs have two identical answers "
            f"(nothing to choose between; raise --temperature?)",
            file=sys.stderr,
        )
    if args.out:
        write_jsonl_atomic(Path(args.out), rows)
        left_out = (
            f" ({len(sides) - len(rows)} left out: an endpoint failed)" if len(rows) < len(sides) else ""
        )
        print(f"wrote {len(rows)} pairs to {args.out}{left_out}", file=sys.stderr)
    else:
        print_pairs(rows)
    return 0


# --------------------------------------------------------------------------------------
# preflab model
# --------------------------------------------------------------------------------------


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help="a local model directory, a Hugging Face id in the local cache, "
        "'smollm2' (built in, works offline) or 'tiny'",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=48,
        metavar="N",
        help="length of the sample answer, in tokens",
    )
    add_load_arguments(p)


def run_model(args: argparse.Namespace) -> int:
    from trainer import models

    quiet_transformers()
    name = canonical_name(args.name)
    cache = {DEFAULT_MODEL: models.default_model_dir, models.TINY_MODEL: models.tiny_model_dir}.get(name)
    built = cache is not None and not (cache(args.cache_dir) / CONFIG_FILE).is_file()
    announce_conversion(name, args.cache_dir)
    # Import first, so that the times below are loading, not Python importing torch.
    t0 = time.perf_counter()
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    imports = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        models.load_model(name, device=args.device, cache_dir=args.cache_dir)
        first = time.perf_counter() - t0
        # The second load is what every later command pays.
        t0 = time.perf_counter()
        model, tokenizer = models.load_model(name, device=args.device, cache_dir=args.cache_dir)
        second = time.perf_counter() - t0
    except models.ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print(f"model:        {name}")
    if cache is not None:
        print(f"cached at:    {cache(args.cache_dir)}")
    print(f"import:       {imports:.2f}s  (torch, transformers)")
    print(f"first load:   {first:.2f}s" + ("  (first use: built the cache)" if built else ""))
    print(f"cached load:  {second:.2f}s")
    print(f"parameters:   {models.count_parameters(model):,}")
    print(f"dtype:        {str(model.dtype).removeprefix('torch.')}")
    print(f"device:       {model.device}")
    print(f"vocabulary:   {len(tokenizer):,} tokens")
    print(f"prompt:       {MODEL_PROMPT}")
    from trainer.sampling import generate

    ((answer,),) = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": MODEL_PROMPT}]],
        n=1,
        max_new_tokens=args.max_new_tokens,
        temperature=0,
        progress=False,
    )
    print(f"answer:       {answer or '(empty)'}")
    return 0
