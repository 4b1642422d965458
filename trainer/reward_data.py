"""Preference pairs for the reward model: from votes (or a TRL-format file) to `Pairs`.

    read_pairs(path, ties=, both_bad=, margin=, weights=)  -> Pairs   no tokenizer, no model
    split_by_prompt(pairs, val_fraction, seed)    -> (train, val) index arrays
    save_snapshot / load_snapshot                 the run's own copy: trainer/pair_snapshot.py

Tokens and batches (encode_pairs, pack, collate, length_grouped_batches) are in
trainer/reward_batches.py.

A pair is oriented so that `chosen` is the answer the annotator preferred and `label` is
the probability that chosen beats rejected: 1.0 for a vote, 0.5 for a tie or a both-bad
vote (when those are included; by default they are left out, as in `preflab export`).
`margin` is the vote's strength (1 slightly, 2 clearly) times `margin_scale`, or 0.
`weight` is the vote's weight in the loss (`--weights`: trainer/annotator_quality.py's
vote_weights over all the store's standing votes), 1 with `--weights none` and for a file.

Everything here runs before any model is loaded, so bad input fails in seconds with a
RewardDataError that says what is wrong. This module never imports `annotate`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.criteria import judged_names, judgments

# The shapes of prompts and answers (and the error) live in trainer/preference_format.py;
# they are imported from here too.
from trainer.preference_format import (  # noqa: F401
    HH_CUE,
    HH_ROLES,
    RewardDataError,
    as_messages,
    as_response,
    implicit_sides,
    text_to_messages,
)
from trainer.store import describe, is_database, messages_to_json, side_contexts
from trainer.store.record import CONVERSATION_FIELDS

TIE_MODES = ("exclude", "include")
NEEDED_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class Pairs:
    """Preference pairs as parallel lists (one entry per pair)."""

    prompts: list[list[dict[str, str]]] = field(default_factory=list)  # chosen's context: chat messages
    # The rejected answer's context: the same list as `prompts` but for a chat vote, whose
    # two sides each answered their own history (trainer.store.side_contexts).
    rejected_prompts: list[list[dict[str, str]]] = field(default_factory=list)
    # What split_by_prompt keeps together: the prompt's JSON; for a chat vote the
    # conversation's opening, so later turns of one conversation never straddle the split.
    groups: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    label: list[float] = field(default_factory=list)  # P(chosen beats rejected): 1.0 or 0.5
    margin: list[float] = field(default_factory=list)  # asked-for reward gap (0 = plain BT)
    weight: list[float] = field(default_factory=list)  # the vote's weight in the loss (--weights)
    head: list[int] = field(default_factory=list)  # the reward head it trains (0: overall; --criteria)
    summary: dict[str, Any] = field(default_factory=dict)  # what was read, used, dropped

    def __len__(self) -> int:
        return len(self.chosen)

    def add(
        self,
        prompt,
        chosen,
        rejected,
        label=1.0,
        margin=0.0,
        weight=1.0,
        head=0,
        rejected_prompt=None,
        group=None,
    ):
        self.head.append(int(head))
        self.prompts.append(prompt)
        self.rejected_prompts.append(prompt if rejected_prompt is None else rejected_prompt)
        self.groups.append(messages_to_json(prompt) if group is None else group)
        self.chosen.append(chosen)
        self.rejected.append(rejected)
        self.label.append(float(label))
        self.margin.append(float(margin))
        self.weight.append(float(weight))

    def subset(self, idx) -> Pairs:
        out = Pairs(summary=dict(self.summary))
        for i in idx:
            out.add(
                self.prompts[i],
                self.chosen[i],
                self.rejected[i],
                self.label[i],
                self.margin[i],
                self.weight[i],
                self.head[i],
                self.rejected_prompts[i],
                self.groups[i],
            )
        return out

    def prompt_keys(self) -> list[str]:
        # The canonical JSON of the prompt: one spelling per distinct prompt, whatever its source.
        return [messages_to_json(p) for p in self.prompts]

    def rejected_prompt_keys(self) -> list[str]:
        return [messages_to_json(p) for p in self.rejected_prompts]


# --------------------------------------------------------------------------------------
# Reading: a comparison store or a file
# --------------------------------------------------------------------------------------


def pairs_from_votes(
    votes,
    *,
    ties: str = "exclude",
    both_bad: str = "exclude",
    margin: bool = False,
    margin_scale: float = 1.0,
    source: str = "",
    weights: str = "none",
    criteria: list[str] = (),
) -> Pairs:
    """Standing votes (an Arrow table with the comparison schema) -> oriented pairs.

    One pair per vote: several votes on one pair count several times, which is what the
    Bradley-Terry likelihood of all the votes asks for. `weights` (none, gold, competence:
    trainer.annotator_quality.vote_weights) gives each pair its vote's weight, computed
    from ALL these votes, ties and both-bad included, before any of them is left out
    or split off: competence is estimated from the overlaps, which a split would cut.
    `criteria` (train-reward --criteria): besides each vote's overall pair (head 0), a pair
    for each criterion it judged (head 1, 2, ...: trainer.criteria.judgments, a scale as
    the preference its scores imply), with the vote's weight, no margin (a judgment has no
    strength), its ties as `ties` says.
    """
    from trainer.annotator_quality import AnnotatorQualityError, annotator_weights, vote_weights

    try:
        w = vote_weights(votes, weights)
        per_annotator = annotator_weights(votes, weights) if weights != "none" else {}
    except AnnotatorQualityError as e:
        raise RewardDataError(f"{source}: {e}") from None
    names = [c for c in VOTE_COLUMNS if c in votes.column_names]
    cols = votes.select(names).to_pydict()
    n_votes = votes.num_rows
    chats = [cols.get(f, [None] * n_votes) for f in CONVERSATION_FIELDS]
    parsed: dict[str, list[dict[str, str]]] = {}  # parse each distinct prompt's JSON once
    pairs = Pairs()

    def contexts(i: int, prompt: str):
        """(a's context, b's context, split group) of vote i: trainer.store.side_contexts."""
        if chats[0][i] is not None and chats[1][i] is not None:
            a, b = side_contexts(
                {"prompt": prompt, "conversation_a": chats[0][i], "conversation_b": chats[1][i]}
            )
            return a, b, prompt
        if prompt not in parsed:
            parsed[prompt] = as_messages(json.loads(prompt))
        return parsed[prompt], parsed[prompt], None

    def add_votes(choices, strengths, head: int) -> dict[str, int]:
        counts = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
        for i, (prompt, a, b, choice, strength, wt) in enumerate(
            zip(cols["prompt"], cols["response_a"], cols["response_b"], choices, strengths, w)
        ):
            if choice is None:  # a criterion this vote did not judge
                continue
            counts[choice] = counts.get(choice, 0) + 1
            context_a, context_b, group = contexts(i, prompt)
            m = margin_scale * float(strength or 0) if margin else 0.0
            if choice == "a":
                pairs.add(context_a, a, b, 1.0, m, wt, head, context_b, group)
            elif choice == "b":
                pairs.add(context_b, b, a, 1.0, m, wt, head, context_a, group)
            elif (choice == "tie" and ties == "include") or (choice == "both_bad" and both_bad == "include"):
                # No preference: a soft label of 0.5 pulls the two rewards together.
                pairs.add(context_a, a, b, 0.5, 0.0, wt, head, context_b, group)
        return counts

    counts = add_votes(cols["choice"], cols["strength"], 0)
    votes_n = sum(counts.values())
    if votes_n == 0:
        raise RewardDataError(
            f"{source}: the comparison store holds no standing votes yet; "
            f"collect some votes (or `preflab import` a preference file) first"
        )
    if counts["a"] + counts["b"] == 0:
        raise RewardDataError(
            f"{source}: none of the {votes_n} votes prefers one answer ({counts['tie']} ties, "
            f"{counts['both_bad']} both-bad); a reward model needs votes for 'a' or 'b'"
        )
    per_head = {}
    for head, name in enumerate(criteria, start=1):
        before = len(pairs)
        c = add_votes(judgments(votes, name, scale_as_preference=True), [None] * votes.num_rows, head)
        if sum(c.values()) == 0:
            judged = judged_names(votes)
            raise RewardDataError(
                f"{source}: --criteria {name}: no standing vote judged it (the votes here judge: "
                f"{', '.join(judged) or 'no criteria at all; serve --rubric collects them'})"
            )
        if c["a"] + c["b"] == 0:
            raise RewardDataError(
                f"{source}: --criteria {name}: none of its {c['tie']} judgments prefers one answer"
            )
        per_head[name] = {"judged": sum(c.values()), "ties": c["tie"], "pairs": len(pairs) - before}
    pairs.summary = {
        "source": source,
        "kind": "store",
        "votes": votes_n,
        "preferences": counts["a"] + counts["b"],
        "ties": counts["tie"],
        "both_bad": counts["both_bad"],
        "ties_mode": ties,
        "both_bad_mode": both_bad,
        "pairs": len(pairs),
    }
    if criteria:  # only then: a single-head run's summary stays what it was
        pairs.summary["criteria"] = per_head
    if weights != "none":  # what the weighting did, in config.json's "data" for all to see
        kept = np.asarray(pairs.weight)
        pairs.summary["weights"] = {
            "mode": weights,
            "per_annotator": {name: round(x, 4) for name, x in per_annotator.items()},
            "zero_weight_pairs": int((kept == 0).sum()),
            "mean_weight": round(float(kept.mean()), 4) if len(kept) else None,
        }
    return pairs


def read_rows(path: Path, keep=(*NEEDED_COLUMNS, "margin")) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a Parquet or JSON-lines file; of a Parquet file only the
    columns in `keep` are read (trainer/reward_eval.py also wants `subset`)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise RewardDataError(f"{path}: not a readable Parquet file ({e})") from None
        names = table.column_names
        return names, table.select([c for c in keep if c in names]).to_pylist()
    if suffix in (".jsonl", ".json"):
        from trainer.rows import BadRow, check_values, load_json

        rows = []
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        # The rows' checks (trainer/rows.py): JSON that parses, nests sanely, holds valid text.
        if suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of rows
            try:
                rows = load_json(text)
            except BadRow as e:
                raise RewardDataError(f"{path}: {e}") from None
            for i, row in enumerate(rows, start=1):
                try:
                    check_values(row)
                except BadRow as e:
                    raise RewardDataError(f"{path}:item {i}: {e}") from None
        else:
            for lineno, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(load_json(line))
                        check_values(rows[-1])
                    except BadRow as e:
                        raise RewardDataError(f"{path}:{lineno}: {e}") from None
        names = sorted({k for r in rows if isinstance(r, dict) for k in r})
        return names, rows
    raise RewardDataError(
        f"{path}: unknown file type {suffix!r}; give a comparison store "
        f"(a directory or a postgresql:// URL), a .parquet, or a .jsonl file"
    )


def pairs_from_file(path, *, margin: bool = False, margin_scale: float = 1.0) -> Pairs:
    """A TRL preference file (standard strings or conversational messages, explicit prompt,
    optional `margin` column; or the implicit-prompt conversational form, whole
    conversations in chosen and rejected) -> pairs. Every row is a preference (label 1)."""
    path = Path(path)
    names, rows = read_rows(path)
    missing = [c for c in NEEDED_COLUMNS if c not in names]
    implicit = missing == ["prompt"]  # what `preflab export` writes when histories differ
    if missing and not implicit:
        raise RewardDataError(
            f"{path}: needs the columns {', '.join(NEEDED_COLUMNS)} (TRL's preference format with an "
            f"explicit prompt); missing {', '.join(missing)}; found {', '.join(names) or 'no columns'}"
        )
    if not rows:
        raise RewardDataError(f"{path}: has the right columns but no rows")
    pairs = Pairs()
    has_margin = margin and "margin" in names
    for i, row in enumerate(rows):
        where = f"{path} row {i}: "
        prompt = row.get("prompt")
        transcript = isinstance(prompt, str) and text_to_messages(prompt)[1]
        m = margin_scale * float(row.get("margin") or 0.0) if has_margin else 0.0
        if not math.isfinite(m):
            raise RewardDataError(f"{where}margin must be a finite number, got {row.get('margin')!r}")
        if implicit:
            (context_c, chosen), (context_r, rejected) = implicit_sides(
                row.get("chosen"), row.get("rejected"), where
            )
            # Kept together by the split: the opening, up to the first user message.
            first_user = next((n for n, m in enumerate(context_c) if m["role"] == "user"), len(context_c))
            group = messages_to_json(context_c[: first_user + 1])
            pairs.add(context_c, chosen, rejected, 1.0, m, 1.0, 0, context_r, group)
            continue
        pairs.add(
            as_messages(prompt, where),
            as_response(row.get("chosen"), transcript, where),
            as_response(row.get("rejected"), transcript, where),
            1.0,
            m,
        )
    pairs.summary = {
        "source": str(path),
        "kind": "file",
        "rows": len(rows),
        "preferences": len(rows),
        "ties": 0,
        "both_bad": 0,
        "pairs": len(pairs),
        "margin_column": "margin" in names,
    }
    return pairs


# A chat vote's two conversations come along: each side is scored in its own context.
VOTE_COLUMNS = ["prompt", "response_a", "response_b", "choice", "strength", *CONVERSATION_FIELDS]
# What vote weights are computed from (trainer.annotator_quality): who voted on which
# pair, and when (their latest vote on a pair counts), and which pairs are gold.
WEIGHT_COLUMNS = ["pair_id", "annotator", "created_at", "gen_params"]


def _store_votes(target, columns: list[str], exclude_flagged: bool, judges: str = "exclude"):
    """(standing votes, the confirmed-flagged annotators left out, their votes dropped,
    what --judges did: a line, "" when there were no judge votes; trainer/judges.py)."""
    from trainer.flags import read_counted_votes
    from trainer.judges import select_judges

    wanted = list(dict.fromkeys([*columns, "annotator"]))
    votes, exclusion = read_counted_votes(str(target), wanted, include_flagged=not exclude_flagged)
    votes, judged = select_judges(votes, judges)
    votes = votes.select(list(columns))
    if not exclude_flagged:
        return votes, [], 0, judged
    return votes, list(exclusion.annotators), exclusion.dropped, judged


def read_pairs(
    path,
    *,
    ties: str = "exclude",
    both_bad: str = "exclude",
    margin: bool = False,
    margin_scale: float = 1.0,
    weights: str = "none",
    exclude_flagged: bool = True,
    criteria: list[str] = (),
    judges: str = "exclude",
) -> Pairs:
    """Pairs from a comparison store (a directory, or a postgresql:// URL) or a
    TRL-format file. A database that cannot be reached raises trainer.store.StoreError.
    `weights`: per-vote weights (pairs_from_votes); a file has no annotators, so only none.
    From a store, the votes of annotators whose flag an admin confirmed are left out
    (before any weights are computed) unless `exclude_flagged` is False (trainer/flags.py);
    models' votes (annotators judge:<name>) as `judges` says (trainer/judges.py)."""
    if ties not in TIE_MODES or both_bad not in TIE_MODES:
        raise RewardDataError(f"ties / both-bad must be one of {TIE_MODES}")
    columns = (
        VOTE_COLUMNS + (WEIGHT_COLUMNS if weights != "none" else []) + (["criteria"] if criteria else [])
    )
    options = dict(ties=ties, both_bad=both_bad, margin=margin, margin_scale=margin_scale, weights=weights)
    p = None if is_database(path) else Path(path)  # a URL is a store, never a file (Path would fold its "//")
    if p is None or p.is_dir():
        try:
            votes, excluded, dropped, judged = _store_votes(path, columns, exclude_flagged, judges)
        except FileNotFoundError as e:
            raise RewardDataError(str(e)) from None
        except ValueError as e:  # an unknown --judges mode
            raise RewardDataError(str(e)) from None
        source = describe(path) if p is None else str(p)
        pairs = pairs_from_votes(votes, source=source, criteria=list(criteria), **options)
        pairs.summary["excluded_flagged"] = {"annotators": excluded, "votes": dropped}
        pairs.summary["judges"] = {"mode": judges, "note": judged}
        return pairs
    if p.is_file():
        if criteria:
            raise RewardDataError(
                f"--criteria needs a comparison store (votes with their rubric judgments); {p} is a "
                f"preference file: train on the store, or `preflab export --criterion NAME` one criterion"
            )
        if weights != "none":
            raise RewardDataError(
                f"--weights {weights} needs a comparison store (votes with their annotators); "
                f"{p} is a preference file: use --weights none, or import it and vote on it"
            )
        return pairs_from_file(p, margin=margin, margin_scale=margin_scale)
    raise RewardDataError(f"{path}: no such comparison store or preference file")


# --------------------------------------------------------------------------------------
# Train / validation split by prompt
# --------------------------------------------------------------------------------------


def split_by_prompt(pairs: Pairs, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, val). All pairs of one prompt land on the same side, so the
    validation accuracy measures generalisation to unseen prompts, not memorised ones."""
    keys = pairs.groups
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    # Sorted before shuffling: the split depends only on the data and the seed, never
    # on the order rows came out of the store.
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    target = round(val_fraction * len(pairs))
    val: list[int] = []
    for k in order[:-1]:  # the last group always stays in train, so train is never empty
        if len(val) >= target:
            break
        val.extend(groups[k])
    val_set = set(val)
    train = [i for i in range(len(pairs)) if i not in val_set]
    return np.array(train, dtype=np.int64), np.array(sorted(val), dtype=np.int64)
