"""The style-control phase of bench/leaderboard.py (`--style-control`,
`--only-style-control`; what it measures is in that file's docstring): simulated battles
with a planted style preference, our contextual Bradley-Terry fit and bootstrap timed and
checked against the truth and against a FastChat-style L-BFGS-B fit."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotate.bradley_terry import RIDGE, fit_bradley_terry  # noqa: E402
from annotate.ratings import SCALE  # noqa: E402
from annotate.style_control import standardised  # noqa: E402
from annotate.style_fit import bootstrap_style, fit_style_bt, style_data  # noqa: E402
from trainer.style_features import FEATURES, style_counts, style_differences  # noqa: E402

# --------------------------------------------------------------------------------------

GAMMA = np.array([2.0, 0.5, 0.3, 0.0])  # planted, per unit of (a - b) / (a + b + 1)


def simulate_style(models: int, battles: int, tie_share: float, seed: int):
    """(theta, model_a, model_b, score of a, style counts of a and of b (n, 4) each)."""
    rng = np.random.default_rng([seed, 1])
    theta = rng.normal(0.0, 1.0, models)
    # the weaker, the longer-winded: typical length 60 (best) to 500 tokens (worst)
    rank = np.argsort(np.argsort(-theta))
    typical = 60.0 * (500 / 60) ** (rank / max(models - 1, 1))
    habit = rng.uniform(0.0, 4.0, (models, 3))  # mean headers, list items, bold per answer
    a = rng.integers(0, models, battles)
    b = (a + rng.integers(1, models, battles)) % models

    def answers(m):
        length = np.maximum(1, np.round(typical[m] * rng.lognormal(0, 0.4, battles))).astype(np.int64)
        return np.column_stack([length, rng.poisson(habit[m])])

    ca, cb = answers(a), answers(b)
    d = style_differences(ca, cb)
    p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b] + d @ GAMMA)))
    q = tie_share * 2.0 * np.minimum(p, 1.0 - p)
    tie = rng.random(battles) < q
    a_wins = rng.random(battles) < (p - q / 2) / (1 - q)
    score = np.where(tie, 0.5, a_wins.astype(np.float64))
    return theta, a, b, score, ca, cb


def fastchat_style_fit(a, b, z, score, n_models, ridge):
    """FastChat's contextual Bradley-Terry as its description gives it: per-battle
    logistic loss over [ratings, feature coefficients], scipy L-BFGS-B from zero, in
    natural log-odds here and with our penalty, so that it maximises our objective."""
    from scipy.optimize import minimize
    from scipy.special import expit

    def loss_and_grad(x):
        eta = x[a] - x[b] + z @ x[n_models:]
        p = expit(eta)
        loss = -(score * np.log(p) + (1 - score) * np.log(1 - p)).sum() + 0.5 * ridge * x @ x
        err = score - p
        grad = ridge * x
        np.add.at(grad, a, -err)
        np.add.at(grad, b, err)
        grad[n_models:] -= z.T @ err
        return loss, grad

    result = minimize(
        loss_and_grad,
        np.zeros(n_models + z.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 100, "gtol": 1e-6},
    )
    return result.x


def markdown_answers(count: int, seed: int) -> list[str]:
    """Answers with prose, headers, lists, bold and code, ~1.2 KB each."""
    rng = np.random.default_rng(seed)
    words = "the model answers with a short list of steps and one clear reason why".split()
    out = []
    for _ in range(count):
        parts = []
        for s in range(int(rng.integers(2, 5))):
            parts.append(f"## Part {s}\n")
            parts.append(" ".join(rng.choice(words, int(rng.integers(20, 60)))) + ", **note** that.\n")
            parts.extend(
                f"- item {i}: {' '.join(rng.choice(words, 5))}\n" for i in range(int(rng.integers(0, 4)))
            )
        if rng.random() < 0.3:
            parts.append("```python\n# not a header\nprint('x')\n```\n")
        out.append("".join(parts))
    return out


def bench_style_control(args, say) -> dict:
    import pyarrow as pa

    K, n, R = args.models, args.battles, args.rounds
    say(f"style control: simulating {n} battles between {K} models with a planted style preference")
    theta, a, b, score, ca, cb = simulate_style(K, n, args.tie_share, args.seed)
    truth = SCALE * (theta - theta.mean())

    t0 = time.perf_counter()
    z, spread, kept = standardised(style_differences(ca, cb))
    data = style_data(a, b, score, z, K)
    prepare_s = time.perf_counter() - t0

    # the plain strengths on the same battles: the start, and what the confound does to them
    S = np.zeros((K, K))
    np.add.at(S, (a, b), score)
    np.add.at(S, (b, a), 1.0 - score)
    t0 = time.perf_counter()
    plain = fit_bradley_terry(S)
    start = np.concatenate([plain, np.zeros(z.shape[1])])
    params = fit_style_bt(data, start=start)
    fit_s = time.perf_counter() - t0
    say(f"style control: bootstrap, {R} rounds")
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    boot = bootstrap_style(data, R, args.seed, start=params, workers=workers)
    bootstrap_s = time.perf_counter() - t0
    one_thread_s = None
    if workers > 1:
        t0 = time.perf_counter()
        bootstrap_style(data, R, args.seed, start=params, workers=1)
        one_thread_s = time.perf_counter() - t0

    ours = SCALE * (params[:K] - params[:K].mean())
    plain_ratings = SCALE * (plain - plain.mean())
    boot_r = SCALE * (boot[:, :K] - np.nanmean(boot[:, :K], axis=1, keepdims=True))
    low, high = np.nanpercentile(boot_r, [2.5, 97.5], axis=0)
    c_low, c_high = np.percentile(boot[:, K:], [2.5, 97.5], axis=0)
    planted = GAMMA[kept] * spread

    say("style control: FastChat-style contextual fit (L-BFGS-B), one fit")
    t0 = time.perf_counter()
    peer = fastchat_style_fit(a, b, z, score, K, RIDGE)
    peer_s = time.perf_counter() - t0
    peer_r = SCALE * (peer[:K] - peer[:K].mean())

    say(f"style control: features of {args.style_texts} generated markdown answers")
    texts = pa.array(markdown_answers(args.style_texts, args.seed))
    t0 = time.perf_counter()
    style_counts(texts)
    features_s = time.perf_counter() - t0
    from scipy.stats import spearmanr

    return {
        "style_features": [f for f, k in zip(FEATURES, kept) if k],
        "style_prepare_s": round(prepare_s, 3),
        "style_fit_s": round(fit_s, 3),
        "style_bootstrap_s": round(bootstrap_s, 2),
        "style_workers": workers,
        "style_bootstrap_1thread_s": None if one_thread_s is None else round(one_thread_s, 2),
        "style_max_abs_err_vs_true": round(float(np.abs(ours - truth).max()), 2),
        "plain_max_abs_err_vs_true_same_battles": round(float(np.abs(plain_ratings - truth).max()), 1),
        "style_spearman_vs_true": round(float(spearmanr(ours, truth).statistic), 4),
        "plain_spearman_vs_true_same_battles": round(float(spearmanr(plain_ratings, truth).statistic), 4),
        "style_ci_coverage_of_true": round(float(np.mean((low <= truth) & (truth <= high))), 3),
        "style_coef": [round(float(x), 4) for x in params[K:]],
        "style_coef_planted": [round(float(x), 4) for x in planted],
        "style_coef_ci": [[round(float(lo), 4), round(float(hi), 4)] for lo, hi in zip(c_low, c_high)],
        "peer_style_fit_s": round(peer_s, 2),
        "peer_style_max_abs_rating_diff": float(f"{np.abs(ours - peer_r).max():.3g}"),
        "peer_style_max_abs_coef_diff": float(f"{np.abs(params[K:] - peer[K:]).max():.3g}"),
        "style_features_mb_s": round(sum(len(t) for t in texts.to_pylist()) / 1e6 / features_s, 1),
    }
