"""Checkpoint directories that a kill mid-save cannot break, and the RNG state a resume needs.

    swap_in(tmp, final)          # tmp fully written: it becomes `final` by two renames
    state = rng_state()          # python, numpy, torch (and CUDA) generators, into training_state.pt
    set_rng_state(state)         # on resume: the run draws what an uninterrupted one would have

Shared by the reward and the policy trainer. torch is imported inside the functions.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the fully written `tmp` with renames: the previous directory stays
    intact until the new one is complete (a kill mid-save loses nothing; a kill between the
    two renames leaves `final.old`, which trainer.runs.RunDir.checkpoint() finds)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
