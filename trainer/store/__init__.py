"""The comparison store: the record, its readers and writers, two backends.

    from trainer.store import open_store, read_comparisons
    with open_store("comparisons") as store:              # a directory (the default)
        store.append({...})                               # durable when it returns
    votes = read_comparisons("postgresql://me@db:5432/votes")   # or a database

A *target* names a store: a directory path, or a `postgresql://` URL. Everything
that takes `--data` takes either; the record (trainer/store/record.py) and what the
readers return (standing votes, retractions applied, the same Arrow schema) are the
same code for both.

    record.py            the schema, validation, "standing votes"
    errors.py            StoreError and its kinds (each names what is at fault)
    directory_reader.py  the directory layout and how it is read
    directory_writer.py  appending to a directory: tail segments, part files, recovery
    compaction.py        merging a directory's part files
    postgres.py          the PostgreSQL backend: events, schema migrations, shared assignment
    copy.py              moving a store between backends, exactly
"""

from __future__ import annotations

import os
import re
from typing import Any

import pyarrow as pa

from trainer.store.errors import (StoreBusy, StoreError, StoreNotFound, StorePermissionError,  # noqa: F401
                                  StoreUnavailable, StoreWriteError, VoteConflict)
from trainer.store.record import (CHOICES, FIELDS, KINDS, SCHEMA, SCHEMA_VERSION, SIDES,  # noqa: F401
                                  RecordError, apply_retractions, messages_to_json, pair_id_for,
                                  prompt_id_for, records_to_table, validate_record)

# What `--data` means, for every command's --help.
DATA_HELP = "the comparison store: a directory, or postgresql://user@host:port/db"

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
        return text[:found.start()] + found.group(1) + "@" + text[found.end():], unquote(found.group(2))
    found = re.search(r"([?&])password=([^&]*)&?", text, flags=re.IGNORECASE)
    if found:
        rest = text[:found.start()] + (found.group(1) if text[found.end():] else "") + text[found.end():]
        return rest.rstrip("?&"), unquote(found.group(2))
    return text, None


def target_key(target: str | os.PathLike) -> str:
    """A short stable name for a store (its password left out): for local files that
    belong with a database store, such as a server's pair cache."""
    import hashlib
    return "pg-" + hashlib.sha256(describe(target).encode()).hexdigest()[:12]


def open_store(target: str | os.PathLike, **options: Any):
    """A writer on the store: `DirectoryStore` for a path, `PostgresStore` for a URL.
    Options are the backend's (e.g. flush_every for a directory)."""
    if is_database(target):
        from trainer.store.postgres import PostgresStore
        return PostgresStore(str(target), **options)
    from trainer.store.directory_writer import DirectoryStore
    return DirectoryStore(target, **options)


def store_exists(target: str | os.PathLike) -> bool:
    """Whether there is a store to read (a database always is, once reachable)."""
    if is_database(target):
        return True
    return os.path.isdir(target)


def read_events(target: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Every event in the store (votes and retracts), unordered; `columns`: only these."""
    if is_database(target):
        from trainer.store.postgres import read_events as read
    else:
        from trainer.store.directory_reader import read_events as read
    return read(target, columns)


def read_comparisons(target: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The standing votes of a store as an Arrow table with SCHEMA, retractions applied.

    columns: only these fields, in this order (a directory store's Parquet reads nothing
    else: model_a, model_b and choice of a million votes come back without touching the
    answer text)."""
    if is_database(target):
        from trainer.store.postgres import read_comparisons as read
    else:
        from trainer.store.directory_reader import read_comparisons as read
    return read(target, columns)
