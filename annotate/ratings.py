"""Ratings of models from human votes, with 95% bootstrap intervals, on an Elo-like scale:
the numbers behind `preflab leaderboard` and the Leaderboard tab.

    from annotate.ratings import leaderboard
    board = leaderboard(votes, anchor="smollm2", rounds=100)   # votes: model_a, model_b, choice
    print(board.table()); board.to_dict()                      # text / JSON forms

Votes become battles and battles Bradley-Terry strengths in annotate/bradley_terry.py.
This file reads top to bottom from there:

1. bootstrap intervals: resampling the battles with replacement is the same as drawing
   the counts of the aggregated cells (pair x outcome) from a multinomial, so a round
   costs one K x K fit, not a pass over the votes.
2. the scale and the ranks: rating = 1000 + (400 / ln 10) * (theta - theta_anchor), so
   400 points = 10:1 odds as in chess Elo; ranks respect the intervals.
3. the leaderboard itself (`Leaderboard`), the checks that make its numbers meaningful
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

from annotate.bradley_terry import RIDGE, Battles, battles_from_votes, fit_bradley_terry
from trainer.errors import PreflabError

# 400 rating points = a factor of 10 in the odds, as in chess Elo. theta is in natural
# log-odds, so one unit of theta is 400 / ln 10 ~ 173.7 points.
SCALE = 400.0 / math.log(10.0)
CENTER = 1000.0


PROVISIONAL_VOTES = 10  # battles a model needs before it gets a rank


class LeaderboardError(PreflabError, ValueError):
    """No meaningful leaderboard from these votes or settings; the message says why and
    what to do."""


# --------------------------------------------------------------------------------------
# 1. bootstrap intervals
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
# 2. the scale and the ranks
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
# 3. the leaderboard
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
    rank: np.ndarray  # interval-respecting; 0 for a provisional model (no rank)
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
    min_votes: int = 0  # fewer battles than this: provisional
    no_interval: list[str] = field(default_factory=list)  # the bootstrap could not vary their votes

    @property
    def provisional(self) -> np.ndarray:
        """Per model: too few battles for a rank (its interval says more than its rating)."""
        return self.games.sum(axis=1) < self.min_votes

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
        few = [m for m, p in zip(self.models, self.provisional) if p]
        if few:
            lines.append(
                f"provisional, no rank: {', '.join(few)} (fewer than {self.min_votes} votes; "
                "a rating from so few votes can move a long way)"
            )
        if self.no_interval:
            lines.append(
                f"no interval for {', '.join(self.no_interval)}: every resampled vote said the same, "
                "so the bootstrap cannot tell how sure the rating is"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        def num(x, digits=1):
            x = float(x)
            return None if math.isnan(x) else round(x, digits)

        rows = [
            {
                "rank": None if self.provisional[k] else int(self.rank[k]),
                "provisional": bool(self.provisional[k]),
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
            "provisional_below_votes": self.min_votes,
            "no_interval": list(self.no_interval),
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
            rank = "–" if self.provisional[k] else str(int(self.rank[k]))
            lines.append(
                f"{rank:>4}  {m:<{width}}  {self.rating[k]:7.1f}  {ci:^17}  "
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
    min_votes: int = PROVISIONAL_VOTES,
) -> Leaderboard:
    """Ratings, intervals and ranks from a votes table (or already counted Battles).
    A model with fewer than `min_votes` battles is provisional: rated, but not ranked,
    and it does not push other models down. An interval the bootstrap could not vary (all
    resampled votes the same) is left out (NaN), not shown as certainty.

    Raises LeaderboardError when the votes cannot rank anything: no votes, fewer than two
    models, an anchor that is not one of the models, or a comparison graph in pieces
    (two groups of models never compared with each other have no common scale).
    """
    timings = {}
    t0 = time.perf_counter()
    battles = votes if isinstance(votes, Battles) else battles_from_votes(votes, both_bad)
    timings["aggregate"] = time.perf_counter() - t0
    battles, unrated, anchor_index = checked_battles(battles, anchor)
    t0 = time.perf_counter()
    theta = fit_bradley_terry(battles.scores, ridge=ridge)
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    boot = bootstrap_thetas(battles, rounds, seed, ridge) if rounds > 0 else None
    timings["bootstrap"] = time.perf_counter() - t0
    return ranked_board(
        battles,
        theta,
        boot,
        anchor=anchor,
        unrated=unrated,
        rounds=rounds,
        seed=seed,
        both_bad=both_bad,
        min_votes=min_votes,
        timings=timings,
    )


def checked_battles(battles: Battles, anchor: str | None) -> tuple[Battles, list[str], int | None]:
    """The battles of the models that can be rated, the models that cannot (seen, but
    never against another model) and the anchor's index; LeaderboardError when the votes
    rank nothing (see `leaderboard`). Shared with the style-controlled fit
    (annotate/style_control.py), so that both boards rate the same models."""
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
    return battles, unrated, anchor_index


def ranked_board(
    battles: Battles,
    theta: np.ndarray,
    boot: np.ndarray | None,
    *,
    anchor: str | None,
    unrated: list[str],
    rounds: int,
    seed: int,
    both_bad: str,
    min_votes: int,
    timings: dict[str, float],
) -> Leaderboard:
    """The Leaderboard of fitted strengths `theta` (K,) and bootstrap strengths `boot`
    (rounds, K; None for no intervals), in battles.models' order: the scale, the
    intervals, the ranks and the order, whichever fit gave the numbers."""
    models, games = battles.models, battles.games
    anchor_index = models.index(anchor) if anchor else None
    rating = to_ratings(theta, anchor_index)
    if boot is not None:
        with np.errstate(all="ignore"):
            low, high = np.nanpercentile(to_ratings(boot, anchor_index), [2.5, 97.5], axis=0)
    else:
        low = high = np.full(len(models), np.nan)
    # Zero width means every bootstrap round saw the same votes (say 3 of 3 one way): the
    # resampling cannot tell how sure that is, so there is no interval, not a certain one.
    # (The anchor's interval is zero wide by definition: it is the fixed point of the scale.)
    degenerate = (np.abs(high - low) < 0.5) & (
        np.arange(len(models)) != (-1 if anchor_index is None else anchor_index)
    )
    # For ranking, such a model stands at its point rating: 30 votes of 30 for a over b still
    # rank a above b; only the interval is not shown.
    rank_low = np.where(degenerate, rating, np.nan_to_num(low, nan=-np.inf))
    rank_high = np.where(degenerate, rating, np.nan_to_num(high, nan=np.inf))
    low, high = np.where(degenerate, np.nan, low), np.where(degenerate, np.nan, high)
    provisional = games.sum(axis=1) < min_votes
    # A provisional model neither gets a rank nor is "clear above" anyone.
    rank = interval_ranks(np.where(provisional, -np.inf, rank_low), np.where(provisional, np.inf, rank_high))
    rank = np.where(provisional, 0, rank)

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
        min_votes=min_votes,
        no_interval=[models[k] for k in order if degenerate[k]],
    )
