"""Benchmark the comparison store: acknowledged-append latency, throughput, reading and
exporting a million events, and whether any acknowledged event was lost.

    .venv/bin/python bench/store.py [--events 1000000] [--appends 2000]

Phases:
1. one writer process appends `--appends` votes; every append is timed from the call to
   its return (the event is fdatasync'd by then) and its event_id sent to the parent;
2. eight writer processes do the same at once, on one store: flat out (CPU queueing
   on a 2-core machine), then paced at `--pace` votes/s each, latency measured from
   when each vote was due;
3. a store of `--events` votes with realistic text (distinct prompts, answers of a few
   hundred to a few thousand characters) is built from part files; we time reading it
   all (`read_comparisons`, retractions applied), the same after `preflab compact`, and
   exporting it to a TRL-ready Parquet file.
`lost` counts acknowledged events of phases 1 and 2 that a reader does not find.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import store_postgres  # noqa: E402  (bench/store_postgres.py, beside this file)

from annotate.export import export_preferences  # noqa: E402
from annotate.table_files import SLICE_ROWS, write_table  # noqa: E402
from trainer.store import SCHEMA, messages_to_json, read_comparisons, read_events  # noqa: E402
from trainer.store.compaction import compact  # noqa: E402
from trainer.store.directory_writer import DirectoryStore  # noqa: E402


def vote_record(i: int, annotator: str) -> dict:
    return dict(
        kind="vote",
        pair_id=f"pair-{i % 5000}",
        prompt_id=f"p-{i % 700}",
        prompt=messages_to_json([{"role": "user", "content": f"Question {i % 700}: explain it."}]),
        response_a="An answer of moderate length. " * 12,
        response_b="Another answer. " * 20,
        model_a="model-x",
        model_b="model-y",
        left="ab"[i % 2],
        choice="ab"[(i // 3) % 2],
        strength=1 + i % 2,
        annotator=annotator,
        decision_ms=2000 + i % 5000,
    )


def writer(store_dir: str, n: int, name: str, queue, start, pace_per_s: float = 0.0) -> None:
    store = DirectoryStore(store_dir)
    start.wait()  # every writer has booted: measure appends, not interpreters starting up
    latencies, ids = [], []
    t_start = time.perf_counter()
    for i in range(n):
        record = vote_record(i, name)
        if pace_per_s:
            # Paced: the i-th vote is due at i / rate. Latency runs from when it was due,
            # not from when we got round to it, so a stall counts in full (no
            # coordinated omission).
            due = t_start + i / pace_per_s
            time.sleep(max(0.0, due - time.perf_counter()))
            t0 = due
        else:
            t0 = time.perf_counter()
        acked = store.append(record)
        latencies.append(time.perf_counter() - t0)
        ids.append(acked["event_id"])
    store.close()
    queue.put((latencies, ids))


def run_writers(
    store_dir: str, procs: int, n: int, pace_per_s: float = 0.0
) -> tuple[np.ndarray, list[str], float]:
    ctx = mp.get_context("spawn")  # fresh interpreters, like separate servers
    queue, start = ctx.Queue(), ctx.Barrier(procs + 1)
    workers = [
        ctx.Process(target=writer, args=(store_dir, n, f"w{k}", queue, start, pace_per_s))
        for k in range(procs)
    ]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    results = [queue.get() for _ in workers]
    wall = time.perf_counter() - t0
    for w in workers:
        w.join()
    latencies = np.concatenate([np.array(r[0]) for r in results]) * 1000
    ids = [i for r in results for i in r[1]]
    return latencies, ids, wall


def synthetic_votes(n: int, seed: int = 0) -> pa.Table:
    """`n` votes over n/3 pairs (three annotators each) and n/30 prompts; answers have a
    log-normal length with a median of 500 characters (a 256-token answer is ~1000),
    prompts a median of 150."""
    rng = np.random.default_rng(seed)
    words = np.array(
        "the a model answer because therefore python list value should could "
        "first second result error function data people time year way "
        "example great simple careful question explain why how what".split()
    )
    corpus = " ".join(rng.choice(words, 400_000))
    n_pairs, n_prompts = max(1, n // 3), max(1, n // 30)

    def texts(count, median, high):
        lengths = np.clip(rng.lognormal(np.log(median), 0.7, count), 1, high).astype(int)
        starts = rng.integers(0, len(corpus) - high, count)
        return [corpus[s : s + n] for s, n in zip(starts, lengths)]

    prompts = [messages_to_json([{"role": "user", "content": t}]) for t in texts(n_prompts, 150, 4000)]
    resp_a, resp_b = texts(n_pairs, 500, 6000), texts(n_pairs, 500, 6000)
    pair = rng.integers(0, n_pairs, n)
    prompt_of_pair = rng.integers(0, n_prompts, n_pairs)
    models = np.array([f"model-{k}" for k in range(8)])
    choice = rng.choice(np.array(["a", "b", "tie", "both_bad"]), n, p=[0.42, 0.42, 0.1, 0.06])
    strength = np.where(np.isin(choice, ["a", "b"]), rng.integers(1, 3, n), 0)
    now = int(time.time() * 1e6)
    columns = {
        "schema_version": pa.array(np.ones(n, np.int16)),
        "event_id": pa.array([f"{i:032x}" for i in range(n)]),
        "kind": pa.array(np.full(n, "vote")),
        "retracts": pa.nulls(n, pa.string()),
        "pair_id": pa.array(np.char.add("pair-", pair.astype(str))),
        "prompt_id": pa.array(np.char.add("p-", prompt_of_pair[pair].astype(str))),
        "prompt": pa.array(prompts).take(pa.array(prompt_of_pair[pair])),
        "response_a": pa.array(resp_a).take(pa.array(pair)),
        "response_b": pa.array(resp_b).take(pa.array(pair)),
        "model_a": pa.array(models[pair % 4]),
        "model_b": pa.array(models[4 + pair % 4]),
        "left": pa.array(rng.choice(np.array(["a", "b"]), n)),
        "choice": pa.array(choice),
        "strength": pa.array(strength.astype(np.int8), mask=strength == 0),
        "rationale": pa.nulls(n, pa.string()),
        "annotator": pa.array(np.char.add("annotator-", rng.integers(0, 40, n).astype(str))),
        "created_at": pa.array(now - np.arange(n)[::-1] * 1000, pa.int64()).cast(
            SCHEMA.field("created_at").type
        ),
        "decision_ms": pa.array(rng.integers(800, 60_000, n).astype(np.int32)),
        "gen_params": pa.nulls(n, pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def best_of(runs: int, fn):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="size of the read/export store")
    ap.add_argument("--appends", type=int, default=2000, help="appends per writer process")
    ap.add_argument("--part-rows", type=int, default=10_000, help="events per part file before compaction")
    ap.add_argument(
        "--pace",
        type=float,
        default=100.0,
        metavar="VOTES_PER_S",
        help="votes per second per writer in the paced 8-writer phase (100 x 8 writers = 800 "
        "votes/s, the pace of ~3,000 annotators voting every 4 s)",
    )
    ap.add_argument(
        "--backend",
        choices=["directory", "postgres", "all"],
        default="directory",
        help="which store to measure: the directory store, PostgreSQL (bench/store_postgres.py: "
        "acknowledged votes, 4 servers x 8 clients, through claim + vote), or both",
    )
    store_postgres.add_arguments(ap)
    args = ap.parse_args()
    result: dict = {"bench": "store", "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    if args.backend == "postgres":
        print(json.dumps({**result, **store_postgres.run(args, synthetic_votes)}))
        return
    work = Path(tempfile.mkdtemp(prefix="preflab-bench-"))
    try:
        # 1 and 8 writer processes
        lat1, ids1, wall1 = run_writers(str(work / "one"), 1, args.appends)
        lat8, ids8, wall8 = run_writers(str(work / "eight"), 8, args.appends)
        lat8p, ids8p, wall8p = run_writers(str(work / "paced"), 8, args.appends, args.pace)
        lost = 0
        for name, ids in (("one", ids1), ("eight", ids8), ("paced", ids8p)):
            lost += len(set(ids) - set(read_events(work / name)["event_id"].to_pylist()))
        result.update(
            append_p50_ms=round(float(np.percentile(lat1, 50)), 3),
            append_p99_ms=round(float(np.percentile(lat1, 99)), 3),
            append_events_per_s=round(len(ids1) / wall1, 1),
            append_p50_ms_8procs=round(float(np.percentile(lat8, 50)), 3),
            append_p99_ms_8procs=round(float(np.percentile(lat8, 99)), 3),
            append_events_per_s_8procs=round(len(ids8) / wall8, 1),
            # 8 writers flat out on 2 cores measure CPU queueing; paced is a server's life
            append_p50_ms_8procs_paced=round(float(np.percentile(lat8p, 50)), 3),
            append_p99_ms_8procs_paced=round(float(np.percentile(lat8p, 99)), 3),
            append_events_per_s_8procs_paced=round(len(ids8p) / wall8p, 1),
        )
        print(
            f"appends: 1 proc p50 {result['append_p50_ms']} ms p99 {result['append_p99_ms']} ms; "
            f"8 procs p50 {result['append_p50_ms_8procs']} ms p99 {result['append_p99_ms_8procs']} ms; "
            f"8 procs at {args.pace:g}/s each p99 {result['append_p99_ms_8procs_paced']} ms",
            file=sys.stderr,
        )

        # a store of `--events` votes
        table = synthetic_votes(args.events)
        big = work / "big"
        with DirectoryStore(big) as store:
            for start in range(0, len(table), args.part_rows):
                # the bulk path writes exactly what an import would
                from trainer.store.directory_writer import write_part

                write_part(
                    table.slice(start, args.part_rows),
                    big / "parts" / f"{store.writer_id}.bench-{start:09d}.parquet",
                )
        n_parts = len(list((big / "parts").glob("*.parquet")))
        read_s, votes = best_of(3, lambda: read_comparisons(big))
        assert len(votes) == args.events, (len(votes), args.events)
        t0 = time.perf_counter()
        compact(big)
        compact_s = time.perf_counter() - t0
        read_compacted_s, votes = best_of(3, lambda: read_comparisons(big))
        out = work / "export.parquet"

        def export():  # what `preflab export` does: gather a slice while the last is written
            pairs, _ties, report = export_preferences(
                read_comparisons(big), format="standard", slice_rows=SLICE_ROWS
            )
            write_table(pairs, out)
            return report.rows

        export_s, exported = best_of(2, export)
        result.update(
            events=args.events,
            part_files=n_parts,
            data_mb=round(table.nbytes / 2**20, 1),
            store_mb=round(sum(p.stat().st_size for p in (big / "parts").glob("*")) / 2**20, 1),
            read_1m_s=round(read_s, 3),
            compact_s=round(compact_s, 3),
            read_1m_compacted_s=round(read_compacted_s, 3),
            export_1m_s=round(export_s, 3),
            exported_rows=exported,
            lost=lost,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.backend == "all":
        result.update(store_postgres.run(args, synthetic_votes))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
