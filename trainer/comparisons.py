"""The comparison record and how a comparison store is read.

This module is the contract between the annotation app (which writes a store through
`annotate.store.ComparisonStore`) and the trainers (which only read). The field names
and types are fixed by DESIGN.md; see there for their meaning.

A store is a directory:

    <store>/parts/<name>.parquet    immutable zstd Parquet part files, renamed into place
    <store>/tail/<writer>.<seq>.jsonl  a live writer's un-flushed events, one JSON a line,
                                     fdatasync'd before the event is acknowledged
    <store>/tail/<writer>.lock       flock'ed by that writer while it lives

Reading = every part file + every tail segment that has not yet become a part file,
minus the parts a compacted part says it replaces. Reading never writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("preflab.comparisons")

SCHEMA_VERSION = 1

SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("retracts", pa.string()),
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response_a", pa.string(), nullable=False),
        pa.field("response_b", pa.string(), nullable=False),
        pa.field("model_a", pa.string(), nullable=False),
        pa.field("model_b", pa.string(), nullable=False),
        pa.field("left", pa.string(), nullable=False),
        pa.field("choice", pa.string()),
        pa.field("strength", pa.int8()),
        pa.field("rationale", pa.string()),
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("decision_ms", pa.int32()),
        pa.field("gen_params", pa.string()),
    ]
)
FIELDS = SCHEMA.names

KINDS = ("vote", "retract")
CHOICES = ("a", "b", "tie", "both_bad")
SIDES = ("a", "b")

PARTS_DIR = "parts"
TAIL_DIR = "tail"
# Parquet key-value metadata on a compacted part: JSON list of the part names it replaces.
REPLACES_KEY = b"preflab.replaces"


class RecordError(ValueError):
    """A record that breaks the schema. The message names the field."""

    def __init__(self, field_name: str, reason: str, where: str = ""):
        self.field, self.reason, self.where = field_name, reason, where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}field '{field_name}': {reason}")


def messages_to_json(messages: list[dict[str, str]]) -> str:
    """The one canonical JSON spelling of a chat prompt (what the `prompt` field holds)."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                      ensure_ascii=False, separators=(",", ":"))


def prompt_id_for(messages: list[dict[str, str]]) -> str:
    """Stable id of a prompt that came without one: a hash of its canonical JSON."""
    return "p-" + hashlib.sha256(messages_to_json(messages).encode()).hexdigest()[:16]


def pair_id_for(prompt_json: str, response_a: str, response_b: str) -> str:
    """Stable id of a pair given in canonical order (same pair -> same id)."""
    h = hashlib.sha256()
    for part in (prompt_json, response_a, response_b):
        h.update(part.encode())
        h.update(b"\0")
    return "pair-" + h.hexdigest()[:20]


# --------------------------------------------------------------------------------------
# Validation of one record (the write path calls this before anything touches disk)
# --------------------------------------------------------------------------------------

_STRING_FIELDS_REQUIRED = ("event_id", "pair_id", "prompt_id", "prompt", "response_a",
                           "response_b", "model_a", "model_b", "annotator")
_STRING_FIELDS_OPTIONAL = ("retracts", "rationale", "gen_params")


def _check_messages(value: str) -> None:
    try:
        messages = json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordError("prompt", f"not valid JSON ({e.msg})") from None
    if not isinstance(messages, list) or not messages:
        raise RecordError("prompt", "must be a non-empty JSON list of chat messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise RecordError("prompt", f"message {i} needs string 'role' and 'content'")


def to_micros(value: Any) -> int:
    """created_at as integer microseconds since the epoch (UTC)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp() * 1_000_000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return to_micros(datetime.fromisoformat(value.replace("Z", "+00:00")))
    raise RecordError("created_at", f"expected a datetime, got {type(value).__name__}")


def validate_record(record: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Return a normalised copy of `record` or raise RecordError naming the field.

    `created_at` comes back as integer microseconds (UTC); everything else keeps its
    Python type. Unknown fields are refused so that a typo never silently drops data.
    """
    unknown = set(record) - set(FIELDS)
    if unknown:
        raise RecordError(sorted(unknown)[0], "unknown field", where)
    missing = [f for f in FIELDS if f not in record and not SCHEMA.field(f).nullable]
    if missing:
        raise RecordError(missing[0], "missing", where)
    r = {f: record.get(f) for f in FIELDS}
    try:
        if r["schema_version"] != SCHEMA_VERSION:
            raise RecordError("schema_version", f"must be {SCHEMA_VERSION}, got {r['schema_version']!r}")
        for f in _STRING_FIELDS_REQUIRED:
            # An empty response is a legitimate (bad) model answer; empty ids are not.
            if not isinstance(r[f], str) or (not r[f] and f not in ("response_a", "response_b")):
                raise RecordError(f, f"must be a non-empty string, got {r[f]!r:.60}")
        for f in _STRING_FIELDS_OPTIONAL:
            if r[f] is not None and not isinstance(r[f], str):
                raise RecordError(f, f"must be a string or null, got {type(r[f]).__name__}")
        if r["kind"] not in KINDS:
            raise RecordError("kind", f"must be one of {KINDS}, got {r['kind']!r}")
        if r["left"] not in SIDES:
            raise RecordError("left", f"must be 'a' or 'b', got {r['left']!r}")
        _check_messages(r["prompt"])
        if r["kind"] == "retract":
            if not r["retracts"]:
                raise RecordError("retracts", "a retract event must name the event_id it cancels")
            if r["choice"] is not None:
                raise RecordError("choice", "must be null on a retract event")
        else:
            if r["retracts"] is not None:
                raise RecordError("retracts", "only a retract event may name one")
            if r["choice"] not in CHOICES:
                raise RecordError("choice", f"must be one of {CHOICES}, got {r['choice']!r}")
        s = r["strength"]
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, int) or s not in (1, 2):
                raise RecordError("strength", f"must be 1 (slightly) or 2 (clearly) or null, got {s!r}")
            if r["choice"] in ("tie", "both_bad", None):
                raise RecordError("strength", f"must be null when choice is {r['choice']!r}")
        d = r["decision_ms"]
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < 2**31):
            raise RecordError("decision_ms", f"must be a non-negative int32 or null, got {d!r}")
        if r["gen_params"] is not None:
            try:
                json.loads(r["gen_params"])
            except json.JSONDecodeError as e:
                raise RecordError("gen_params", f"not valid JSON ({e.msg})") from None
        r["created_at"] = to_micros(r["created_at"])
    except RecordError as e:
        if where and not e.where:
            raise RecordError(e.field, e.reason, where) from None
        raise
    return r


def records_to_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """Normalised records (from validate_record) -> a table with exactly SCHEMA."""
    records = list(records)
    columns = {}
    for f in SCHEMA:
        values = [r[f.name] for r in records]
        if f.name == "created_at":
            columns[f.name] = pa.array(values, pa.int64()).cast(f.type)
        else:
            columns[f.name] = pa.array(values, f.type)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


# --------------------------------------------------------------------------------------
# Reading a store
# --------------------------------------------------------------------------------------

@dataclass
class StoreFiles:
    """What a reader sees in a store directory at one moment."""

    parts: list[Path] = field(default_factory=list)      # live part files
    replaced: list[Path] = field(default_factory=list)   # superseded by a compacted part
    tails: list[Path] = field(default_factory=list)      # segments not yet turned into parts


class _Vanished(Exception):
    """A file disappeared between listing and reading (a flush or a compaction)."""


def tail_part_name(segment: Path) -> str:
    """The part file a tail segment becomes when it is flushed: same stem."""
    return segment.stem + ".parquet"


def list_store(store: str | os.PathLike) -> StoreFiles:
    root = Path(store)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such comparison store (a directory)")
    parts_dir, tail_dir = root / PARTS_DIR, root / TAIL_DIR
    # Tails are listed BEFORE parts: a writer creates a segment's part before it
    # unlinks the segment, so in this order an event is always in one of the lists.
    segments = sorted(tail_dir.glob("*.jsonl")) if tail_dir.is_dir() else []
    parts = sorted(parts_dir.glob("*.parquet")) if parts_dir.is_dir() else []
    names = {p.name for p in parts}
    replaced: set[str] = set()
    for p in parts:
        if p.name.startswith("compact-"):
            try:
                meta = pq.read_schema(p).metadata or {}
            except FileNotFoundError:
                raise _Vanished(p) from None
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


def read_tail_segment(path: Path) -> list[dict[str, Any]]:
    """Parse one tail segment. A torn final line (a writer killed mid-write, or one
    still writing) holds no acknowledged event and is dropped; a bad line elsewhere is
    reported with its line number and skipped."""
    records = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # The last element is b"" when the file ends with a newline, else a torn line.
    for lineno, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(validate_record(json.loads(line)))
        except (json.JSONDecodeError, RecordError) as e:
            log.warning("%s:%d: skipped a damaged event (%s)", path, lineno, e)
    return records


def _read_part(path: Path, columns: list[str] | None = None) -> pa.Table | None:
    try:
        table = pq.read_table(path, schema=SCHEMA, columns=columns)
        return table.select(columns) if columns is not None else table   # in the order asked
    except FileNotFoundError:
        raise _Vanished(path) from None
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


def _read_tables(store: str | os.PathLike, columns: list[str] | None = None) -> list[pa.Table]:
    """One table per file. Safe while writers append and a compaction runs: a file
    that vanishes mid-read means its events moved to a newer file, so start over."""
    for attempt in range(50):
        try:
            return _read_once(store, columns)
        except _Vanished:
            time.sleep(0.001 * attempt)
    raise RuntimeError(f"{store}: files kept moving during 50 read attempts; try again")


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables) if tables else empty_table()


def read_events(store: str | os.PathLike) -> pa.Table:
    """Every event in the store (votes and retracts), unordered."""
    return _concat(_read_tables(store))


def _standing(tables: list[pa.Table]) -> list[pa.Table]:
    """Drop retract events and the votes they name, table by table.

    Filtering copies every string, so it runs in parallel per file and skips the files
    that have nothing to drop (most of them, in a store with few undos).
    """
    retracted = pc.unique(pa.chunked_array(
        [pc.drop_null(t["retracts"]) for t in tables], pa.string()).combine_chunks())

    def keep(t: pa.Table) -> pa.Table:
        mask = pc.equal(t["kind"], "vote")
        if len(retracted):
            mask = pc.and_(mask, pc.invert(pc.is_in(t["event_id"], value_set=retracted)))
        if pc.all(mask).as_py() is not False:
            return t
        return t.filter(mask)

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(tables)))) as pool:
        return list(pool.map(keep, tables))


def apply_retractions(events: pa.Table) -> pa.Table:
    """The votes that stand: vote events not named by any retract event."""
    return _concat(_standing([events]))


def read_comparisons(store: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The standing votes of a store as an Arrow table with SCHEMA, retractions applied.

    columns: only these fields, in this order (Parquet reads nothing else: model_a,
    model_b and choice of a million votes come back without touching the answer text).
    """
    if columns is None:
        return _concat(_standing(_read_tables(store)))
    unknown = [c for c in columns if c not in FIELDS]
    if unknown:
        raise ValueError(f"unknown column {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    # the fields that retractions are applied with come along, then go
    needed = list(dict.fromkeys([*columns, "event_id", "kind", "retracts"]))
    tables = _standing(_read_tables(store, needed))
    return (pa.concat_tables(tables) if tables else empty_table().select(needed)).select(list(columns))
