"""A vote's rubric judgments read back, and the reward heads they train.

    judgments(votes, "helpful", scale_as_preference=True)   # per vote: "a" | "b" | "tie" | None
    parse_criteria("helpful,safe")                           # ["helpful", "safe"], or CriteriaError
    heads_of("helpful,safe")                                 # ["overall", "helpful", "safe"]

The record's `criteria` field (trainer/store/record.py owns its shape) holds, per vote,
criterion name -> "a" | "b" | "tie" (pairwise) or {"a": 1-5, "b": 1-5} (scale), in
canonical a/b terms. Here, in the library layer, because both the annotation side
(`export --criterion`, the Dashboard's agreement: annotate/rubric.py) and the reward
trainer (`train-reward --criteria`: one head per criterion) read it the same way.

A multi-head reward model's heads are named: "overall" (the overall vote) first, then
each criterion in the order given. The head of a pair is the judgment it came from.
"""

from __future__ import annotations

import json

from trainer.errors import PreflabError
from trainer.store.record import CRITERION_NAME, FLAGS_KEY

OVERALL = "overall"  # the head trained on the overall vote (`choice`); head 0 of every reward model


class CriteriaError(PreflabError, ValueError):
    """A --criteria list the trainer cannot use; the message names the criterion."""


def judgments(votes, name: str, *, scale_as_preference: bool = False) -> list[str | None]:
    """Criterion `name`'s judgment of each vote (canonical "a" / "b" / "tie"), None where the
    vote did not judge it. With `scale_as_preference` a scale counts as the preference its
    two scores imply (a higher: "a", b higher: "b", equal: "tie"; one score only: None)."""
    values = votes["criteria"].to_pylist() if "criteria" in votes.column_names else [None] * votes.num_rows
    picked: list[str | None] = []
    for text in values:
        judgment = json.loads(text).get(name) if text else None
        if isinstance(judgment, dict) and scale_as_preference and len(judgment) == 2:
            gap = judgment["a"] - judgment["b"]
            judgment = "a" if gap > 0 else "b" if gap < 0 else "tie"
        picked.append(judgment if isinstance(judgment, str) else None)
    return picked


def judged_names(votes) -> list[str]:
    """The criteria any of these votes judged, sorted (for error messages)."""
    if "criteria" not in votes.column_names:
        return []
    names = set()
    for text in votes["criteria"].drop_null().to_pylist():
        names.update(k for k in json.loads(text) if k != FLAGS_KEY)
    return sorted(names)


def parse_criteria(text: str | None) -> list[str]:
    """The names of a --criteria list ("a,b"): each a criterion name, none twice, not
    "overall" (that head is the overall vote's) nor "flags"."""
    if not text or not text.strip():
        return []
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if not CRITERION_NAME.fullmatch(n) or n == FLAGS_KEY:
            raise CriteriaError(f"--criteria: {n[:40]!r} is not a criterion name ([a-z][a-z0-9_]*)")
        if n == OVERALL:
            raise CriteriaError(
                f"--criteria: {OVERALL!r} is the overall vote's head, always trained; list only rubric criteria"
            )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CriteriaError(f"--criteria: {twice[0]!r} is given twice")
    return names


def heads_of(criteria: str | None) -> list[str]:
    """The heads a reward run trains: the overall vote's, then one per criterion."""
    return [OVERALL, *parse_criteria(criteria)]
