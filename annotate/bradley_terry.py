"""The Bradley-Terry model of human votes: votes counted as battles between models, and
the maximum-likelihood strengths of the models. The statistics under annotate/ratings.py,
which turns these strengths into a leaderboard (bootstrap intervals, the Elo-like scale,
ranks).

    from annotate.bradley_terry import battles_from_votes, fit_bradley_terry
    battles = battles_from_votes(votes)          # votes: model_a, model_b, choice
    theta = fit_bradley_terry(battles.scores)    # natural log-odds, one per battles.models

The file reads top to bottom:

1. votes -> battles: every standing vote is a battle between model_a and model_b; they
   are counted per ordered pair of models. A win is worth 1 to the winner; a tie 0.5 to
   each side; "both bad" is a tie by default (as FastChat's arena does: neither answer
   was preferred), or dropped. A vote where both answers come from the same model says
   nothing about ratings (it compares two samples of one model) and is left out, counted.
2. the Bradley-Terry fit: P(i beats j) = sigmoid(theta_i - theta_j), maximum likelihood
   on the K x K matrix of scores (ties as half wins), by Newton's method on all K
   parameters at once, batched over bootstrap rounds. See `fit_bradley_terry`.

Counting is Arrow / numpy over whole columns; the fit grows with K (models) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
