"""Numbers for the admin dashboard, computed from the standing votes.

Every function takes the votes as a pyarrow Table (what
`trainer.store.read_comparisons` returns) or a pandas DataFrame with the same
column names, and never changes it. Only the columns a function needs must be present.

    votes_by(votes, "annotator" | "model" | "day")  one row per group: counts and rates
    choice_rates(votes)        share of a / b / tie / both_bad
    position_bias(votes)       how often the candidate shown on the left wins
    median_decision_ms(votes)  typical time from pair shown to vote
    cohens_kappa(votes)        agreement of every two annotators on the pairs they share
    krippendorff_alpha(votes)  agreement of all annotators at once (nominal alpha)
    summary(votes)             the headline numbers, in one flat dict

A number that is undefined (a rate over zero votes, agreement with no shared pairs) is
NaN, never an exception: a dashboard over a young store must still render.

How the work is done: string columns are dictionary-encoded once by Arrow into integer
codes, and everything after that is numpy over whole columns (bincount, lexsort), so a
million votes take a fraction of a second. No Python loop runs per vote.

Agreement (kappa and alpha) compares labels on the same `pair_id`. An annotator who
voted on one pair several times (the app may allow re-voting without a retract) counts
once, with their latest vote; for equal timestamps the later row wins.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from trainer.store import CHOICES, SIDES
from trainer.evaluate import wilson_interval  # noqa: F401  (one implementation, shared with the policy eval)

Votes = Union[pa.Table, pd.DataFrame]

# Integer codes of the choices, in the order of CHOICES ("a", "b", "tie", "both_bad").
# The codes of `left` use the same numbers for "a" and "b", so that "the chosen side
# was the one on the left" is simply `choice == left`.
A, B, TIE, BOTH_BAD = range(len(CHOICES))
N_CHOICES = len(CHOICES)

_US_PER_DAY = 86_400 * 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# The columns any function here may read; a DataFrame is cut down to these before it
# is handed to Arrow, so that prompts and responses are never copied.
_USED_COLUMNS = ("pair_id", "prompt_id", "annotator", "choice", "left", "model_a",
                 "model_b", "created_at", "decision_ms")

BY = ("annotator", "model", "day")


# --------------------------------------------------------------------------------------
# Input: columns as numpy codes, each computed the first time a function asks for it
# --------------------------------------------------------------------------------------

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as floats, NaN where den is 0 (a rate over no votes is undefined)."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


class _Votes:
    """The votes as numpy arrays.

    Categorical columns become integer codes (-1 for null or unknown). Each column is
    converted lazily, so a function that needs only `choice` never encodes `pair_id`,
    and `summary`, which calls many functions, converts each column only once.
    """

    def __init__(self, votes: Votes):
        if isinstance(votes, pd.DataFrame):
            votes = pa.Table.from_pandas(
                votes[[c for c in _USED_COLUMNS if c in votes.columns]], preserve_index=False)
        elif not isinstance(votes, pa.Table):
            raise TypeError(f"votes must be a pyarrow Table or a pandas DataFrame, "
                            f"not {type(votes).__name__}")
        self.table = votes
        self.n = votes.num_rows

    @classmethod
    def of(cls, votes: Votes | _Votes) -> _Votes:
        return votes if isinstance(votes, _Votes) else cls(votes)

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    def column(self, name: str) -> pa.Array:
        if not self.has(name):
            raise ValueError(f"the votes have no column {name!r} "
                             f"(columns: {', '.join(self.table.column_names)})")
        col = self.table.column(name).combine_chunks()
        # pandas 3 strings arrive as large_string, categoricals as dictionaries; one
        # plain type keeps the Arrow kernels below simple.
        if pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        return col

    def _encode(self, arr: pa.Array, sort: bool) -> tuple[np.ndarray, list[str]]:
        """Integer codes and their labels. With `sort`, the labels are in sorted order
        (worth it for the few annotators and models; not for a million pair ids)."""
        encoded = pc.dictionary_encode(arr)
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        labels = encoded.dictionary.to_pylist()
        if sort and labels:
            order = sorted(range(len(labels)), key=labels.__getitem__)
            rank = np.empty(len(labels) + 1, dtype=np.int64)
            rank[np.asarray(order)] = np.arange(len(labels))
            rank[-1] = -1  # code -1 (null) indexes the last slot and stays -1
            codes = rank[codes]
            labels = [labels[i] for i in order]
        return codes, labels

    def _fixed_codes(self, name: str, values: tuple[str, ...]) -> np.ndarray:
        """Codes of a column with a fixed vocabulary: the position in `values`, or -1."""
        codes = pc.index_in(self.column(name), value_set=pa.array(values, pa.string()))
        return codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int8)

    @cached_property
    def choice(self) -> np.ndarray:
        return self._fixed_codes("choice", CHOICES)

    @cached_property
    def left(self) -> np.ndarray:
        return self._fixed_codes("left", SIDES)

    @cached_property
    def _annotator(self) -> tuple[np.ndarray, list[str]]:
        return self._encode(self.column("annotator"), sort=True)

    @property
    def annotator(self) -> np.ndarray:
        return self._annotator[0]

    @property
    def annotators(self) -> list[str]:
        return self._annotator[1]

    @cached_property
    def _pair(self) -> tuple[np.ndarray, list[str]]:
        return self._encode(self.column("pair_id"), sort=False)

    @property
    def pair(self) -> np.ndarray:
        return self._pair[0]

    @property
    def n_pairs(self) -> int:
        return len(self._pair[1])

    @cached_property
    def _models(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        # Both sides share one dictionary, so a model has the same code on either side.
        both = pa.concat_arrays([self.column("model_a"), self.column("model_b")])
        codes, labels = self._encode(both, sort=True)
        return codes[: self.n], codes[self.n:], labels

    @property
    def model_a(self) -> np.ndarray:
        return self._models[0]

    @property
    def model_b(self) -> np.ndarray:
        return self._models[1]

    @property
    def models(self) -> list[str]:
        return self._models[2]

    @cached_property
    def created_us(self) -> np.ndarray:
        """created_at as integer microseconds since the epoch, UTC.

        A timestamp stores UTC instants whatever its display zone, so the integer value
        is UTC; a zone-less timestamp is taken to be UTC already."""
        col = self.column("created_at")
        if not pa.types.is_timestamp(col.type):
            raise ValueError(f"the votes' created_at must be a timestamp, not {col.type}")
        col = pc.cast(col, pa.timestamp("us", col.type.tz), safe=False)
        return col.cast(pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy()

    @cached_property
    def shared(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labels agreement is measured on (see `_shared_labels`)."""
        return _shared_labels(self)

    @cached_property
    def decision_ms(self) -> np.ndarray:
        """Float milliseconds, NaN where not recorded (or where the column is absent,
        as in imported data)."""
        if not self.has("decision_ms"):
            return np.full(self.n, np.nan)
        return self.column("decision_ms").cast(pa.float64()).to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------------------
# Shares and rates
# --------------------------------------------------------------------------------------

def choice_rates(votes: Votes) -> dict[str, float]:
    """{"a": share, "b": share, "tie": share, "both_bad": share}, summing to 1
    (all NaN when there are no votes)."""
    return _choice_rates(_Votes.of(votes))


def _choice_rates(v: _Votes) -> dict[str, float]:
    counts = np.bincount(v.choice[v.choice >= 0], minlength=N_CHOICES)
    shares = _ratio(counts, counts.sum())
    return {name: float(shares[i]) for i, name in enumerate(CHOICES)}


def position_bias(votes: Votes) -> dict[str, float]:
    """How often the candidate shown on the left wins.

    Among decisive votes (choice "a" or "b"), the share where the chosen candidate was
    the one displayed on the left, i.e. choice == left. Without position bias it is
    0.5; `low`..`high` is its 95% Wilson interval; `n` the number of decisive votes.
    Returns {"share_left", "low", "high", "n"}.
    """
    return _position_bias(_Votes.of(votes))


def _decisive(v: _Votes) -> np.ndarray:
    return ((v.choice == A) | (v.choice == B)) & (v.left >= 0)


def _position_bias(v: _Votes) -> dict[str, float]:
    decisive = _decisive(v)
    n = int(decisive.sum())
    k = int((decisive & (v.choice == v.left)).sum())
    low, high = wilson_interval(k, n)
    return {"share_left": k / n if n else math.nan, "low": low, "high": high, "n": n}


def median_decision_ms(votes: Votes) -> float:
    """Median time from pair shown to vote, over votes that recorded one (NaN if none)."""
    return _median_decision_ms(_Votes.of(votes))


def _median_decision_ms(v: _Votes) -> float:
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
    v = _Votes.of(votes)
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
    medians = (pd.Series(v.decision_ms[rows]).groupby(groups).median()
               .reindex(range(size)).to_numpy(dtype=float))
    table = pd.DataFrame({
        by: labels,
        "votes": n,
        "ties": ties,
        "both_bad": both_bad,
        "tie_rate": _ratio(ties, n),
        "both_bad_rate": _ratio(both_bad, n),
        "left_share": _ratio(count(decisive & (choice == left)), count(decisive)),
        "median_decision_ms": medians,
    })
    table = table[table["votes"] > 0]
    if by != "day":
        table = table.sort_values(["votes", by], ascending=[False, True], kind="stable")
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Agreement between annotators
# --------------------------------------------------------------------------------------

def _shared_labels(v: _Votes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pair, annotator, choice) codes: each annotator's latest vote on each pair,
    for the pairs that two or more annotators labelled. In no particular order.
    """
    idx = np.flatnonzero((v.choice >= 0) & (v.annotator >= 0) & (v.pair >= 0))
    # A pair with a single vote cannot be shared. In a typical store that is most
    # pairs, so dropping them first makes everything below cheaper.
    per_pair = np.bincount(v.pair[idx], minlength=v.n_pairs)
    idx = idx[per_pair[v.pair[idx]] >= 2]

    # Re-votes (one annotator, one pair, several standing votes) are rare, so find
    # them by hashing, which costs no sort, and order only those by time.
    key = v.pair[idx] * max(1, len(v.annotators)) + v.annotator[idx]
    repeated = pd.Series(key).duplicated(keep=False).to_numpy()
    if repeated.any():
        rows, rows_key = idx[repeated], key[repeated]
        # lexsort sorts by the last key first and is stable: within one (pair,
        # annotator) run the votes are in time order, equal times in table order.
        order = np.lexsort((v.created_us[rows], rows_key))
        rows, rows_key = rows[order], rows_key[order]
        last_of_run = np.ones(len(rows), dtype=bool)
        last_of_run[:-1] = rows_key[1:] != rows_key[:-1]
        idx = np.concatenate([idx[~repeated], rows[last_of_run]])

    pair, annotator, choice = v.pair[idx], v.annotator[idx], v.choice[idx]
    # Several votes by one annotator made a pair look shared above; now it may not be.
    per_pair = np.bincount(pair, minlength=v.n_pairs)
    shared = per_pair[pair] >= 2
    return pair[shared], annotator[shared], choice[shared].astype(np.int64)


def _pairs_within_units(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (i, j), i != j, of every two rows with the same unit, each
    unordered pair of rows once.

    After a stable sort by unit, the rows of a unit are consecutive; pairing every
    row with the one d places further on, for d = 1, 2, ..., while both are in the same
    unit, enumerates each pair once. The loop runs once per distance (at most the
    number of annotators on one pair), never once per vote.
    """
    order = np.argsort(unit, kind="stable")
    sorted_unit = unit[order]
    starts = np.flatnonzero(np.r_[True, sorted_unit[1:] != sorted_unit[:-1]])
    sizes = np.diff(np.r_[starts, len(unit)])
    # How many rows of its unit follow each row.
    position = np.arange(len(unit)) - np.repeat(starts, sizes)
    following = np.repeat(sizes, sizes) - position - 1
    firsts, seconds = [], []
    for d in range(1, int(sizes.max(initial=1))):
        rows = np.flatnonzero(following >= d)
        firsts.append(order[rows])
        seconds.append(order[rows + d])
    if not firsts:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


KAPPA_UNDEFINED = ("chance agreement is 1 (both annotators used one and the same "
                   "category on every shared pair): kappa is undefined")


def cohens_kappa(votes: Votes) -> pd.DataFrame:
    """Cohen's kappa for every two annotators who labelled at least one pair in common.

    Columns: annotator_1, annotator_2 (annotator_1 < annotator_2, rows sorted by
    both), n_shared (pairs both labelled), agreement (share of those pairs with the
    same choice), kappa, note. Categories are a / b / tie / both_bad.

        kappa = (p_o - p_e) / (1 - p_e)

    with p_o the observed agreement and p_e the agreement expected by chance from the
    two annotators' own category shares on the shared pairs (Cohen 1960). When p_e is
    1 kappa is 0/0: it is NaN and `note` says why; otherwise `note` is "".
    """
    v = _Votes.of(votes)
    pair, annotator, choice = v.shared

    # Every two labels on the same pair: annotator_1 < annotator_2 by code, and the
    # codes follow sorted names, so the names are ordered too.
    i, j = _pairs_within_units(pair)
    swap = annotator[i] > annotator[j]
    first = np.where(swap, annotator[j], annotator[i])
    second = np.where(swap, annotator[i], annotator[j])
    choice_1 = np.where(swap, choice[j], choice[i])
    choice_2 = np.where(swap, choice[i], choice[j])

    # One 4x4 contingency table per annotator pair, built by one bincount.
    n_annotators = max(1, len(v.annotators))
    keys, group = np.unique(first * n_annotators + second, return_inverse=True)
    cell = (group * N_CHOICES + choice_1) * N_CHOICES + choice_2
    tables = np.bincount(cell, minlength=len(keys) * N_CHOICES * N_CHOICES)
    tables = tables.reshape(len(keys), N_CHOICES, N_CHOICES)

    n = tables.sum(axis=(1, 2))
    agreeing = np.trace(tables, axis1=1, axis2=2)
    # n^2 * p_e = sum over categories of (row total * column total): an integer, so the
    # degenerate case p_e == 1 is detected exactly, without float round-off.
    chance = (tables.sum(axis=2) * tables.sum(axis=1)).sum(axis=1)
    degenerate = chance == n * n
    p_o = _ratio(agreeing, n)
    p_e = _ratio(chance, n * n)
    kappa = _ratio(p_o - p_e, np.where(degenerate, 0.0, 1 - p_e))

    names = np.asarray(v.annotators, dtype=object)
    return pd.DataFrame({
        "annotator_1": names[keys // n_annotators],
        "annotator_2": names[keys % n_annotators],
        "n_shared": n,
        "agreement": p_o,
        "kappa": kappa,
        "note": np.where(degenerate, KAPPA_UNDEFINED, "").astype(object),
    })


def nominal_alpha(units: Any, values: Any) -> dict[str, float]:
    """Krippendorff's alpha for nominal data, from one (unit, value) row per label.

    `units` and `values` are equal-length sequences of hashable labels (or pandas
    Series / numpy arrays); each row is one coder's value for one unit, so a coder
    appears at most once per unit. Missing values are simply absent rows. Units with
    fewer than two values are not pairable and are left out.

    Returns {"alpha", "n_units" (pairable units), "n_values" (pairable values, the n of
    the coincidence matrix)}. alpha is NaN when there is no variation to measure
    against (no pairable unit, or every value the same).
    """
    unit_codes, _ = pd.factorize(pd.Series(units), use_na_sentinel=True)
    value_codes, value_labels = pd.factorize(pd.Series(values), use_na_sentinel=True)
    if len(unit_codes) != len(value_codes):
        raise ValueError(f"nominal_alpha: {len(unit_codes)} units but {len(value_codes)} values")
    known = (unit_codes >= 0) & (value_codes >= 0)
    return _nominal_alpha(unit_codes[known], value_codes[known], len(value_labels))


def _nominal_alpha(unit: np.ndarray, value: np.ndarray, n_categories: int) -> dict[str, float]:
    """Coincidence-matrix formulation (Krippendorff, "Computing Krippendorff's
    Alpha-Reliability", 2011):

        o_ck = sum over units u of  (number of ordered c-k pairs of values in u,
                                     each from a different coder) / (m_u - 1)
        n_c  = sum_k o_ck,  n = sum_c n_c
        alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k
    """
    if len(unit) == 0:
        return {"alpha": math.nan, "n_units": 0, "n_values": 0}
    unique_units, u = np.unique(unit, return_inverse=True)
    k = n_categories
    # counts[u, c]: how many coders gave value c in unit u.
    counts = np.bincount(u * k + value, minlength=len(unique_units) * k).reshape(-1, k)
    m = counts.sum(axis=1)
    counts, m = counts[m >= 2], m[m >= 2]
    if len(m) == 0:
        return {"alpha": math.nan, "n_units": 0, "n_values": 0}
    # Within a unit there are n_uc * n_uk ordered c-k pairs for c != k, and
    # n_uc * (n_uc - 1) for c == k (a value is not paired with itself): that is the
    # outer product minus its diagonal, each unit weighted by 1 / (m_u - 1).
    weighted = counts / (m - 1)[:, None]
    coincidences = weighted.T @ counts - np.diag(weighted.sum(axis=0))
    n_c = coincidences.sum(axis=1)
    n = float(m.sum())
    disagreeing = coincidences.sum() - np.trace(coincidences)
    expected_disagreeing = (n_c.sum() ** 2 - (n_c ** 2).sum()) / (n - 1)
    alpha = 1 - disagreeing / expected_disagreeing if expected_disagreeing > 0 else math.nan
    return {"alpha": float(alpha), "n_units": int(len(m)), "n_values": int(n)}


def krippendorff_alpha(votes: Votes) -> dict[str, float]:
    """Nominal Krippendorff's alpha over all annotators: units are pair_ids labelled by
    two or more annotators (each annotator's latest vote), values a / b / tie /
    both_bad. 1 is perfect agreement, 0 what chance gives, below 0 systematic
    disagreement. Returns {"alpha", "n_units", "n_values"} (see `nominal_alpha`)."""
    return _krippendorff_alpha(_Votes.of(votes))


def _krippendorff_alpha(v: _Votes) -> dict[str, float]:
    pair, _, choice = v.shared
    return _nominal_alpha(pair, choice, N_CHOICES)


# --------------------------------------------------------------------------------------
# The dashboard header
# --------------------------------------------------------------------------------------

def _utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def summary(votes: Votes) -> dict[str, Any]:
    """Every headline number of the dashboard, in one flat dict:

    votes, pairs, prompts (None without a prompt_id column), annotators, models,
    first_vote, last_vote (UTC datetimes, None without votes),
    share_a, share_b, share_tie, share_both_bad        (see choice_rates)
    left_share, left_low, left_high, decisive_votes     (see position_bias)
    median_decision_ms,
    alpha, alpha_units, alpha_values                    (see krippendorff_alpha)
    mean_kappa: the mean of the defined pairwise Cohen's kappas (Light's kappa), and
    kappa_pairs: how many annotator pairs it averages.
    """
    v = _Votes.of(votes)
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
        "alpha": alpha["alpha"],
        "alpha_units": alpha["n_units"],
        "alpha_values": alpha["n_values"],
        "mean_kappa": float(kappas.mean()) if len(kappas) else math.nan,
        "kappa_pairs": int(len(kappas)),
    }
