"""What a reward run keeps besides the model: fp32 master weights (mixed precision) and
the resumable state of training_state.pt.

    master = fp32_masters(params, keep_fp32=head.parameters())   # params now hold bf16
    with masters_in_place(params, master):                        # save the fp32 weights
        save_checkpoint(run, model, tokenizer, meta, state)
    state = restore_training_state(ckpt / STATE_FILE, optimizer, scheduler, lr_factor, lr)

Mixed precision with fp32 master weights is how Megatron and DeepSpeed do bf16: the model
holds bf16 weights that forward and backward run on, the optimizer steps fp32 copies and
writes them back once a step (trainer/reward.py). torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from trainer.checkpoints import set_rng_state


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


def restore_training_state(path: Path, optimizer, scheduler, lr_factor, lr: float) -> dict:
    """Load training_state.pt into the optimizer, the scheduler and the RNGs; return it (the
    step and the counters). The schedule follows the (maybe longer) run, and a new --lr."""
    import torch

    # weights_only=False: our own file, holding Python RNG state next to the tensors.
    state = torch.load(path, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.lr_lambdas[0] = lr_factor  # the schedule follows the (maybe longer) run
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)  # and a new --lr, if given
    for group in optimizer.param_groups:
        group["lr"] = lr * lr_factor(state["step"])
    set_rng_state(state["rng"])
    return state
