"""Numbers for the admin dashboard, computed from the standing votes.

Every function takes the votes as a pyarrow Table (what
`trainer.store.read_comparisons` returns) or a pandas DataFrame with the same
column names, and never changes it. Only the columns a function needs must be present.

    votes_by(votes, "annotator" | "model" | "day")  one row per group: counts and rates
    choice_rates(votes)        share of a / b / tie / both_bad
    position_bias(votes)       how often the candidate shown on the left wins
    median_decision_ms(votes)  typical time from pair shown to vote
    summary(votes)             the headline numbers, in one flat dict

Agreement between annotators (Cohen's kappa, Krippendorff's alpha) is in
annotate/agreement.py; the numpy view of the votes both use is annotate/vote_arrays.py.

A number that is undefined (a rate over zero votes, agreement with no shared pairs) is
NaN, never an exception: a dashboard over a young store must still render.

How the work is done: string columns are dictionary-encoded once by Arrow into integer
codes, and everything after that is numpy over whole columns (bincount, lexsort), so a
million votes take a fraction of a second. No Python loop runs per vote.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from annotate.agreement import _krippendorff_alpha, cohens_kappa
from annotate.vote_arrays import BOTH_BAD, N_CHOICES, TIE, A, B, VoteArrays, Votes, ratio
from trainer.evaluate import wilson_interval
from trainer.store import CHOICES

_US_PER_DAY = 86_400 * 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

BY = ("annotator", "model", "day")


# --------------------------------------------------------------------------------------
# Shares and rates
# --------------------------------------------------------------------------------------


def choice_rates(votes: Votes) -> dict[str, float]:
    """{"a": share, "b": share, "tie": share, "both_bad": share}, summing to 1
    (all NaN when there are no votes)."""
    return _choice_rates(VoteArrays.of(votes))


def _choice_rates(v: VoteArrays) -> dict[str, float]:
    counts = np.bincount(v.choice[v.choice >= 0], minlength=N_CHOICES)
    shares = ratio(counts, counts.sum())
    return {name: float(shares[i]) for i, name in enumerate(CHOICES)}


def position_bias(votes: Votes) -> dict[str, float]:
    """How often the candidate shown on the left wins.

    Among decisive votes (choice "a" or "b"), the share where the chosen candidate was
    the one displayed on the left, i.e. choice == left. Without position bias it is
    0.5; `low`..`high` is its 95% Wilson interval; `n` the number of decisive votes.
    Returns {"share_left", "low", "high", "n"}.
    """
    return _position_bias(VoteArrays.of(votes))


def _decisive(v: VoteArrays) -> np.ndarray:
    return ((v.choice == A) | (v.choice == B)) & (v.left >= 0)


def _position_bias(v: VoteArrays) -> dict[str, float]:
    decisive = _decisive(v)
    n = int(decisive.sum())
    k = int((decisive & (v.choice == v.left)).sum())
    low, high = wilson_interval(k, n)
    return {"share_left": k / n if n else math.nan, "low": low, "high": high, "n": n}


def median_decision_ms(votes: Votes) -> float:
    """Median time from pair shown to vote, over votes that recorded one (NaN if none)."""
    return _median_decision_ms(VoteArrays.of(votes))


def _median_decision_ms(v: VoteArrays) -> float:
    ms = v.decision_ms[~np.isnan(v.decision_ms)]
    return float(np.median(ms)) if len(ms) else math.nan


# --------------------------------------------------------------------------------------
# Counts per annotator, model or day
# --------------------------------------------------------------------------------------


def votes_by(votes: Votes, by: str) -> pd.DataFrame:
    """One row per annotator, model or UTC day.

    Columns: <by>, votes, ties, both_bad, tie_rate, both_bad_rate, left_share,
    median_decision_ms.

    * "annotator": sorted by votes, most first (then by name).
    * "model": a vote counts once for model_a and once for model_b, i.e. `votes` is
      the number of votes the model took part in; a pair of a model with itself counts
      once for it. So the column sums to more than the number of votes. Sorted like
      "annotator".
    * "day": the UTC calendar date of created_at as "YYYY-MM-DD", oldest first; days
      without votes are absent.

    `left_share` is the position-bias share (see `position_bias`) within the group,
    NaN without decisive votes; `median_decision_ms` ignores votes without a time.
    """
    if by not in BY:
        raise ValueError(f"votes_by: by must be one of {', '.join(BY)}, got {by!r}")
    v = VoteArrays.of(votes)
    rows = np.arange(v.n)
    if by == "annotator":
        groups, labels = v.annotator, v.annotators
    elif by == "model":
        # Each vote appears once per distinct model in it.
        other = np.flatnonzero(v.model_b != v.model_a)
        rows = np.concatenate([rows, other])
        groups = np.concatenate([v.model_a, v.model_b[other]])
        labels = v.models
    else:
        days = v.created_us // _US_PER_DAY  # floor division: correct before 1970 too
        unique_days, groups = np.unique(days, return_inverse=True)
        labels = [str(np.datetime64(int(d), "D")) for d in unique_days]

    # A row whose key is null (code -1) belongs to no group.
    known = groups >= 0
    rows, groups = rows[known], groups[known]
    size = len(labels)
    choice, left = v.choice[rows], v.left[rows]
    decisive = ((choice == A) | (choice == B)) & (left >= 0)

    def count(mask: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(groups if mask is None else groups[mask], minlength=size)

    n = count()
    ties, both_bad = count(choice == TIE), count(choice == BOTH_BAD)
    # Median per group: pandas' grouped median skips NaN and is vectorised.
    medians = (
        pd.Series(v.decision_ms[rows]).groupby(groups).median().reindex(range(size)).to_numpy(dtype=float)
    )
    table = pd.DataFrame(
        {
            by: labels,
            "votes": n,
            "ties": ties,
            "both_bad": both_bad,
            "tie_rate": ratio(ties, n),
            "both_bad_rate": ratio(both_bad, n),
            "left_share": ratio(count(decisive & (choice == left)), count(decisive)),
            "median_decision_ms": medians,
        }
    )
    table = table[table["votes"] > 0]
    if by != "day":
        table = table.sort_values(["votes", by], ascending=[False, True], kind="stable")
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------
# The dashboard header
# --------------------------------------------------------------------------------------


def _utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def cut_votes(votes: Votes) -> int:
    """Votes on a pair where the token limit stopped at least one answer (its side of
    gen_params has "cut": true): judged on text that may end mid-sentence. 0 without a
    gen_params column (imported data)."""
    v = VoteArrays.of(votes)
    if not v.n or not v.has("gen_params"):
        return 0
    column = v.column("gen_params")
    if not pa.types.is_string(column.type):  # all null (a frame without any): nothing was cut
        column = column.cast(pa.string())
    hit = pc.match_substring_regex(column, r'"cut"\s*:\s*true')
    return int(pc.sum(hit.fill_null(False).cast("int64")).as_py() or 0)


def summary(votes: Votes) -> dict[str, Any]:
    """Every headline number of the dashboard, in one flat dict:

    votes, pairs, prompts (None without a prompt_id column), annotators, models,
    first_vote, last_vote (UTC datetimes, None without votes),
    share_a, share_b, share_tie, share_both_bad        (see choice_rates)
    left_share, left_low, left_high, decisive_votes     (see position_bias)
    median_decision_ms,
    cut_votes                                           (see cut_votes)
    alpha, alpha_units, alpha_values                    (see krippendorff_alpha)
    mean_kappa: the mean of the defined pairwise Cohen's kappas (Light's kappa), and
    kappa_pairs: how many annotator pairs it averages.
    """
    v = VoteArrays.of(votes)
    rates = _choice_rates(v)
    bias = _position_bias(v)
    alpha = _krippendorff_alpha(v)
    kappas = cohens_kappa(v)["kappa"].to_numpy(dtype=float)
    kappas = kappas[~np.isnan(kappas)]
    prompts = None
    if v.has("prompt_id"):
        prompts = int(pc.count_distinct(v.column("prompt_id")).as_py()) if v.n else 0
    first = last = None
    if v.n:
        first, last = _utc(v.created_us.min()), _utc(v.created_us.max())
    return {
        "votes": v.n,
        "pairs": v.n_pairs,
        "prompts": prompts,
        "annotators": len(v.annotators),
        "models": len(v.models),
        "first_vote": first,
        "last_vote": last,
        **{f"share_{name}": share for name, share in rates.items()},
        "left_share": bias["share_left"],
        "left_low": bias["low"],
        "left_high": bias["high"],
        "decisive_votes": bias["n"],
        "median_decision_ms": _median_decision_ms(v),
        "cut_votes": cut_votes(v),
        "alpha": alpha["alpha"],
        "alpha_units": alpha["n_units"],
        "alpha_values": alpha["n_values"],
        "mean_kappa": float(kappas.mean()) if len(kappas) else math.nan,
        "kappa_pairs": int(len(kappas)),
    }
