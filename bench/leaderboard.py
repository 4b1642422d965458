"""Benchmark the leaderboard's Bradley-Terry fit against choix and FastChat's method.

    .venv/bin/python bench/leaderboard.py [--models 50] [--battles 1000000] [--rounds 100]
                                          [--tie-share 0.3] [--seed 0] [--cli-votes 1000000]
                                          [--style-control] [--only-style-control]

Simulated arena: K models with known strengths theta ~ N(0, 1) (natural log-odds; sd ~174
rating points); each battle is a uniformly random pair of different models; the outcome
is a tie with probability q = tie_share * 2 * min(p, 1 - p) and otherwise a win drawn so
that the expected score of i is exactly p = sigmoid(theta_i - theta_j). That keeps "a tie
is half a win" an unbiased estimating equation, so every method's error against the
truth is sampling error only.

Compared, on the same battles and the same scale (rating = 1000 + 400/ln10 * (theta -
mean theta)):

* ours: annotate.ratings.leaderboard() from an Arrow table of battles (aggregation
  into a K x K score matrix, batched Newton); `ours_s` is the point estimate,
  `bootstrap_s` the 100-round bootstrap on top.
* FastChat (the peer), reimplemented from the description of its Bradley-Terry
  leaderboard (fastchat/serve/monitor/rating_systems.py): battles as a DataFrame with a
  `winner` column; unique (model_a, model_b, outcome) rows with their counts as weights,
  outcome 1 / 0.5 / 0 for a win of a / tie / win of b; logistic loss with logits
  ln(10) * (r_a - r_b), minimised by scipy L-BFGS-B from zero (maxiter 100, gtol 1e-6);
  rating = 400 * r + 1000. Its bootstrap draws the unique rows' counts from a multinomial
  and refits each round (FastChat spreads the rounds over processes; here they run one
  after another, as ours do). `peer_s`, `peer_bootstrap_s`.
* choix: `ilsr_pairwise_dense(comp_mat)` (iterative Luce spectral ranking, which
  converges to the maximum-likelihood estimate) on the same score matrix ours fits:
  comp_mat[i, j] = wins of i over j + 0.5 * ties, which is exactly the half-win
  likelihood (the pairwise-list functions of choix take (winner, loser) tuples and have
  no way to say "tie"). `choix_s` times the fit only; `ours_fit_s` is ours on the same matrix.
* the CLI: a real store of `--cli-votes` votes (DirectoryStore.append_many, short
  answers), then `preflab leaderboard --data DIR --rounds R` as a subprocess, end to end
  (interpreter start, imports, reading the store, fit, bootstrap, printing): `cli_s`;
  `cli_phases_s` is the CLI's own breakdown (from a second run with --json).

* style control (`--style-control`; `--only-style-control` skips everything above):
  battles of their own with a planted style preference. Each model has a typical answer
  length (log-normal around 60-500 tokens) and its own habit of headers, list items and
  bold (Poisson counts), the weaker models the longer-winded; the outcome follows
  sigmoid(theta_a - theta_b + gamma . d) with d the four (a - b) / (a + b + 1) and gamma
  = (2.0, 0.5, 0.3, 0.0), ties as above. Timed: `style_prepare_s` (standardising the
  features, sorting the battles by pair), `style_fit_s` (the point fit from the plain
  strengths), `style_bootstrap_s` (the rounds, on `style_workers` threads; one thread:
  `style_bootstrap_1thread_s`). Checked: the style-controlled and the plain ratings
  against the truth, the coefficients against the planted ones, and ours against the
  peer: FastChat's contextual Bradley-Terry reimplemented from its description (L-BFGS-B
  on the per-battle logistic loss, features as columns, maxiter 100, gtol 1e-6), with
  our penalty so that both maximise one objective; `peer_style_fit_s` is one fit of it
  (its bootstrap refits that many times). `style_features_mb_s`: trainer.style_features
  .style_counts on `--style-texts` generated markdown answers, in MB of text a second.

Timings are the best of `--repeat` runs, except the CLI's (one cold run) and the
style-control phase's (one run each).

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotate.bradley_terry import battles_from_votes, fit_bradley_terry  # noqa: E402
from annotate.ratings import CENTER, SCALE, bootstrap_thetas, leaderboard, to_ratings  # noqa: E402
from bench.leaderboard_style import bench_style_control  # noqa: E402


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# simulated battles
# --------------------------------------------------------------------------------------


def simulate(models: int, battles: int, tie_share: float, seed: int):
    """(names, true theta, model_a index, model_b index, outcome 'a' | 'b' | 'tie')."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, models)
    a = rng.integers(0, models, battles)
    b = (a + rng.integers(1, models, battles)) % models  # never the same model
    p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
    q = tie_share * 2.0 * np.minimum(p, 1.0 - p)  # P(tie), at most tie_share
    u = rng.random(battles)
    # tie with probability q; else a wins with probability (p - q/2) / (1 - q): E[score_a] = p
    outcome = np.where(u < q, "tie", np.where(rng.random(battles) < (p - q / 2) / (1 - q), "a", "b"))
    names = np.array([f"model-{k:02d}" for k in range(models)])
    return names, theta, a, b, outcome


def centred(ratings: np.ndarray) -> np.ndarray:
    return ratings - ratings.mean() + CENTER


# --------------------------------------------------------------------------------------
# the peer: FastChat's Bradley-Terry method, reimplemented from its description
# --------------------------------------------------------------------------------------


def fastchat_preprocess(df):
    """Unique (model_a, model_b, outcome) rows and how often each occurs."""
    import pandas as pd

    n = len(df)
    codes, models = pd.factorize(pd.concat([df["model_a"], df["model_b"]]))
    schedule = np.ones((n, 3), dtype=np.int32)  # outcome 1 = tie (x2)
    schedule[:, 0], schedule[:, 1] = codes[:n], codes[n:]
    schedule[(df["winner"] == "model_a").to_numpy(), 2] = 2
    schedule[(df["winner"] == "model_b").to_numpy(), 2] = 0
    rows, weights = np.unique(schedule, return_counts=True, axis=0)
    return rows[:, :2], rows[:, 2].astype(np.float64) / 2.0, list(models), weights.astype(np.float64)


def fastchat_loss_and_grad(r, matchups, outcomes, weights, alpha):
    from scipy.special import expit

    logits = alpha * (r[matchups[:, 0]] - r[matchups[:, 1]])
    p = expit(logits)
    loss = -(weights * (outcomes * np.log(p) + (1.0 - outcomes) * np.log(1.0 - p))).sum()
    g = -alpha * weights * (outcomes - p)
    grad = np.zeros_like(r)
    np.add.at(grad, matchups[:, 0], g)
    np.add.at(grad, matchups[:, 1], -g)
    return loss, grad


LOG10 = math.log(10.0)  # FastChat's scale: ratings in base-10 log-odds (x 400 later)


def fastchat_fit(matchups, outcomes, weights, n_models, alpha=LOG10, tol=1e-6):
    from scipy.optimize import minimize

    result = minimize(
        fastchat_loss_and_grad,
        np.zeros(n_models),
        args=(matchups, outcomes, weights, alpha),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 100, "gtol": tol},
    )
    return result.x


def fastchat_ratings(r):
    return 400.0 * r + 1000.0


def fastchat_bootstrap(matchups, outcomes, weights, n_models, rounds, seed):
    rng = np.random.default_rng(seed)
    n = int(weights.sum())
    draws = rng.multinomial(n, weights / n, size=rounds)
    return np.stack(
        [fastchat_ratings(fastchat_fit(matchups, outcomes, w.astype(np.float64), n_models)) for w in draws]
    )


# --------------------------------------------------------------------------------------
# the CLI on a real store
# --------------------------------------------------------------------------------------


def build_store(path: Path, names, a, b, outcome, votes: int) -> float:
    from trainer.store import messages_to_json
    from trainer.store.directory_writer import DirectoryStore

    prompts = [messages_to_json([{"role": "user", "content": f"Question {k}?"}]) for k in range(100)]
    t0 = time.perf_counter()
    chunk = 100_000
    with DirectoryStore(path) as store:
        for start in range(0, votes, chunk):
            stop = min(votes, start + chunk)
            store.append_many(
                {
                    "kind": "vote",
                    "pair_id": f"pair-{i}",
                    "prompt_id": f"p-{i % 100}",
                    "prompt": prompts[i % 100],
                    "response_a": "Answer A.",
                    "response_b": "Answer B.",
                    "model_a": names[a[i]],
                    "model_b": names[b[i]],
                    "left": "ab"[i % 2],
                    "choice": outcome[i],
                    "annotator": "sim",
                }
                for i in range(start, stop)
            )
            say(f"  store: {stop} / {votes} votes written")
    return time.perf_counter() - t0


def time_cli(store: Path, rounds: int, *extra: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "annotate.cli",
            "leaderboard",
            "--data",
            str(store),
            "--rounds",
            str(rounds),
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"preflab leaderboard failed ({r.returncode}):\n{r.stderr}")
    return wall, r


# --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=50, help="number of simulated models")
    p.add_argument("--battles", type=int, default=1_000_000, help="number of simulated battles")
    p.add_argument("--rounds", type=int, default=100, help="bootstrap rounds (ours and the peer's)")
    p.add_argument(
        "--tie-share",
        type=float,
        default=0.3,
        help="tie probability between equal models (less for unequal ones); ~15%% ties overall",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation and of the bootstraps")
    p.add_argument(
        "--cli-votes",
        type=int,
        default=1_000_000,
        help="votes in the real store the CLI is timed on (0: skip that phase)",
    )
    p.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument(
        "--style-control", action="store_true", help="also time and check the style-controlled fit"
    )
    p.add_argument(
        "--only-style-control",
        action="store_true",
        help="the style-control phase only (implies --style-control)",
    )
    p.add_argument(
        "--style-texts",
        type=int,
        default=100_000,
        help="generated answers the feature extraction is timed on",
    )
    args = p.parse_args()
    if args.only_style_control:
        result = {
            "bench": "leaderboard",
            "models": args.models,
            "battles": args.battles,
            "rounds": args.rounds,
        }
        result.update(bench_style_control(args, say))
        result.update({"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__})
        print(json.dumps(result))
        return
    import choix
    import pandas as pd

    say(f"simulating {args.battles} battles between {args.models} models")
    names, theta, a, b, outcome = simulate(args.models, args.battles, args.tie_share, args.seed)
    table = pa.table({"model_a": names[a], "model_b": names[b], "choice": outcome})
    df = pd.DataFrame(
        {
            "model_a": names[a],
            "model_b": names[b],
            "winner": np.select([outcome == "a", outcome == "b"], ["model_a", "model_b"], "tie"),
        }
    )
    truth = centred(SCALE * theta)  # index = model number
    by_name = {n: k for k, n in enumerate(names)}

    def best(fn):
        times, out = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    say("ours: aggregate + Newton fit")
    ours_s, board = best(lambda: leaderboard(table, rounds=0))
    ours = np.empty(args.models)
    ours[[by_name[m] for m in board.models]] = board.rating
    battles = battles_from_votes(table)
    order = [by_name[m] for m in battles.models]
    ours_fit_s, _ = best(lambda: fit_bradley_terry(battles.scores))
    say(f"ours: bootstrap, {args.rounds} rounds")
    bootstrap_s, boot = best(lambda: bootstrap_thetas(battles, args.rounds, args.seed))
    low, high = np.nanpercentile(to_ratings(boot), [2.5, 97.5], axis=0)
    covered = float(np.mean((low <= truth[order]) & (truth[order] <= high)))

    say("choix: ilsr_pairwise_dense on the same score matrix")
    choix_s, params = best(lambda: choix.ilsr_pairwise_dense(battles.scores, alpha=0.0))
    choix_ratings = np.empty(args.models)
    choix_ratings[order] = centred(SCALE * params)

    say("FastChat-style: unique matchups + scipy L-BFGS-B")

    def peer():
        matchups, outcomes, models, weights = fastchat_preprocess(df)
        return models, fastchat_ratings(fastchat_fit(matchups, outcomes, weights, len(models)))

    peer_s, (peer_models, peer_r) = best(peer)
    peer_ratings = np.empty(args.models)
    peer_ratings[[by_name[m] for m in peer_models]] = centred(peer_r)
    say(f"FastChat-style: bootstrap, {args.rounds} rounds")
    matchups, outcomes, _, weights = fastchat_preprocess(df)
    peer_bootstrap_s, _ = best(
        lambda: fastchat_bootstrap(matchups, outcomes, weights, len(peer_models), args.rounds, args.seed)
    )

    result = {
        "bench": "leaderboard",
        "models": args.models,
        "battles": args.battles,
        "rounds": args.rounds,
        "ties": int((outcome == "tie").sum()),
        "ours_s": round(ours_s, 4),
        "peer_s": round(peer_s, 4),
        "ratio": round(peer_s / ours_s, 2),
        "max_abs_rating_diff": float(f"{np.abs(ours - peer_ratings).max():.3g}"),
        "choix_s": round(choix_s, 4),
        "ours_fit_s": round(ours_fit_s, 5),
        "choix_max_abs_rating_diff": float(f"{np.abs(ours - choix_ratings).max():.3g}"),
        "bootstrap_s": round(bootstrap_s, 4),
        "peer_bootstrap_s": round(peer_bootstrap_s, 3),
        "bootstrap_ratio": round(peer_bootstrap_s / bootstrap_s, 1),
        "ours_max_abs_err_vs_true": round(float(np.abs(ours - truth).max()), 2),
        "peer_max_abs_err_vs_true": round(float(np.abs(peer_ratings - truth).max()), 2),
        "ours_ci_coverage_of_true": round(covered, 3),
        "mean_ci_width": round(float(np.mean(high - low)), 2),
    }

    if args.cli_votes > 0:
        n = min(args.cli_votes, args.battles)
        folder = Path(tempfile.mkdtemp(prefix="preflab-leaderboard-bench-"))
        try:
            say(f"CLI: building a store of {n} votes with DirectoryStore.append_many")
            result["store_build_s"] = round(build_store(folder / "store", names, a, b, outcome, n), 1)
            say(f"CLI: preflab leaderboard --data {folder / 'store'} --rounds {args.rounds}")
            cli_s, r = time_cli(folder / "store", args.rounds)
            say("\n".join(r.stdout.splitlines()[:8]) + "\n  ...\n" + r.stderr.strip())
            # once more with --json, for the breakdown (read, aggregate, fit, bootstrap)
            _, r = time_cli(folder / "store", args.rounds, "--json")
            result.update(
                {"cli_votes": n, "cli_s": round(cli_s, 2), "cli_phases_s": json.loads(r.stdout)["timings_s"]}
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    if args.style_control:
        result.update(bench_style_control(args, say))
    result.update({"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
