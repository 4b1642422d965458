"""How a directory store is laid out, and how it is read.

    <store>/parts/<name>.parquet       immutable zstd Parquet part files, renamed into place
    <store>/parts/.<name>.<rand>.tmp   a part being written (never read; a dead writer's
                                       leftovers are removed by recovery)
    <store>/tail/<writer>.<seq>.jsonl  a live writer's un-flushed events, one JSON a line,
                                       fdatasync'd before the event is acknowledged
    <store>/tail/<writer>.lock         flock'ed by that writer while it lives
    <store>/quarantine/                segments that held bytes recovery could not turn into
                                       events (kept, never deleted, never read)
    <store>/serve.lock                 flock'ed by the one `preflab serve` of this store

A writer id never contains a dot (trainer/store/directory_writer.py), and a segment's
writer is its name less the last two dotted parts (`.<seq>.jsonl`), so a hostname
like `node-7.rack-2.cluster.local` cannot make a live writer look like another one.

Reading = every part file + every tail segment that has not yet become a part file,
minus the parts a compacted part says it replaces. Reading never writes. A part file
that cannot be parsed is reported and skipped; one that cannot be *opened* for lack of
permission is an error (StorePermissionError), never "damaged": the data is there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.store.errors import StoreError, StoreNotFound, StorePermissionError
from trainer.store.record import (
    FLAG_KINDS,
    SCHEMA,
    RecordError,
    check_columns,
    concat,
    empty_table,
    records_to_table,
    standing_votes,
    validate_record,
)

log = logging.getLogger("preflab.store")

PARTS_DIR = "parts"
TAIL_DIR = "tail"
QUARANTINE_DIR = "quarantine"
SERVE_LOCK = "serve.lock"
# Parquet key-value metadata on a compacted part: JSON list of the part names it replaces.
REPLACES_KEY = b"preflab.replaces"


@dataclass
class StoreFiles:
    """What a reader sees in a store directory at one moment."""

    parts: list[Path] = field(default_factory=list)  # live part files
    replaced: list[Path] = field(default_factory=list)  # superseded by a compacted part
    tails: list[Path] = field(default_factory=list)  # segments not yet turned into parts


class _Vanished(Exception):
    """A file disappeared between listing and reading (a flush or a compaction)."""


def tail_part_name(segment: Path) -> str:
    """The part file a tail segment becomes when it is flushed: same stem."""
    return segment.stem + ".parquet"


def segment_writer(segment: Path) -> str:
    """The writer id of `<writer>.<seq>.jsonl` (everything before the last two dots)."""
    return segment.name.rsplit(".", 2)[0]


def permission_error(path: Path, e: OSError, doing: str) -> StorePermissionError:
    return StorePermissionError(
        f"{path}: permission denied {doing} ({e.strerror}); the comparison store's files must be "
        f"readable and writable by the user running preflab (uid {os.getuid()})"
    )


def _listdir(directory: Path, pattern: str) -> list[Path]:
    try:
        return sorted(directory.glob(pattern)) if directory.is_dir() else []
    except PermissionError as e:
        raise permission_error(directory, e, "listing the directory") from None


def list_store(store: str | os.PathLike) -> StoreFiles:
    root = Path(store)
    try:
        if not root.is_dir():
            raise StoreNotFound(f"{root}: no such comparison store (a directory)")
        os.listdir(root)
    except PermissionError as e:
        raise permission_error(root, e, "opening the store") from None
    parts_dir, tail_dir = root / PARTS_DIR, root / TAIL_DIR
    # Tails are listed BEFORE parts: a writer creates a segment's part before it
    # unlinks the segment, so in this order an event is always in one of the lists.
    segments = _listdir(tail_dir, "*.jsonl")
    parts = _listdir(parts_dir, "*.parquet")
    names = {p.name for p in parts}
    replaced: set[str] = set()
    for p in parts:
        if p.name.startswith("compact-"):
            try:
                meta = pq.read_schema(p).metadata or {}
            except FileNotFoundError:
                raise _Vanished(p) from None
            except PermissionError as e:
                raise permission_error(p, e, "reading a part file") from None
            except Exception:  # damaged: reported when read
                continue
            replaced.update(json.loads(meta.get(REPLACES_KEY, b"[]")))
    return StoreFiles(
        parts=[p for p in parts if p.name not in replaced],
        replaced=[p for p in parts if p.name in replaced],
        # A segment whose part already exists crashed (or is) between rename and
        # unlink: the part holds its events, so the segment is ignored.
        tails=[s for s in segments if tail_part_name(s) not in names],
    )


def parse_tail_segment(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parse one tail segment: (events, bytes that held no event). A torn final line (a
    writer killed mid-write, or a write that failed and was never acknowledged) holds
    no acknowledged event and is dropped; a bad line elsewhere is reported with its line
    number and skipped. The byte count tells recovery whether the segment may go."""
    records, dropped = [], 0
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError as e:
        raise permission_error(path, e, "reading a tail segment") from None
    lines = data.split(b"\n")
    # The last element is b"" when the file ends with a newline, else a torn line.
    for lineno, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            dropped += len(line) + 1
            continue
        try:
            records.append(validate_record(json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, RecordError) as e:
            log.warning("%s:%d: skipped a damaged event (%s)", path, lineno, e)
            dropped += len(line) + 1
    dropped += len(lines[-1])
    return records, dropped


def read_tail_segment(path: Path) -> list[dict[str, Any]]:
    return parse_tail_segment(path)[0]


def _read_part(path: Path, columns: list[str] | None = None) -> pa.Table | None:
    try:
        table = pq.read_table(path, schema=SCHEMA, columns=columns)
        return table.select(columns) if columns is not None else table  # in the order asked
    except FileNotFoundError:
        raise _Vanished(path) from None
    except PermissionError as e:
        raise permission_error(path, e, "reading a part file") from None
    except OSError as e:
        # pyarrow reports an unopenable file as a plain OSError carrying the errno text
        if getattr(e, "errno", None) == errno.EACCES or "Permission denied" in str(e):
            raise permission_error(path, e, "reading a part file") from None
        log.warning("%s: damaged part file skipped (%s)", path, e)
        return None
    except Exception as e:  # pyarrow raises several types for damaged files
        log.warning("%s: damaged part file skipped (%s)", path, e)
        return None


def _read_once(store: str | os.PathLike, columns: list[str] | None = None) -> list[pa.Table]:
    files = list_store(store)
    tables: list[pa.Table] = []
    if files.parts:
        with ThreadPoolExecutor(max_workers=min(8, len(files.parts))) as pool:
            tables = [t for t in pool.map(lambda p: _read_part(p, columns), files.parts) if t is not None]
    tail_records = []
    for segment in files.tails:
        try:
            tail_records.extend(read_tail_segment(segment))
        except FileNotFoundError:
            # Flushed since we listed it: the writer renamed its part into place
            # before unlinking the segment, so the events are there.
            part = _read_part(segment.parent.parent / PARTS_DIR / tail_part_name(segment), columns)
            if part is not None:
                tables.append(part)
    if tail_records:
        tail = records_to_table(tail_records)
        tables.append(tail.select(columns) if columns is not None else tail)
    return tables


def read_tables(store: str | os.PathLike, columns: list[str] | None = None) -> list[pa.Table]:
    """One table per file. Safe while writers append and a compaction runs: a file
    that vanishes mid-read means its events moved to a newer file, so start over."""
    for attempt in range(50):
        try:
            return _read_once(store, columns)
        except _Vanished:
            time.sleep(0.001 * attempt)
    raise StoreError(
        f"{store}: files kept moving during 50 read attempts (a compaction or many flushes "
        f"at once); try again"
    )


def read_events(store: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Every event in the store (votes, retracts and flag events), unordered; `columns`: only these."""
    tables = read_tables(store, columns)
    return (
        concat(tables)
        if columns is None
        else (pa.concat_tables(tables) if tables else empty_table().select(columns))
    )


def read_flag_events(store: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The flag events in this store's order: created_at, then event_id. A directory has one
    server (its ServeLock), the only writer of flag events, so one clock stamps them, and
    compaction keeps its parts in created_at order too. `columns`: only these (plus what
    the order needs, dropped again)."""
    wanted = list(columns) if columns is not None else None
    needed = None if wanted is None else list(dict.fromkeys([*wanted, "kind", "created_at", "event_id"]))
    events = read_events(store, needed)
    hit = pc.is_in(events["kind"], value_set=pa.array(FLAG_KINDS, pa.string()))
    flags = events.filter(hit).sort_by([("created_at", "ascending"), ("event_id", "ascending")])
    return flags if wanted is None else flags.select(wanted)


def read_comparisons(store: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The standing votes: see trainer.store.read_comparisons."""
    return standing_votes(read_tables(store, check_columns(columns)), columns)
