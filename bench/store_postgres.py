"""The PostgreSQL half of bench/store.py: acknowledged votes through the shared assignment.

    .venv/bin/python bench/store.py --backend postgres [--pg-seconds 8] [--pg-servers 4 --pg-clients 8]

A throwaway PostgreSQL (trainer/store/pg_testserver.py: initdb on a free port of
127.0.0.1, fsync on) and `--pg-servers` processes, each one PostgresStore (its pool as
big as its clients) and `--pg-clients` threads. Every client is one annotator doing what
the app does per vote: claim a pair (overlap 2), then vote on it. Like the app's queue,
a server never hands one pair to two of its own clients: each server walks the pair
list once, handing the next pair to whichever client asks. All servers walk the same
list, so up to `--pg-servers` claims meet on each pair in the database (two win, the
others are refused and move on), as several servers with their own queues would. Two
phases:

1. flat out: claim, vote, next, for `--pg-seconds`; gives votes/s and the latency of a
   saturated machine (2 cores shared by the servers and PostgreSQL);
2. paced: each client votes `--pg-pace` times a second, from a random phase (people do
   not vote in step); latency runs from when the vote was due (a stall counts in full:
   no coordinated omission).

Latency is the `vote()` call: from submitting the vote to its commit. The first
`--pg-warmup` seconds of each phase are not counted (each new connection's backend
compiles the PL/pgSQL functions and psycopg prepares its statements: a server does that
once, then runs for days); their votes are still checked for loss. Afterwards every
acknowledged event_id is looked up (`pg_lost`), the overlap rules are checked on what
was stored (`pg_overlap_violations`: pairs over 2 votes, or someone's second vote on a
pair), and `--pg-read-events` realistic votes are loaded and read back with
`read_comparisons` (`pg_read_s`).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import random
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pg-servers", type=int, default=4, help="server processes sharing the database")
    ap.add_argument("--pg-clients", type=int, default=8, help="annotator threads per server process")
    ap.add_argument("--pg-seconds", type=float, default=8.0, help="length of each PostgreSQL phase")
    ap.add_argument(
        "--pg-warmup",
        type=float,
        default=1.0,
        help="seconds at the start of each phase left out of the numbers (connections warming up)",
    )
    ap.add_argument(
        "--pg-pace",
        type=float,
        default=10.0,
        metavar="VOTES_PER_S",
        help="votes per second per client in the paced phase (10 x 32 clients = 320 votes/s)",
    )
    ap.add_argument(
        "--pg-read-events",
        type=int,
        default=100_000,
        help="realistic votes loaded into PostgreSQL and read back (1000000 for the full figure)",
    )


def _vote(i: int, annotator: str, pair_id: str) -> dict:
    """A vote like bench/store.py's: a short prompt, answers of a few hundred characters."""
    from trainer.store.record import messages_to_json

    return dict(
        kind="vote",
        pair_id=pair_id,
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


def _client(store, name: str, next_pair, seconds: float, pace: float, out: list) -> None:
    from trainer.store.errors import VoteConflict

    votes, claims, ids, conflicts = [], [], [], 0  # votes, claims: (seconds into the phase, latency)
    t_begin = t_start = time.perf_counter()
    deadline = t_start + seconds
    if pace:
        t_start += random.random() / pace
    while time.perf_counter() < deadline:
        pair_id = f"pair-{next_pair()}"
        t0 = time.perf_counter()
        ok, _voters = store.claim(pair_id, name, 2, 60.0)
        claims.append((t0 - t_begin, time.perf_counter() - t0))
        if not ok:
            continue
        if pace:
            due = t_start + len(ids) / pace
            time.sleep(max(0.0, due - time.perf_counter()))
            t0 = max(due, t0)  # late because the claim was slow: that counts too
        else:
            t0 = time.perf_counter()
        try:
            rec = store.vote(_vote(len(ids), name, pair_id), want=2)
        except VoteConflict:
            conflicts += 1
            continue
        votes.append((t0 - t_begin, time.perf_counter() - t0))
        ids.append(rec["event_id"])
    out.append((votes, claims, ids, conflicts))


def _server(url: str, index: int, clients: int, seconds: float, pace: float, queue, start) -> None:
    from trainer.store.postgres import PostgresStore

    store = PostgresStore(url, min_size=clients, max_size=clients)
    out: list = []
    pairs, pairs_lock = itertools.count(), threading.Lock()

    def next_pair() -> int:  # this server's queue: each pair to one of its clients
        with pairs_lock:
            return next(pairs)

    threads = [
        threading.Thread(target=_client, args=(store, f"s{index}-c{k}", next_pair, seconds, pace, out))
        for k in range(clients)
    ]
    start.wait()  # every server has booted and connected: measure votes, not start-up
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    queue.put(out)


def _phase(url: str, args, pace: float) -> dict:
    ctx = mp.get_context("spawn")  # fresh interpreters, like separate servers
    queue, start = ctx.Queue(), ctx.Barrier(args.pg_servers + 1)
    procs = [
        ctx.Process(target=_server, args=(url, i, args.pg_clients, args.pg_seconds, pace, queue, start))
        for i in range(args.pg_servers)
    ]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    results = [r for _ in procs for r in queue.get()]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()

    def measured(samples) -> np.ndarray:  # latencies in ms, after the warm-up
        a = np.array(samples, dtype=float).reshape(-1, 2)
        return a[a[:, 0] >= args.pg_warmup, 1] * 1000

    votes = np.concatenate([measured(r[0]) for r in results])
    claims = np.concatenate([measured(r[1]) for r in results])
    return {
        "votes": votes,
        "claims": claims,
        "ids": [i for r in results for i in r[2]],
        "conflicts": sum(r[3] for r in results),
        "wall": wall,
        "votes_per_s": round(len(votes) / max(1e-9, args.pg_seconds - args.pg_warmup), 1),
    }


def _ms(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if len(values) else float("nan")


def run(args, synthetic_votes) -> dict:
    """Both phases and the read; returns the pg_* keys of the benchmark's JSON."""
    from trainer.store import read_comparisons, read_events
    from trainer.store.pg_testserver import ThrowawayPostgres
    from trainer.store.postgres import PostgresStore

    result: dict = {}
    with ThrowawayPostgres() as server:
        flat_url, paced_url, read_url = (server.create_database(n) for n in ("flat", "paced", "read"))
        for url in (flat_url, paced_url):
            PostgresStore(url).close()  # the schema, before the servers race for it
        flat = _phase(flat_url, args, 0.0)
        paced = _phase(paced_url, args, args.pg_pace)
        lost = violations = 0
        for url, phase in ((flat_url, flat), (paced_url, paced)):
            stored = read_comparisons(url, ["event_id", "pair_id", "annotator"])
            lost += len(set(phase["ids"]) - set(stored["event_id"].to_pylist()))
            pairs = stored["pair_id"].to_pylist()
            pairs_people = Counter(zip(pairs, stored["annotator"].to_pylist()))
            violations += sum(1 for n in Counter(pairs).values() if n > 2)
            violations += sum(1 for n in pairs_people.values() if n > 1)
        result.update(
            pg_servers=args.pg_servers,
            pg_clients_per_server=args.pg_clients,
            pg_vote_p50_ms=_ms(flat["votes"], 50),
            pg_vote_p99_ms=_ms(flat["votes"], 99),
            pg_votes_per_s=flat["votes_per_s"],
            pg_claim_p50_ms=_ms(flat["claims"], 50),
            pg_claim_p99_ms=_ms(flat["claims"], 99),
            pg_vote_p50_ms_paced=_ms(paced["votes"], 50),
            pg_vote_p99_ms_paced=_ms(paced["votes"], 99),
            pg_votes_per_s_paced=paced["votes_per_s"],
            pg_pace_per_client=args.pg_pace,
            pg_conflicts=flat["conflicts"] + paced["conflicts"],
            pg_overlap_violations=violations,
            pg_lost=lost,
        )
        print(
            f"postgres, {args.pg_servers} servers x {args.pg_clients} clients: flat out "
            f"{result['pg_votes_per_s']} votes/s, vote p50 {result['pg_vote_p50_ms']} ms "
            f"p99 {result['pg_vote_p99_ms']} ms; paced at {args.pg_pace:g}/s each: p99 "
            f"{result['pg_vote_p99_ms_paced']} ms; lost {lost}",
            file=sys.stderr,
        )

        if args.pg_read_events:
            table = synthetic_votes(args.pg_read_events)
            at = table.schema.get_field_index("created_at")
            table = table.set_column(at, "created_at", table["created_at"].cast(pa.int64()))
            t0 = time.perf_counter()
            with PostgresStore(read_url) as store:
                for begin in range(0, table.num_rows, 50_000):
                    store.append_many(table.slice(begin, 50_000).to_pylist())
            load_s = time.perf_counter() - t0
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                votes = read_comparisons(read_url)
                times.append(time.perf_counter() - t0)
            assert votes.num_rows == args.pg_read_events
            t0 = time.perf_counter()
            read_comparisons(read_url, ["model_a", "model_b", "choice"])
            result.update(
                pg_read_events=args.pg_read_events,
                pg_load_s=round(load_s, 3),
                pg_read_s=round(min(times), 3),
                pg_read_3_columns_s=round(time.perf_counter() - t0, 3),
                pg_events_total=read_events(read_url).num_rows,
            )
    return result
