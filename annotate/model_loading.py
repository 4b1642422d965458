"""Loading a generation model for a command (`preflab generate`, `preflab model`), saying
on stderr what takes the time.

    quiet_transformers()                      # no per-file bars or advisory warnings
    announce_conversion("smollm2", cache)     # "converting the shipped SmolLM2 GGUF ..." (first use)
    model, tokenizer = load_announced("smollm2", device="auto", cache_dir=None)   # "loaded ... in 2.1s"

torch / transformers are imported inside the functions: `preflab --help` stays fast.
"""

from __future__ import annotations

import sys
import time

from trainer.models import DEFAULT_MODEL, canonical_name
from trainer.runs import CONFIG_FILE


def quiet_transformers() -> None:
    # The per-file "Loading weights" bars and advisory warnings drown the output that
    # matters here; our own messages say what is being loaded and how long it took.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def announce_conversion(name: str, cache_dir) -> bool:
    """Say so before the default model's first use converts it (which takes a while)."""
    from trainer.models import default_model_dir

    target = default_model_dir(cache_dir)
    if canonical_name(name) != DEFAULT_MODEL or (target / CONFIG_FILE).is_file():
        return False
    print(
        f"converting the shipped SmolLM2 GGUF into {target} (once; about half a minute on a CPU)",
        file=sys.stderr,
    )
    return True


def load_announced(name: str, *, device, cache_dir) -> tuple:
    """trainer.models.load_model, then one line saying what was loaded, where, how fast."""
    from trainer import models

    t0 = time.perf_counter()
    model, tokenizer = models.load_model(name, device=device, cache_dir=cache_dir)
    print(
        f"loaded {canonical_name(name)} in {time.perf_counter() - t0:.1f}s "
        f"({model.device}, {str(model.dtype).removeprefix('torch.')})",
        file=sys.stderr,
    )
    return model, tokenizer
