"""The contextual Bradley-Terry fit behind the style-controlled leaderboard: model
strengths and style coefficients together, maximum likelihood with an L2 penalty, and
its bootstrap. Pure numpy; annotate/style_control.py builds the inputs from votes and
turns the result into a leaderboard.

    from annotate.style_fit import style_data, fit_style_bt, bootstrap_style
    data = style_data(model_a, model_b, score_a, diffs, K)   # diffs: (n, F) style differences
    params = fit_style_bt(data)                               # (K + F,): theta, then beta
    boot = bootstrap_style(data, rounds=100, seed=0, start=params)   # (rounds, K + F)

The model, for a battle between model_a = i and model_b = j with style features z
(each the standardised (a - b) / (a + b + 1) of one feature, trainer/style_features.py):

    P(a wins) = sigmoid(theta_i - theta_j + beta . z)

A tie scores 0.5 to each side, as in the plain fit (annotate/bradley_terry.py): the
log-likelihood of a battle is y log sigmoid(eta) + (1 - y) log sigmoid(-eta) with y = 1,
0.5 or 0. The penalty is ridge / 2 * |theta, beta|^2 (as FastChat's contextual fit
penalises every parameter). A vote between two answers of one model has theta_i -
theta_j = 0: it informs beta only, and it is kept (in preflab most pairs are two samples
of one model, and they are the cleanest evidence of what style alone does).

Why Newton again, and how it stays fast on a million battles: K + F parameters (55 for
50 models), so the exact Hessian is cheap to solve; what costs is the pass over the
battles. The battles are sorted once by pair of models, so per-pair sums are one
`np.add.reduceat` over contiguous rows, and every per-battle quantity is a handful of
vectorised passes (the linear predictor, one sigmoid, one log-sigmoid, the sums). The
line search moves along the predictor's own direction (eta + t * d_eta), so a trial step
costs one log-sigmoid, not a new predictor. A bootstrap round is the same fit with
per-battle counts as weights (a resample of the battles with replacement), started from
the full fit: 2-3 Newton steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from annotate.bradley_terry import RIDGE


@dataclass
class StyleData:
    """Battles sorted by (model_a, model_b), the ones between different models first.

    seg_i, seg_j, seg_start: per pair of models (a segment of consecutive battles), the
    model on side a, on side b and the segment's first battle; battles [rated, n) are
    between two answers of one model. y: model_a's score (1, 0.5, 0). z: (F, n)
    standardised style features, a row per feature (contiguous for the sums).
    seg_of: per battle between models, its segment. order: the battle each row came
    from (rows = battles[order])."""

    K: int
    seg_i: np.ndarray
    seg_j: np.ndarray
    seg_start: np.ndarray
    rated: int
    y: np.ndarray
    z: np.ndarray
    seg_of: np.ndarray
    order: np.ndarray

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def F(self) -> int:
        return len(self.z)


def style_data(
    model_a: np.ndarray, model_b: np.ndarray, score_a: np.ndarray, z: np.ndarray, K: int
) -> StyleData:
    """StyleData from per-battle arrays: model indices (0..K-1), model_a's score and the
    (n, F) standardised features (annotate/style_control.py standardises them)."""
    model_a = np.asarray(model_a, np.int64)
    model_b = np.asarray(model_b, np.int64)
    key = np.where(model_a == model_b, K * K, model_a * K + model_b)  # self-pairs last
    order = np.argsort(key, kind="stable")
    key = key[order]
    rated = int(np.searchsorted(key, K * K))
    keys, starts = np.unique(key[:rated], return_index=True)
    return StyleData(
        K=K,
        seg_i=keys // K,
        seg_j=keys % K,
        seg_start=starts.astype(np.int64),
        rated=rated,
        y=np.ascontiguousarray(np.asarray(score_a, np.float64)[order]),
        z=np.ascontiguousarray(np.asarray(z, np.float64)[order].T.reshape(-1, len(order))),
        seg_of=np.repeat(np.arange(len(keys)), np.diff(np.append(starts, rated))),
        order=order,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(x)  # no overflow for any x; several times faster than tanh or logaddexp here


def _predictor(data: StyleData, params: np.ndarray) -> np.ndarray:
    """The linear predictor of every battle: theta_a - theta_b (0 for a self-pair) + beta . z."""
    K = data.K
    eta = data.z.T @ params[K:] if data.F else np.zeros(data.n)
    diff = params[:K][data.seg_i] - params[:K][data.seg_j]
    eta[: data.rated] += diff[data.seg_of]
    return eta


def fit_style_bt(
    data: StyleData,
    weights: np.ndarray | None = None,
    *,
    ridge: float = RIDGE,
    start: np.ndarray | None = None,
    tol: float = 1e-8,
    max_iter: int = 100,
) -> np.ndarray:
    """Penalised maximum likelihood (theta (K), beta (F)) as one vector of K + F.

    weights: per battle (in the order the battles were given to style_data), how often
    it counts (a bootstrap round's resample counts); None = once each. start: where
    Newton starts (zeros by default; the full fit for a bootstrap round). tol: stop when
    no parameter moved more than this (1e-8 in theta is 2e-6 rating points)."""
    c = None if weights is None else np.asarray(weights, np.float64)[data.order]
    params = np.zeros(data.K + data.F) if start is None else np.array(start, np.float64)
    return _newton(data, c, params, _sigmoid(_predictor(data, params)), ridge, tol, max_iter)


def _newton(
    data: StyleData,
    c: np.ndarray | None,
    params: np.ndarray,
    p: np.ndarray,
    ridge: float,
    tol: float,
    max_iter: int,
) -> np.ndarray:
    """Newton's method from `params`, where P(a wins) is `p`; weights `c` already in the
    battles' sorted order.

    The line search needs no log-likelihood (two log-sigmoids per battle, the costliest
    pass there would be): along the Newton direction the penalised log-likelihood phi(t)
    is concave, so phi'(t) >= 0 means phi rose all the way from 0 to t, and phi'(t) costs
    one sigmoid, which the next step reuses as its p. A step past the maximum (phi'(t) <
    0) is shortened to just short of where phi' crosses 0 (secant; at most half the last
    trial after the first). With ridge > 0 the objective is strictly concave, and every
    accepted step rises, so this converges from anywhere."""
    K, F, rated = data.K, data.F, data.rated
    eta = _predictor(data, params)
    sums = np.empty((2 + F, rated))
    diagonal = np.arange(K + F)
    for _ in range(max_iter):
        r = data.y - p  # d loglik / d eta
        w = p * (1.0 - p)  # -d2 loglik / d eta2
        if c is not None:
            r *= c
            w *= c
        grad = np.empty(K + F)
        # Per pair of models: the sums of r, w and w * z over its battles, in one pass.
        sums[0], sums[1] = r[:rated], w[:rated]
        if F:
            np.multiply(data.z[:, :rated], w[:rated], out=sums[2:])
        seg = np.add.reduceat(sums, data.seg_start, axis=1) if rated else np.zeros((2 + F, 0))
        seg_r, seg_w, seg_wz = seg[0], seg[1], seg[2:]
        grad[:K] = np.bincount(data.seg_i, seg_r, K) - np.bincount(data.seg_j, seg_r, K)
        grad[K:] = data.z @ r
        grad -= ridge * params
        # Minus the Hessian: the theta block is the Laplacian of the pair weights, the
        # cross block per model the signed sums of w z, the beta block z' diag(w) z.
        A = np.bincount(data.seg_i * K + data.seg_j, seg_w, K * K).reshape(K, K)
        A = A + A.T
        H = np.zeros((K + F, K + F))
        H[:K, :K] = -A
        H[diagonal[:K], diagonal[:K]] = A.sum(axis=1)
        for f in range(F):
            cross = np.bincount(data.seg_i, seg_wz[f], K) - np.bincount(data.seg_j, seg_wz[f], K)
            H[:K, K + f] = H[K + f, :K] = cross
        if F:  # the w * z of the battles between models is already in sums
            H[K:, K:] = sums[2:] @ data.z[:, :rated].T + (data.z[:, rated:] * w[rated:]) @ data.z[:, rated:].T
        H[diagonal, diagonal] += ridge
        step = np.linalg.solve(H, grad)
        if np.abs(step).max() < tol:  # a move this small needs no line search
            return params + step
        d_eta = _predictor(data, step)
        slope0 = float(grad @ step)  # phi'(0) > 0: H is positive definite
        t = 1.0
        for trial in range(60):
            eta_t = eta + t * d_eta
            p_new = _sigmoid(eta_t)
            r_new = data.y - p_new
            if c is not None:
                r_new *= c
            slope = float(r_new @ d_eta) - ridge * float((params + t * step) @ step)
            if slope >= 0.0:
                break  # phi'(t) >= 0: phi rose all the way from 0 to t
            # Past the maximum (near the optimum about half of all full Newton steps land
            # a hair past it): just short of the secant's zero of phi' on [0, t], where
            # phi' is nearly linear; if that too was past it, at most half the last trial.
            secant = 0.999 * t * slope0 / (slope0 - slope)
            t = secant if trial == 0 else min(secant, 0.5 * t)
        params, p, eta = params + t * step, p_new, eta_t
    return params


def bootstrap_style(
    data: StyleData,
    rounds: int = 100,
    seed: int = 0,
    *,
    ridge: float = RIDGE,
    start: np.ndarray | None = None,
    tol: float = 1e-6,
) -> np.ndarray:
    """(rounds, K + F) parameters, one fit per resample of the battles with replacement.

    A resample is drawn as per-battle counts (bincount of n uniform draws: the
    nonparametric bootstrap exactly), the features fixed (standardised once on all
    votes, so every round's beta is on one scale). Each round starts from `start` (the
    full fit); tol 1e-6 is 2e-4 rating points, far inside any interval."""
    rng = np.random.default_rng(seed)
    n, K = data.n, data.K
    out = np.empty((rounds, K + data.F))
    if start is None:
        start = fit_style_bt(data, ridge=ridge)
    start = np.asarray(start, np.float64)
    p0 = _sigmoid(_predictor(data, start))  # the same start every round: one sigmoid for all
    for k in range(rounds):
        # Counts drawn straight in the sorted order: the battles are exchangeable under
        # resampling, so this is the same distribution without a gather per round.
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        out[k] = _newton(data, counts, start.copy(), p0, ridge, tol, 100)
        # A model with no battle in this resample has no rating in it (NaN, as the plain
        # bootstrap says), rather than the penalty's pull towards 0.
        if data.rated:
            seg = np.add.reduceat(counts[: data.rated], data.seg_start)
            played = (np.bincount(data.seg_i, seg, K) + np.bincount(data.seg_j, seg, K)) > 0
            out[k, :K][~played] = np.nan
    return out
