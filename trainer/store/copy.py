"""Moving a store between backends, exactly: `preflab copy --from SRC --to DST`.

    preflab copy --from comparisons --to postgresql://me@db:5432/votes
    preflab copy --from postgresql://me@db:5432/votes --to backup-dir

    from trainer.store.copy import copy_store
    copy_store("comparisons", "postgresql://me@db:5432/votes")   # {"copied": n, "skipped": m, ...}

Either side is a directory or a `postgresql://` URL. Every event moves (votes and
retracts, so undo survives the trip) with every field as it is, created_at to the
microsecond; nothing is re-stamped. Flag events go last, in the source's order
(trainer.store.read_flag_events), which is what a database destination decides by.
A directory destination decides by created_at instead, so a copy from a database into
a directory is refused, before anything is written, when an annotator's latest flag
event by the database's order (seq) is not their latest by created_at (servers' clocks
disagreed): the copy would change their flag decision. Re-stamping would make the copy
inexact, so the error names them; an admin's new decision on each (the Annotators tab)
is latest in both orders, and the copy then goes through.
Events whose event_id the destination already has are skipped, so an interrupted copy
is finished by running it again, and a rerun copies nothing. Events go in chunks
through the destination's `append_many` (all-or-nothing each: a directory gets one part
file per chunk, a database one transaction).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from trainer.store import describe, is_database, open_store, read_events, store_exists

CHUNK = 50_000


def _event_ids(target: str) -> set[str]:
    """The event_ids a store already holds (only that column is read)."""
    if not store_exists(target):
        return set()
    return set(read_events(target, ["event_id"])["event_id"].to_pylist())


def copy_store(
    src: str, dst: str, *, chunk: int = CHUNK, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Copy every event of `src` that `dst` lacks. progress(done, total) after each chunk.
    Returns {"source", "target", "events", "copied", "skipped"}."""
    import pyarrow as pa
    import pyarrow.compute as pc

    src, dst = str(src), str(dst)
    if src.rstrip("/") == dst.rstrip("/"):
        raise ValueError(f"--from and --to are the same store ({describe(src)})")
    if not store_exists(src):
        raise ValueError(f"{describe(src)}: no such store")
    if not is_database(dst):
        _refuse_flag_decisions_a_directory_would_change(src, dst)
    events = read_events(src)
    have = _event_ids(dst)
    todo = events
    if have:
        todo = events.filter(
            pc.invert(pc.is_in(events["event_id"], value_set=pa.array(sorted(have), pa.string())))
        )
    todo = _flags_last_in_order(todo, src)
    # Integer microseconds, not datetimes, go to append_many: no rounding on the way.
    at = todo.schema.get_field_index("created_at")
    todo = todo.set_column(at, "created_at", todo["created_at"].cast(pa.int64()))
    copied = 0
    with open_store(dst) as store:
        for start in range(0, todo.num_rows, chunk):
            records = todo.slice(start, chunk).to_pylist()
            store.append_many(records, where=f"{describe(src)} event {start}+")
            copied += len(records)
            if progress:
                progress(copied, todo.num_rows)
    return {
        "source": describe(src),
        "target": describe(dst),
        "events": events.num_rows,
        "copied": copied,
        "skipped": events.num_rows - todo.num_rows,
    }


def _refuse_flag_decisions_a_directory_would_change(src: str, dst: str) -> None:
    """ValueError naming the annotators whose latest flag event in the source's order is
    not their latest in a directory's (created_at, then event_id): copied into `dst`,
    their flag decision would flip (see the module docstring)."""
    from trainer.store import read_flag_events

    events = read_flag_events(src, ["event_id", "subject", "created_at"]).to_pylist()
    stored = {e["subject"]: e["event_id"] for e in events}  # the last one wins
    stamped = {
        e["subject"]: e["event_id"] for e in sorted(events, key=lambda e: (e["created_at"], e["event_id"]))
    }
    changed = sorted(name for name, event_id in stored.items() if stamped[name] != event_id)
    if changed:
        raise ValueError(
            f"not copied: {describe(dst)} is a directory, which orders flag events by created_at, "
            f"and for {', '.join(changed)} the latest flag decision in {describe(src)} is not the "
            "latest by created_at (its servers' clocks disagreed), so the copy would change it. "
            "Have an admin decide on them again (Annotators tab), then copy; nothing was written"
        )


def _flags_last_in_order(todo, src: str):
    """The events with the flag events last, in the source's order (read_flag_events). A
    database destination decides an annotator's flag state by its own insertion order
    (seq), so it must receive them in the order the source decides by; votes and retracts
    mean the same in any order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from trainer.store import read_flag_events
    from trainer.store.record import FLAG_KINDS

    is_flag = pc.is_in(todo["kind"], value_set=pa.array(FLAG_KINDS, pa.string()))
    flags = todo.filter(is_flag)
    if flags.num_rows == 0:
        return todo
    rank = {eid: i for i, eid in enumerate(read_flag_events(src, ["event_id"])["event_id"].to_pylist())}
    ids = flags["event_id"].to_pylist()
    order = sorted(range(len(ids)), key=lambda i: rank.get(ids[i], len(rank)))
    return pa.concat_tables([todo.filter(pc.invert(is_flag)), flags.take(order)])


# ---- `preflab copy` ------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="src",
        required=True,
        metavar="SRC",
        help="the store to copy: a directory or a postgresql://user@host:port/db URL",
    )
    p.add_argument(
        "--to",
        dest="dst",
        required=True,
        metavar="DST",
        help="where the events go (created if it is a directory that does not exist; "
        "a database gets its tables on first use); events it already has are skipped",
    )
    p.add_argument(
        "--chunk", type=int, default=CHUNK, help="events per write (a directory gets one part file per chunk)"
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainer.store.errors import StoreError

    if args.chunk < 1:
        print(f"error: --chunk must be at least 1, got {args.chunk}", file=sys.stderr)
        return 2
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="event", desc="copying", file=sys.stderr)
        bar.update(done - bar.n)

    try:
        report = copy_store(args.src, args.dst, chunk=args.chunk, progress=progress)
    except (StoreError, ValueError, OSError) as e:  # RecordError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    print(
        f"copied {report['copied']} events from {report['source']} to {report['target']}"
        f" ({report['skipped']} already there)"
    )
    return 0
