"""`preflab compact` and `preflab info`: commands on a comparison store.

    preflab info --data comparisons
    preflab info --data postgresql://me@db:5432/votes
    preflab compact --data comparisons

The store itself (record, readers, writers, both backends) is trainer/store/. Store
errors (missing, unreadable, database down) reach the user as one line through the
error mapper in annotate/cli.py.
"""

from __future__ import annotations

import argparse
import time

from trainer.store import DATA_HELP, StoreError, apply_retractions, describe, is_database, read_events


def add_compact_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="the comparison store directory (a PostgreSQL store needs no compaction)",
    )


def run_compact(args: argparse.Namespace) -> int:
    from trainer.store.compaction import compact

    if is_database(args.data):
        raise StoreError(f"{describe(args.data)}: a PostgreSQL store has no part files to compact")
    before = read_events(args.data)
    t0 = time.perf_counter()
    result = compact(args.data)
    print(
        f"{args.data}: {result['parts_before']} part files -> {result['parts_after']} "
        f"({result['events']} events, {time.perf_counter() - t0:.2f}s); "
        f"{len(before)} events read before and {len(read_events(args.data))} after"
    )
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="STORE", help=DATA_HELP)


def run_info(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    events = read_events(args.data)
    votes = apply_retractions(events)
    print(f"store      {describe(args.data)}")
    if is_database(args.data):
        print("backend    PostgreSQL")
    else:
        from trainer.store.directory_reader import list_store

        files = list_store(args.data)
        print(f"files      {len(files.parts)} part files, {len(files.tails)} live tail segments")
    retracts = pc.sum(pc.equal(events["kind"], "retract")).as_py() or 0 if len(events) else 0
    flags = (
        len(events) - retracts - (pc.sum(pc.equal(events["kind"], "vote")).as_py() or 0 if len(events) else 0)
    )
    print(f"events     {len(events)} ({retracts} retracts, {flags} flag events)")
    print(f"votes      {len(votes)} standing")
    if len(votes):
        for column in ("choice", "annotator", "model_a"):
            counts = votes[column].value_counts().to_pylist()
            shown = ", ".join(
                f"{c['values']}: {c['counts']}" for c in sorted(counts, key=lambda c: -c["counts"])[:10]
            )
            print(f"{column:<10} {shown}")
        first, last = pc.min_max(votes["created_at"]).values()
        print(f"span       {first} .. {last}")
    return 0
