"""The leaderboard: Bradley-Terry ratings of models from human votes, with 95% bootstrap
intervals, on an Elo-like scale.

    preflab leaderboard --data comparisons                      # table, centred on 1000
    preflab leaderboard --data comparisons --anchor smollm2     # smollm2 is rated 1000
    preflab leaderboard --data comparisons --json --runs runs   # machine-readable, with policy evals
    preflab leaderboard --data postgresql://me@db:5432/votes    # a PostgreSQL store, the same

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
5. the leaderboard itself, the checks that make its numbers meaningful (enough models,
   a connected comparison graph, a known anchor), and its text / JSON forms.
6. head-to-head win rates and the "reward model vs humans" view of policy evaluations.
7. the Leaderboard tab of `preflab serve` (admins only): HTML table, an inline SVG of
   the ratings with their intervals, the coloured win-rate matrix; the /leaderboard API.
8. the command line.

Everything that grows with the number of votes is Arrow / numpy over whole columns;
everything else grows with K (models), so a million votes over 50 models with 100
bootstrap rounds takes about as long as reading the store.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotate.web.html import escape as _e, pct
from trainer.store import DATA_HELP

log = logging.getLogger("preflab.leaderboard")

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
CHOICE_CODES = ("a", "b", "tie", "both_bad")   # index = outcome code
# All a leaderboard reads of a vote: the store reads nothing else (no answer text).
VOTE_COLUMNS = ["model_a", "model_b", "choice"]


class LeaderboardError(ValueError):
    """The votes cannot give a meaningful leaderboard; the message says why and what to do."""


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
    votes: int = 0              # standing votes read
    self_pairs: int = 0         # left out: model_a == model_b
    both_bad_dropped: int = 0   # left out with both_bad="drop"

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
    if (outcome < 0).any():   # the record schema forbids it; a hand-made table might not
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
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # no overflow for any x


def _log_likelihood(theta: np.ndarray, scores: np.ndarray, ridge: float) -> np.ndarray:
    """sum_ij scores_ij * log sigmoid(theta_i - theta_j) - ridge/2 |theta|^2, per batch row."""
    diff = theta[:, :, None] - theta[:, None, :]
    return (-(scores * np.logaddexp(0.0, -diff)).sum(axis=(1, 2))
            - 0.5 * ridge * (theta * theta).sum(axis=1))


def fit_bradley_terry(scores: np.ndarray, ridge: float = RIDGE, tol: float = 1e-8,
                      max_iter: int = 100) -> np.ndarray:
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
    S = np.array(scores, dtype=np.float64)   # a copy: the diagonal is cleared below
    single = S.ndim == 2
    if single:
        S = S[None]
    B, K, _ = S.shape
    S[:, np.arange(K), np.arange(K)] = 0.0   # a model against itself carries no information
    games = S + S.transpose(0, 2, 1)
    points = S.sum(axis=2)
    theta = np.zeros((B, K))
    f = _log_likelihood(theta, S, ridge)
    diagonal = np.arange(K)
    for _ in range(max_iter):
        p = _sigmoid(theta[:, :, None] - theta[:, None, :])          # P(i beats j)
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

def bootstrap_thetas(battles: Battles, rounds: int = 100, seed: int = 0,
                     ridge: float = RIDGE) -> np.ndarray:
    """theta of every bootstrap round, shape (rounds, K); NaN for a model with no battle
    in a round (it has no rating there, rather than the prior's 0).

    Resampling the n battles with replacement draws each battle i.i.d. from the empirical
    distribution over (pair, outcome) cells, so the resampled cell counts are exactly
    Multinomial(n, cell counts / n): we draw those counts directly.
    """
    K = len(battles.models)
    upper_i, upper_j = np.triu_indices(K, k=1)
    # cells per unordered pair: i beat j, j beat i, tie (both_bad included when counted)
    cells = np.concatenate([battles.wins[upper_i, upper_j], battles.wins[upper_j, upper_i],
                            battles.ties[upper_i, upper_j]]).astype(np.float64)
    n = int(cells.sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, cells / n, size=rounds).astype(np.float64)
    P = len(upper_i)
    i_won, j_won, tied = draws[:, :P], draws[:, P:2 * P], draws[:, 2 * P:]
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
        zero = theta[..., anchor:anchor + 1]
    return CENTER + SCALE * (theta - zero)


def interval_ranks(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """rank_i = 1 + the number of models whose interval lies entirely above i's.

    So a model ranks above another only when its interval is clear of it; models whose
    intervals overlap can share a rank (as LMSYS's arena ranks them)."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    clear_above = low[None, :] > high[:, None]            # [i, j]: j is clear above i
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
    low: np.ndarray            # 95% bootstrap interval
    high: np.ndarray
    rank: np.ndarray           # interval-respecting
    wins: np.ndarray           # per model, against the field
    losses: np.ndarray
    ties: np.ndarray
    scores: np.ndarray         # [i, j] points i took from j (win 1, tie 0.5)
    games: np.ndarray          # [i, j] battles between i and j
    anchor: str | None
    rounds: int
    seed: int
    both_bad: str
    votes: int                 # standing votes read
    used: int                  # battles in the fit
    self_pairs: int
    both_bad_dropped: int
    unrated: list[str] = field(default_factory=list)   # seen, but never against another model
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
        return (f"Elo-like scale: {anchor}; +400 points = 10:1 odds of winning. "
                f"95% intervals from {self.rounds} bootstrap rounds (seed {self.seed}).")

    def notes(self) -> list[str]:
        """What went into the numbers and what was left out."""
        lines = [f"{self.used} battles between {len(self.models)} models, from {self.votes} standing votes"]
        if self.self_pairs:
            lines.append(f"{self.self_pairs} votes left out: both answers from the same model "
                         "(they say nothing about ratings)")
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

        rows = [{"rank": int(self.rank[k]), "model": m, "rating": num(self.rating[k]),
                 "ci": [num(self.low[k]), num(self.high[k])], "votes": int(self.played[k]),
                 "wins": int(self.wins[k]), "losses": int(self.losses[k]), "ties": int(self.ties[k]),
                 "win_rate": num(self.win_rate[k], 4)}
                for k, m in enumerate(self.models)]
        return {"models": rows, "anchor": self.anchor, "scale": {"center": CENTER, "points_per_logit": SCALE},
                "rounds": self.rounds, "seed": self.seed, "both_bad": self.both_bad,
                "votes": self.votes, "battles": self.used, "self_pairs_ignored": self.self_pairs,
                "both_bad_dropped": self.both_bad_dropped, "unrated": list(self.unrated),
                "pairs": {"models": list(self.models),
                          "win_rate": [[num(x, 4) for x in row] for row in self.win_matrix],
                          "games": self.games.astype(int).tolist()},
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()}}

    def table(self) -> str:
        """The ranked table as fixed-width text."""
        width = max([5] + [len(m) for m in self.models])
        lines = [f"{'rank':>4}  {'model':<{width}}  {'rating':>7}  {'95% CI':^17}  {'votes':>8}  {'win rate':>8}"]
        for k, m in enumerate(self.models):
            ci = "–" if math.isnan(self.low[k]) else f"{self.low[k]:7.1f} – {self.high[k]:7.1f}"
            lines.append(f"{int(self.rank[k]):>4}  {m:<{width}}  {self.rating[k]:7.1f}  {ci:^17}  "
                         f"{int(self.played[k]):>8}  {100 * self.win_rate[k]:7.1f}%")
        return "\n".join(lines)


def leaderboard(votes: pa.Table | Battles, *, anchor: str | None = None, rounds: int = 100,
                seed: int = 0, both_bad: str = "tie", ridge: float = RIDGE) -> Leaderboard:
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
        raise LeaderboardError(f"none of the {battles.votes} votes compares two different models "
                               f"({'; '.join(why)}); ratings need votes between models. Models seen: "
                               + ", ".join(models))
    games = battles.games
    active = games.sum(axis=1) > 0
    if active.sum() < 2:
        raise LeaderboardError(f"only one model ({models[int(np.flatnonzero(active)[0])]}) has votes "
                               "against another: a rating needs at least two models")
    unrated = [models[k] for k in np.flatnonzero(~active)]
    if unrated:
        # a model seen only in self-pairs (or only in dropped both-bad votes) has no rating
        keep = np.flatnonzero(active)
        battles = Battles([models[k] for k in keep], battles.wins[np.ix_(keep, keep)],
                          battles.ties[np.ix_(keep, keep)], battles.both_bad[np.ix_(keep, keep)],
                          votes=battles.votes, self_pairs=battles.self_pairs,
                          both_bad_dropped=battles.both_bad_dropped)
        models, games = battles.models, battles.games
    groups = components(games)
    if len(groups) > 1:
        listed = " | ".join("{" + ", ".join(models[k] for k in g) + "}" for g in groups)
        raise LeaderboardError(
            f"the comparison graph is not connected: {len(groups)} groups of models were never compared "
            f"with each other, so their ratings are not comparable: {listed}. "
            "Collect votes between models of different groups (e.g. serve an arena with models from each).")
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

    order = np.lexsort((np.arange(len(models)), -rating))   # best first; stable on equal ratings
    ox = np.ix_(order, order)
    wins = battles.wins.sum(axis=1)
    return Leaderboard(
        models=[models[k] for k in order], rating=rating[order], low=low[order], high=high[order],
        rank=rank[order], wins=wins[order], losses=battles.wins.sum(axis=0)[order],
        ties=battles.ties.sum(axis=1)[order], scores=battles.scores[ox], games=games[ox],
        anchor=anchor or None, rounds=rounds, seed=seed, both_bad=both_bad, votes=battles.votes,
        used=battles.used, self_pairs=battles.self_pairs, both_bad_dropped=battles.both_bad_dropped,
        unrated=unrated, timings=timings)


# --------------------------------------------------------------------------------------
# 6. head-to-head, and the reward model's verdict next to the humans'
# --------------------------------------------------------------------------------------

def head_to_head(votes: pa.Table | None, model_x: str, model_y: str, both_bad: str = "tie") -> dict[str, Any]:
    """Human win rate of model_x over model_y (ties 0.5) with a 95% Wilson interval.

    Counts every standing vote whose two sides are x and y, in either order. n is the
    number of votes used; win_rate and ci are None when n is 0.
    """
    from annotate.stats import wilson_interval

    wins = losses = ties = 0
    if votes is not None and votes.num_rows:
        a, b, choice = votes["model_a"], votes["model_b"], votes["choice"]
        x_is_a = pc.and_(pc.equal(a, model_x), pc.equal(b, model_y))
        x_is_b = pc.and_(pc.equal(a, model_y), pc.equal(b, model_x))

        def count(mask, value):
            return int(pc.sum(pc.and_(mask, pc.equal(choice, value))).as_py() or 0)

        wins = count(x_is_a, "a") + count(x_is_b, "b")
        losses = count(x_is_a, "b") + count(x_is_b, "a")
        ties = count(x_is_a, "tie") + count(x_is_b, "tie")
        if both_bad == "tie":
            ties += count(x_is_a, "both_bad") + count(x_is_b, "both_bad")
    n = wins + losses + ties
    if n == 0:
        return {"model": model_x, "opponent": model_y, "n": 0, "wins": 0, "losses": 0, "ties": 0,
                "win_rate": None, "ci": None}
    points = wins + 0.5 * ties
    low, high = wilson_interval(points, n)
    return {"model": model_x, "opponent": model_y, "n": n, "wins": wins, "losses": losses, "ties": ties,
            "win_rate": points / n, "ci": [low, high]}


EVAL_KEYS = ("policy", "reference", "prompts", "rm_win_rate", "rm_win_rate_ci", "reward_run")


def policy_evals(runs_dir: str | os.PathLike, votes: pa.Table | None) -> list[dict[str, Any]]:
    """Every runs/<run_id>/eval.json (a policy's reward-model win rate over its reference
    on held-out prompts) next to the humans' head-to-head win rate of the same two models.

    In the arena a policy's answers carry its run id as model id, so the human side is
    head_to_head(votes, policy, reference). A file that cannot be read is skipped with a
    warning naming it.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob("*/eval.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            missing = [k for k in EVAL_KEYS if k not in record]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (OSError, ValueError) as e:
            log.warning("%s: skipped (%s)", path, e)
            continue
        entry = {k: record[k] for k in EVAL_KEYS}
        entry["file"] = str(path)   # not "path": gradio takes a dict with "path" for a file to send
        entry["human"] = head_to_head(votes, str(record["policy"]), str(record["reference"]))
        out.append(entry)
    return out


def _pct(x: float | None) -> str:
    return pct(x, 1)


def human_text(h: dict[str, Any]) -> str:
    if not h["n"]:
        return "no votes yet"
    return f"{_pct(h['win_rate'])} ({_pct(h['ci'][0])}–{_pct(h['ci'][1])}, n={h['n']})"


def rm_text(e: dict[str, Any]) -> str:
    ci = e.get("rm_win_rate_ci") or [None, None]
    return f"{_pct(e['rm_win_rate'])} ({_pct(ci[0])}–{_pct(ci[1])}, {e['prompts']} prompts)"


def evals_table(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return "no policy evaluations (runs/<id>/eval.json) found"
    rows = [("policy", "reference", "reward model win rate", "human win rate")]
    rows += [(e["policy"], e["reference"], rm_text(e), human_text(e["human"])) for e in evals]
    widths = [max(len(str(r[c])) for r in rows) for c in range(4)]
    return "\n".join("  ".join(f"{str(v):<{w}}" for v, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------------------
# 7. the Leaderboard tab (every model name escaped in HTML: names come from pair files)
# --------------------------------------------------------------------------------------

def table_html(board: Leaderboard) -> str:
    head = ("<tr><th>rank</th><th>model</th><th>rating</th><th>95% CI</th><th>votes</th>"
            "<th>W / L / T</th><th>win rate</th></tr>")
    rows = []
    for k, m in enumerate(board.models):
        ci = "–" if math.isnan(board.low[k]) else f"{board.low[k]:.0f} – {board.high[k]:.0f}"
        anchor = ' class="anchor"' if m == board.anchor else ""
        rows.append(f'<tr{anchor} data-model="{_e(m)}"><td>{int(board.rank[k])}</td><td class="model">{_e(m)}</td>'
                    f"<td>{board.rating[k]:.0f}</td><td>{ci}</td><td>{int(board.played[k])}</td>"
                    f"<td>{int(board.wins[k])} / {int(board.losses[k])} / {int(board.ties[k])}</td>"
                    f"<td>{100 * board.win_rate[k]:.1f}%</td></tr>")
    return f'<table class="lb-table" id="lb-ranked"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _nice_step(span: float) -> float:
    """A round tick step giving about 6 ticks over span."""
    raw = max(span, 1e-9) / 6
    power = 10 ** math.floor(math.log10(raw))
    return next(s * power for s in (1, 2, 2.5, 5, 10) if s * power >= raw)


def plot_svg(board: Leaderboard) -> str:
    """Ratings as dots with their 95% intervals as bars, best at the top: an inline SVG
    (gradio's plots have no error bars), sized to the number of models."""
    K = len(board.models)
    label_w, plot_w, right_pad, row_h, top, bottom = 200, 560, 20, 22, 14, 36
    width, height = label_w + plot_w + right_pad, top + K * row_h + bottom
    finite = [v for v in (*board.low, *board.high, *board.rating, CENTER) if not math.isnan(v)]
    lo, hi = min(finite), max(finite)
    step = _nice_step(hi - lo)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if hi == lo:
        lo, hi = lo - step, hi + step

    def x(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lb-plot" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="ratings with 95% intervals" '
             f'font-family="ui-sans-serif, system-ui, sans-serif" font-size="12">']
    tick = lo
    while tick <= hi + 1e-9:
        parts.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top - 4}" y2="{top + K * row_h}" '
                     f'stroke="#e4e4e7"/><text x="{x(tick):.1f}" y="{top + K * row_h + 16}" '
                     f'text-anchor="middle" fill="#71717a">{tick:g}</text>')
        tick += step
    parts.append(f'<line x1="{x(CENTER):.1f}" x2="{x(CENTER):.1f}" y1="{top - 4}" y2="{top + K * row_h}" '
                 f'stroke="#a1a1aa" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{label_w + plot_w / 2}" y="{height - 4}" text-anchor="middle" fill="#52525b">'
                 f'rating (95% bootstrap interval)</text>')
    for k, m in enumerate(board.models):
        y = top + k * row_h + row_h / 2
        short = m if len(m) <= 28 else m[:27] + "…"
        parts.append(f'<g class="lb-row" data-model="{_e(m)}"><title>{_e(m)}: {board.rating[k]:.0f}'
                     + ("" if math.isnan(board.low[k]) else f" ({board.low[k]:.0f}–{board.high[k]:.0f})")
                     + f'</title><text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end" fill="#27272a">'
                     f'{_e(short)}</text>')
        if not math.isnan(board.low[k]):
            parts.append(f'<line x1="{x(board.low[k]):.1f}" x2="{x(board.high[k]):.1f}" y1="{y:.1f}" '
                         f'y2="{y:.1f}" stroke="#6366f1" stroke-width="3" stroke-linecap="round"/>')
        parts.append(f'<circle cx="{x(board.rating[k]):.1f}" cy="{y:.1f}" r="4.5" fill="#312e81"/></g>')
    parts.append("</svg>")
    return '<div class="lb-plot-box">' + "".join(parts) + "</div>"


def _cell_colour(rate: float) -> str:
    """Red (0%) through white (50%) to blue (100%)."""
    t = max(0.0, min(1.0, rate))
    if t < 0.5:
        s = (0.5 - t) * 2
        return f"rgb(255,{255 - 120 * s:.0f},{255 - 120 * s:.0f})"
    s = (t - 0.5) * 2
    return f"rgb({255 - 140 * s:.0f},{255 - 110 * s:.0f},255)"


def matrix_html(board: Leaderboard) -> str:
    """Win rate of the row model against the column model (ties 0.5), coloured, with the
    number of votes of the pair under it; best-rated models first."""
    rates, games = board.win_matrix, board.games
    head = "".join(f'<th title="{_e(m)}"><div class="col">{_e(m)}</div></th>' for m in board.models)
    rows = []
    for i, m in enumerate(board.models):
        cells = []
        for j, other in enumerate(board.models):
            if i == j:
                cells.append('<td class="self"></td>')
            elif games[i, j] == 0:
                cells.append(f'<td class="none" title="{_e(m)} vs {_e(other)}: no votes">–</td>')
            else:
                cells.append(f'<td style="background:{_cell_colour(rates[i, j])}" '
                             f'title="{_e(m)} vs {_e(other)}: {100 * rates[i, j]:.1f}% of {int(games[i, j])} votes">'
                             f'{100 * rates[i, j]:.0f}%<small>{int(games[i, j])}</small></td>')
        rows.append(f'<tr><th class="row">{_e(m)}</th>{"".join(cells)}</tr>')
    return (f'<div class="lb-matrix-box"><table class="lb-matrix"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def evals_html(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return ('<p class="lb-note">No policy evaluations yet: a policy run writes '
                '<code>runs/&lt;id&gt;/eval.json</code> with its reward-model win rate over the reference.</p>')
    rows = "".join(f"<tr><td>{_e(e['policy'])}</td><td>{_e(e['reference'])}</td><td>{_e(rm_text(e))}</td>"
                   f"<td>{_e(human_text(e['human']))}</td></tr>" for e in evals)
    return ('<table class="lb-table lb-evals"><thead><tr><th>policy</th><th>reference</th>'
            '<th>reward model win rate (held-out prompts)</th><th>human win rate (arena votes)</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


LEADERBOARD_CSS = """
.lb-table { border-collapse: collapse; font-variant-numeric: tabular-nums; width: auto; min-width: 60%; }
.lb-table th, .lb-table td { padding: 4px 10px; border-bottom: 1px solid var(--border-color-primary); text-align: right; }
.lb-table th:nth-child(2), .lb-table td.model, .lb-evals td, .lb-evals th { text-align: left; }
.lb-table tr.anchor td { font-weight: 650; }
.lb-plot-box, .lb-matrix-box { overflow-x: auto; }
.lb-plot { max-width: 100%; height: auto; }
.lb-matrix { border-collapse: collapse; font-size: 0.8em; font-variant-numeric: tabular-nums; }
.lb-matrix td { width: 46px; min-width: 46px; text-align: center; padding: 3px 2px; border: 1px solid #fff; color: #18181b; }
.lb-matrix td small { display: block; font-size: 0.8em; color: #52525b; }
.lb-matrix td.self { background: #f4f4f5; }
.lb-matrix td.none { color: #a1a1aa; }
.lb-matrix th.row { text-align: right; padding-right: 6px; white-space: nowrap; }
.lb-matrix th .col { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; max-height: 160px;
  overflow: hidden; text-overflow: ellipsis; }
.lb-note { color: var(--body-text-color-subdued); }
.lb-error { color: var(--error-text-color, #b91c1c); }
"""


MEAN_ANCHOR = "(mean of all models)"


def page(data: str | os.PathLike, runs_dir: str | os.PathLike, anchor: str | None = None,
         rounds: int = 100, seed: int = 0) -> dict[str, Any]:
    """Everything the Leaderboard tab shows for the store `data` (a directory, or a
    postgresql:// URL): HTML strings, the model names (for the anchor dropdown) and the
    anchor in use. A LeaderboardError becomes `message` (ok False) with
    the other parts empty; an anchor that is no longer among the models falls back to the
    mean, with a note."""
    from trainer.store import StoreError, read_comparisons

    try:
        votes = read_comparisons(data, columns=VOTE_COLUMNS)
    except StoreError as e:   # e.g. the database is down: said on the tab, like the CLI says it
        return {"ok": False, "message": str(e), "models": [], "anchor": None, "table": "",
                "plot": "", "matrix": "", "evals": "", "board": None}
    evals = evals_html(policy_evals(runs_dir, votes))
    anchor = None if anchor in (None, "", MEAN_ANCHOR) else anchor
    battles = battles_from_votes(votes)
    note = ""
    if anchor is not None and anchor not in battles.models:
        note = f"The anchor {anchor} has no votes now; the mean of the models is 1000 instead. "
        anchor = None
    try:
        board = leaderboard(battles, anchor=anchor, rounds=rounds, seed=seed)
    except LeaderboardError as e:
        return {"ok": False, "message": str(e), "models": battles.models, "anchor": None, "table": "",
                "plot": "", "matrix": "", "evals": evals, "board": None}
    message = note + " · ".join([*board.notes(), board.scale_note()])
    return {"ok": True, "message": message, "models": sorted(board.models), "anchor": board.anchor,
            "table": table_html(board), "plot": plot_svg(board), "matrix": matrix_html(board),
            "evals": evals, "board": board}


def build_leaderboard_tab(demo, service, tab, admin) -> None:
    """The Leaderboard tab of `preflab serve`; call inside `with gr.Tab(...) as tab:`.

    Admins only, like the Dashboard: annotators are blind judges and must not see which
    model is winning. The tab is shown by its own load event, and `admin(request)` (which
    raises gr.Error for anyone else) guards every handler, so hiding it is not the only
    defence. Also an API endpoint, /leaderboard, with the numbers as JSON.
    """
    import gradio as gr

    gr.Markdown("Bradley-Terry ratings of every model from the human votes (a win counts 1, a tie or "
                "both-bad half a win to each side), with 95% bootstrap intervals. A model ranks above "
                "another only when its interval is clear of the other's.")
    with gr.Row():
        anchor = gr.Dropdown(label="Anchor: the model rated 1000", choices=[MEAN_ANCHOR], value=MEAN_ANCHOR,
                             elem_id="lb-anchor", scale=3, interactive=True)
        refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="lb-refresh")
    css = dict(js_on_load=None, css_template=LEADERBOARD_CSS)
    status = gr.HTML(elem_id="lb-status", **css)
    table = gr.HTML(elem_id="lb-table", **css)
    plot = gr.HTML(elem_id="lb-plot", **css)
    with gr.Accordion("Win rates: row model against column model (ties 0.5), votes under each", open=True):
        matrix = gr.HTML(elem_id="lb-matrix", **css)
    with gr.Accordion("Reward model vs humans: each policy against its reference", open=True):
        evals = gr.HTML(elem_id="lb-evals", **css)

    def on_load(request: gr.Request):
        return gr.Tab(visible=service.is_admin(request))

    def on_open(current, request: gr.Request):
        admin(request)
        view = page(service.data, service.runs_dir, current)
        cls = "lb-note" if view["ok"] else "lb-note lb-error"
        stamp = time.strftime("%H:%M:%S")
        return (gr.Dropdown(choices=[MEAN_ANCHOR, *view["models"]], value=view["anchor"] or MEAN_ANCHOR),
                f'<p class="{cls}" id="lb-message">{_e(view["message"])} (updated {stamp})</p>',
                view["table"], view["plot"], view["matrix"], view["evals"])

    def leaderboard_api(anchor: str = "", request: gr.Request = None) -> dict:
        """Ratings, 95% intervals, ranks, win-rate matrix and vote counts (admins only).
        anchor: the model rated 1000; empty for the mean of the models."""
        from trainer.store import read_comparisons

        admin(request)
        votes = read_comparisons(service.data, columns=VOTE_COLUMNS)
        try:
            out = leaderboard(votes, anchor=anchor or None).to_dict()
        except LeaderboardError as e:
            raise gr.Error(str(e)) from None
        out["policy_evals"] = policy_evals(service.runs_dir, votes)
        return out

    outputs = [anchor, status, table, plot, matrix, evals]
    kw = dict(api_visibility="private", concurrency_limit=2, concurrency_id="leaderboard")
    demo.load(on_load, None, tab, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    tab.select(on_open, [anchor], outputs, **kw)
    refresh.click(on_open, [anchor], outputs, **kw)
    anchor.input(on_open, [anchor], outputs, **kw)
    gr.api(leaderboard_api, api_name="leaderboard", concurrency_limit=2, concurrency_id="leaderboard")


# --------------------------------------------------------------------------------------
# 8. the command line
# --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Rank the models of a comparison store by Bradley-Terry ratings from the human votes "
        "(a win counts 1, a tie half a win to each side), with 95% bootstrap intervals, on an "
        "Elo-like scale: 1000 is the mean of the models (or the --anchor model), +400 points "
        "means 10:1 odds of winning. A model ranks above another only when its interval is clear "
        "of the other's. Votes comparing a model with itself are left out.")
    p.add_argument("--data", required=True, metavar="STORE",
                   help=DATA_HELP)
    p.add_argument("--anchor", metavar="MODEL", default=None,
                   help="the model rated exactly 1000; without it the mean of all models is 1000")
    p.add_argument("--rounds", type=int, default=100, metavar="N",
                   help="bootstrap rounds for the 95%% intervals (0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--both-bad", choices=BOTH_BAD_MODES, default="tie",
                   help="'both bad' votes: a tie (half a win each, as FastChat does) or left out")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (ratings, intervals, ranks, win-rate matrix, counts) instead of the table")
    p.add_argument("--runs", metavar="DIR", default=None,
                   help="also list policy evaluations (DIR/<run_id>/eval.json): the reward model's win rate "
                        "of a policy over its reference next to the humans' win rate from the votes")


def run(args: argparse.Namespace) -> int:
    from trainer.store import describe, read_comparisons

    if args.rounds < 0:
        print(f"error: --rounds must be 0 or more, got {args.rounds}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    # A store problem (missing, unreadable, database down) is a StoreError, which
    # annotate/cli.py prints as one line.
    votes = read_comparisons(args.data, columns=VOTE_COLUMNS)
    read_s = time.perf_counter() - t0
    try:
        board = leaderboard(votes, anchor=args.anchor, rounds=args.rounds, seed=args.seed,
                            both_bad=args.both_bad)
    except LeaderboardError as e:
        print(f"error: {describe(args.data)}: {e}", file=sys.stderr)
        return 2
    board.timings = {"read": read_s, **board.timings}
    evals = policy_evals(args.runs, votes) if args.runs else None
    if args.json:
        out = board.to_dict()
        if evals is not None:
            out["policy_evals"] = evals
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for line in board.notes():
        print(line)
    print(board.scale_note())
    print()
    print(board.table())
    if evals is not None:
        print()
        print("reward model vs humans: win rate of each policy over its reference")
        print(evals_table(evals))
    t = board.timings
    print(f"\nread {t['read']:.2f}s, counted {t['aggregate']:.2f}s, fit {t['fit']:.3f}s, "
          f"bootstrap {t['bootstrap']:.2f}s", file=sys.stderr)
    return 0
