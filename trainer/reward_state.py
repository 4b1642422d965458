"""What a reward run keeps besides the model: its precision (fp32 master weights in mixed
precision) and the resumable state of training_state.pt.

    weight_dtype, mixed, precision, autocast = choose_precision(cfg.dtype, lora, cuda)
    master = fp32_masters(params, keep_fp32=head.parameters())   # params now hold bf16
    with masters_in_place(params, master):                        # save the fp32 weights
        save_checkpoint(run, model, tokenizer, meta, training_state(step=..., ...))
    state = restore_training_state(ckpt / STATE_FILE, optimizer, scheduler, lr_factor, lr)

Mixed precision with fp32 master weights is how Megatron and DeepSpeed do bf16: the model
holds bf16 weights that forward and backward run on, the optimizer steps fp32 copies and
writes them back once a step (trainer/reward.py). torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from trainer.checkpoints import load_training_state, rng_state, set_rng_state


class Precision(NamedTuple):
    weight_dtype: Any  # the torch dtype the model's weights are loaded in
    mixed: bool  # bf16 weights + fp32 master weights that the optimizer steps
    label: str  # what the run's config.json says ("precision")
    autocast: Callable[[], contextlib.AbstractContextManager]  # around every forward


def choose_precision(dtype: str, lora: bool, cuda: bool) -> Precision:
    """The precision of a run from --dtype (auto, mixed, bf16, fp32), LoRA and the device."""
    import torch

    weight_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    # Mixed precision with fp32 master weights (as Megatron and DeepSpeed do it in bf16): the
    # model holds bf16 weights that forward and backward run on, the optimizer steps fp32
    # copies and writes them back once a step. bf16 autocast instead re-casts every weight in
    # every forward and again in backward; on SmolLM2-135M on an H100 (a launch-bound step)
    # that cost 2.3x in step time. Plain bf16 weights are no substitute: at learning rates
    # ~1e-5 most updates round away (validation accuracy 0.59 against 1.00, same run).
    mixed = not lora and (dtype == "mixed" or (dtype == "auto" and cuda))
    label = (
        "bf16 weights + fp32 master weights"
        if mixed
        else "bf16 weights"
        if dtype == "bf16"
        else "fp32 weights + bf16 autocast"
        if cuda
        else "fp32"
    )

    def autocast():
        # LoRA and fp32 runs on CUDA: bf16 autocast (matmuls on tensor cores, weights in fp32).
        return (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cuda and not mixed and dtype != "bf16"
            else contextlib.nullcontext()
        )

    return Precision(weight_dtype, mixed, label, autocast)


def fp32_masters(params: list, keep_fp32) -> list:
    """fp32 copies of `params` for the optimizer (loaded, or resumed, in full precision);
    the same Parameter objects then hold bf16, except those in `keep_fp32` (the head).
    Buffers stay fp32 (module.to(bf16) would also round the rotary inv_freq buffer)."""
    import torch

    master = [p.detach().clone() for p in params]
    keep = {id(p) for p in keep_fp32}
    for p in params:
        if id(p) not in keep:
            p.data = p.data.to(torch.bfloat16)
    return master


@contextlib.contextmanager
def masters_in_place(params: list, master: list | None):
    """Point the Parameters at their fp32 masters for a write (no copy), then back."""
    compute = [p.data for p in params]
    if master is not None:
        for p, m in zip(params, master):
            p.data = m
    try:
        yield
    finally:
        for p, c in zip(params, compute):
            p.data = c


def training_state(
    *,
    step: int,
    train_seconds: float,
    train_cpu_seconds: float,
    pairs_seen: int,
    norm: dict,
    last_eval: dict,
    optimizer,
    scheduler,
) -> dict:
    """What training_state.pt holds: what restore_training_state puts back on a resume,
    with the RNG state of this moment."""
    return {
        "step": step,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "pairs_seen": pairs_seen,
        "norm": norm,
        "last_eval": {k: v for k, v in last_eval.items() if not k.startswith("_")},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }


def restore_training_state(path: Path, optimizer, scheduler, lr_factor, lr: float) -> dict:
    """Load training_state.pt into the optimizer, the scheduler and the RNGs; return it (the
    step and the counters). The schedule follows the (maybe longer) run, and a new --lr."""

    state = load_training_state(path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.lr_lambdas[0] = lr_factor  # the schedule follows the (maybe longer) run
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)  # and a new --lr, if given
    for group in optimizer.param_groups:
        group["lr"] = lr * lr_factor(state["step"])
    set_rng_state(state["rng"])
    return state
