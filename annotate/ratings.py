"""Bradley-Terry ratings of models from human votes, with 95% bootstrap intervals, on an
Elo-like scale: the numbers behind `preflab leaderboard` and the Leaderboard tab.

    from annotate.ratings import leaderboard
    board = leaderboard(votes, anchor="smollm2", rounds=100)   # votes: model_a, model_b, choice
    print(board.table()); board.to_dict()                      # text / JSON forms

The file reads top to bottom:

1. votes -> battles: every standing vote is a battle between model_a and model_b; they
   are counted per ordered pair of models. A win is worth 1 to the winner; a tie 0.5 to
   each side; "both bad" is a tie by default (as FastChat's arena does: neither answer
   was preferred), or dropped. A vote where both answers come from the same model says
   nothing about ratings (it compares two samples of one model) and is left out, counted.
2. the Bradley-Terry fit: P(i beats j) = sigmoid(theta_i - theta_j), maximum likelihood
   on the K x K matrix of scores (ties as half wins), by Newton's method on all K
   parameters at once, batched over bootstrap rounds. See `fit_bradley_terry`.
3. bootstrap intervals: resampling the battles with replacement is the same as drawing
   the counts of the aggregated cells (pair x outcome) from a multinomial, so a round
   costs one K x K fit, not a pass over the votes.
4. the scale and the ranks: rating = 1000 + (400 / ln 10) * (theta - theta_anchor), so
   400 points = 10:1 odds as in chess Elo; ranks respect the intervals.
5. the leaderboard itself (`Leaderboard`), the checks that make its numbers meaningful
   (enough models, a connected comparison graph, a known anchor), and its text / JSON forms.

Elsewhere: the policy evaluations beside the humans' win rates (annotate/policy_evals.py),
the HTML and SVG (annotate/web/leaderboard_html.py), the tab
(annotate/web/leaderboard_tab.py), the command line (annotate/leaderboard.py).

Everything that grows with the number of votes is Arrow / numpy over whole columns;
everything else grows with K (models), so a million votes over 50 models with 100
bootstrap rounds takes about as long as reading the store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trainer.errors import PreflabError

# 400 rating points = a factor of 10 in the odds, as in chess Elo. theta is in natural
# log-odds, so one unit of theta is 400 / ln 10 ~ 173.7 points.
SCALE = 400.0 / math.log(10.0)
CENTER = 1000.0

# A Gaussian prior on theta with variance 1 / RIDGE (sd ~ 32 in theta, ~5,500 rating
# points). Invisible wherever the data pin a rating down, but it keeps the fit finite when
# the maximum-likelihood estimate is at infinity (a model that never lost or never won),
# and it fixes the one free direction of the model (adding a constant to every theta):
# at the optimum the thetas of each connected group of models sum to zero.
RIDGE = 1e-3

BOTH_BAD_MODES = ("tie", "drop")
# outcome codes of a battle, from model_a's point of view
A_WINS, B_WINS, TIE, BOTH_BAD = 0, 1, 2, 3
CHOICE_CODES = ("a", "b", "tie", "both_bad")  # index = outcome code
# All a leaderboard reads of a vote: the store reads nothing else (no answer text).
VOTE_COLUMNS = ["model_a", "model_b", "choice"]


class LeaderboardError(PreflabError, ValueError):
    """No meaningful leaderboard from these votes or settings; the message says why and
    what to do."""


# --------------------------------------------------------------------------------------
# 1. votes -> battles
# --------------------------------------------------------------------------------------


@dataclass
class Battles:
    """Votes aggregated per pair of models. Indices follow `models` (sorted names).

    wins[i, j]      battles i won against j
    ties[i, j]      ties between i and j (symmetric; both_bad included when counted as tie)
    both_bad[i, j]  of those, the both-bad votes (symmetric), for the report
    """

    models: list[str]
    wins: np.ndarray
    ties: np.ndarray
    both_bad: np.ndarray
    votes: int = 0  # standing votes read
    self_pairs: int = 0  # left out: model_a == model_b
    both_bad_dropped: int = 0  # left out with both_bad="drop"

    @property
    def scores(self) -> np.ndarray:
        """scores[i, j]: points i took from j (win 1, tie 0.5). The likelihood's data."""
        return self.wins + 0.5 * self.ties

    @property
    def games(self) -> np.ndarray:
        """games[i, j]: battles between i and j, either way round (symmetric)."""
        return self.wins + self.wins.T + self.ties

    @property
    def used(self) -> int:
        return int(self.games.sum() // 2)


def battles_from_votes(votes: pa.Table, both_bad: str = "tie") -> Battles:
    """Count the battles of a votes table (model_a, model_b, choice) per pair of models."""
    if both_bad not in BOTH_BAD_MODES:
        raise ValueError(f"both_bad must be one of {BOTH_BAD_MODES}, got {both_bad!r}")
    n = votes.num_rows
    if n == 0:
        return Battles([], *(np.zeros((0, 0), np.int64) for _ in range(3)))
    a, b = votes["model_a"], votes["model_b"]
    # The model names: hashing two string columns once; every later step is on integers.
    names = pc.unique(pa.chunked_array(a.chunks + b.chunks, pa.string())).to_pylist()
    models = sorted(names)
    value_set = pa.array(models, pa.string())
    ia = pc.index_in(a, value_set=value_set).to_numpy().astype(np.int64)
    ib = pc.index_in(b, value_set=value_set).to_numpy().astype(np.int64)
    outcome = pc.fill_null(pc.index_in(votes["choice"], value_set=pa.array(CHOICE_CODES)), -1)
    outcome = outcome.to_numpy().astype(np.int64)
    if (outcome < 0).any():  # the record schema forbids it; a hand-made table might not
        raise ValueError(f"{int((outcome < 0).sum())} votes have a choice outside {CHOICE_CODES}")

    K = len(models)
    # One bincount over (model_a, model_b, outcome) does the whole aggregation.
    counts = np.bincount((ia * K + ib) * 4 + outcome, minlength=K * K * 4).reshape(K, K, 4)
    diagonal = np.arange(K)
    self_pairs = int(counts[diagonal, diagonal].sum())
    counts[diagonal, diagonal] = 0
    # From model_a's side to each model's side: i beat j as model_a or as model_b.
    wins = counts[:, :, A_WINS] + counts[:, :, B_WINS].T
    ties = counts[:, :, TIE] + counts[:, :, TIE].T
    bad = counts[:, :, BOTH_BAD] + counts[:, :, BOTH_BAD].T
    dropped = 0
    if both_bad == "tie":
        ties = ties + bad
    else:
        dropped = int(bad.sum() // 2)
    return Battles(models, wins, ties, bad, votes=n, self_pairs=self_pairs, both_bad_dropped=dropped)


# --------------------------------------------------------------------------------------
# 2. the Bradley-Terry fit
# --------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for any x


def _log_likelihood(theta: np.ndarray, scores: np.ndarray, ridge: float) -> np.ndarray:
    """sum_ij scores_ij * log sigmoid(theta_i - theta_j) - ridge/2 |theta|^2, per batch row."""
    diff = theta[:, :, None] - theta[:, None, :]
    return -(scores * np.logaddexp(0.0, -diff)).sum(axis=(1, 2)) - 0.5 * ridge * (theta * theta).sum(axis=1)


def fit_bradley_terry(
    scores: np.ndarray, ridge: float = RIDGE, tol: float = 1e-8, max_iter: int = 100
) -> np.ndarray:
    """Maximum-likelihood Bradley-Terry strengths (natural log-odds) from a score matrix.

    scores: (K, K) or a batch (B, K, K); scores[i, j] = points i took from j (ties 0.5).
    Returns theta of shape (K,) or (B, K).

    Why Newton and not the classic MM iteration (Hunter 2004) or L-BFGS: with K models
    the problem has only K parameters, so the exact Hessian (a K x K weighted graph
    Laplacian plus the ridge) costs nothing next to the data, and Newton converges
    quadratically: 6-8 steps to the last digit on a million votes, where MM converges
    linearly (slowly when strengths are far apart). With ridge > 0 the penalised
    log-likelihood is strictly concave, so Newton with a backtracking line search always
    converges. All B problems (the bootstrap rounds) run as one batch: one (B, K, K)
    linear solve per step.

    tol: stop when no theta moved more than this (1e-8 is 2e-6 rating points; below
    ~1e-10, rounding in sums over a million votes is what moves).
    """
    S = np.array(scores, dtype=np.float64)  # a copy: the diagonal is cleared below
    single = S.ndim == 2
    if single:
        S = S[None]
    B, K, _ = S.shape
    S[:, np.arange(K), np.arange(K)] = 0.0  # a model against itself carries no information
    games = S + S.transpose(0, 2, 1)
    points = S.sum(axis=2)
    theta = np.zeros((B, K))
    f = _log_likelihood(theta, S, ridge)
    diagonal = np.arange(K)
    for _ in range(max_iter):
        p = _sigmoid(theta[:, :, None] - theta[:, None, :])  # P(i beats j)
        grad = points - (games * p).sum(axis=2) - ridge * theta
        # minus the Hessian: Laplacian of the weights n_ij p_ij (1 - p_ij), plus the ridge
        w = games * p * (1.0 - p)
        neg_hessian = -w
        neg_hessian[:, diagonal, diagonal] = w.sum(axis=2) + ridge
        step = np.linalg.solve(neg_hessian, grad[:, :, None])[:, :, 0]
        # Backtracking (Armijo) per batch row: a full Newton step can overshoot when a
        # model is far from the others (near-undefeated), a half step cannot forever.
        slope = (grad * step).sum(axis=1)
        t = np.ones(B)
        for _ in range(60):
            candidate = theta + t[:, None] * step
            f_new = _log_likelihood(candidate, S, ridge)
            ok = f_new >= f + 1e-4 * t * slope - 1e-12 * np.abs(f)
            if ok.all():
                break
            t = np.where(ok, t, 0.5 * t)
        moved = np.abs(t[:, None] * step).max()
        theta, f = candidate, f_new
        if moved < tol:
            break
    return theta[0] if single else theta


# --------------------------------------------------------------------------------------
# 3. bootstrap intervals
# --------------------------------------------------------------------------------------


def bootstrap_thetas(battles: Battles, rounds: int = 100, seed: int = 0, ridge: float = RIDGE) -> np.ndarray:
    """theta of every bootstrap round, shape (rounds, K); NaN for a model with no battle
    in a round (it has no rating there, rather than the prior's 0).

    Resampling the n battles with replacement draws each battle i.i.d. from the empirical
    distribution over (pair, outcome) cells, so the resampled cell counts are exactly
    Multinomial(n, cell counts / n): we draw those counts directly.
    """
    K = len(battles.models)
    upper_i, upper_j = np.triu_indices(K, k=1)
    # cells per unordered pair: i beat j, j beat i, tie (both_bad included when counted)
    cells = np.concatenate(
        [battles.wins[upper_i, upper_j], battles.wins[upper_j, upper_i], battles.ties[upper_i, upper_j]]
    ).astype(np.float64)
    n = int(cells.sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, cells / n, size=rounds).astype(np.float64)
    P = len(upper_i)
    i_won, j_won, tied = draws[:, :P], draws[:, P : 2 * P], draws[:, 2 * P :]
    S = np.zeros((rounds, K, K))
    S[:, upper_i, upper_j] = i_won + 0.5 * tied
    S[:, upper_j, upper_i] = j_won + 0.5 * tied
    theta = fit_bradley_terry(S, ridge=ridge)
    played = (S + S.transpose(0, 2, 1)).sum(axis=2) > 0
    return np.where(played, theta, np.nan)


# --------------------------------------------------------------------------------------
# 4. the scale and the ranks
# --------------------------------------------------------------------------------------


def to_ratings(theta: np.ndarray, anchor: int | None = None) -> np.ndarray:
    """theta (K,) or (B, K) -> Elo-like ratings: the anchor model at exactly 1000, or
    (anchor None) the mean of the models at 1000. Each bootstrap round is anchored on
    its own, so an interval says how sure we are of the distance to the anchor."""
    theta = np.asarray(theta, dtype=np.float64)
    if anchor is None:
        zero = np.nanmean(theta, axis=-1, keepdims=True)
    else:
        zero = theta[..., anchor : anchor + 1]
    return CENTER + SCALE * (theta - zero)


def interval_ranks(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """rank_i = 1 + the number of models whose interval lies entirely above i's.

    So a model ranks above another only when its interval is clear of it; models whose
    intervals overlap can share a rank (as LMSYS's arena ranks them)."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    clear_above = low[None, :] > high[:, None]  # [i, j]: j is clear above i
    return 1 + clear_above.sum(axis=1)


# --------------------------------------------------------------------------------------
# 5. the leaderboard
# --------------------------------------------------------------------------------------


def components(games: np.ndarray) -> list[list[int]]:
    """Connected groups of models in the comparison graph (an edge = at least one battle)."""
    K = len(games)
    adjacent = games > 0
    label = np.full(K, -1)
    groups = []
    for start in range(K):
        if label[start] >= 0:
            continue
        label[start] = len(groups)
        group, frontier = [start], [start]
        while frontier:
            reached = np.flatnonzero(adjacent[frontier].any(axis=0) & (label < 0))
            label[reached] = len(groups)
            group.extend(reached.tolist())
            frontier = reached.tolist()
        groups.append(sorted(group))
    return groups


@dataclass
class Leaderboard:
    """Per-model arrays are in leaderboard order (best rating first); matrices too."""

    models: list[str]
    rating: np.ndarray
    low: np.ndarray  # 95% bootstrap interval
    high: np.ndarray
    rank: np.ndarray  # interval-respecting
    wins: np.ndarray  # per model, against the field
    losses: np.ndarray
    ties: np.ndarray
    scores: np.ndarray  # [i, j] points i took from j (win 1, tie 0.5)
    games: np.ndarray  # [i, j] battles between i and j
    anchor: str | None
    rounds: int
    seed: int
    both_bad: str
    votes: int  # standing votes read
    used: int  # battles in the fit
    self_pairs: int
    both_bad_dropped: int
    unrated: list[str] = field(default_factory=list)  # seen, but never against another model
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def played(self) -> np.ndarray:
        return self.games.sum(axis=1)

    @property
    def win_rate(self) -> np.ndarray:
        """Per model: points / battles against everyone it met (ties 0.5)."""
        return self.scores.sum(axis=1) / np.maximum(self.played, 1)

    @property
    def win_matrix(self) -> np.ndarray:
        """[i, j]: i's points per battle against j (ties 0.5); NaN where they never met."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.games > 0, self.scores / self.games, np.nan)

    def scale_note(self) -> str:
        anchor = f"{self.anchor} = {CENTER:.0f}" if self.anchor else f"mean of the models = {CENTER:.0f}"
        return (
            f"Elo-like scale: {anchor}; +400 points = 10:1 odds of winning. "
            f"95% intervals from {self.rounds} bootstrap rounds (seed {self.seed})."
        )

    def notes(self) -> list[str]:
        """What went into the numbers and what was left out."""
        lines = [f"{self.used} battles between {len(self.models)} models, from {self.votes} standing votes"]
        if self.self_pairs:
            lines.append(
                f"{self.self_pairs} votes left out: both answers from the same model "
                "(they say nothing about ratings)"
            )
        if self.both_bad == "drop":
            lines.append(f"{self.both_bad_dropped} both-bad votes left out (--both-bad drop)")
        else:
            lines.append("ties and both-bad votes count half a win to each side")
        if self.unrated:
            lines.append(f"no rating for {', '.join(self.unrated)}: no vote against another model")
        return lines

    def to_dict(self) -> dict[str, Any]:
        def num(x, digits=1):
            x = float(x)
            return None if math.isnan(x) else round(x, digits)

        rows = [
            {
                "rank": int(self.rank[k]),
                "model": m,
                "rating": num(self.rating[k]),
                "ci": [num(self.low[k]), num(self.high[k])],
                "votes": int(self.played[k]),
                "wins": int(self.wins[k]),
                "losses": int(self.losses[k]),
                "ties": int(self.ties[k]),
                "win_rate": num(self.win_rate[k], 4),
            }
            for k, m in enumerate(self.models)
        ]
        return {
            "models": rows,
            "anchor": self.anchor,
            "scale": {"center": CENTER, "points_per_logit": SCALE},
            "rounds": self.rounds,
            "seed": self.seed,
            "both_bad": self.both_bad,
            "votes": self.votes,
            "battles": self.used,
            "self_pairs_ignored": self.self_pairs,
            "both_bad_dropped": self.both_bad_dropped,
            "unrated": list(self.unrated),
            "pairs": {
                "models": list(self.models),
                "win_rate": [[num(x, 4) for x in row] for row in self.win_matrix],
                "games": self.games.astype(int).tolist(),
            },
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def table(self) -> str:
        """The ranked table as fixed-width text."""
        width = max([5] + [len(m) for m in self.models])
        lines = [
            f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {'95% CI':^17}  {'votes':>8}  {'win rate':>8}"
        ]
        for k, m in enumerate(self.models):
            ci = "–" if math.isnan(self.low[k]) else f"{self.low[k]:7.1f} – {self.high[k]:7.1f}"
            lines.append(
                f"{int(self.rank[k]):>4}  {m:<{width}}  {self.rating[k]:7.1f}  {ci:^17}  "
                f"{int(self.played[k]):>8}  {100 * self.win_rate[k]:7.1f}%"
            )
        return "\n".join(lines)


def leaderboard(
    votes: pa.Table | Battles,
    *,
    anchor: str | None = None,
    rounds: int = 100,
    seed: int = 0,
    both_bad: str = "tie",
    ridge: float = RIDGE,
) -> Leaderboard:
    """Ratings, intervals and ranks from a votes table (or already counted Battles).

    Raises LeaderboardError when the votes cannot rank anything: no votes, fewer than two
    models, an anchor that is not one of the models, or a comparison graph in pieces
    (two groups of models never compared with each other have no common scale).
    """
    timings = {}
    t0 = time.perf_counter()
    battles = votes if isinstance(votes, Battles) else battles_from_votes(votes, both_bad)
    timings["aggregate"] = time.perf_counter() - t0
    models = battles.models
    if battles.votes == 0:
        raise LeaderboardError("no votes yet: the store holds no standing votes to rate models with")
    if battles.used == 0:
        why = []
        if battles.self_pairs:
            why.append(f"{battles.self_pairs} compare a model with itself")
        if battles.both_bad_dropped:
            why.append(f"{battles.both_bad_dropped} are both-bad votes, dropped")
        raise LeaderboardError(
            f"none of the {battles.votes} votes compares two different models "
            f"({'; '.join(why)}); ratings need votes between models. Models seen: " + ", ".join(models)
        )
    games = battles.games
    active = games.sum(axis=1) > 0
    if active.sum() < 2:
        raise LeaderboardError(
            f"only one model ({models[int(np.flatnonzero(active)[0])]}) has votes "
            "against another: a rating needs at least two models"
        )
    unrated = [models[k] for k in np.flatnonzero(~active)]
    if unrated:
        # a model seen only in self-pairs (or only in dropped both-bad votes) has no rating
        keep = np.flatnonzero(active)
        battles = Battles(
            [models[k] for k in keep],
            battles.wins[np.ix_(keep, keep)],
            battles.ties[np.ix_(keep, keep)],
            battles.both_bad[np.ix_(keep, keep)],
            votes=battles.votes,
            self_pairs=battles.self_pairs,
            both_bad_dropped=battles.both_bad_dropped,
        )
        models, games = battles.models, battles.games
    groups = components(games)
    if len(groups) > 1:
        listed = " | ".join("{" + ", ".join(models[k] for k in g) + "}" for g in groups)
        raise LeaderboardError(
            f"the comparison graph is not connected: {len(groups)} groups of models were never compared "
            f"with each other, so their ratings are not comparable: {listed}. "
            "Collect votes between models of different groups (e.g. serve an arena with models from each)."
        )
    anchor_index = None
    if anchor:
        if anchor not in models:
            raise LeaderboardError(f"unknown anchor {anchor!r}; the models are: {', '.join(models)}")
        anchor_index = models.index(anchor)

    t0 = time.perf_counter()
    theta = fit_bradley_terry(battles.scores, ridge=ridge)
    timings["fit"] = time.perf_counter() - t0
    rating = to_ratings(theta, anchor_index)
    t0 = time.perf_counter()
    if rounds > 0:
        boot = to_ratings(bootstrap_thetas(battles, rounds, seed, ridge), anchor_index)
        with np.errstate(all="ignore"):
            low, high = np.nanpercentile(boot, [2.5, 97.5], axis=0)
    else:
        low = high = np.full(len(models), np.nan)
    timings["bootstrap"] = time.perf_counter() - t0
    rank = interval_ranks(np.nan_to_num(low, nan=-np.inf), np.nan_to_num(high, nan=np.inf))

    order = np.lexsort((np.arange(len(models)), -rating))  # best first; stable on equal ratings
    ox = np.ix_(order, order)
    wins = battles.wins.sum(axis=1)
    return Leaderboard(
        models=[models[k] for k in order],
        rating=rating[order],
        low=low[order],
        high=high[order],
        rank=rank[order],
        wins=wins[order],
        losses=battles.wins.sum(axis=0)[order],
        ties=battles.ties.sum(axis=1)[order],
        scores=battles.scores[ox],
        games=games[ox],
        anchor=anchor or None,
        rounds=rounds,
        seed=seed,
        both_bad=both_bad,
        votes=battles.votes,
        used=battles.used,
        self_pairs=battles.self_pairs,
        both_bad_dropped=battles.both_bad_dropped,
        unrated=unrated,
        timings=timings,
    )
