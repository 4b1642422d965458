"""The one base class of every error a user can act on.

A `PreflabError` carries a message meant for the person at the keyboard: it names the
file, line, field, run or flag at fault and says what to do. The command line catches
it once (`exit_code`, used by `annotate/cli.py` and by the trainers' own `python -m`
entry points: `error: <message>`, exit 2) and the web layer maps it once
(`annotate/web/guard.py`: a `gr.Error` with the same text). Anything else that escapes
is a bug and keeps its traceback.

It lives in `trainer` because `trainer` never imports `annotate`, and both raise it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class PreflabError(Exception):
    """A problem the user can fix; `str(e)` is the whole message, one line."""


class PolicyInputError(PreflabError, ValueError):
    """Input a policy cannot be trained on (a setting, the prompts, the reward model). The
    message says what to change. Here, not in trainer/policy.py, because the prompt loader
    (trainer/prompts.py) and the policy's model side raise it too."""


class MissingExtra(PreflabError):
    """A feature whose package is not installed; the message names the install extra."""


def missing_extra(module: str, extra: str) -> str | None:
    """None when the optional package `module` imports; else the one wording for its
    absence, "needs peft: pip install 'preflab[train]'", for a caller to prefix with the
    feature (a config check prefixes the flag: "--lora-r needs peft: ...").

    Only the package itself being absent is the user's to fix: an ImportError raised from
    inside an installed package (a broken install, an incompatible version) names another
    module and keeps its traceback."""
    top = module.split(".")[0]
    try:
        importlib.import_module(module)
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] != top:
            raise
        return f"needs {top}: pip install 'preflab[{extra}]'"
    return None


def requires(module: str, extra: str, feature: str) -> ModuleType:
    """The optional package `module` (pyproject.toml's extras), imported; MissingExtra
    naming the extra to install when it is absent: "<feature> needs <package>: pip install
    'preflab[<extra>]'"."""
    why = missing_extra(module, extra)
    if why:
        raise MissingExtra(f"{feature} {why}")
    return sys.modules[module]


def exit_code(command: Callable[..., Any], *args: Any) -> int:
    """Run a command's `run(args)` and return its exit code; a PreflabError becomes one
    line on stderr, `error: <message>`, and exit code 2 (no traceback)."""
    try:
        return int(command(*args) or 0)
    except PreflabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
