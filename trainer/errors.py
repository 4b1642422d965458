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
    """An optional package a feature needs is not installed; the message names the
    install extra of pyproject.toml that brings it."""


def requires(module: str, extra: str, feature: str, error: type[PreflabError] = MissingExtra) -> ModuleType:
    """`module`, imported; or `error`, one line: "FEATURE needs MODULE: pip install
    'preflab[EXTRA]'". Every optional import a user can reach goes through here, so the
    advice is worded once and always names the extra (pip's own ImportError names
    neither the feature nor the fix). `error`: a subclass the caller's handlers expect
    (a store's StoreError, say)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise error(f"{feature} needs {module}: pip install 'preflab[{extra}]'") from None


def exit_code(command: Callable[..., Any], *args: Any) -> int:
    """Run a command's `run(args)` and return its exit code; a PreflabError becomes one
    line on stderr, `error: <message>`, and exit code 2 (no traceback)."""
    try:
        return int(command(*args) or 0)
    except PreflabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
