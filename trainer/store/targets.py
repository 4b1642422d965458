"""What a `--data` target names, and how it may be printed.

A target is a directory path or a `postgresql://` URL. A URL may hold a password:
`describe` masks it for messages and logs, `without_password` takes it out for
command lines and run directories (the password travels in PGPASSWORD instead).
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^postgres(ql)?://", re.IGNORECASE)


def is_database(target: str | os.PathLike) -> bool:
    """True for a `postgresql://` (or `postgres://`) URL, False for a directory path."""
    return bool(_URL.match(str(target)))


def describe(target: str | os.PathLike) -> str:
    """The target as it may be printed: a URL's password is masked, in the user part
    (`user:pw@`, `:pw@`) and as a `password=` parameter."""
    text = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(target))
    return re.sub(r"([?&]password=)[^&]*", r"\1***", text, flags=re.IGNORECASE)


def without_password(target: str | os.PathLike) -> tuple[str, str | None]:
    """(the target with its password taken out, the password or None). A trainer started
    by the page gets the first on its command line and in its run directory, and the
    password in its environment (PGPASSWORD, which libpq reads), never on disk."""
    text = str(target)
    if not is_database(text):
        return text, None
    from urllib.parse import unquote

    found = re.search(r"(://[^:/@]*):([^@/]*)@", text)
    if found:
        return text[: found.start()] + found.group(1) + "@" + text[found.end() :], unquote(found.group(2))
    found = re.search(r"([?&])password=([^&]*)&?", text, flags=re.IGNORECASE)
    if found:
        rest = text[: found.start()] + (found.group(1) if text[found.end() :] else "") + text[found.end() :]
        return rest.rstrip("?&"), unquote(found.group(2))
    return text, None


def target_key(target: str | os.PathLike) -> str:
    """A short stable name for a store (its password left out): for local files that
    belong with a database store, such as a server's pair cache."""
    import hashlib

    return "pg-" + hashlib.sha256(describe(target).encode()).hexdigest()[:12]
