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
    targets.py           what a target names, printed without its password
    errors.py            StoreError and its kinds (each names what is at fault)
    directory_reader.py  the directory layout and how it is read
    directory_writer.py  appending to a directory: tail segments, part files, recovery
    compaction.py        merging a directory's part files
    postgres.py          the PostgreSQL backend: events, schema migrations, shared assignment
    postgres_connect.py  its connections: the retrying pool, why a connection failed
    copy.py              moving a store between backends, exactly
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from trainer.store.errors import (  # noqa: F401
    StoreBusy,
    StoreError,
    StoreNotFound,
    StorePermissionError,
    StoreUnavailable,
    StoreWriteError,
    VoteConflict,
)
from trainer.store.record import (  # noqa: F401
    CHOICES,
    FIELDS,
    KINDS,
    SCHEMA,
    SCHEMA_VERSION,
    SIDES,
    RecordError,
    apply_retractions,
    is_chat_vote,
    messages_to_json,
    pair_id_for,
    prompt_id_for,
    records_to_table,
    side_contexts,
    validate_record,
)
from trainer.store.targets import describe, is_database, target_key, without_password  # noqa: F401

# What `--data` means, for every command's --help.
DATA_HELP = "the comparison store: a directory, or postgresql://user@host:port/db"


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


def read_flag_events(target: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The flag events (flag, flag_confirm, flag_clear), in the store's order: the order
    trainer/flags.py decides an annotator's state in, never the writers' clocks alone. A
    database's is `seq`, one sequence for all its servers (their clocks may disagree); a
    directory's is created_at then event_id (one server per directory: one clock)."""
    if is_database(target):
        from trainer.store.postgres import read_flag_events as read
    else:
        from trainer.store.directory_reader import read_flag_events as read
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
