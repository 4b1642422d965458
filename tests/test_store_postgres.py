"""The PostgreSQL store against a real throwaway server (tests/conftest.py): the same
events and reads as a directory store, idempotent writes, the shared assignment across
"servers" (several PostgresStore instances), kill -9 of a writer, a PostgreSQL restart
mid-load, clear errors, migrations, and `preflab copy` between backends."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from helpers import preflab, vote_record

from trainer.store import open_store, read_comparisons, read_events
from trainer.store.copy import copy_store
from trainer.store.errors import StoreError, StoreUnavailable, StoreWriteError, VoteConflict
from trainer.store.pg_testserver import free_port
from trainer.store.postgres import PostgresStore
from trainer.store.postgres_schema import LATEST
from trainer.store.record import SCHEMA, RecordError, messages_to_json

REPO = Path(__file__).resolve().parents[1]


def vote(pair: str = "pair-1", annotator: str = "alice", **over) -> dict:
    """A vote on `pair` by `annotator`. The overrides go on top of the checked record
    unchecked: some tests hand the store a broken one on purpose."""
    rec = vote_record(
        "Which is better?",
        "first answer",
        "second answer",
        "a",
        2,
        pair_id=pair,
        prompt_id="p-1",
        model_a="m-a",
        model_b="m-b",
        annotator=annotator,
        decision_ms=1200,
    )
    return {**rec, **over}


def awkward_records() -> list[dict]:
    """Votes whose text and nulls trip up naive encodings (CSV quoting, "NA", newlines,
    empty strings vs nulls), with fixed event ids and created_at to the microsecond."""
    texts = [
        "NA",
        "",
        "a,b",
        'say "hi"',
        "line\nbreak",
        "cr\r\nlf",
        "tab\there",
        "back\\slash",
        "ünïcødé ✓ 漢字",
        "NULL",
        "  padded  ",
        "x" * 5000,
    ]
    records = []
    for i, text in enumerate(texts):
        records.append(
            vote(
                f"pair-{i % 5}",
                f"ann-{i % 3}",
                event_id=f"ev-{i:03d}",
                created_at=1_700_000_000_123_457 + i * 1_000_001,
                prompt=messages_to_json([{"role": "user", "content": text}]),
                response_a=text,
                response_b=text[::-1],
                choice=["a", "b", "tie", "both_bad"][i % 4],
                strength=[1, 2, None, None][i % 4],
                rationale=text if i % 2 else None,
                decision_ms=None if i % 3 == 0 else i,
                gen_params=json.dumps({"t": text}) if i % 2 == 0 else None,
                left="ab"[i % 2],
            )
        )
    return records


def sort(table):
    return table.sort_by("event_id")


# ---- the same events and reads as a directory store -------------------------------------


def test_round_trip_matches_the_directory_backend(pg_url, tmp_path):
    records = awkward_records()
    with open_store(pg_url) as pg, open_store(tmp_path / "dir") as directory:
        assert isinstance(pg, PostgresStore) and pg.target == pg_url and pg.recovered_events == 0
        for rec in records:
            assert pg.append(rec) == directory.append(rec)
        for target in ("ev-001", "ev-004"):  # undo, as a retract event written out in full
            undone = next(r for r in records if r["event_id"] == target)
            undo = {
                **undone,
                "kind": "retract",
                "retracts": target,
                "choice": None,
                "strength": None,
                "event_id": f"undo-{target}",
                "created_at": 1_800_000_000_000_001,
            }
            assert pg.append(undo) == directory.append(undo)
    for columns in (None, ["model_a", "choice", "created_at"], ["annotator", "pair_id"]):
        ours, theirs = read_comparisons(pg_url, columns), read_comparisons(tmp_path / "dir", columns)
        assert ours.schema == theirs.schema and ours.num_rows == len(records) - 2
        if columns is None:
            assert ours.schema == SCHEMA
            assert sort(ours).equals(sort(theirs))
        else:
            assert sorted(ours.to_pylist(), key=repr) == sorted(theirs.to_pylist(), key=repr)
    events = read_events(pg_url)
    assert events.schema == SCHEMA and events.num_rows == len(records) + 2
    assert sort(events).equals(sort(read_events(tmp_path / "dir")))


def test_retractions_and_an_unused_database(pg_url, postgres_server):
    empty = postgres_server.create_database(f"e_{uuid.uuid4().hex[:8]}")
    assert read_comparisons(empty).schema == SCHEMA and read_events(empty).num_rows == 0
    assert read_comparisons(empty, ["choice"]).column_names == ["choice"]
    with PostgresStore(pg_url) as store:
        first = store.append(vote(annotator="alice"))
        second = store.append(vote(annotator="bob"))
        store.retract(first["event_id"], "alice", vote=first)
        assert read_comparisons(pg_url)["event_id"].to_pylist() == [second["event_id"]]
        assert read_events(pg_url).num_rows == 3
        again = store.append(vote(annotator="alice", choice="b", strength=None))  # a vote after undo
    assert sorted(read_comparisons(pg_url)["event_id"].to_pylist()) == sorted(
        [second["event_id"], again["event_id"]]
    )


# ---- idempotent writes --------------------------------------------------------------------


def test_duplicate_submission_of_one_event_id(pg_url):
    with PostgresStore(pg_url) as one, PostgresStore(pg_url) as two:
        stored = one.append(vote())
        # A client retry (even one that changed its mind) gets the stored event back.
        assert two.append({**vote(choice="b"), "event_id": stored["event_id"]}) == stored
        assert one.vote({**vote(), "event_id": stored["event_id"]}, want=1) == stored  # no conflict
        # Eight threads on two "servers" all submitting the same 20 events.
        records = [
            vote(f"pair-{i}", event_id=f"same-{i}", created_at=1_700_000_000_000_000 + i) for i in range(20)
        ]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda k: [(one if k % 2 else two).append(r) for r in records], range(8)))
        assert all(r == results[0] for r in results)
        bulk = one.append_many(records + [{**records[0], "choice": "tie", "strength": None}])
        assert bulk[-1] == bulk[0] == results[0][0]
    ids = read_events(pg_url)["event_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 21


def test_append_many_is_all_or_nothing_and_names_the_bad_item(pg_url):
    with PostgresStore(pg_url) as store:
        good = [vote(f"pair-{i}") for i in range(5)]
        bad = good[:2] + [vote(choice="maybe")] + good[2:]
        with pytest.raises(RecordError, match=r"import\.jsonl item 2: field 'choice'"):
            store.append_many(bad, where="import.jsonl")
        with pytest.raises(RecordError, match="field 'rationale'.*NUL"):
            store.append_many(good + [vote(rationale="nul\x00byte")])
        assert read_events(pg_url).num_rows == 0
        assert len(store.append_many(good)) == 5
    assert read_events(pg_url).num_rows == 5


# ---- the shared assignment ----------------------------------------------------------------


def test_claim_and_vote_rules(pg_url):
    with PostgresStore(pg_url) as a, PostgresStore(pg_url) as b:
        assert a.claim("p", "ann1", 2, 60) == (True, set())
        assert b.claim("p", "ann1", 2, 60) == (True, set())  # holds it already
        assert b.claim("p", "ann2", 2, 60) == (True, set())
        assert a.claim("p", "ann3", 2, 60) == (False, set())  # two live leases fill it
        with pytest.raises(VoteConflict, match="already has the 2 votes"):
            b.vote(vote("p", "ann3"), want=2)  # no lease, no room
        a.vote(vote("p", "ann1"), want=2)
        assert b.claim("p", "ann1", 2, 60) == (False, {"ann1"})  # never twice
        with pytest.raises(VoteConflict, match="ann1 already has a standing vote on p"):
            b.vote(vote("p", "ann1"), want=2)
        b.release("p", "ann2")  # a cancelled vote frees the slot
        assert a.claim("p", "ann3", 2, 60) == (True, {"ann1"})
        third = b.vote(vote("p", "ann3"), want=2)
        with pytest.raises(VoteConflict):
            a.vote(vote("p", "ann2"), want=2)  # full: 2 standing
        assert a.vote(vote("p", "ann2"), want=3)["annotator"] == "ann2"  # sent back for relabelling
        a.retract(third["event_id"], "ann3", vote=third)  # undo frees a slot
        assert b.claim("p", "ann4", 3, 60) == (True, {"ann1", "ann2"})

        a.append(vote("q", "import:hh"))  # imports are nobody's work here
        assert a.claim("q", "ann1", 1, 60) == (True, set())

        assert a.claim("r", "x", 1, 0.3) == (True, set())
        assert b.claim("r", "y", 1, 60) == (False, set())
        time.sleep(0.5)  # x's lease ran out
        assert b.claim("r", "y", 1, 60) == (True, set())

        a.claim("s", "x", 2, 60)
        a.skip("s", "x")
        assert b.claim("s", "x", 2, 60) == (False, set())
        assert b.claim("s", "y", 1, 60) == (True, set())  # the skip freed x's slot
    with PostgresStore(pg_url) as restarted:
        assert restarted.skipped() == {("s", "x")}


@pytest.mark.parametrize("db_default", ["read committed", "repeatable read"])
def test_two_servers_keep_overlap_and_never_twice(pg_url, db_default):
    """Six annotators, each using both "servers" at random, 15 pairs, overlap 2, plus a
    rogue client that votes without claiming: no pair over 2, nobody twice. Also when
    the database's default isolation is one under which the pair's state would be read
    from a snapshot older than its row lock."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(f"ALTER DATABASE \"{dbname}\" SET default_transaction_isolation = '{db_default}'")
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a plain connection gets the default
        assert conn.execute("SHOW transaction_isolation").fetchone()[0] == db_default
    servers = [PostgresStore(pg_url, max_size=4), PostgresStore(pg_url, max_size=4)]
    pairs = [f"pair-{i}" for i in range(15)]
    conflicts = Counter()

    def annotator(name: str, rogue: bool = False) -> None:
        rng = random.Random(name)
        for _ in range(3):  # several passes: a pair refused once may have room later
            for pair in rng.sample(pairs, len(pairs)):
                if not rogue:
                    ok, _voters = rng.choice(servers).claim(pair, name, 2, 60)
                    if not ok:
                        continue
                try:
                    rng.choice(servers).vote(vote(pair, name), want=2)
                except VoteConflict:
                    conflicts[name] += 1

    try:
        with ThreadPoolExecutor(7) as pool:
            done = [pool.submit(annotator, f"ann{k}") for k in range(6)] + [
                pool.submit(annotator, "rogue", True)
            ]
            for f in done:
                f.result()
    finally:
        for s in servers:
            s.close()
    votes = read_comparisons(pg_url, ["pair_id", "annotator"]).to_pylist()
    per_pair = Counter(v["pair_id"] for v in votes)
    assert set(per_pair) == set(pairs) and set(per_pair.values()) == {2}
    assert len({(v["pair_id"], v["annotator"]) for v in votes}) == len(votes)
    assert conflicts["rogue"] >= 15  # its second and third passes find every pair full


def test_changes_since_hands_each_event_out_once(pg_url):
    with PostgresStore(pg_url) as mine, PostgresStore(pg_url) as theirs:
        cursor = mine.cursor()
        first = theirs.vote(vote("p1", "bob"), want=2)
        events, cursor = mine.changes_since(cursor)
        assert [{k: v for k, v in e.items() if k != "seq"} for e in events] == [first]
        assert isinstance(events[0]["seq"], int)
        # A transaction that took its seq first but commits last is still seen.
        slow = psycopg.connect(pg_url)
        slow.execute(
            "INSERT INTO events (schema_version, event_id, kind, pair_id, prompt_id, prompt, response_a,"
            " response_b, model_a, model_b, \"left\", choice, annotator, created_at) VALUES (1, 'slow',"
            " 'vote', 'p2', 'p', %s, 'a', 'b', 'm', 'n', 'a', 'a', 'carol', now())",
            (vote()["prompt"],),
        )
        fast = theirs.append(vote("p3", "dan"))
        events, cursor = mine.changes_since(cursor)
        assert [e["event_id"] for e in events] == [fast["event_id"]]
        slow.commit()
        slow.close()
        undo = theirs.retract(first["event_id"], "bob", vote=first)
        events, cursor = mine.changes_since(cursor)
        assert [e["event_id"] for e in events] == ["slow", undo["event_id"]]
        assert mine.changes_since(cursor) == ([], cursor)
        assert len(mine.changes_since(0)[0]) == 4
        table, at = mine.snapshot(["pair_id"])
        assert sorted(table["pair_id"].to_pylist()) == ["p2", "p3"]
        later = theirs.append(vote("p4", "erin"))
        assert [{k: v for k, v in e.items() if k != "seq"} for e in mine.changes_since(at)[0]] == [later]


# ---- durability: kill -9 of a writer, PostgreSQL restarting ---------------------------------

WRITER = """
import sys
from trainer.store.postgres import PostgresStore
from trainer.store.record import messages_to_json
store = PostgresStore(sys.argv[1])
prompt = messages_to_json([{"role": "user", "content": "q"}])
for i in range(100000):
    pair = f"pair-{i}"
    ok, _ = store.claim(pair, "writer", 2, 60)
    rec = store.vote(dict(kind="vote", pair_id=pair, prompt_id="p", prompt=prompt, response_a="a",
                          response_b="b", model_a="m", model_b="n", left="a", choice="a",
                          strength=1, annotator="writer"), want=2)
    print(rec["event_id"], flush=True)
"""


def test_kill_9_of_a_writer_loses_no_acknowledged_vote(pg_url):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, pg_url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    acked = []
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        acked += [line.strip() for line in proc.stdout]  # printed before it died: acknowledged too
    finally:
        proc.kill()
        proc.wait()
    assert len(acked) >= 150, "the writer did not get going"
    stored = set(read_events(pg_url)["event_id"].to_pylist())
    assert set(acked) <= stored
    assert len(stored) - len(acked) <= 1  # at most one committed and not yet printed


def test_postgres_restart_mid_load(postgres_server, pg_url):
    """A crash-restart (pg_ctl stop -m immediate: WAL replay) while two threads write:
    every acknowledged event is there, and the writers carry on by themselves."""
    acked, errors, stop = [], [], threading.Event()

    def writer(store: PostgresStore, name: str, shared: bool) -> None:
        i = 0
        while not stop.is_set():
            try:
                if shared:
                    store.claim(f"{name}-{i}", name, 2, 60)
                    acked.append(store.vote(vote(f"{name}-{i}", name), want=2)["event_id"])
                else:
                    acked.append(store.append(vote(f"{name}-{i}", name))["event_id"])
            except Exception as e:  # noqa: BLE001 - the test reports any failure
                errors.append(repr(e))
                return
            i += 1

    store = PostgresStore(pg_url, retry_s=60)
    impatient = PostgresStore(pg_url, retry_s=0.5)
    threads = [threading.Thread(target=writer, args=(store, n, n == "voter")) for n in ("voter", "appender")]
    try:
        for t in threads:
            t.start()
        _wait_for(lambda: len(acked) >= 40)
        postgres_server.stop(mode="immediate")
        with pytest.raises(StoreWriteError, match=r"not saved, try again \("):
            impatient.append(vote("gone", "zed"))  # the server stays down longer than it waits
        time.sleep(0.5)
        before = len(acked)
        postgres_server.start()
        _wait_for(lambda: len(acked) >= before + 40)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        if not postgres_server.running:
            postgres_server.start()
        store.close()
        impatient.close()
    assert errors == []
    stored = set(read_events(pg_url)["event_id"].to_pylist())
    assert set(acked) <= stored and len(acked) == len(set(acked))


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- clear errors ---------------------------------------------------------------------------


def _unavailable(url: str) -> str:
    with pytest.raises(StoreUnavailable) as caught:
        PostgresStore(url, connect_timeout=2)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_server_down_and_refused_credentials_are_one_clear_line(postgres_server):
    port = free_port()
    down = f"postgresql://me:hunter2@127.0.0.1:{port}/votes"
    message = _unavailable(down)
    assert message == (
        f"postgresql://me:***@127.0.0.1:{port}/votes: cannot connect: "
        f"connection refused: is PostgreSQL running on 127.0.0.1:{port}?"
    )
    with pytest.raises(StoreUnavailable, match="connection refused"):
        read_comparisons(down)
    assert _unavailable(postgres_server.url("nope")).endswith('database "nope" does not exist')
    assert _unavailable(postgres_server.url("postgres", "ghost")).endswith('role "ghost" does not exist')
    postgres_server.execute("DROP ROLE IF EXISTS pwuser")
    postgres_server.execute("CREATE ROLE pwuser LOGIN PASSWORD 'right'")
    postgres_server.require_password("pwuser")
    message = _unavailable(postgres_server.url("postgres", "pwuser", "wrong"))
    assert message.endswith('password authentication failed for user "pwuser"') and "wrong" not in message


def test_a_role_that_may_not_create_the_tables(postgres_server, pg_url):
    postgres_server.execute("DROP ROLE IF EXISTS plain")
    postgres_server.execute("CREATE ROLE plain LOGIN")
    url = pg_url.replace("postgresql://postgres@", "postgresql://plain@")
    with pytest.raises(StoreError, match=r"plain@.*: cannot set up the store's tables: permission denied"):
        PostgresStore(url)
    assert read_comparisons(url).num_rows == 0  # reading needs no tables: an unused store is empty


def test_copy_command_with_the_server_down_is_one_line(tmp_path):
    port = free_port()
    for args in (
        ["--from", f"postgresql://me:hunter2@127.0.0.1:{port}/votes", "--to", str(tmp_path / "d")],
        ["--from", str(tmp_path / "missing"), "--to", "postgresql://x@127.0.0.1:1/y"],
    ):
        result = preflab("copy", *args, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    assert (
        "connection refused: is PostgreSQL running on"
        in preflab(
            "copy", "--from", f"postgresql://me@127.0.0.1:{port}/v", "--to", str(tmp_path / "d")
        ).stderr
    )


# ---- schema migrations ------------------------------------------------------------------------


def test_migrations_are_safe_when_servers_start_together(pg_url):
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresStore(pg_url), range(4)))
    for s in stores:
        s.close()
    PostgresStore(pg_url).close()  # and again, later
    with psycopg.connect(pg_url) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM preflab_schema_version ORDER BY version")]
        assert versions == list(range(1, LATEST + 1))
        conn.execute("INSERT INTO preflab_schema_version (version) VALUES (%s)", (LATEST + 1,))
    with pytest.raises(StoreError, match="newer than this preflab knows"):
        PostgresStore(pg_url)


# ---- preflab copy -----------------------------------------------------------------------------


def test_copy_between_backends_is_exact_and_rerunnable(pg_url, postgres_server, tmp_path):
    source = tmp_path / "source"
    with open_store(source) as store:
        store.append_many(awkward_records()[:6])
        for rec in awkward_records()[6:]:
            store.append(rec)
        store.retract("ev-002", "ann-2", vote=awkward_records()[2])
    original = sort(read_events(source))

    assert copy_store(source, pg_url, chunk=4)["copied"] == 13
    assert copy_store(source, pg_url) == {
        "source": str(source),
        "target": pg_url,
        "events": 13,
        "copied": 0,
        "skipped": 13,
    }
    back = tmp_path / "back"
    assert copy_store(pg_url, back)["copied"] == 13
    other = postgres_server.create_database(f"c_{uuid.uuid4().hex[:8]}")
    assert copy_store(pg_url, other)["copied"] == 13  # pg -> pg
    assert copy_store(back, tmp_path / "again")["copied"] == 13  # dir -> dir
    for target in (pg_url, back, other, tmp_path / "again"):
        assert sort(read_events(target)).equals(original), target
    assert sort(read_comparisons(back)).equals(sort(read_comparisons(source)))

    result = preflab("copy", "--from", str(source), "--to", other, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "copied 0 events" in result.stdout and "(13 already there)" in result.stdout
    with pytest.raises(ValueError, match="same store"):
        copy_store(source, str(source) + "/")


def test_a_role_that_may_only_read_and_write_opens_a_store_set_up_by_another(pg_url):
    PostgresStore(pg_url).close()  # the owner creates the tables
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    url = pg_url.replace("postgres@", f"{role}@", 1)
    assert f"{role}@" in url
    with PostgresStore(url) as store:
        acked = store.append(vote())
        ok, _ = store.claim("pair-2", "bob", 2, 60)
        assert ok
    assert acked["event_id"] in read_events(url)["event_id"].to_pylist()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the fixture drops the database
        conn.execute(f"REASSIGN OWNED BY {role} TO postgres")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
