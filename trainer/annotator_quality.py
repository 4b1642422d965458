"""Which votes to trust: per-annotator quality numbers and per-vote weights, computed
from the standing votes alone (so every number can be recomputed from the store).

    rows = annotator_table(votes)              # one JSON-able dict per annotator
    fit = dawid_skene(votes)                   # fit.competence["alice"], fit.posteriors[pair_id]
    w = vote_weights(votes, "competence")      # numpy array, one weight per vote, in order
    low, high = wilson_interval(7, 10)

`votes` is a pyarrow Table with the record's fields (what `trainer.store.read_comparisons`
returns) or a list of record dicts; each function reads only the fields it needs:
pair_id, annotator, choice, created_at, decision_ms, response_a/b, gen_params.

The numbers, per annotator (annotator_table):
  * gold accuracy: on gold items (gen_params "selection": {"method": "gold", "gold": ...},
    read by trainer/selection.py), the share answered right, with its Wilson interval;
  * agreement with the others on the pairs they share, with and without ties;
  * Dawid-Skene competence (trainer/dawid_skene.py): the probability that their label
    is the true class, estimated by EM from all overlapping votes, no gold needed;
  * votes per hour while working, median decision time, and the rank correlation of
    decision time with answer length (someone who reads takes longer on longer pairs;
    a clicker does not);
  * the flag rule (Prolific's: never on one slip): at least `min_failed_gold` gold
    checks failed AND the upper end of the gold-accuracy interval below `flag_below`.

Classes are a, b and tie; a both-bad vote counts as a tie everywhere here. As an answer
to "which of the two is better" both-bad says "neither", which is what a tie says; the
reward trainer gives both the same soft label 0.5; and a fourth, rarely used class would
only thin out the counts Dawid-Skene estimates from.

Library code: never imports `annotate` or gradio.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trainer.dawid_skene import N_CLASSES, CodesFit, dawid_skene_codes
from trainer.errors import PreflabError
from trainer.intervals import wilson_interval
from trainer.selection import gold_of

CLASSES = ("a", "b", "tie")
CLASS_OF = {"a": 0, "b": 1, "tie": 2, "both_bad": 2}  # both-bad is a tie: see above
WEIGHT_MODES = ("none", "gold", "competence")

# gold weights: each annotator's gold accuracy is shrunk towards the team's pooled gold
# accuracy as if they had GOLD_PRIOR_CHECKS more checks at that accuracy (a Beta prior,
# the posterior mean). One lucky check does not make a 100% annotator; with 20 checks
# their own record dominates (20 / 24 of the weight).
GOLD_PRIOR_CHECKS = 4.0
# votes per hour: a gap of more than this between two votes is a break, not work.
BREAK_S = 30 * 60


class AnnotatorQualityError(PreflabError, ValueError):
    """Votes or settings the quality numbers cannot be computed from; names the flag or field."""


# --------------------------------------------------------------------------------------
# The votes as numpy columns
# --------------------------------------------------------------------------------------


def _column(votes, name: str) -> list | np.ndarray:
    if hasattr(votes, "column_names"):  # a pyarrow Table
        if name not in votes.column_names:
            raise AnnotatorQualityError(f"the votes have no {name!r} field; read them with that column")
        return votes[name].to_pylist()
    try:
        return [v[name] for v in votes]
    except KeyError:
        raise AnnotatorQualityError(f"a vote has no {name!r} field") from None


def _codes(values: list) -> tuple[np.ndarray, list[str]]:
    """(integer code per value, the distinct values sorted)."""
    names, codes = np.unique(np.array(values, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]


def _timestamps_s(votes) -> np.ndarray:
    """created_at as float seconds since the epoch (NaN where missing); a record dict may
    hold a datetime, an ISO string or integer microseconds (trainer.store.record). Votes
    without the field at all: all NaN (then the order of the votes says which is latest)."""
    if hasattr(votes, "column_names"):
        if "created_at" not in votes.column_names:
            return np.full(votes.num_rows, np.nan)
        import pyarrow as pa
        import pyarrow.compute as pc

        col = votes["created_at"]
        us = pc.cast(col, pa.timestamp("us", tz="UTC")).cast(pa.int64())
        return np.array(us.to_pylist(), dtype=float) / 1e6  # None -> NaN
    out = []
    for v in (v.get("created_at") for v in votes):
        if v is None:
            out.append(math.nan)
        elif hasattr(v, "timestamp"):
            out.append(v.timestamp())
        elif isinstance(v, str):
            from datetime import datetime

            out.append(datetime.fromisoformat(v).timestamp())
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out.append(v / 1e6)  # the record's own spelling: microseconds since the epoch (UTC)
        else:
            raise AnnotatorQualityError(f"created_at must be a timestamp, got {v!r}")
    return np.array(out, dtype=float)


class _Votes:
    """The columns the quality numbers need, as integer codes (built once per call)."""

    def __init__(self, votes):
        choices = _column(votes, "choice")
        bad = next((c for c in choices if c not in CLASS_OF), None)
        if bad is not None or any(c is None for c in choices):
            raise AnnotatorQualityError(
                f"choice must be one of a, b, tie, both_bad in every vote, got {bad!r}: pass "
                f"standing votes (trainer.store.read_comparisons), not raw events"
            )
        self.n = len(choices)
        self.label = np.array([CLASS_OF[c] for c in choices], dtype=np.int64)
        self.annotator, self.names = _codes(_column(votes, "annotator"))
        self.item, self.pair_ids = _codes(_column(votes, "pair_id"))
        self.time = _timestamps_s(votes)
        self._votes = votes

    def latest_per_annotator_and_item(self) -> np.ndarray:
        """Indices of the votes that count for agreement and Dawid-Skene: each
        annotator's latest vote on a pair (a second vote on the same pair replaces the
        first; counting both would make one person look like two who agree)."""
        t = np.nan_to_num(self.time, nan=-np.inf)
        order = np.lexsort((np.arange(self.n), t, self.item, self.annotator))
        a, i = self.annotator[order], self.item[order]
        last = np.r_[(a[1:] != a[:-1]) | (i[1:] != i[:-1]), True] if self.n else np.zeros(0, bool)
        return np.sort(order[last])

    def gold(self) -> np.ndarray:
        """Per vote: the gold class code, or -1 for a vote on a pair that is not gold."""
        return np.array(
            [CLASS_OF[g] if (g := gold_of(p)) else -1 for p in _column(self._votes, "gen_params")],
            dtype=np.int64,
        )


# --------------------------------------------------------------------------------------
# Dawid-Skene
# --------------------------------------------------------------------------------------


class DawidSkene:
    """What `dawid_skene` returns: competence and chance level per annotator (None for one
    with no overlapping votes), confusion matrices, the class prior, and the posterior of
    the true class of every overlapping pair."""

    def __init__(self, fit: CodesFit, names: list[str], pair_ids: list[str]):
        self.codes = fit
        self.competence = {n: _num(c) for n, c in zip(names, fit.competence)}
        self.chance = {n: _num(c) for n, c in zip(names, fit.chance)}
        self.overlap_votes = {n: int(k) for n, k in zip(names, fit.overlap_votes)}
        self.confusion = {
            n: {CLASSES[t]: dict(zip(CLASSES, map(float, row))) for t, row in enumerate(m)}
            for n, m, k in zip(names, fit.confusion, fit.overlap_votes)
            if k
        }
        self.class_prior = dict(zip(CLASSES, map(float, fit.class_prior)))
        self.posteriors = {
            pair_ids[i]: dict(zip(CLASSES, map(float, p))) for i, p in zip(fit.items, fit.posteriors)
        }
        self.iterations, self.converged = fit.iterations, fit.converged

    def weight(self, annotator: str) -> float | None:
        """The competence weight (see vote_weights): 0 at or below chance, 1 for perfect."""
        c, chance = self.competence.get(annotator), self.chance.get(annotator)
        if c is None or chance is None:
            return None
        # Chance-corrected, like Cohen's kappa: (c - chance) / (1 - chance). A random
        # clicker sits at chance and gets 0; an adversarial one is below chance and gets 0
        # too, not a negative weight: a negative weight would train towards the opposite
        # of their votes, i.e. trust them fully in reverse on the strength of a model fit
        # that cannot tell "adversarial" from "confused", and would turn the loss into
        # one that is unbounded below (maximising the log-likelihood of the wrong answer).
        return max(0.0, (c - chance) / (1.0 - chance)) if chance < 1 else 0.0


def dawid_skene(votes, *, max_iter: int = 200, tol: float = 1e-6) -> DawidSkene:
    """Dawid-Skene competences from the overlapping votes (pairs at least two annotators
    voted on; each annotator's latest vote there). See trainer/dawid_skene.py."""
    return _dawid_skene(_Votes(votes), max_iter=max_iter, tol=tol)


def _dawid_skene(v: _Votes, **options) -> DawidSkene:
    keep = v.latest_per_annotator_and_item()
    fit = dawid_skene_codes(v.item[keep], v.annotator[keep], v.label[keep], len(v.names), **options)
    return DawidSkene(fit, v.names, v.pair_ids)


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def _num(x: float | None, digits: int | None = None) -> float | None:
    """A JSON-able number: None for NaN (json would write NaN, which is not JSON)."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits) if digits is not None else float(x)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (for Spearman's correlation)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    for f, c in zip(first, counts):
        if c > 1:
            ranks[order[f : f + c]] = f + (c - 1) / 2
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (NaN with fewer than 3 points or a constant side).
    Ranks, not values: one vote left open over lunch must not decide the correlation."""
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _agreement(v: _Votes, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per annotator: (agreeing, compared) over every (their vote, another's vote) on a
    shared pair; then the same counting only pairings where neither vote is a tie."""
    item, ann, label = v.item[keep], v.annotator[keep], v.label[keep]
    counts = np.zeros((len(v.pair_ids), N_CLASSES))
    np.add.at(counts, (item, label), 1.0)
    on_item = counts.sum(axis=1)
    # A vote agrees with the others of its label on the pair (itself excluded) and is
    # compared with all the others.
    agree, compared = counts[item, label] - 1, on_item[item] - 1
    decisive = label < 2
    decisive_others = counts[item, 0] + counts[item, 1] - 1
    n = len(v.names)
    return (
        np.bincount(ann, agree, n),
        np.bincount(ann, compared, n),
        np.bincount(ann[decisive], agree[decisive], n),
        np.bincount(ann[decisive], decisive_others[decisive], n),
    )


def _votes_per_hour(times: np.ndarray) -> float:
    """Votes per hour of work: the gaps between consecutive votes of up to BREAK_S are
    the working time, and each such gap is one vote done in it; longer gaps are breaks."""
    t = np.sort(times[np.isfinite(times)])
    gaps = np.diff(t)
    work = gaps[gaps <= BREAK_S]
    if len(work) == 0 or work.sum() <= 0:
        return math.nan
    return len(work) / (work.sum() / 3600.0)


def _decision_columns(votes) -> tuple[np.ndarray, np.ndarray]:
    """(decision_ms with NaN where missing, answer length in characters: a + b)."""
    ms = np.array([math.nan if d is None else float(d) for d in _column(votes, "decision_ms")])
    if hasattr(votes, "column_names"):
        import pyarrow.compute as pc

        length = np.asarray(pc.utf8_length(votes["response_a"]).to_numpy(zero_copy_only=False)) + np.asarray(
            pc.utf8_length(votes["response_b"]).to_numpy(zero_copy_only=False)
        )
    else:
        length = np.array([len(v["response_a"] or "") + len(v["response_b"] or "") for v in votes])
    return ms, length.astype(float)


def check_flag_settings(min_failed_gold: int, flag_below: float) -> None:
    if not isinstance(min_failed_gold, int) or min_failed_gold < 1:
        raise AnnotatorQualityError(
            f"--min-failed-gold must be a whole number of at least 1, got {min_failed_gold!r} "
            f"(one failed check is never enough evidence)"
        )
    if not 0 < flag_below <= 1:
        raise AnnotatorQualityError(f"--flag-below must be in (0, 1], got {flag_below!r}")


def _flag(gold_n: int, correct: int, high: float, min_failed: int, below: float) -> tuple[bool, str]:
    failed = gold_n - correct
    if gold_n == 0:
        return False, "no gold checks yet: nothing to judge by"
    interval = f"gold accuracy {correct}/{gold_n}, 95% interval up to {high:.2f}"
    if failed >= min_failed and high < below:
        return True, f"flagged: failed {failed} of {gold_n} gold checks and the {interval} is below {below}"
    if failed < min_failed:
        return False, f"not flagged: failed {failed} of {gold_n} gold checks (the rule needs {min_failed})"
    return False, f"not flagged: failed {failed} of {gold_n} gold checks, but the {interval} reaches {below}"


def annotator_table(votes, *, min_failed_gold: int = 2, flag_below: float = 0.6) -> list[dict[str, Any]]:
    """One JSON-able dict per annotator (sorted by name); the numbers are described in the
    module docstring. Undefined numbers (no gold votes, no shared pairs) are None."""
    check_flag_settings(min_failed_gold, flag_below)
    v = _Votes(votes)
    if v.n == 0:
        return []
    keep = v.latest_per_annotator_and_item()
    ds = _dawid_skene(v)
    agree, compared, agree_nt, compared_nt = _agreement(v, keep)
    gold = v.gold()
    is_gold = gold >= 0
    right = is_gold & (gold == v.label)
    gold_n = np.bincount(v.annotator[is_gold], minlength=len(v.names))
    gold_right = np.bincount(v.annotator[right], minlength=len(v.names))
    ms, length = _decision_columns(votes)
    rows = []
    for j, name in enumerate(v.names):
        mine = v.annotator == j
        n_gold, n_right = int(gold_n[j]), int(gold_right[j])
        low, high = wilson_interval(n_right, n_gold)
        flagged, reason = _flag(n_gold, n_right, high, min_failed_gold, flag_below)
        timed = mine & np.isfinite(ms)
        rows.append(
            {
                "annotator": name,
                "votes": int(mine.sum()),
                "gold_n": n_gold,
                "gold_correct": n_right,
                "gold_accuracy": _num(n_right / n_gold if n_gold else math.nan, 4),
                "gold_low": _num(low, 4),
                "gold_high": _num(high, 4),
                "agreement": _num(agree[j] / compared[j] if compared[j] else math.nan, 4),
                "agreement_no_ties": _num(agree_nt[j] / compared_nt[j] if compared_nt[j] else math.nan, 4),
                "shared_votes": ds.overlap_votes[name],
                "competence": _num(ds.competence[name], 4),
                "competence_weight": _num(ds.weight(name), 4),
                "votes_per_hour": _num(_votes_per_hour(v.time[mine]), 1),
                "median_decision_ms": _num(float(np.median(ms[timed])) if timed.any() else math.nan, 1),
                "decision_length_corr": _num(spearman(ms[timed], length[timed]), 3),
                "flag_rule": flagged,
                "flag_reason": reason,
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# Weights for the reward model's loss
# --------------------------------------------------------------------------------------


def gold_weights(v: _Votes) -> dict[str, float]:
    """Per annotator: gold accuracy shrunk towards the pooled gold accuracy of everyone
    (the posterior mean under a Beta prior worth GOLD_PRIOR_CHECKS checks at that
    accuracy). An annotator with no gold votes gets the pooled accuracy itself."""
    gold = v.gold()
    is_gold = gold >= 0
    if not is_gold.any():
        raise AnnotatorQualityError(
            "--weights gold: the store holds no gold votes (gen_params selection method 'gold'); "
            "serve gold items first, or use --weights competence or none"
        )
    right = is_gold & (gold == v.label)
    pooled = right.sum() / is_gold.sum()
    n = np.bincount(v.annotator[is_gold], minlength=len(v.names))
    k = np.bincount(v.annotator[right], minlength=len(v.names))
    shrunk = (k + GOLD_PRIOR_CHECKS * pooled) / (n + GOLD_PRIOR_CHECKS)
    return {name: float(w) for name, w in zip(v.names, shrunk)}


def competence_weights(v: _Votes) -> dict[str, float]:
    """Per annotator: the chance-corrected Dawid-Skene competence (DawidSkene.weight).
    An annotator none of whose pairs anyone else voted on gets 1, the weight of
    `--weights none`: there is no evidence about them either way (the table shows their
    competence as None, so an admin sees that nobody checked them)."""
    ds = _dawid_skene(v)
    if not any(k for k in ds.overlap_votes.values()):
        raise AnnotatorQualityError(
            "--weights competence: no pair has votes from two annotators, so there is nothing "
            "to estimate competence from; collect overlapping votes (serve --overlap 2 or more) "
            "or use --weights none"
        )
    return {name: (w if (w := ds.weight(name)) is not None else 1.0) for name in v.names}


def annotator_weights(votes, mode: str) -> dict[str, float]:
    """The weight of each annotator's votes under `mode` (see vote_weights)."""
    if mode not in WEIGHT_MODES:
        raise AnnotatorQualityError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
    v = _Votes(votes)
    if mode == "none" or v.n == 0:
        return dict.fromkeys(v.names, 1.0)
    return gold_weights(v) if mode == "gold" else competence_weights(v)


def vote_weights(votes, mode: str) -> np.ndarray:
    """One weight per vote, in the order of `votes`, for the Bradley-Terry loss:

    none        1 for every vote
    gold        the annotator's gold accuracy, shrunk towards the team's (gold_weights)
    competence  the annotator's Dawid-Skene competence, chance-corrected: 0 for a
                random or an adversarial annotator, 1 for a perfect one (DawidSkene.weight)

    Compute them from ALL the standing votes of the store (competence is estimated from
    the overlaps, which a train/validation split would cut)."""
    if mode == "none":  # needs no field at all (a TRL file's rows have no annotator)
        return np.ones(len(votes), dtype=np.float64)
    weights = annotator_weights(votes, mode)
    names = _column(votes, "annotator")
    return np.array([weights[str(a)] for a in names], dtype=np.float64)
