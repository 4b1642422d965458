"""The files preflab ships, and the one place their paths are worked out.

The prompt pool (`preflab serve`, `generate`, `train-policy` and the Train tab default to
it), the annotators' guidelines (`serve --guidelines`), the demo pairs made ahead of
time for that pool (`make demo-pairs`), an example rubric and the judge's prompt
(`preflab judge`). They live inside this
package, not beside it, so that a wheel carries them (pyproject.toml's package-data);
`importlib.resources` finds them where the package is, a checkout or site-packages alike.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# A package installed from a wheel or a checkout is a directory, so its Traversable is a
# real path; the callers need one (they open, resolve and compare paths, and pass them
# to subprocesses). A zipped install would fail here, at import, not half-way through.
SHIPPED = Path(str(files(__name__)))
if not SHIPPED.is_dir():
    raise RuntimeError(f"preflab's data files must be on disk, not in an archive: {SHIPPED}")

PROMPTS = SHIPPED / "prompts.jsonl"
GUIDELINES = SHIPPED / "guidelines.md"
DEMO_PAIRS = SHIPPED / "demo-pairs.jsonl"
RUBRIC = SHIPPED / "rubric.toml"
JUDGE_TEMPLATE = SHIPPED / "judge.md"  # preflab judge's default prompt (annotate/judge_template.py)
