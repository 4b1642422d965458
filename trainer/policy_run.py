"""The bookkeeping of a policy run around its loop (trainer/policy.py): which prompts a
step draws, the statistics of a step, checkpoints and the final policy, failing and
cancelling cleanly.

    rows = prompt_rows(step, rank, world, batch_size, n_prompts, seed)   # a function of the step
    roll = RolloutSums.gather(reduce, reward=raw.sum(), ...)             # one all-reduce, named sums
    save_checkpoint(run, accelerator, net, tokenizer, policy_meta(...), state)
    return fail(run, "the KL exploded ...", step, steps)                 # state failed, exit code 1

torch is imported inside functions.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.policy_model import merge_lora_in_fp32, save_policy
from trainer.runs import CHECKPOINT, POLICY_DIR, Run


def seed_for(seed: int, step: int, rank: int) -> int:
    """Each step (and each process) samples from its own seed: a resumed run draws what an
    uninterrupted one would have, and DDP processes never draw the same answers."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)


def prompt_rows(step: int, rank: int, world: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """The prompts of one step on one process: consecutive slices of a seeded permutation of
    the pool, a fresh permutation each pass. A function of the step alone, so resume needs
    no sampler state."""
    import numpy as np

    out, perms = [], {}
    first = (step * world + rank) * batch_size
    for g in range(first, first + batch_size):
        epoch, i = divmod(g, n_prompts)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.append(int(perms[epoch][i]))
    return out


def policy_meta(cfg, base_source: str, rm_path: Path, step: int, kl_coef: float) -> dict:
    """preflab_policy.json: where the policy came from (`cfg`: the run's PolicyConfig)."""
    return {
        "format": 1,
        "algo": cfg.algo,
        "base_model": cfg.model,
        "base_source": base_source,
        "reward_model": str(rm_path),
        "step": step,
        "lora": cfg.lora_r > 0,
        "kl_coef": kl_coef,
    }


def save_checkpoint(run: Run, accelerator, net, tokenizer, meta: dict, state: dict) -> None:
    """The resumable checkpoint: the model (or LoRA adapter), the value head, training_state.pt."""
    if run.main:
        save_policy(run.path / CHECKPOINT, net.lm, tokenizer, meta, net.value_head, state)
    accelerator.wait_for_everyone()


def save_final(run: Run, accelerator, net, tokenizer, meta: dict, weight_dtype, base_source: str) -> None:
    """The result: a plain HF model directory (LoRA merged in); the resumable state goes."""
    import torch

    if run.main:
        model = net.lm
        if meta["lora"]:  # a plain model: loadable without peft
            model = (
                model.merge_and_unload()
                if weight_dtype == torch.float32
                else merge_lora_in_fp32(model, base_source)
            )
        save_policy(run.path / POLICY_DIR, model, tokenizer, meta)
        shutil.rmtree(run.path / CHECKPOINT, ignore_errors=True)
        shutil.rmtree(run.path / (CHECKPOINT + ".old"), ignore_errors=True)
    accelerator.wait_for_everyone()


def fail(run: Run, message: str, step: int, steps: int) -> int:
    from tqdm.auto import tqdm

    kept = run.checkpoint()
    message = f"{message}. Last good checkpoint: {kept or 'none (no checkpoint was saved yet)'}"
    run.status("failed", step / steps, message, step=step, total_steps=steps)
    if run.main:
        tqdm.write(f"error: {message}", file=sys.stderr)
    return 1


def finish_cancelled(run: Run, signum: int, step: int, steps: int) -> int:
    """After the checkpoint of `step` is saved: state `cancelled`, exit code 128 + signal."""
    from tqdm.auto import tqdm

    msg = f"cancelled at step {step} of {steps}; run the same command again to resume"
    run.status("cancelled", step / steps, msg, step=step, total_steps=steps)
    if run.main:
        tqdm.write(msg, file=sys.stderr)
    return 128 + signum


def reduce_sum(accelerator, t):
    """Sum over the processes (DDP); the tensor itself on one process."""
    return accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t


def peak_memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------------------
# The statistics of a step (summed over answers and over processes, then logged)
# --------------------------------------------------------------------------------------


@dataclass
class RolloutSums:
    """Steps 1-3 of one step, summed over its answers (all processes)."""

    reward: float  # the reward model's normalised score
    reward_sq: float  # its square (for the std)
    score: float  # after the missing-EOS penalty
    kl: float  # sum_t log pi/ref per answer (k1): the usual "KL" of RLHF
    kl_penalty: float  # the same with the estimator in use
    entropy: float  # summed over tokens
    tokens: float  # answer tokens
    eos: float  # answers that ended with EOS
    answers: float

    @classmethod
    def gather(cls, reduce, **sums) -> RolloutSums:
        """From one tensor per field (this process's sums): one all-reduce for all of them."""
        import torch

        stacked = torch.stack([sums[f.name] for f in dataclasses.fields(cls)]).double()
        return cls(*reduce(stacked).tolist())


@dataclass
class UpdateSums:
    """Step 5, summed over its micro-batches (all processes)."""

    pg_loss: float
    value_loss: float
    clipped: float  # tokens (PPO) or answers whose ratio was clipped
    value_clipped: float  # tokens whose value was clipped (PPO)
    approx_kl: float  # 0.5 (log pi/pi_old)^2, summed over tokens
    tokens: float  # tokens updated on
    answers: float  # answers updated on

    @staticmethod
    def zeros(device):
        """The accumulator: a float64 tensor, one entry per field, in field order."""
        import torch

        return torch.zeros(len(dataclasses.fields(UpdateSums)), dtype=torch.float64, device=device)
