"""The files preflab ships (trainer/data/): the one place their paths are worked out.

    from trainer.shipped import DEFAULT_PROMPTS, DEMO_PAIRS, GUIDELINES, EXAMPLE_RUBRIC

They are package data of `trainer`, found through importlib.resources, so a wheel
install finds them as a checkout does (a path worked out from the repository root would
point into site-packages' parent, where nothing is). In `trainer`, not `annotate`:
train-policy's default pool is one of them, and trainer never imports the app; the app's
files (guidelines, demo pairs, the example rubric) sit beside it so there is one folder
and one owner. Each is shipped once: the repository's copy is the package's.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped(name: str) -> Path:
    """The shipped file `name` as a real path. Callers pass it on as a path (argparse
    defaults, a trainer's command line, a run's config), so it must be one: setuptools
    installs a wheel unpacked, never as a zip, and a resource there is a plain Path."""
    resource = files(__package__).joinpath("data", name)
    if not isinstance(resource, Path):  # pragma: no cover - a zipped install
        raise RuntimeError(f"preflab's data must be installed as files, not in an archive ({resource})")
    return resource


# The pool of `serve --model` and of train-policy, when none is given.
DEFAULT_PROMPTS = shipped("prompts.jsonl")
# The first pairs `serve` shows on DEFAULT_PROMPTS (annotate/pregenerated.py: `make demo-pairs`).
DEMO_PAIRS = shipped("demo-pairs.jsonl")
# The annotation guidelines the page shows unless `serve --guidelines` names others.
GUIDELINES = shipped("guidelines.md")
# An example for `serve --rubric` (README).
EXAMPLE_RUBRIC = shipped("rubric.toml")
