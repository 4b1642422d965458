"""The style-controlled leaderboard: model ratings with the answers' length and markdown
held equal, and how much each of those sways the annotators. What
`preflab leaderboard --style-control` prints and the Leaderboard tab's toggle shows.

    from annotate.style_control import STYLE_COLUMNS, style_leaderboard
    votes = read_comparisons(store, columns=STYLE_COLUMNS)   # the vote columns and the answers
    sc = style_leaderboard(votes, anchor=None, rounds=100)
    sc.board          # a ratings.Leaderboard of the style-controlled ratings (same models, counts)
    sc.plain          # the plain leaderboard of the same votes, for comparison
    sc.coefficients() # per feature: coefficient, 95% interval, in rating points too
    print(sc.table()); print(sc.coefficients_table()); sc.to_dict()

As LMArena's style control (its blog post "Does style matter?", FastChat's
`rating_systems.py`): a Bradley-Terry fit with covariates, P(a beats b) =
sigmoid(theta_a - theta_b + beta . z), z per feature (length in tokens, headers, list
items, bold; trainer/style_features.py) the difference (a - b) / (a + b + 1) of the two
answers, standardised; L2-penalised; 95% intervals from bootstrap rounds that resample
the votes. The fit is annotate/style_fit.py's.

Two choices differ from FastChat's, on purpose:

* standardised by the root mean square of each difference, not by its mean and standard
  deviation: subtracting the mean would make the model favour whichever answer the
  record happens to call `a` (an intercept in disguise), so relabelling a pair's
  answers would change the ratings. With the RMS, swapping a and b in every vote (and
  the choice with them) gives exactly the same fit; where sides are balanced the RMS is
  the standard deviation.
* votes between two answers of one model are kept: their rating difference is 0, so
  they inform the style coefficients only (FastChat's arena never pairs a model with
  itself; preflab's reward-model pairs mostly do).

A feature no pair differs in (no answer ever uses bold, say) has nothing to fit and is
left out, said in the notes; the fit and the ties are as the plain board's (a tie or,
by default, a both-bad vote is half a win to each side).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotate.bradley_terry import (
    A_WINS,
    B_WINS,
    BOTH_BAD,
    CHOICE_CODES,
    RIDGE,
    VOTE_COLUMNS,
    battles_from_votes,
    fit_bradley_terry,
)
from annotate.ratings import PROVISIONAL_VOTES, SCALE, Leaderboard, checked_battles, leaderboard, ranked_board
from annotate.style_fit import bootstrap_style, fit_style_bt, style_data
from trainer.style_features import FEATURE_HELP, FEATURES, style_counts, style_differences

# What a style-controlled board reads of a vote: the plain board's columns and the answers.
STYLE_COLUMNS = [*VOTE_COLUMNS, "response_a", "response_b"]


@dataclass
class StyleControl:
    """A style-controlled board next to the plain one of the same votes.

    features: the features in the fit; coef / coef_low / coef_high: their coefficients
    (log-odds per root-mean-square of the feature difference) and 95% bootstrap
    intervals; spread: that root mean square of (a - b) / (a + b + 1); left_out:
    features no pair differed in; style_only: votes between two answers of one model,
    which inform only the coefficients."""

    board: Leaderboard
    plain: Leaderboard
    features: list[str]
    coef: np.ndarray
    coef_low: np.ndarray
    coef_high: np.ndarray
    spread: np.ndarray
    left_out: list[str] = field(default_factory=list)
    style_only: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def coefficients(self) -> list[dict[str, Any]]:
        """Per feature in the fit, JSON-able: `coefficient` and `ci` in log-odds per one
        spread of the feature difference, `points` the same in rating points (what one
        spread more of the feature is worth, like a rating difference), `spread`, and for
        length the ratio of answer lengths one spread means."""

        def num(x, digits):
            return None if math.isnan(x) else round(float(x), digits)

        rows = []
        for k, name in enumerate(self.features):
            s = float(self.spread[k])
            row = {
                "feature": name,
                "what": FEATURE_HELP[name],
                "coefficient": num(self.coef[k], 4),
                "ci": [num(self.coef_low[k], 4), num(self.coef_high[k], 4)],
                "points": num(SCALE * self.coef[k], 1),
                "points_ci": [num(SCALE * self.coef_low[k], 1), num(SCALE * self.coef_high[k], 1)],
                "spread": round(s, 4),
            }
            if name == "length":
                # (a - b) / (a + b + 1) = s means a / b ~ (1 + s) / (1 - s) for long answers
                row["length_ratio"] = round((1 + s) / (1 - s), 2) if s < 1 else None
            rows.append(row)
        return rows

    def notes(self) -> list[str]:
        lines = [
            "style-controlled: ratings with the answers' "
            + ", ".join(self.features)
            + " held equal (Bradley-Terry with style covariates, as LMArena's style control)"
        ]
        if self.style_only:
            lines.append(
                f"{self.style_only} votes between two answers of one model inform the style coefficients only"
            )
        if self.left_out:
            lines.append(f"left out of the fit, no pair differs in them: {', '.join(self.left_out)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The style-controlled board as the plain one's to_dict (models, ranks, intervals,
        counts), each model's plain rating beside it, and the coefficients."""
        out = self.board.to_dict()
        plain = {m: float(r) for m, r in zip(self.plain.models, self.plain.rating)}
        for row in out["models"]:
            row["plain_rating"] = round(plain[row["model"]], 1)
        out.update(
            {
                "coefficients": self.coefficients(),
                "features": list(self.features),
                "features_left_out": list(self.left_out),
                "style_only_votes": self.style_only,
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            }
        )
        return out

    def table(self) -> str:
        """The style-controlled ranking as fixed-width text, with the plain rating and how
        far style control moved each model."""
        b = self.board
        plain = dict(zip(self.plain.models, self.plain.rating))
        width = max([5] + [len(m) for m in b.models])
        lines = [
            f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {'95% CI':^17}  {'plain':>7}  {'shift':>6}"
        ]
        for k, m in enumerate(b.models):
            ci = "–" if math.isnan(b.low[k]) else f"{b.low[k]:7.1f} – {b.high[k]:7.1f}"
            rank = "–" if b.provisional[k] else str(int(b.rank[k]))
            shift = b.rating[k] - plain[m]
            lines.append(
                f"{rank:>4}  {m:<{width}}  {b.rating[k]:7.1f}  {ci:^17}  {plain[m]:7.1f}  {shift:+6.1f}"
            )
        return "\n".join(lines)

    def coefficients_table(self) -> str:
        lines = [
            "style coefficients: log-odds of winning per spread (root mean square) of the feature's "
            "(a - b) / (a + b + 1); + means annotators favour more of it",
            f"{'feature':<8}  {'coef':>7}  {'95% CI':^17}  {'points':>7}  {'spread':>6}",
        ]
        for row in self.coefficients():
            lo, hi = row["ci"]
            ci = "–" if lo is None else f"{lo:+7.3f} – {hi:+7.3f}"
            extra = (
                f"  (one spread of length: {row['length_ratio']}x as long)" if row.get("length_ratio") else ""
            )
            lines.append(
                f"{row['feature']:<8}  {row['coefficient']:+7.3f}  {ci:^17}  {row['points']:+7.1f}  "
                f"{row['spread']:6.3f}{extra}"
            )
        return "\n".join(lines)


def vote_arrays(votes: pa.Table, models: list[str], both_bad: str) -> tuple[np.ndarray, ...]:
    """Per vote that enters the fit: model_a and model_b as indices into `models` (-1 for
    a model without a rating, which only ever meets itself), model_a's score (1, 0.5,
    0), and which votes of the table those are (both-bad votes dropped with
    both_bad="drop")."""
    value_set = pa.array(models, pa.string())
    ia = pc.fill_null(pc.index_in(votes["model_a"], value_set=value_set), -1).to_numpy().astype(np.int64)
    ib = pc.fill_null(pc.index_in(votes["model_b"], value_set=value_set), -1).to_numpy().astype(np.int64)
    outcome = pc.index_in(votes["choice"], value_set=pa.array(CHOICE_CODES)).to_numpy(zero_copy_only=False)
    keep = np.ones(len(ia), bool) if both_bad == "tie" else outcome != BOTH_BAD
    score = np.where(outcome == A_WINS, 1.0, np.where(outcome == B_WINS, 0.0, 0.5))
    rows = np.flatnonzero(keep)
    return ia[rows], ib[rows], score[rows], rows


def standardised(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, spread, kept): each feature difference over its root mean square, for the
    features that vary at all (kept, a boolean per feature)."""
    spread = np.sqrt(np.mean(diffs * diffs, axis=0)) if len(diffs) else np.zeros(diffs.shape[1])
    kept = spread > 1e-12
    return diffs[:, kept] / spread[kept], spread[kept], kept


def style_leaderboard(
    votes: pa.Table,
    *,
    anchor: str | None = None,
    rounds: int = 100,
    seed: int = 0,
    both_bad: str = "tie",
    ridge: float = RIDGE,
    min_votes: int = PROVISIONAL_VOTES,
    workers: int | None = None,
) -> StyleControl:
    """The style-controlled board of a votes table with STYLE_COLUMNS, and the plain one.
    The same checks as the plain board (LeaderboardError: no votes, one model, an unknown
    anchor, a comparison graph in pieces); the same models rated, the same counts.
    workers: threads for the bootstrap rounds (None: one per CPU; the numbers do not
    depend on it)."""
    missing = [c for c in STYLE_COLUMNS if c not in votes.column_names]
    if missing:
        raise ValueError(f"style control needs the vote columns {STYLE_COLUMNS}; missing {missing}")
    plain = leaderboard(
        votes.select(VOTE_COLUMNS),
        anchor=anchor,
        rounds=rounds,
        seed=seed,
        both_bad=both_bad,
        ridge=ridge,
        min_votes=min_votes,
    )
    timings = {}
    battles, unrated, _ = checked_battles(battles_from_votes(votes.select(VOTE_COLUMNS), both_bad), anchor)
    K = len(battles.models)
    t0 = time.perf_counter()
    ia, ib, score, rows = vote_arrays(votes, battles.models, both_bad)
    answers_a, answers_b = votes["response_a"].take(rows), votes["response_b"].take(rows)
    diffs = style_differences(style_counts(answers_a), style_counts(answers_b))
    z, spread, kept = standardised(diffs)
    timings["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = style_data(np.maximum(ia, 0), np.maximum(ib, 0), score, z, K)
    # Newton from the plain strengths (a K x K fit, nothing next to the battles) and no
    # style effect: fewer steps over the battles than from zero.
    start = np.concatenate([fit_bradley_terry(battles.scores, ridge=ridge), np.zeros(z.shape[1])])
    params = fit_style_bt(data, ridge=ridge, start=start)
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    boot = (
        bootstrap_style(data, rounds, seed, ridge=ridge, start=params, workers=workers)
        if rounds > 0
        else None
    )
    timings["bootstrap"] = time.perf_counter() - t0
    board = ranked_board(
        battles,
        params[:K],
        boot[:, :K] if boot is not None else None,
        anchor=anchor,
        unrated=unrated,
        rounds=rounds,
        seed=seed,
        both_bad=both_bad,
        min_votes=min_votes,
        timings=timings,
    )
    beta = params[K:]
    if boot is not None:
        low, high = np.percentile(boot[:, K:], [2.5, 97.5], axis=0)
    else:
        low = high = np.full(len(beta), np.nan)
    return StyleControl(
        board=board,
        plain=plain,
        features=[f for f, k in zip(FEATURES, kept) if k],
        coef=beta,
        coef_low=low,
        coef_high=high,
        spread=spread,
        left_out=[f for f, k in zip(FEATURES, kept) if not k],
        style_only=int((ia == ib).sum()),
        timings=timings,
    )
