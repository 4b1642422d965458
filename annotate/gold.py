"""Gold items: pairs whose right answer is known, mixed into every annotator's queue.

    preflab serve --pairs pairs.jsonl --gold gold.jsonl --gold-rate 0.05 [--gold-feedback]

    items = load_gold("gold.jsonl")                  # GoldItem(pair, label, explanation)
    queue.gold = GoldItems(items, rate=0.05)         # annotate/serve.py; annotate/queue.py asks it

A gold file is a pairs file (annotate/pairs.py: prompt, response_a, response_b, model_a,
model_b, pair_id, prompt_id, gen_params) whose every row also carries `gold`: `a`, `b`
or `tie`, in the file's a/b terms, and may carry `explanation` (shown after the vote with
--gold-feedback). Unlike a pairs file, a bad row is an error, not a skip: a check whose
label is wrong or missing would mark good annotators as failing. Errors read
`FILE:LINE: FIELD: reason`.

The pair is put in canonical order (sorted by model, then answer, as `preflab generate`
makes pairs: annotate/pair_building.py), so a gold item taken from a generated pairs file
has that pair's id; when that swaps the answers, the label is swapped with them. Votes on
it carry gen_params "selection" {"method": "gold", "gold": label} with the label in the
record's canonical a/b terms; that is how trainer/annotator_quality.py finds them.

Looking like any other pair: the queue hands a gold item out in place of the pair it was
about to give, with probability `rate`, at the same moment, with the same random side on
the left; what the page and the API receive has the same fields (the selection is in
gen_params, which never leaves the server). What a gold file itself says is the admin's
to keep alike: the acknowledgement names the two models after every vote, so a gold row
should name models the pool has (not `unknown`), and a pool whose pairs file names its
own pair_ids makes gold items' derived `pair-...` ids stand out. Each annotator gets each gold item at most
once (a vote or a skip on it ends it for them; with PostgreSQL across every server, as the
database's claim refuses a pair someone voted on or skipped; on a directory store skips
live in memory, as for every pair, so after a restart a skipped gold item may come
back). Gold votes are outside the
pool: they never fill a pool pair's K slots, and a pool pair that is also a gold item is
served as gold only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from annotate.pairs import Pair, PairsFileError, load_pairs
from annotate.sampling import with_selection
from trainer.errors import PreflabError
from trainer.rows import BadRow, check_utf8, iter_rows
from trainer.store import pair_id_for

log = logging.getLogger("preflab.gold")

GOLD_LABELS = ("a", "b", "tie")
MAX_EXPLANATION_CHARS = 4_000
# Votes a gold pair may take (every annotator once): the shared store's claim counts slots,
# and a gold item has one per annotator, so it is never full. PostgreSQL's integer max.
GOLD_WANT = 2**31 - 1
SHOW_PROBLEMS = 5


class GoldError(PreflabError, ValueError):
    """Gold or flag settings of `preflab serve` that cannot work; the message names the flag."""


@dataclass(frozen=True)
class GoldItem:
    pair: Pair  # canonical order; gen_params carries the "selection"
    label: str  # "a", "b" or "tie", in the pair's canonical terms
    explanation: str = ""


def gold_selection(label: str) -> dict[str, str]:
    """The gen_params "selection" of a vote on a gold item."""
    return {"method": "gold", "gold": label}


def _gold_fields(row: dict[str, Any]) -> tuple[str, str]:
    label = row.get("gold")
    if label is None:
        raise BadRow("gold: missing; every row of a gold file needs 'a', 'b' or 'tie'")
    if not isinstance(label, str) or label.strip().lower() not in GOLD_LABELS:
        raise BadRow(f"gold: must be 'a', 'b' or 'tie' (in the file's a/b terms), got {label!r:.40}")
    explanation = row.get("explanation")
    if explanation is None:
        explanation = ""
    elif not isinstance(explanation, str):
        raise BadRow(f"explanation: must be a string, got {type(explanation).__name__}")
    check_utf8(explanation, "explanation")
    if len(explanation) > MAX_EXPLANATION_CHARS:
        raise BadRow(
            f"explanation: {len(explanation):,} characters, more than the {MAX_EXPLANATION_CHARS:,} shown"
        )
    return label.strip().lower(), explanation.strip()


def canonical_item(pair: Pair, label: str, explanation: str) -> GoldItem:
    """The item in canonical order (model, then answer); a swap swaps the label too."""
    swap = (pair.model_b, pair.response_b) < (pair.model_a, pair.response_a)
    if swap:
        pair = _swapped(pair)
        label = {"a": "b", "b": "a"}.get(label, label)
    return GoldItem(with_selection(pair, gold_selection(label)), label, explanation)


def _swapped(pair: Pair) -> Pair:
    gen_params = pair.gen_params
    if gen_params:  # per-side settings ({"a": ..., "b": ...}) follow their answer
        try:
            params = json.loads(gen_params)
        except ValueError:
            params = None
        if isinstance(params, dict) and ("a" in params or "b" in params):
            params = {**params, "a": params.get("b"), "b": params.get("a")}
            gen_params = json.dumps({k: v for k, v in params.items() if v is not None}, sort_keys=True)
    derived = pair_id_for(pair.prompt, pair.response_a, pair.response_b)
    return replace(
        pair,
        response_a=pair.response_b,
        response_b=pair.response_a,
        model_a=pair.model_b,
        model_b=pair.model_a,
        gen_params=gen_params,
        # An id the file gave is the file's name for the pair and stays; one derived from
        # the answers is derived again from the new order (what `preflab generate` gives).
        pair_id=pair_id_for(pair.prompt, pair.response_b, pair.response_a)
        if pair.pair_id == derived
        else pair.pair_id,
    )


def load_gold(path: str | os.PathLike) -> list[GoldItem]:
    """The gold items of a file; PairsFileError naming the file, line and field of the
    first problems when any row is bad (nothing is skipped)."""
    path = Path(path)
    pairs, problems = load_pairs(path)  # the pair fields, checked as a pairs file's
    labels: list[tuple[str, str] | None] = []
    for where, row in iter_rows(path):
        if isinstance(row, BadRow) or not isinstance(row, dict):
            labels.append(None)  # load_pairs reported it
            continue
        try:
            labels.append(_gold_fields(row))
        except BadRow as e:
            problems.append(f"{path}:{where}: {e}")
            labels.append(None)
    if problems:
        shown = "; ".join(problems[:SHOW_PROBLEMS])
        more = f" (and {len(problems) - SHOW_PROBLEMS} more)" if len(problems) > SHOW_PROBLEMS else ""
        raise PairsFileError(f"{path}: every row of a gold file must be usable: {shown}{more}")
    # No problems: load_pairs kept every row, in order, so pairs and labels line up.
    return [canonical_item(p, *fields) for p, fields in zip(pairs, labels) if fields is not None]


class GoldItems:
    """The gold items of one server, and when to hand one out (see the module docstring).
    The queue calls `draw` under its lock; this object keeps no state of its own beyond
    the random draws: who saw what is the queue's (votes and skips, restored from the store)."""

    def __init__(
        self, items: list[GoldItem], rate: float, *, feedback: bool = False, seed: int | None = None
    ):
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"--gold-rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.feedback = feedback
        self.items = {item.pair.pair_id: item for item in items}
        self._rng = random.Random(seed)

    def __contains__(self, pair_id: object) -> bool:
        return pair_id in self.items

    def __len__(self) -> int:
        return len(self.items)

    def pair(self, pair_id: str) -> Pair | None:
        item = self.items.get(pair_id)
        return item.pair if item is not None else None

    def draw(self, can_take) -> Pair | None:
        """A gold pair to hand out instead of the next pool pair, with probability `rate`,
        among those `can_take(pair_id)` allows (the queue's never-twice rule); else None."""
        if self._rng.random() >= self.rate:
            return None
        open_items = [pid for pid in self.items if can_take(pid)]
        return self.items[self._rng.choice(open_items)].pair if open_items else None

    def feedback_for(self, pair_id: str, choice: str, left: str) -> dict[str, Any] | None:
        """With --gold-feedback, what the annotator is told after a vote on a gold item:
        {"matched", "expected" (as shown: left, right or tie), "explanation"}; None when
        feedback is off or the pair is not gold. `choice` is canonical (a/b/tie/both_bad)."""
        item = self.items.get(pair_id)
        if not self.feedback or item is None:
            return None
        right = "b" if left == "a" else "a"
        return {
            # both-bad on a tie item matches, as the quality numbers count it (a tie class)
            "matched": (choice if choice != "both_bad" else "tie") == item.label,
            "expected": {left: "left", right: "right"}.get(item.label, item.label),
            "explanation": item.explanation,
        }


# ---- `preflab serve` flags --------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gold items and annotator flags (annotate/gold.py, trainer/flags.py)")
    g.add_argument(
        "--gold",
        metavar="FILE",
        default=None,
        help="gold pairs (.jsonl or .parquet): a pairs file whose rows also carry gold (a, b or tie, "
        "in the file's a/b terms) and optionally explanation; mixed into every annotator's queue",
    )
    g.add_argument(
        "--gold-rate",
        type=float,
        default=0.05,
        metavar="F",
        help="share of the pairs handed out that are gold items (default: %(default)g)",
    )
    g.add_argument(
        "--gold-feedback",
        action="store_true",
        help="after a vote on a gold item, show the annotator whether they matched and the "
        "explanation (for training phases; such a vote cannot be undone)",
    )
    g.add_argument(
        "--flag-min-failed-gold",
        type=int,
        default=2,
        metavar="N",
        help="flag an annotator only after at least N failed gold checks (default: %(default)s)",
    )
    g.add_argument(
        "--flag-below",
        type=float,
        default=0.6,
        metavar="P",
        help="... and when the upper end of their gold accuracy's 95%% Wilson interval is below P "
        "(default: %(default)g)",
    )


def check_arguments(args: argparse.Namespace) -> None:
    """GoldError naming the flag when the gold and flag settings are wrong on their own."""
    problem = None
    if not 0.0 < args.gold_rate <= 1.0:
        problem = f"--gold-rate must be more than 0 and at most 1, got {args.gold_rate}"
    elif args.gold_feedback and not args.gold:
        problem = "--gold-feedback needs --gold FILE"
    elif args.flag_min_failed_gold < 1:
        problem = f"--flag-min-failed-gold must be at least 1, got {args.flag_min_failed_gold}"
    elif not 0.0 < args.flag_below <= 1.0:
        problem = f"--flag-below must be more than 0 and at most 1, got {args.flag_below}"
    if problem:
        raise GoldError(problem)


def gold_items(args: argparse.Namespace) -> GoldItems | None:
    """The server's gold items (--gold), or None; PairsFileError for a bad file."""
    if not args.gold:
        return None
    items = GoldItems(load_gold(args.gold), args.gold_rate, feedback=args.gold_feedback)
    log.info("%s: %d gold items, mixed in at %g", args.gold, len(items), args.gold_rate)
    return items
