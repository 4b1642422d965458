"""The comparison store: append-only, durable, many writers, no shared locks.

How a vote becomes durable (the layout is documented in trainer/comparisons.py):

1. `append` writes the event as one JSON line to this writer's tail segment
   (`tail/<writer>.<seq>.jsonl`) and fdatasync's it. Only then does it return: an
   acknowledged event survives `kill -9` and power loss.
2. Every `flush_every` events (or `flush_after_s` seconds) a background thread turns
   the pending events into a zstd Parquet part `parts/<writer>.<seq>.parquet`: written under a temporary name,
   fsync'd, renamed into place, directory fsync'd. Then the segment is unlinked and
   the writer moves on to `<seq + 1>`. A crash between rename and unlink leaves both;
   readers ignore a segment whose part exists, so nothing is read twice.
3. Each writer holds an flock on `tail/<writer>.lock` while it lives. A new writer
   that can take the lock of another writer knows that writer is dead, and turns its
   orphaned segments into part files (recovery).

Each writer only ever touches its own files, so any number of processes append to
one store at once. Compaction is the only operation that takes a store-wide lock,
and only against other compactions.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.comparisons import (PARTS_DIR, REPLACES_KEY, SCHEMA, SCHEMA_VERSION, TAIL_DIR,
                                 list_store, read_events, read_tail_segment, records_to_table,
                                 tail_part_name, validate_record)

log = logging.getLogger("preflab.store")

PARQUET_OPTIONS = dict(compression="zstd", compression_level=3)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(table: pa.Table, path: Path, metadata: dict[bytes, bytes] | None = None) -> None:
    """Write a part file atomically: temp name, fsync, rename, fsync the directory."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f, **PARQUET_OPTIONS)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ComparisonStore:
    """One writer on a store directory. Thread-safe; one instance per process is plenty.

    >>> with ComparisonStore("comparisons") as store:
    ...     rec = store.append({...})        # durable when it returns
    """

    def __init__(self, path: str | os.PathLike, *, flush_every: int = 1000,
                 flush_after_s: float = 30.0):
        self.root = Path(path)
        self.parts_dir = self.root / PARTS_DIR
        self.tail_dir = self.root / TAIL_DIR
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.tail_dir.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.flush_after_s = flush_after_s
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._mutex = threading.Lock()
        # Take our liveness lock before anything else, so no other process ever
        # mistakes us for a dead writer.
        self._lock_path = self.tail_dir / f"{self.writer_id}.lock"
        # Locked before it is visible: created under a name recovery ignores, flock'ed, then
        # renamed into place. Otherwise a recovering writer could flock it between our create
        # and our flock, take us for dead and delete it, and later our live segments.
        tmp_lock = self.tail_dir / f".{self.writer_id}.lock.tmp"
        self._lock_fd = os.open(tmp_lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp_lock, self._lock_path)
        self.recovered_events = recover_orphans(self.root)
        self._seq = 0
        self._pending: list[dict[str, Any]] = []
        self._segment_fd: int | None = None
        self._oldest_pending = 0.0
        self._closed = False
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preflab-flush")

    # ---- writing ---------------------------------------------------------------------

    def _segment_path(self) -> Path:
        return self.tail_dir / f"{self.writer_id}.{self._seq:06d}.jsonl"

    def _open_segment(self) -> None:
        self._segment_fd = os.open(self._segment_path(),
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_dir(self.tail_dir)  # the new name itself must survive a crash

    def _complete(self, record: dict[str, Any]) -> dict[str, Any]:
        record = dict(record)
        record.setdefault("schema_version", SCHEMA_VERSION)
        record.setdefault("event_id", str(uuid.uuid4()))
        if record.get("created_at") is None:
            record["created_at"] = datetime.now(timezone.utc)
        return record

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Validate, write, fdatasync; return the stored record (created_at in µs)."""
        rec = validate_record(self._complete(record))
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        with self._mutex:
            if self._closed:
                raise RuntimeError(f"{self.root}: store writer is closed")
            if self._segment_fd is None:
                self._open_segment()
                self._oldest_pending = time.monotonic()
            os.write(self._segment_fd, line)
            os.fdatasync(self._segment_fd)
            self._pending.append(rec)
            if (len(self._pending) >= self.flush_every
                    or time.monotonic() - self._oldest_pending >= self.flush_after_s):
                self._rotate_locked()
        return rec

    def append_many(self, records: Iterable[dict[str, Any]], where: str = "") -> list[dict[str, Any]]:
        """Validate every record first, then write them as one durable part file.

        For bulk imports: nothing is written unless all records are valid.
        """
        prefix = f"{where} " if where else ""
        recs = [validate_record(self._complete(r), where=f"{prefix}item {i}")
                for i, r in enumerate(records)]
        if not recs:
            return []
        table = records_to_table(recs)
        with self._mutex:
            write_part(table, self.parts_dir / f"{self.writer_id}.bulk-{uuid.uuid4().hex[:12]}.parquet")
        return recs

    def retract(self, event_id: str, annotator: str, **context: Any) -> dict[str, Any]:
        """Cancel an earlier vote. `context` carries the pair fields of the vote (the
        record schema requires them); pass the vote record itself for convenience."""
        vote = context.pop("vote", None) or {}
        fields = {k: vote.get(k, context.get(k)) for k in
                  ("pair_id", "prompt_id", "prompt", "response_a", "response_b",
                   "model_a", "model_b", "left")}
        return self.append({**fields, "kind": "retract", "retracts": event_id,
                            "choice": None, "strength": None, "annotator": annotator})

    def flush(self) -> None:
        """Turn pending events into a part file now (and wait for it)."""
        with self._mutex:
            self._rotate_locked()
        self._flusher.submit(lambda: None).result()  # wait for queued part writes

    def _rotate_locked(self) -> None:
        """Hand the current segment to the background flusher and start a new one, so
        the request that crosses `flush_every` pays for an fdatasync, not a part write."""
        if self._segment_fd is None:
            return
        fd, segment, pending = self._segment_fd, self._segment_path(), self._pending
        self._segment_fd, self._pending = None, []
        self._seq += 1
        self._flusher.submit(self._write_segment_part, fd, segment, pending)

    @staticmethod
    def _write_segment_part(fd: int, segment: Path, pending: list[dict[str, Any]]) -> None:
        try:
            if pending:
                write_part(records_to_table(pending), segment.parent.parent / PARTS_DIR / tail_part_name(segment))
            os.unlink(segment)
        except Exception:
            # The segment stays; readers still see it and recovery turns it into a part.
            log.exception("%s: could not write its part file", segment)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._rotate_locked()
            self._closed = True
        self._flusher.shutdown(wait=True)
        with self._mutex:
            os.unlink(self._lock_path)
            os.close(self._lock_fd)

    def __enter__(self) -> "ComparisonStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- recovery ------------------------------------------------------------------------

def recover_orphans(root: Path) -> int:
    """Turn the tail segments of dead writers into part files. Returns events recovered.

    A writer is dead when its lock file can be flock'ed. A segment with no lock file
    (removed by hand, say) is treated as a dead writer's too: a live writer takes its
    lock before it creates any segment.
    """
    tail_dir, parts_dir = root / TAIL_DIR, root / PARTS_DIR
    recovered = 0
    by_writer: dict[str, list[Path]] = {}
    for seg in tail_dir.glob("*.jsonl"):
        by_writer.setdefault(seg.name.split(".")[0], []).append(seg)
    locks = {p.stem: p for p in tail_dir.glob("*.lock")}
    for writer in set(by_writer) | set(locks):
        lock_path = locks.get(writer)
        fd = None
        if lock_path is not None:
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:  # another process just recovered it
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # alive
                os.close(fd)
                continue
        try:
            for seg in sorted(tail_dir.glob(f"{writer}.*.jsonl")):
                part = parts_dir / tail_part_name(seg)
                if not part.exists():
                    records = read_tail_segment(seg)
                    if records:
                        write_part(records_to_table(records), part)
                        recovered += len(records)
                seg.unlink(missing_ok=True)
            if lock_path is not None:
                lock_path.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    if recovered:
        log.warning("%s: recovered %d un-flushed events from writers that died", root, recovered)
    return recovered


# ---- compaction ----------------------------------------------------------------------

def compact(path: str | os.PathLike) -> dict[str, int]:
    """Merge all part files into as few as possible, without changing what is read.

    The compacted part records in its metadata the names it replaces, so a crash after
    its rename but before the old parts are deleted still reads each event once.
    Damaged parts are left alone (and reported by the reader).
    """
    root = Path(path)
    list_store(root)  # raises a clear error for a missing store
    (root / TAIL_DIR).mkdir(exist_ok=True)
    lock_fd = os.open(root / "compact.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        recover_orphans(root)
        files = list_store(root)
        # Delete leftovers of a compaction that crashed before deleting its sources.
        for p in files.replaced:
            p.unlink(missing_ok=True)
        sources, tables = [], []
        for p in files.parts:
            try:
                tables.append(pq.read_table(p, schema=SCHEMA))
                sources.append(p)
            except Exception as e:
                log.warning("%s: damaged part file left out of compaction (%s)", p, e)
        if len(sources) < 2:
            return {"parts_before": len(files.parts), "parts_after": len(files.parts), "events": sum(len(t) for t in tables)}
        table = pa.concat_tables(tables).sort_by("created_at")
        # One file (many row groups): one rename makes the whole merge visible at once.
        names = json.dumps([p.name for p in sources]).encode()
        write_part(table, root / PARTS_DIR / f"compact-{uuid.uuid4().hex}.parquet",
                   {REPLACES_KEY: names})
        for p in sources:
            p.unlink()
        _fsync_dir(root / PARTS_DIR)
        return {"parts_before": len(files.parts), "parts_after": len(files.parts) - len(sources) + 1,
                "events": len(table)}
    finally:
        os.close(lock_fd)


# ---- command line --------------------------------------------------------------------

def add_compact_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="the comparison store directory")


def run_compact(args: argparse.Namespace) -> int:
    before = read_events(args.data)
    t0 = time.perf_counter()
    result = compact(args.data)
    print(f"{args.data}: {result['parts_before']} part files -> {result['parts_after']} "
          f"({result['events']} events, {time.perf_counter() - t0:.2f}s); "
          f"{len(before)} events read before and {len(read_events(args.data))} after")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="the comparison store directory")


def run_info(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from trainer.comparisons import apply_retractions

    files = list_store(args.data)
    events = read_events(args.data)
    votes = apply_retractions(events)
    print(f"store      {args.data}")
    print(f"files      {len(files.parts)} part files, {len(files.tails)} live tail segments")
    retracts = len(events) - pc.sum(pc.equal(events["kind"], "vote")).as_py() if len(events) else 0
    print(f"events     {len(events)} ({retracts} retracts)")
    print(f"votes      {len(votes)} standing")
    if len(votes):
        for column in ("choice", "annotator", "model_a"):
            counts = votes[column].value_counts().to_pylist()
            shown = ", ".join(f"{c['values']}: {c['counts']}" for c in
                              sorted(counts, key=lambda c: -c["counts"])[:10])
            print(f"{column:<10} {shown}")
        first, last = pc.min_max(votes["created_at"]).values()
        print(f"span       {first} .. {last}")
    return 0
