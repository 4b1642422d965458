"""Votes cast by models (`preflab judge`, annotate/judge.py): who counts as a judge, and
the one switch that keeps or leaves out their votes downstream.

    from trainer.judges import JUDGE_PREFIX, is_judge, select_judges
    is_judge("judge:gpt")                          # True; an account name has no colon
    votes, line = select_judges(votes, "exclude")  # (the votes without judges', a report line)

A judge's votes carry the annotator `judge:<name>`. Account names cannot contain a colon
(annotate/users.py), so no person can vote as a judge, as no person can vote as
`import:<source>`. This module owns the prefix: the queue (judge votes fill no pair's
overlap K), the dashboard (judge-human agreement), export and the trainers all ask it.

`--judges` on `export`, `train-reward` and `train-dpo`: `exclude` (the default: a reward
model is meant to learn what people prefer; AI feedback is mixed in only when asked for,
so that a store a judge ran over trains what it trained before), `include`, or `only`
(the judges' votes alone, e.g. to compare an AI-feedback reward model with a human one).
"""

from __future__ import annotations

from typing import Any

JUDGE_PREFIX = "judge:"
JUDGE_MODES = ("exclude", "include", "only")
JUDGES_HELP = (
    "votes by models (annotators judge:<name>, from `preflab judge`): exclude them (the default: "
    "train on what people prefer), include them beside people's, or only them"
)


def is_judge(annotator: str | None) -> bool:
    return isinstance(annotator, str) and annotator.startswith(JUDGE_PREFIX)


def judge_name(model: str) -> str:
    """The annotator a model votes as."""
    return f"{JUDGE_PREFIX}{model}"


def check_mode(mode: str) -> str:
    if mode not in JUDGE_MODES:
        raise ValueError(f"judges must be one of {', '.join(JUDGE_MODES)}, got {mode!r}")
    return mode


def select_judges(votes, mode: str) -> tuple[Any, str]:
    """(votes, one report line) with judges' votes kept, left out or alone, as `mode`
    says; the line is "" when the votes hold no judge's (nothing to say)."""
    import pyarrow.compute as pc

    check_mode(mode)
    if votes.num_rows == 0 or "annotator" not in votes.column_names:
        return votes, ""
    judged = pc.fill_null(pc.starts_with(votes["annotator"], JUDGE_PREFIX), False)
    n = pc.sum(judged).as_py() or 0
    if n == 0 and mode != "only":
        return votes, ""
    if mode == "include":
        return votes, f"{n} judge vote{'s' if n != 1 else ''} included (--judges include)"
    if mode == "exclude":
        kept = votes.filter(pc.invert(judged))
        return kept, f"{n} judge vote{'s' if n != 1 else ''} left out (--judges include keeps them)"
    kept = votes.filter(judged)
    return kept, f"only the {n} judge vote{'s' if n != 1 else ''} kept (--judges only)"
