"""Agreement between annotators on the pairs they share: Cohen's kappa for every two,
Krippendorff's alpha for all at once.

    cohens_kappa(votes)        one row per annotator pair: n_shared, agreement, kappa, note
    krippendorff_alpha(votes)  {"alpha", "n_units", "n_values"} over all annotators
    nominal_alpha(units, values)  alpha of any (unit, value) labels

Labels are compared on the same `pair_id`; an annotator who voted on one pair several
times counts once, with their latest vote (`vote_arrays.shared_labels`). An undefined
value is NaN with a note, never an exception.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from annotate.vote_arrays import N_CHOICES, VoteArrays, Votes, ratio


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


KAPPA_UNDEFINED = (
    "chance agreement is 1 (both annotators used one and the same "
    "category on every shared pair): kappa is undefined"
)


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
    v = VoteArrays.of(votes)
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
    p_o = ratio(agreeing, n)
    p_e = ratio(chance, n * n)
    kappa = ratio(p_o - p_e, np.where(degenerate, 0.0, 1 - p_e))

    names = np.asarray(v.annotators, dtype=object)
    return pd.DataFrame(
        {
            "annotator_1": names[keys // n_annotators],
            "annotator_2": names[keys % n_annotators],
            "n_shared": n,
            "agreement": p_o,
            "kappa": kappa,
            "note": np.where(degenerate, KAPPA_UNDEFINED, "").astype(object),
        }
    )


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
    expected_disagreeing = (n_c.sum() ** 2 - (n_c**2).sum()) / (n - 1)
    alpha = 1 - disagreeing / expected_disagreeing if expected_disagreeing > 0 else math.nan
    return {"alpha": float(alpha), "n_units": int(len(m)), "n_values": int(n)}


def krippendorff_alpha(votes: Votes) -> dict[str, float]:
    """Nominal Krippendorff's alpha over all annotators: units are pair_ids labelled by
    two or more annotators (each annotator's latest vote), values a / b / tie /
    both_bad. 1 is perfect agreement, 0 what chance gives, below 0 systematic
    disagreement. Returns {"alpha", "n_units", "n_values"} (see `nominal_alpha`)."""
    return _krippendorff_alpha(VoteArrays.of(votes))


def _krippendorff_alpha(v: VoteArrays) -> dict[str, float]:
    pair, _, choice = v.shared
    return _nominal_alpha(pair, choice, N_CHOICES)
