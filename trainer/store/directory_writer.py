"""Appending to a directory store: durable, many writers, no shared locks.

    from trainer.store.directory_writer import DirectoryStore
    with DirectoryStore("comparisons") as store:
        rec = store.append({...})        # durable when it returns, or StoreWriteError

How a vote becomes durable (the layout is in trainer/store/directory_reader.py):

1. `append` writes the event as one JSON line to this writer's tail segment
   (`tail/<writer>.<seq>.jsonl`) and fdatasync's it. Only then does it return: an
   acknowledged event survives `kill -9` and power loss.
2. Every `flush_every` events (or `flush_after_s` seconds) a background thread turns
   the acknowledged events into a zstd Parquet part `parts/<writer>.<seq>.parquet`:
   written under a temporary name, fsync'd, renamed into place, directory fsync'd.
   Then the segment is unlinked and the writer moves on to `<seq + 1>`. A crash between
   rename and unlink leaves both; readers ignore a segment whose part exists.
3. Each writer holds an flock on `tail/<writer>.lock` while it lives. flock belongs to
   the open file, not to a pid, and the kernel drops it when the process dies, so
   liveness is never fooled by a reused pid (after a reboot, in containers). A new
   writer that can take another writer's lock knows that writer is dead, and turns its
   orphaned segments into part files (recovery).

When a write or fdatasync fails (disk full, I/O error), the event is not acknowledged
(StoreWriteError), the torn bytes are cut off again, and the writer abandons that
segment for a fresh one, so no later event is ever glued onto a torn line. Bytes that
could not be turned into events are moved to `quarantine/`, never deleted.

Each writer only ever touches its own files, so any number of processes append to
one store at once. Compaction (trainer/store/compaction.py) takes a store-wide lock
against other compactions only; `serve_lock` lets one server at a time assign pairs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.store.directory_reader import (
    PARTS_DIR,
    QUARANTINE_DIR,
    SERVE_LOCK,
    TAIL_DIR,
    parse_tail_segment,
    permission_error,
    segment_writer,
    tail_part_name,
)
from trainer.store.errors import StoreBusy, StoreWriteError
from trainer.store.file_modes import create_file, make_store_root, make_subdir
from trainer.store.record import complete_record, records_to_table, retract_record, validate_record

log = logging.getLogger("preflab.store")

PARQUET_OPTIONS = dict(compression="zstd", compression_level=3)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """Where `path` is written before its rename: `.<name>.<rand>.tmp`, so recovery
    can tell a dead writer's leftovers by the writer id the name starts with."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_part(table: pa.Table, path: Path, metadata: dict[bytes, bytes] | None = None) -> None:
    """Write a part file atomically: temp name, fsync, rename, fsync the directory.
    On any failure the temp file is removed and the error raised: nothing half-written
    stays behind, and nothing is visible until it is complete."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = tmp_name(path)
    try:
        # 0600 (trainer/store/file_modes.py): the votes are nobody else's to read
        with os.fdopen(create_file(tmp, os.O_WRONLY | os.O_EXCL), "wb") as f:
            pq.write_table(table, f, **PARQUET_OPTIONS)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _host_label() -> str:
    """The hostname as a writer-id label: only [A-Za-z0-9_-], so ids never hold a dot."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname())[:40] or "host"


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a nearly full disk): write the rest, and
    treat a write that makes no progress as the disk being full."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


class DirectoryStore:
    """One writer on a store directory. Thread-safe; one instance per process is plenty."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        flush_every: int = 1000,
        flush_after_s: float = 30.0,
        writer_id: str | None = None,
    ):
        self.root = Path(path)
        self.target = str(path)
        self.parts_dir = self.root / PARTS_DIR
        self.tail_dir = self.root / TAIL_DIR
        self.flush_every = flush_every
        self.flush_after_s = flush_after_s
        # host-pid-random: readable in a listing, unique without any coordination
        self.writer_id = writer_id or f"{_host_label()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if "." in self.writer_id:
            raise ValueError(f"writer id {self.writer_id!r} must not contain a dot")
        self._mutex = threading.Lock()
        try:
            make_store_root(self.root)  # 0700 where new (trainer/store/file_modes.py)
            make_subdir(self.parts_dir)
            make_subdir(self.tail_dir)
            # Take our liveness lock before anything else, so no other process ever
            # mistakes us for a dead writer. Locked before it is visible: created under a
            # name recovery ignores, flock'ed, then renamed into place.
            self._lock_path = self.tail_dir / f"{self.writer_id}.lock"
            tmp_lock = self.tail_dir / f".{self.writer_id}.lock.tmp"
            self._lock_fd = create_file(tmp_lock, os.O_RDWR)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp_lock, self._lock_path)
        except PermissionError as e:
            raise permission_error(
                Path(e.filename or self.root), e, "opening the store for writing"
            ) from None
        except OSError as e:
            raise StoreWriteError(
                f"{self.root}: cannot open the store for writing ({e.strerror or e})"
            ) from None
        self.recovered_events = recover_orphans(self.root)
        self._seq = 0
        self._pending: list[dict[str, Any]] = []
        self._segment_fd: int | None = None
        self._segment_size = 0  # bytes of acknowledged events in the segment
        self._oldest_pending = 0.0
        self._closed = False
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preflab-flush")
        # pyarrow imports pandas on its first array (~0.2-0.3 s, holding the GIL): pay that
        # now, not in the first background flush while appends wait on the GIL.
        records_to_table([])

    # ---- writing ---------------------------------------------------------------------

    def _segment_path(self) -> Path:
        return self.tail_dir / f"{self.writer_id}.{self._seq:06d}.jsonl"

    def _open_segment(self) -> None:
        self._segment_fd = create_file(self._segment_path(), os.O_WRONLY | os.O_APPEND)
        self._segment_size = 0
        fsync_dir(self.tail_dir)  # the new name itself must survive a crash

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Validate, write, fdatasync; return the stored record (created_at in µs).
        Raises StoreWriteError (nothing acknowledged, nothing stored touched) when the
        event could not be made durable."""
        rec = validate_record(complete_record(record))
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        with self._mutex:
            if self._closed:
                raise RuntimeError(f"{self.root}: store writer is closed")
            try:
                if self._segment_fd is None:
                    self._open_segment()
                    self._oldest_pending = time.monotonic()
                _write_all(self._segment_fd, line)
                os.fdatasync(self._segment_fd)
            except OSError as e:
                self._abandon_segment_locked()
                raise StoreWriteError(
                    f"{self.root}: vote not saved ({e.strerror or e}); nothing already stored was "
                    f"touched; try again"
                ) from e
            self._segment_size += len(line)
            self._pending.append(rec)
            if (
                len(self._pending) >= self.flush_every
                or time.monotonic() - self._oldest_pending >= self.flush_after_s
            ):
                self._rotate_locked()
        return rec

    def _abandon_segment_locked(self) -> None:
        """A write or fdatasync failed: cut the segment back to its acknowledged events
        (best effort: the disk may refuse that too) and never write to it again."""
        if self._segment_fd is None:
            return
        try:
            os.ftruncate(self._segment_fd, self._segment_size)
            os.fdatasync(self._segment_fd)
        except OSError:
            pass  # the torn bytes stay; readers drop a torn last line, and the segment is done
        self._rotate_locked()

    def append_many(self, records: Iterable[dict[str, Any]], where: str = "") -> list[dict[str, Any]]:
        """Validate every record first, then write them as one durable part file.

        For bulk imports: nothing is written unless all records are valid.
        """
        prefix = f"{where} " if where else ""
        recs = [validate_record(complete_record(r), where=f"{prefix}item {i}") for i, r in enumerate(records)]
        if not recs:
            return []
        table = records_to_table(recs)
        with self._mutex:
            try:
                write_part(table, self.parts_dir / f"{self.writer_id}.bulk-{uuid.uuid4().hex[:12]}.parquet")
            except OSError as e:
                raise StoreWriteError(
                    f"{self.root}: {len(recs)} events not saved ({e.strerror or e}); "
                    f"nothing already stored was touched"
                ) from e
        return recs

    def retract(self, event_id: str, annotator: str, **context: Any) -> dict[str, Any]:
        """Cancel an earlier vote. `context` carries the pair fields of the vote (the
        record schema requires them); pass the vote record itself for convenience."""
        return self.append(retract_record(event_id, annotator, **context))

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
        fd, segment, pending, size = self._segment_fd, self._segment_path(), self._pending, self._segment_size
        self._segment_fd, self._pending, self._segment_size = None, [], 0
        self._seq += 1
        self._flusher.submit(_segment_to_part, fd, segment, pending, size)

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._rotate_locked()
            self._closed = True
        self._flusher.shutdown(wait=True)
        with self._mutex:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)

    def __enter__(self) -> DirectoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quarantine(segment: Path, why: str) -> None:
    """Keep a segment's raw bytes out of the way of readers, never deleting them."""
    target_dir = segment.parent.parent / QUARANTINE_DIR
    make_subdir(target_dir)
    target = target_dir / segment.name
    shutil.move(segment, target)
    fsync_dir(target_dir)
    log.warning("%s: %s; its raw bytes are kept in %s", segment, why, target)


def _segment_to_part(fd: int, segment: Path, pending: list[dict[str, Any]], size: int) -> None:
    """The flusher's job: the acknowledged events of a finished segment become a part
    file; then the segment goes (or to quarantine, if it holds bytes beyond them)."""
    try:
        if pending:
            write_part(records_to_table(pending), segment.parent.parent / PARTS_DIR / tail_part_name(segment))
        if os.fstat(fd).st_size == size:
            os.unlink(segment)
        else:
            _quarantine(segment, "holds bytes of a write that failed")
    except Exception:
        # The segment stays; readers still see it and recovery turns it into a part.
        log.exception("%s: could not write its part file; the segment stays and is still read", segment)
    finally:
        os.close(fd)


# ---- recovery ------------------------------------------------------------------------


def recover_orphans(root: Path) -> int:
    """Turn the tail segments of dead writers into part files. Returns events recovered.

    A writer is dead when its lock file can be flock'ed. A segment with no lock file
    (removed by hand, say) is treated as a dead writer's too: a live writer takes its
    lock before it creates any segment. A segment that cannot be turned into a part
    (disk full) stays where it is, still read; one with bytes that held no event goes
    to quarantine once its events are safe in a part.
    """
    tail_dir = root / TAIL_DIR
    recovered = 0
    by_writer: dict[str, list[Path]] = {}
    for seg in tail_dir.glob("*.jsonl"):
        by_writer.setdefault(segment_writer(seg), []).append(seg)
    locks = {p.name[: -len(".lock")]: p for p in tail_dir.glob("*.lock") if not p.name.startswith(".")}
    for writer in set(by_writer) | set(locks):
        lock_path = locks.get(writer)
        fd = None
        if lock_path is not None:
            try:
                # Read-only is enough for flock, and works on another user's lock file.
                fd = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:  # another process just recovered it
                continue
            except PermissionError as e:
                raise permission_error(lock_path, e, "checking whether its writer is alive") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # alive
                os.close(fd)
                continue
        try:
            recovered += _recover_writer(root, writer, sorted(by_writer.get(writer, [])), lock_path)
        finally:
            if fd is not None:
                os.close(fd)
    if recovered:
        log.warning("%s: recovered %d un-flushed events from writers that died", root, recovered)
    return recovered


def _recover_writer(root: Path, writer: str, segments: list[Path], lock_path: Path | None) -> int:
    parts_dir = root / PARTS_DIR
    recovered, kept = 0, False
    for seg in segments:
        part = parts_dir / tail_part_name(seg)
        try:
            if part.exists():  # flushed, then the writer died before the unlink
                seg.unlink(missing_ok=True)
                continue
            records, dropped = parse_tail_segment(seg)
            if records:
                write_part(records_to_table(records), part)
                recovered += len(records)
            if dropped:
                _quarantine(seg, f"{dropped} bytes held no complete event")
            else:
                seg.unlink(missing_ok=True)
        except FileNotFoundError:  # another writer recovered it first
            continue
        except OSError as e:
            kept = True
            log.warning("%s: could not recover it now (%s); it stays and is still read", seg, e.strerror or e)
    for tmp in parts_dir.glob(f".{writer}.*.tmp"):  # a part write the dead writer never finished
        tmp.unlink(missing_ok=True)
    if lock_path is not None and not kept:
        lock_path.unlink(missing_ok=True)
    return recovered


# ---- one server per directory store --------------------------------------------------


class ServeLock:
    """Held by the one `preflab serve` that assigns pairs from a directory store.

    Assignment (overlap K, never twice) lives in that server's memory, so a second
    server on the same directory would hand out the same pairs again. The lock is an
    flock (released by the kernel when the process dies, whatever its pid); the file
    says who holds it, for the message the second server prints.
    """

    def __init__(self, root: str | os.PathLike, description: str = ""):
        self.path = Path(root) / SERVE_LOCK
        try:
            make_store_root(self.path.parent)
            self._fd = create_file(self.path, os.O_RDWR)
        except PermissionError as e:
            raise permission_error(
                Path(e.filename or self.path), e, "opening the store for serving"
            ) from None
        except OSError as e:  # not a directory, a read-only file system, ...
            raise StoreWriteError(
                f"{self.path.parent}: cannot serve from this store ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace")
            os.close(self._fd)
            try:
                who = json.loads(holder)
                held_by = (
                    f"{who.get('server', 'a server')} (pid {who.get('pid')} on {who.get('host')}, "
                    f"since {who.get('since')})"
                )
            except (json.JSONDecodeError, AttributeError):
                held_by = "another preflab serve"
            raise StoreBusy(
                f"{self.path.parent}: {held_by} already assigns pairs from this store. One directory "
                f"store serves one server: stop that one, or keep the votes in PostgreSQL "
                f"(--data postgresql://user@host:port/db) to run several servers on one store."
            ) from None
        info = {
            "server": description or "preflab serve",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
