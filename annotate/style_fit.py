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

Why Newton again, and how it stays fast on a million battles: K + F parameters (54 for
50 models and 4 features), so the exact Hessian is cheap to solve; what costs is the pass
over the battles. The battles are sorted once by pair of models, so per-pair sums are
one `np.add.reduceat` over contiguous rows and a pair's rating difference is one
`np.repeat`; every step is a handful of vectorised passes (the linear predictor, one
sigmoid, the sums). The line search needs no log-likelihood (_line_search says why that
is safe). A bootstrap round is the same fit with per-battle counts as weights (a
resample of the battles with replacement), made cheap as `bootstrap_style` explains: one
Hessian for all rounds, a first step without a sigmoid, float32 passes with float64
sums, the rounds on threads. Measured: bench/leaderboard.py --only-style-control.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

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
    seg_len: the battles in each segment. order: the battle each row came from (rows =
    battles[order])."""

    K: int
    seg_i: np.ndarray
    seg_j: np.ndarray
    seg_start: np.ndarray
    rated: int
    y: np.ndarray
    z: np.ndarray
    seg_len: np.ndarray
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
        seg_len=np.diff(np.append(starts, rated)),
        order=order,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """P(a wins) from the predictor, in the predictor's precision: expit in float64 (no
    overflow for any x); in float32 (the bootstrap rounds) through float32's vectorised
    exp, several times quicker."""
    if x.dtype != np.float32:
        return expit(x)
    # exp(-x) overflows float32 past 88; clipped at 80 it is still 0 to float32's eyes as
    # a probability, and no floating-point warning (whose context manager costs more than
    # the clip) is needed.
    e = np.minimum(-x, np.float32(80.0))
    np.exp(e, out=e)
    e += 1.0
    return np.reciprocal(e, out=e)


def _predictor(data: StyleData, params: np.ndarray) -> np.ndarray:
    """The linear predictor of every battle, in the data's precision: theta_a - theta_b
    (0 for a self-pair) + beta . z."""
    K, dtype = data.K, data.y.dtype
    # beta @ z: z's rows are contiguous, one gemv
    eta = params[K:].astype(dtype) @ data.z if data.F else np.zeros(data.n, dtype)
    diff = (params[:K][data.seg_i] - params[:K][data.seg_j]).astype(dtype)
    eta[: data.rated] += np.repeat(diff, data.seg_len)  # a segment's battles are contiguous
    return eta


def single_precision(data: StyleData) -> StyleData:
    """The same battles with y and z in float32, for the bootstrap rounds: half the
    memory traffic of every pass and float32's vectorised exp. Right where it matters:
    per-pair sums still accumulate in float64, and the rounding of the float32 sums over
    a million battles moves a parameter by ~1e-8, a thousandth of the rounds' tolerance."""
    return replace(data, y=data.y.astype(np.float32), z=data.z.astype(np.float32))


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


def _gradient(data: StyleData, r: np.ndarray, params: np.ndarray, ridge: float, seg_r=None) -> np.ndarray:
    """The penalised log-likelihood's gradient from r = d loglik / d eta per battle
    (weights included); seg_r: r's per-pair sums when already summed."""
    K, rated = data.K, data.rated
    if seg_r is None:
        seg_r = np.add.reduceat(r[:rated], data.seg_start, dtype=np.float64) if rated else np.zeros(0)
    grad = np.empty(K + data.F)
    grad[:K] = np.bincount(data.seg_i, seg_r, K) - np.bincount(data.seg_j, seg_r, K)
    grad[K:] = data.z @ r
    return grad - ridge * params


def _gradient_hessian(data: StyleData, p: np.ndarray, c: np.ndarray | None, params: np.ndarray, ridge: float):
    """(gradient, minus the Hessian) of the penalised log-likelihood where P(a wins) = p."""
    K, F, rated = data.K, data.F, data.rated
    r = data.y - p  # d loglik / d eta
    w = p * (1.0 - p)  # -d2 loglik / d eta2
    if c is not None:
        r *= c
        w *= c
    # Per pair of models: the sums of r, w and w * z over its battles, in one pass.
    sums = np.empty((2 + F, rated), p.dtype)
    sums[0], sums[1] = r[:rated], w[:rated]
    if F:
        np.multiply(data.z[:, :rated], w[:rated], out=sums[2:])
    seg = np.add.reduceat(sums, data.seg_start, axis=1, dtype=np.float64) if rated else np.zeros((2 + F, 0))
    grad = _gradient(data, r, params, ridge, seg_r=seg[0])
    # The theta block is the Laplacian of the pair weights, the cross block per model the
    # signed sums of w z, the beta block z' diag(w) z.
    A = np.bincount(data.seg_i * K + data.seg_j, seg[1], K * K).reshape(K, K)
    A = A + A.T
    H = np.zeros((K + F, K + F))
    diagonal = np.arange(K + F)
    H[:K, :K] = -A
    H[diagonal[:K], diagonal[:K]] = A.sum(axis=1)
    for f in range(F):
        cross = np.bincount(data.seg_i, seg[2 + f], K) - np.bincount(data.seg_j, seg[2 + f], K)
        H[:K, K + f] = H[K + f, :K] = cross
    if F:  # the w * z of the battles between models is already in sums
        H[K:, K:] = sums[2:] @ data.z[:, :rated].T + (data.z[:, rated:] * w[rated:]) @ data.z[:, rated:].T
    H[diagonal, diagonal] += ridge
    return grad, H


def _line_search(data, c, params, eta, step, slope0, ridge):
    """How far along `step` to go, and the predictor and P(a wins) there.

    No log-likelihood is needed (two log-sigmoids per battle, the costliest pass there
    would be); phi'(t), the penalised log-likelihood's slope along the step, costs one
    sigmoid, which the next step reuses. A trial t is taken when phi provably rose by
    the Armijo fraction from 0 to t:

    * phi'(t) >= 0: phi is concave, so it rose all the way; or
    * past the maximum (phi'(t) < 0: near the optimum about half of all full steps land a
      hair past it), by the trapezoid rule with its error bounded: phi'' is minus a sum
      of w_i d_eta_i^2 (plus the ridge), and w = p(1 - p) changes by at most a factor
      e^|x| when eta moves by x (|w'| <= w), so over [0, t] the curvature varies by at
      most e^(2 M t), M = max |d_eta|, and phi(t) - phi(0) >= t [(phi'(0) + phi'(t)) / 2 -
      (e^(2 M t) - 1) / 8 (phi'(0) - phi'(t))].

    Otherwise the trial is shortened to just short of where phi' crosses 0 (the secant on
    [0, t], phi' being nearly linear there), after the first at most half the last."""
    d_eta = _predictor(data, step)
    spread = float(np.abs(d_eta).max())
    t = 1.0
    for trial in range(60):
        eta_t = eta + d_eta if t == 1.0 else eta + t * d_eta  # a Python float keeps float32 float32
        p_t = _sigmoid(eta_t)
        r_t = data.y - p_t
        if c is not None:
            r_t *= c
        slope = float(r_t @ d_eta) - ridge * float((params + t * step) @ step)
        if slope >= 0.0:
            break
        bound = (slope0 + slope) / 2 - np.expm1(2 * spread * t) / 8 * (slope0 - slope)
        if bound >= 1e-4 * slope0:
            break
        secant = 0.999 * t * slope0 / (slope0 - slope)
        t = secant if trial == 0 else min(secant, 0.5 * t)
    return t, eta_t, p_t


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
    battles' sorted order. With ridge > 0 the objective is strictly concave and every
    accepted step rises (_line_search), so this converges from anywhere."""
    eta = _predictor(data, params)
    for _ in range(max_iter):
        grad, H = _gradient_hessian(data, p, c, params, ridge)
        step = np.linalg.solve(H, grad)
        if np.abs(step).max() < tol:  # a move this small needs no line search
            return params + step
        t, eta, p = _line_search(data, c, params, eta, step, float(grad @ step), ridge)
        params = params + t * step
    return params


def bootstrap_style(
    data: StyleData,
    rounds: int = 100,
    seed: int = 0,
    *,
    ridge: float = RIDGE,
    start: np.ndarray | None = None,
    tol: float = 1e-5,
    workers: int | None = None,
) -> np.ndarray:
    """(rounds, K + F) parameters, one fit per resample of the battles with replacement.

    A resample is drawn as per-battle counts (bincount of n uniform draws: the
    nonparametric bootstrap exactly), the features fixed (standardised once on all
    votes, so every round's beta is on one scale). Each round is fitted to convergence
    (no parameter moving more than tol; 1e-5 is 0.002 rating points, and a thousandth of
    a coefficient's interval on a million votes), from the full fit `start`.

    What makes a round cheap: a resample's Hessian differs from the full data's by
    O(1/sqrt(n)), so the full fit's Hessian, inverted once, serves every round (a
    quasi-Newton step that shrinks the error by about that factor each time, with no
    Hessian to sum over the battles), and the first step needs no sigmoid at all: at the
    start the residuals y - p are the full fit's, only reweighted (the one-step
    bootstrap; the steps after it make the fit exact), and its passes run in float32
    (single_precision) with float64 sums. A round that has not converged
    after a few such steps (a model with few votes, whose curvature a resample changes a
    lot) finishes with full Newton steps. workers: threads running rounds at once (None:
    one per CPU); the result does not depend on it."""
    n, K = data.n, data.K
    if start is None:
        start = fit_style_bt(data, ridge=ridge)
    start = np.asarray(start, np.float64)
    _, H0 = _gradient_hessian(data, _sigmoid(_predictor(data, start)), None, start, ridge)
    H0_inv = np.linalg.inv(H0)
    data = single_precision(data)
    eta0 = _predictor(data, start)
    r0 = data.y - _sigmoid(eta0)  # the same start every round: computed once

    def one_round(k: int) -> np.ndarray:
        # Each round its own generator from (seed, round): the same numbers however many
        # threads run the rounds. Counts drawn straight in the sorted order: the battles
        # are exchangeable under resampling, so this is the same distribution.
        rng = np.random.default_rng([seed, k])
        c = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float32)
        out = _fixed_hessian_fit(data, c, start, eta0, r0 * c, H0_inv, ridge, tol)
        # A model with no battle in this resample has no rating in it (NaN, as the plain
        # bootstrap says), rather than the penalty's pull towards 0.
        if data.rated:
            seg = np.add.reduceat(c[: data.rated], data.seg_start, dtype=np.float64)
            played = (np.bincount(data.seg_i, seg, K) + np.bincount(data.seg_j, seg, K)) > 0
            out[:K][~played] = np.nan
        return out

    if rounds <= 0:
        return np.empty((0, K + data.F))
    # numpy lets go of the GIL in its passes over the battles, so threads run rounds in
    # parallel without copying the data to other processes.
    workers = max(1, min(workers or os.cpu_count() or 1, rounds))
    if workers == 1:
        return np.stack([one_round(k) for k in range(rounds)])
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(one_round, range(rounds))))


def _fixed_hessian_fit(data, c, params, eta, r, H_inv, ridge, tol, steps: int = 8) -> np.ndarray:
    """A weighted fit from `params` (predictor `eta`, weighted residuals `r` there) by
    steps H_inv @ gradient with _line_search; full Newton if `steps` are not enough.

    These steps converge linearly: each shrinks the error by about rho = |this step| /
    |the last one| (~0.01 on a million battles). Once rho is clearly below 1, what is
    left after taking a step is about rho / (1 - rho) of it; when that is under tol, the
    step is taken and the fit is done, without the sigmoid and the gradient that would
    only confirm it."""
    p, last = None, None
    for _ in range(steps):
        grad = _gradient(data, r, params, ridge)
        step = H_inv @ grad
        size = float(np.abs(step).max())
        if size < tol:
            return params + step
        if last is not None and size < 0.5 * last and size * (size / last) / (1 - size / last) < 0.5 * tol:
            return params + step
        t, eta, p = _line_search(data, c, params, eta, step, float(grad @ step), ridge)
        params = params + t * step
        r = (data.y - p) * c
        last = t * size
    return _newton(data, c, params, p, ridge, tol, 100)
