"""How a vote's pair was chosen, as its record says: the "selection" object in the
record's `gen_params` JSON, and the gold answer a gold item carries there.

    selection_of(record["gen_params"])  -> {"method": "uncertain", "gap": 0.03, ...} or None
    gold_of(record["gen_params"])       -> "a" | "b" | "tie" or None

The writers are in the service layer (annotate/sampling.py's `with_selection`, which
documents the methods; the gold queue), the readers here in the library, so that the
trainers (annotator quality, vote weights) can read it without importing `annotate`.
A gold item's selection is {"method": "gold", "gold": "a" | "b" | "tie", ...}, `gold`
in the record's canonical a/b terms (response_a / response_b), never screen sides.
"""

from __future__ import annotations

import json
from typing import Any

GOLD_METHOD = "gold"
GOLD_ANSWERS = ("a", "b", "tie")


def selection_of(gen_params: str | None) -> dict[str, Any] | None:
    """The "selection" a record's gen_params carries, if any."""
    # A cheap test first: most records have no selection, and parsing every record's
    # JSON would dominate a pass over a large store.
    if not gen_params or '"selection"' not in gen_params:
        return None
    try:
        params = json.loads(gen_params)
    except json.JSONDecodeError:
        return None
    how = params.get("selection") if isinstance(params, dict) else None
    return how if isinstance(how, dict) else None


def gold_of(gen_params: str | None) -> str | None:
    """The right answer of a gold item ("a", "b" or "tie"), or None for any other vote.
    A gold selection with an answer that is none of those is not counted as gold: a
    check that cannot be marked right or wrong must not fail anybody."""
    if not gen_params or '"gold"' not in gen_params:
        return None
    how = selection_of(gen_params)
    if not how or how.get("method") != GOLD_METHOD:
        return None
    gold = how.get("gold")
    return gold if gold in GOLD_ANSWERS else None


def without_gold(votes):
    """A table of votes less the votes on gold items (those whose gen_params carries a
    gold selection). A gold pair is a check on the annotator: its answers are written
    for the check and carry the pool's model names only to look like the pool's pairs
    (annotate/gold.py), so its votes say nothing about the models: the leaderboard
    leaves them out. (Reward training and export keep them: they are real preferences.)"""
    import numpy as np
    import pyarrow.compute as pc

    if votes.num_rows == 0 or "gen_params" not in votes.column_names:
        return votes
    params = votes.column("gen_params")
    maybe = pc.fill_null(pc.match_substring(params, '"gold"'), False).to_numpy(zero_copy_only=False)
    if not maybe.any():  # the common case: one vectorised scan, nothing parsed
        return votes
    gold = np.zeros(votes.num_rows, dtype=bool)
    candidates = params.filter(maybe).to_pylist()  # one conversion, not one lookup per row
    gold[np.flatnonzero(maybe)] = [gold_of(p) is not None for p in candidates]
    return votes.filter(~gold) if gold.any() else votes
