"""Benchmark: the Hessian-free update (--algo trpo) against PPO and RLOO, at equal rollouts.

    .venv/bin/python bench/hf_vs_ppo.py                          # the word policy (tiny), ~15 min on a free CPU core
    .venv/bin/python bench/hf_vs_ppo.py --steps 20 --seeds 0,1,2  # longer runs, three seeds
    .venv/bin/python bench/hf_vs_ppo.py --model smollm2          # SmolLM2-135M as the policy (slow on a CPU)

The task is the hidden rule of the learning tests: a tiny reward model fitted to
simulated votes that prefer answers saying "banana" (conftest.policy_world's recipe), and
as the policy either the tests' word policy (a tiny Llama that answers in a few words,
banana rarely: tests/helpers.word_policy) or SmolLM2-135M. Every algorithm gets the same
rollouts: the same prompts per step, samples per prompt (k), answer length, temperature,
KL coefficient (k3 in the reward) and steps, and the same seeds; each its own update
settings (PPO and RLOO: AdamW at lr 5e-4, the learning tests' settings; trpo: one
natural-gradient step of --trust-kl 0.05 nats per token, 10 CG iterations).

Measured per run (from its metrics.jsonl): reward gained (the mean reward of the last 5
steps minus that of the first 3), the KL to the reference at the end (k3 per answer, the
mean of the last 5 steps), the seconds of the steps (rollout + update) and of the updates
alone; then reward gained per nat of KL and per second, averaged over the seeds. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers: the word policy and the hidden-rule votes
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALGO_SETTINGS = {
    "trpo": {"trust_kl": 0.05, "cg_iters": 10},
    "ppo": {"lr": 5e-4},
    "rloo": {"lr": 5e-4},
}


def build_world(work: Path, model: str) -> tuple[Path, str, Path]:
    """(reward run, policy model, prompt pool) of the hidden-rule task."""
    from helpers import hidden_rule_world

    rm, word, prompts = hidden_rule_world(work)
    return rm, str(word) if model == "word" else model, prompts


def run_one(args, algo: str, seed: int, rm: Path, policy: str, prompts: Path, work: Path) -> dict:
    from trainer.policy import train

    run_dir = work / f"{algo}-{seed}"
    settings = {
        "model": policy,
        "reward": str(rm),
        "prompts": str(prompts),
        "run_dir": str(run_dir),
        "algo": algo,
        "k": args.k,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0,
        "kl_estimator": "k3",
        "kl_coef": args.kl_coef,
        "eval_prompts": 0,
        "save_every": 0,
        "sample_every": 0,
        "device": args.device,
        "progress": False,
        "seed": seed,
        **ALGO_SETTINGS[algo],
    }
    code = train(settings)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    if code != 0 or len(steps) != args.steps:
        return {
            "algo": algo,
            "seed": seed,
            "failed": json.loads((run_dir / "status.json").read_text())["message"],
        }
    first = statistics.mean(r["reward_mean"] for r in steps[:3])
    last = statistics.mean(r["reward_mean"] for r in steps[-5:])
    kl = statistics.mean(r["kl"] for r in steps[-5:])
    step_s = sum(r["step_s"] for r in steps)
    update_s = sum(r["train_s"] for r in steps)
    out = {
        "algo": algo,
        "seed": seed,
        "reward_gain": last - first,
        "kl_end": kl,
        "step_s": step_s,
        "update_s": update_s,
        "gain_per_kl": (last - first) / kl if kl > 0 else None,
        "gain_per_s": (last - first) / step_s,
    }
    if algo == "trpo":
        out["steps_taken"] = sum(r["step_frac"] > 0 for r in steps)
        out["mean_step_frac"] = statistics.mean(r["step_frac"] for r in steps)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="word", help="word (the tests' word policy) or smollm2 / a model dir")
    p.add_argument("--algos", default="trpo,ppo,rloo", help="comma-separated algorithms")
    p.add_argument("--steps", type=int, default=12, help="steps of each run")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (every algorithm)")
    p.add_argument("--max-new-tokens", type=int, default=12, help="longest answer")
    p.add_argument("--kl-coef", type=float, default=0.05, help="KL coefficient in the reward")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the figures are their means")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared CPU)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    algos = args.algos.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="hf-vs-ppo-") as tmp:
        work = Path(tmp)
        rm, policy, prompts = build_world(work, args.model)
        runs = []
        for seed in seeds:
            for algo in algos:
                runs.append(run_one(args, algo, seed, rm, policy, prompts, work))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # each run as it ends
    summary = {}
    for algo in algos:
        ok = [r for r in runs if r["algo"] == algo and "failed" not in r]
        if not ok:
            summary[algo] = {"failed": [r["failed"] for r in runs if r["algo"] == algo]}
            continue
        per_kl = [r["gain_per_kl"] for r in ok if r["gain_per_kl"] is not None]
        summary[algo] = {
            "reward_gain": round(statistics.mean(r["reward_gain"] for r in ok), 4),
            "kl_end": round(statistics.mean(r["kl_end"] for r in ok), 4),
            "gain_per_kl": round(statistics.mean(per_kl), 4) if per_kl else None,
            "gain_per_s": round(statistics.mean(r["gain_per_s"] for r in ok), 5),
            "step_s": round(statistics.mean(r["step_s"] / args.steps for r in ok), 3),
            "update_s": round(statistics.mean(r["update_s"] / args.steps for r in ok), 3),
            **(
                {"mean_step_frac": round(statistics.mean(r["mean_step_frac"] for r in ok), 3)}
                if algo == "trpo"
                else {}
            ),
        }

    def ranked(key):
        return max(
            (a for a in summary if summary[a].get(key) is not None),
            key=lambda a: summary[a][key],
            default=None,
        )

    print(
        json.dumps(
            {
                "model": args.model,
                "steps": args.steps,
                "rollouts_per_step": args.batch_size * args.k,
                "seeds": seeds,
                "device": args.device
                if args.device != "cpu"
                else f"cpu ({platform.processor() or platform.machine()}, {args.threads} thread)",
                "algos": summary,
                "best_gain_per_kl": ranked("gain_per_kl"),
                "best_gain_per_s": ranked("gain_per_s"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
