"""Benchmark: our policy trainer (RLOO) against TRL's RLOOTrainer (and GRPOTrainer).

    .venv/bin/python bench/policy_vs_trl.py                                       # SmolLM2-135M
    .venv/bin/python bench/policy_vs_trl.py --model tiny --prompts 16 --steps 3   # a few minutes on a CPU
    .venv/bin/python bench/policy_vs_trl.py --batch 16 --k 8 --max-new-tokens 256 # GPU-sized

All trainers get the same model (fp32 weights, bf16 autocast on CUDA), the same prompts
(the first --prompts of trainer/data/prompts.jsonl, as chat messages), the same samples per prompt
(k), prompts per step, answer length, sampling temperature, learning rate, KL coefficient
(k1, sequence-level, on the reward), one optimizer step per batch, no gradient
checkpointing (TRL turns it on by default; that would only slow TRL down) and the same
reward model (one trained by trainer.reward, scored with RewardModel.score; built here
with a few steps on synthetic votes unless --reward names one). TRL runs GRPO with the same
beta (its default is 0, which would skip the reference forward that the others do).

Each trainer runs in its own fresh process (this script again, with --phase), one after
the other, on the same work directory. Measured, over the steps after --warmup: prompts/s
and generated tokens/s (a step = generate + score + reference / old log-probs + one
update; the step's wall time), process CPU seconds of those steps (less sensitive to other
jobs on a shared CPU box), peak memory (CUDA: max allocated; CPU: peak RSS of the
trainer's process, sampled). The last line printed is one JSON object.

Where the difference comes from. On CUDA: our rollout decodes with a bf16 copy of the
weights, a static KV cache and a torch.compile'd decoding step (CUDA graphs), where TRL
decodes eagerly in fp32 with a dynamic cache; the rest is the same work. On a CPU: TRL's
fused LM head runs its tiles in plain torch there (its Triton kernel is GPU-only), so the
CPU ratio says little about the GPU one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reward_vs_trl import PeakMemory  # noqa: E402  (sampled peak RSS / CUDA max allocated)


def shipped_prompts(n: int) -> list[list[dict[str, str]]]:
    from trainer.prompts import load_prompt_pool

    prompts = [p.messages for p in load_prompt_pool(ROOT / "trainer" / "data" / "prompts.jsonl").prompts]
    return (prompts * (n // len(prompts) + 1))[:n]


def build_reward_model(work: Path, prompts, seed: int) -> Path:
    """A tiny reward model (trainer.reward) fitted in a few steps to synthetic votes: what
    it learned does not matter here, only that both sides pay the same scoring cost."""
    from trainer.reward import train

    rng = random.Random(seed)
    words = "the answer is clear and short so you can use it today with care".split()
    rows = [
        {
            "prompt": p,
            "chosen": [{"role": "assistant", "content": " ".join(rng.choices(words, k=12))}],
            "rejected": [{"role": "assistant", "content": " ".join(rng.choices(words, k=4))}],
        }
        for p in prompts[:32] * 2
    ]
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = work / "rm"
    code = train(
        {
            "model": "tiny",
            "data": str(data),
            "run_dir": str(run_dir),
            "max_steps": 4,
            "batch_size": 8,
            "lr": 1e-3,
            "max_length": 256,
            "progress": False,
            "seed": seed,
            "val_fraction": 0.25,
        }
    )
    if code != 0:
        raise SystemExit(f"could not build the benchmark's reward model (exit {code})")
    return run_dir


def run_ours(args, model: str, reward: Path, prompts_file: Path, work: Path, cuda: bool) -> dict:
    from trainer.policy import train

    run_dir = work / "ours"
    with PeakMemory(cuda) as mem:
        code = train(
            {
                "model": model,
                "reward": str(reward),
                "prompts": str(prompts_file),
                "run_dir": str(run_dir),
                "algo": "rloo",
                "k": args.k,
                "batch_size": args.batch,
                "steps": args.warmup + args.steps,
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "lr": args.lr,
                "kl_coef": args.kl_coef,
                "kl_estimator": "k1",
                "epochs": 1,
                "minibatches": 1,
                "micro_batch": args.micro_batch or args.batch * args.k,
                "whiten_advantages": False,
                "missing_eos_penalty": 0.0,
                "max_kl": 0.0,
                "save_every": 0,
                "sample_every": 0,
                "seed": args.seed,
                "progress": not args.quiet,
                "max_prompt_length": 1024,
            }
        )
    if code != 0:
        raise SystemExit(f"our trainer failed with exit code {code}; see {run_dir}/status.json")
    steps = [
        r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ][args.warmup :]
    seconds = sum(r["step_s"] for r in steps)
    return {
        "prompts": sum(r["prompts"] for r in steps),
        "tokens": sum(r["gen_tokens"] for r in steps),
        "seconds": seconds,
        "cpu_s": sum(r["cpu_s"] for r in steps),
        "peak_mb": mem.mb,
        "gen_s": sum(r["gen_s"] for r in steps),
        "reward_last": steps[-1]["reward_mean"],
        "generation": json.loads((run_dir / "config.json").read_text()).get("generation"),
    }


class StepTimer:
    """A TRL callback: wall and CPU time of each optimizer step (generation happens inside it)."""

    def __init__(self, cuda: bool):
        self.cuda, self.wall, self.cpu = cuda, [], []

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def on_step_begin(self, *a, **k):
        self._sync()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, *a, **k):
        self._sync()
        self.wall.append(time.perf_counter() - self.t0)
        self.cpu.append(time.process_time() - self.c0)


def run_trl(kind: str, args, source: str, reward: Path, prompts, work: Path, cuda: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from trainer.reward_model import RewardModel

    hf_logging.set_verbosity_error()
    rm = RewardModel.load(reward)
    tokens_per_step: list[int] = []

    def reward_model(prompts, completions, completion_ids, **kwargs):
        # The same scorer ours uses: RewardModel.score on (chat messages, answer text).
        tokens_per_step.append(sum(len(c) for c in completion_ids))
        return rm.score(prompts, [c[0]["content"].strip() for c in completions], normalize=True)

    n_steps = args.warmup + args.steps
    dataset = Dataset.from_list(
        [{"prompt": p} for p in (prompts * (n_steps * args.batch // len(prompts) + 2))]
    )
    common = dict(
        output_dir=str(work / kind),
        per_device_train_batch_size=args.batch * args.k,
        gradient_accumulation_steps=1,
        num_generations=args.k,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        beta=args.kl_coef,
        num_iterations=1,
        max_steps=n_steps,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=cuda,
        use_cpu=not cuda,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=args.quiet,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
    )
    if kind == "rloo":
        config, trainer_cls = RLOOConfig(**common, normalize_advantages=False), RLOOTrainer
    else:
        config, trainer_cls = GRPOConfig(**common), GRPOTrainer
    timer = StepTimer(cuda)
    callback = type(
        "Timer",
        (TrainerCallback,),
        {
            "on_step_begin": lambda self, *a, **k: timer.on_step_begin(),
            "on_step_end": lambda self, *a, **k: timer.on_step_end(),
        },
    )()
    trainer = trainer_cls(
        model=source, reward_funcs=reward_model, args=config, train_dataset=dataset, callbacks=[callback]
    )
    with PeakMemory(cuda) as mem:
        trainer.train()
    wall, cpu = timer.wall[args.warmup :], timer.cpu[args.warmup :]
    tokens = tokens_per_step[args.warmup : len(timer.wall)]
    seconds = sum(wall)
    del trainer
    rm = None  # noqa: F841  (the reward model goes before the next run; the closure sees None now)
    return {
        "prompts": args.batch * len(wall),
        "tokens": sum(tokens),
        "seconds": seconds,
        "cpu_s": sum(cpu),
        "peak_mb": mem.mb,
    }


def per_s(r: dict, key: str) -> float:
    return round(r[key] / r["seconds"], 4) if r["seconds"] else float("nan")


def run_phase(args, work: Path) -> dict:
    """One trainer, in this process (the parent runs each phase in a fresh process, so that
    peak memory and warm caches are each trainer's own)."""
    import torch

    from trainer.models import check_model

    cuda = torch.cuda.is_available()
    prompts = shipped_prompts(args.prompts)
    reward = Path(args.reward) if args.reward else work / "rm"
    if args.phase == "ours":
        return run_ours(args, args.model, reward, work / "prompts.jsonl", work, cuda)
    return run_trl(args.phase, args, check_model(args.model), reward, prompts, work, cuda)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="policy for all trainers (trainer.models name or dir)")
    p.add_argument("--reward", default=None, help="reward model run dir (default: a tiny one built here)")
    p.add_argument("--prompts", type=int, default=64, help="how many prompts of trainer/data/prompts.jsonl")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed first steps (compiled generation compiles here)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument(
        "--micro-batch", type=int, default=0, help="ours: rows per forward (0: the whole batch, as TRL)"
    )
    p.add_argument("--no-grpo", dest="grpo", action="store_false", help="skip TRL's GRPOTrainer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--phase", choices=("ours", "rloo", "grpo"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase:  # a child: one trainer, its numbers as the last line
        print(json.dumps(run_phase(args, Path(args.work))))
        return 0

    import subprocess

    import trl

    from trainer.models import check_model

    cuda = torch.cuda.is_available()
    device = (
        torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    prompts = shipped_prompts(args.prompts)
    results = {}
    with tempfile.TemporaryDirectory(prefix="policy-bench-") as tmp:
        work = Path(tmp)
        check_model(args.model)  # converts the default model once, outside the timed phases
        if not args.reward:
            build_reward_model(work, prompts, args.seed)
        distinct = list(dict.fromkeys(json.dumps(m) for m in prompts))  # the pool loader drops repeats
        (work / "prompts.jsonl").write_text("".join(f'{{"messages": {m}}}\n' for m in distinct))
        argv = list(sys.argv[1:] if argv is None else argv)
        for phase in ("ours", "rloo", "grpo") if args.grpo else ("ours", "rloo"):
            print(f"--- {phase} ---", file=sys.stderr, flush=True)
            out = subprocess.run(
                [sys.executable, __file__, *argv, "--phase", phase, "--work", str(work)],
                stdout=subprocess.PIPE,
                text=True,
            )
            if out.returncode != 0:
                raise SystemExit(f"the {phase} phase failed (exit {out.returncode})")
            results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, rloo, grpo = results["ours"], results["rloo"], results.get("grpo")

    ratio = per_s(ours, "prompts") / per_s(rloo, "prompts")
    result = {
        "bench": "policy_vs_trl",
        "model": args.model,
        "prompts_per_step": args.batch,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "timed_steps": args.steps,
        "ours_prompts_per_s": per_s(ours, "prompts"),
        "trl_prompts_per_s": per_s(rloo, "prompts"),
        "ratio": round(ratio, 3),
        "peer_prompts_per_s": per_s(rloo, "prompts"),
        "ours_tokens_per_s": per_s(ours, "tokens"),
        "trl_tokens_per_s": per_s(rloo, "tokens"),
        "ours_step_s": round(ours["seconds"] / args.steps, 3),
        "trl_step_s": round(rloo["seconds"] / args.steps, 3),
        "ours_gen_share": round(ours["gen_s"] / ours["seconds"], 3) if ours["seconds"] else None,
        "ours_generation": ours["generation"],
        # CPU seconds per prompt, TRL over ours: on a shared CPU box, less sensitive to other jobs.
        "ratio_cpu_time": round((rloo["cpu_s"] / rloo["prompts"]) / (ours["cpu_s"] / ours["prompts"]), 3),
        "ours_peak_mem_mb": ours["peak_mb"],
        "trl_peak_mem_mb": rloo["peak_mb"],
        "memory": "cuda max allocated" if cuda else "peak RSS of each trainer's own process (sampled)",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "device": device,
    }
    if grpo:
        result.update(
            grpo_prompts_per_s=per_s(grpo, "prompts"),
            grpo_tokens_per_s=per_s(grpo, "tokens"),
            ratio_vs_grpo=round(per_s(ours, "prompts") / per_s(grpo, "prompts"), 3),
            grpo_peak_mem_mb=grpo["peak_mb"],
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
