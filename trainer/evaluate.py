"""Reward-model win rate of a trained policy over its reference, on held-out prompts.

    preflab eval-policy --policy runs/policy-1                  # the run's own held-out prompts
    preflab eval-policy --policy runs/policy-1 --prompts trainer/data/prompts.jsonl --n 128

The policy trainer keeps `--eval-prompts` prompts out of training (runs/<id>/heldout.jsonl)
and runs this at its end; the command reruns it, with more prompts or another reward model.

Both models answer every prompt once with the same sampling settings and seed; the reward
model scores both answers; the policy wins a prompt when its score is higher (equal scores
count half). The result goes to runs/<id>/eval.json, which the Leaderboard tab shows next
to the human win rate of the same two models in the arena (the policy's votes carry its
run id, the reference's its model name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import add_config_arguments
from trainer.endpoints import HELP as ENDPOINTS_HELP
from trainer.errors import exit_code
from trainer.intervals import wilson_interval  # here too for its callers: stats, reward_metrics
from trainer.runs import EVAL_FILE, HELDOUT_FILE, read_json, write_json


def write_heldout(run_dir: Path, conversations: list) -> None:
    text = "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations)
    tmp = run_dir / f".{HELDOUT_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(run_dir / HELDOUT_FILE)


def read_heldout(run_dir: Path) -> list:
    path = run_dir / HELDOUT_FILE
    if not path.exists():
        return []
    return [
        json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def evaluate_policy(
    policy,
    reference,
    reward_model,
    conversations: list,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    device=None,
    batch_size: int = 16,
    progress: bool = False,
    endpoints: dict | None = None,
) -> dict:
    """Win rate of `policy` over `reference` (model dirs or names) under `reward_model`
    (a trainer.reward_model.RewardModel) on `conversations`. Loads one model at a time.
    `endpoints` ({display name: trainer.endpoint_client.EndpointModel}): a side named
    there is answered by its server; a prompt on which its request failed is left out
    (counted in "failed_prompts", the first reasons in "failures")."""
    import gc

    import torch

    from trainer.endpoint_client import EndpointFailure, answers_of, side_params
    from trainer.models import load_model

    endpoints = endpoints or {}
    answers = {}
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    for side, name in (("policy", policy), ("reference", reference)):
        source = endpoints.get(str(name)) or load_model(str(name), device=device)
        answers[side] = answers_of(
            source, conversations, seed=seed, batch_size=batch_size, progress=progress, **sampling
        )
        del source
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    failures = [a for side in answers.values() for a in side if isinstance(a, EndpointFailure)]
    kept = [
        i
        for i in range(len(conversations))
        if not any(isinstance(answers[s][i], EndpointFailure) for s in answers)
    ]
    if failures and not kept:
        raise EndpointFailure(f"every answer failed: {failures[0]}")
    failed_prompts = len(conversations) - len(kept)
    failures = list(dict.fromkeys(map(str, failures)))[:5]  # JSON-able, each reason once
    conversations = [conversations[i] for i in kept]
    answers = {side: [texts[i].text for i in kept] for side, texts in answers.items()}
    ours = reward_model.score(conversations, answers["policy"])
    theirs = reward_model.score(conversations, answers["reference"])
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs))
    n = len(conversations)
    lo, hi = wilson_interval(wins, n)
    return {
        "prompts": n,
        "rm_win_rate": wins / n if n else None,
        "rm_win_rate_ci": [lo, hi],
        "policy_reward_mean": sum(ours) / n if n else None,
        "reference_reward_mean": sum(theirs) / n if n else None,
        "sampling": {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        },
        # what each endpoint side sampled with (its recommended_config), and what failed
        **{
            f"{side}_endpoint": side_params(endpoints[str(name)], sampling, seed)
            for side, name in (("policy", policy), ("reference", reference))
            if str(name) in endpoints
        },
        **({"failed_prompts": failed_prompts, "failures": failures} if failed_prompts else {}),
        "examples": [
            {
                "prompt": c,
                "policy": a,
                "policy_reward": round(x, 4),
                "reference": b,
                "reference_reward": round(y, 4),
            }
            for c, a, b, x, y in list(
                zip(conversations, answers["policy"], answers["reference"], ours, theirs)
            )[:5]
        ],
    }


def write_eval(run_dir: Path, *, reference_id: str, reward_run: str, result: dict) -> dict:
    record = {
        "policy": run_dir.name,
        "reference": reference_id,
        "reward_run": str(reward_run),
        **result,
        "created_at": time.time(),
    }
    write_json(run_dir / EVAL_FILE, record)
    return record


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """eval-policy's settings: the one place of their defaults and --help text."""

    policy: str | None = field(
        default=None,
        metadata={"help": "a finished policy run (runs/<id>)", "metavar": "RUN", "required": True},
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "reward model run (default: the one the policy was trained against)",
            "metavar": "RUN",
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "the model to beat (default: the policy's starting model); with --endpoints, "
            "also one of its display names",
            "metavar": "M",
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "prompt pool or comparison store (default: the run's held-out prompts)",
            "metavar": "FILE",
        },
    )
    n: int = field(default=0, metadata={"help": "use at most this many prompts (0: all)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "default: the run's setting"})
    temperature: float | None = field(default=None, metadata={"help": "default: the run's setting"})
    seed: int = field(default=0, metadata={"help": "sampling seed (both models draw with it)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    endpoints: str | None = field(default=None, metadata={"help": ENDPOINTS_HELP, "metavar": "FILE"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, EvalConfig, config_file=False)


def run(args: argparse.Namespace) -> int:
    from trainer.endpoint_client import close_all, connect
    from trainer.endpoints import load_endpoints

    remote = connect(load_endpoints(args.endpoints))  # a bad file: error now, before any model loads
    try:
        return _run(args, remote)
    finally:
        close_all(remote)


def _run(args: argparse.Namespace, remote: dict) -> int:
    from trainer.models import canonical_name
    from trainer.policy_model import reward_model_dir  # trainer.runs.reward_model_path's check
    from trainer.prompts import load_prompts
    from trainer.reward_blend import parse_reward_weights, scorer_for
    from trainer.reward_model import RewardModel
    from trainer.runs import CHECKPOINT, CONFIG_FILE, POLICY_DIR, RunDirError

    run_dir = Path(args.policy)
    config = read_json(run_dir / CONFIG_FILE)
    if not (run_dir / POLICY_DIR).is_dir() or "config" not in config:
        raise RunDirError(f"{run_dir}: not a finished policy run (no {POLICY_DIR}/ or {CONFIG_FILE})")
    cfg = config["config"]
    conversations = load_prompts(args.prompts) if args.prompts else read_heldout(run_dir)
    rm_path = reward_model_dir(args.reward or config.get("reward_model"))
    if not conversations:
        raise RunDirError(f"{run_dir}: the run held no prompts out; give --prompts FILE")
    if args.n:
        conversations = conversations[: args.n]
    device = None if args.device == "auto" else args.device
    reference = args.reference or cfg["model"]
    result = evaluate_policy(
        run_dir / POLICY_DIR,
        reference,
        # The run's own reward model scores as the run trained: its --reward-weights, if any
        # (another --reward is scored by its first head).
        scorer_for(
            RewardModel.load(rm_path, device=device),
            parse_reward_weights(cfg.get("reward_weights")) if not args.reward else {},
        ),
        conversations,
        max_new_tokens=args.max_new_tokens or cfg["max_new_tokens"],
        temperature=args.temperature if args.temperature is not None else cfg["temperature"],
        seed=args.seed,
        device=device,
        progress=True,
        endpoints=remote,
    )
    reward_run = rm_path.parent if rm_path.name == CHECKPOINT else rm_path
    record = write_eval(
        run_dir,
        reference_id=reference if reference in remote else canonical_name(reference),
        reward_run=str(reward_run),
        result=result,
    )
    lo, hi = record["rm_win_rate_ci"]
    for problem in record.get("failures", []):
        print(f"warning: {problem}; {record['failed_prompts']} prompts left out in all", file=sys.stderr)
    print(
        f"{run_dir.name} vs {record['reference']} on {record['prompts']} prompts: reward-model win rate "
        f"{record['rm_win_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}); written to {run_dir / EVAL_FILE}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return exit_code(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
