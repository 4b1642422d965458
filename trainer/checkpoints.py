"""Checkpoint directories that a kill mid-save cannot break, and the RNG state a resume needs.

    swap_in(tmp, final)          # tmp fully written: it becomes `final` by two renames
    state = rng_state()          # python, numpy, torch (and CUDA) generators, into training_state.pt
    set_rng_state(state)         # on resume: the run draws what an uninterrupted one would have
    state = load_training_state(path)   # torch.load(weights_only=True): a file, never code

Shared by the reward and the policy trainer. torch is imported inside the functions.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np

from trainer.errors import PreflabError


class CheckpointError(PreflabError):
    """A checkpoint that cannot be resumed from; the message names the file."""


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


def load_training_state(path: Path) -> dict:
    """training_state.pt, loaded as data only (`weights_only=True`: tensors, numbers,
    strings and containers). The file lives in a run directory, which other people may
    be able to write to: a pickle planted there must not run code when Resume is clicked.
    A state that is not plain data is refused with a CheckpointError."""
    import pickle

    import torch

    # Numpy arrays (the RNG key in states saved by earlier versions) are data too: allowed
    # by name, as torch's weights-only loader recommends; nothing else is.
    arrays = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(arrays):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines() if "GLOBAL" in line), "it holds objects")
        raise CheckpointError(
            f"{path}: not plain training state (tensors, arrays and numbers), so it is not loaded "
            f"({reason.strip()[:200]}); start the run again in a new run directory"
        ) from None


def rng_state() -> dict:
    import torch

    keys = np.random.get_state()
    # numpy's state as plain numbers (its key array as a list): weights_only loading
    # takes tensors, numbers and containers, not numpy arrays.
    numpy_state = (keys[0], keys[1].tolist(), int(keys[2]), int(keys[3]), float(keys[4]))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
