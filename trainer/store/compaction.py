"""Merging a directory store's part files, without changing what is read.

    from trainer.store.compaction import compact
    compact("comparisons")      # {"parts_before": 120, "parts_after": 1, "events": ...}

The compacted part records in its metadata the names it replaces, so a crash after
its rename but before the old parts are deleted still reads each event once. Damaged
parts are left alone (and reported by the reader). Compactions exclude each other
with `compact.lock`; writers and readers go on meanwhile.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.store.directory_reader import PARTS_DIR, REPLACES_KEY, TAIL_DIR, list_store, permission_error
from trainer.store.directory_writer import fsync_dir, recover_orphans, write_part
from trainer.store.file_modes import create_file, make_subdir
from trainer.store.record import SCHEMA

log = logging.getLogger("preflab.store")


def compact(path: str | os.PathLike) -> dict[str, int]:
    root = Path(path)
    list_store(root)  # raises a clear error for a missing or unreadable store
    try:
        make_subdir(root / TAIL_DIR)
        lock_fd = create_file(root / "compact.lock", os.O_RDWR)  # 0600, as every store file
    except PermissionError as e:
        raise permission_error(root, e, "compacting the store") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        # A compaction that died mid-write left its temp file: no one else writes these.
        for tmp in (root / PARTS_DIR).glob(".compact-*.tmp"):
            tmp.unlink(missing_ok=True)
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
            except PermissionError as e:
                raise permission_error(p, e, "compacting the store") from None
            except Exception as e:
                log.warning("%s: damaged part file left out of compaction (%s)", p, e)
        if len(sources) < 2:
            return {
                "parts_before": len(files.parts),
                "parts_after": len(files.parts),
                "events": sum(len(t) for t in tables),
            }
        table = pa.concat_tables(tables).sort_by("created_at")
        # One file (many row groups): one rename makes the whole merge visible at once.
        names = json.dumps([p.name for p in sources]).encode()
        write_part(table, root / PARTS_DIR / f"compact-{uuid.uuid4().hex}.parquet", {REPLACES_KEY: names})
        for p in sources:
            p.unlink()
        fsync_dir(root / PARTS_DIR)
        return {
            "parts_before": len(files.parts),
            "parts_after": len(files.parts) - len(sources) + 1,
            "events": len(table),
        }
    finally:
        os.close(lock_fd)
