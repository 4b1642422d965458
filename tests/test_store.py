"""The comparison store: durability, concurrency, recovery, damage, compaction."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import preflab, vote_record

from trainer.store import SCHEMA, SCHEMA_VERSION, RecordError, read_comparisons, read_events
from trainer.store.compaction import compact
from trainer.store.directory_reader import list_store
from trainer.store.directory_writer import DirectoryStore, recover_orphans

REPO = Path(__file__).resolve().parents[1]


def vote(**overrides):
    """A vote with every optional field set. The overrides go on top of the checked
    record unchecked: several tests hand the store a broken one on purpose."""
    record = vote_record(
        "Name a prime number.",
        "7",
        "Nine is prime.",
        "a",
        2,
        pair_id="pair-1",
        prompt_id="p-1",
        left="b",
        rationale="b is wrong",
        decision_ms=1234,
        gen_params=json.dumps({"a": {"temperature": 0.7}}),
    )
    return {**record, **overrides}


# ---- writing and reading ---------------------------------------------------------------


def test_append_roundtrip_keeps_every_field_and_type(tmp_path):
    with DirectoryStore(tmp_path) as store:
        acked = store.append(vote())
        store.append(vote(choice="tie", strength=None, rationale=None, decision_ms=None, gen_params=None))
    table = read_events(tmp_path)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    rows = {r["event_id"]: r for r in table.to_pylist()}
    row = rows[acked["event_id"]]
    assert row["schema_version"] == SCHEMA_VERSION and row["kind"] == "vote"
    assert json.loads(row["prompt"]) == [{"role": "user", "content": "Name a prime number."}]
    assert (row["choice"], row["strength"], row["left"], row["decision_ms"]) == ("a", 2, "b", 1234)
    assert row["created_at"].tzinfo is not None
    assert abs((datetime.now(UTC) - row["created_at"]).total_seconds()) < 600
    assert sorted(r["choice"] for r in rows.values()) == ["a", "tie"]


def test_tail_is_visible_before_flush_and_parts_after(tmp_path):
    store = DirectoryStore(tmp_path, flush_every=3)
    for _ in range(2):
        store.append(vote())
    files = list_store(tmp_path)
    assert (len(files.parts), len(files.tails)) == (0, 1)
    assert len(read_events(tmp_path)) == 2
    store.append(vote())  # third event: handed to the background flusher
    store.flush()  # waits for it
    files = list_store(tmp_path)
    assert (len(files.parts), len(files.tails)) == (1, 0)
    assert pq.ParquetFile(files.parts[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    store.close()
    assert len(read_events(tmp_path)) == 3
    assert not list((tmp_path / "tail").iterdir()), "a closed writer leaves nothing behind"


def test_retractions_cancel_exactly_the_named_vote(tmp_path):
    with DirectoryStore(tmp_path) as store:
        keep = store.append(vote(choice="a"))
        undo = store.append(vote(choice="b", strength=1))
        store.retract(undo["event_id"], "alice", vote=undo)
    votes = read_comparisons(tmp_path)
    assert votes["event_id"].to_pylist() == [keep["event_id"]]
    assert len(read_events(tmp_path)) == 3


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("choice", "c", "choice"),
        ("strength", 3, "strength"),
        ("left", "middle", "left"),
        ("prompt", "not json", "prompt"),
        ("prompt", json.dumps([{"role": "user"}]), "prompt"),
        ("annotator", "", "annotator"),
        ("decision_ms", -5, "decision_ms"),
        ("kind", "upvote", "kind"),
        ("gen_params", "{broken", "gen_params"),
        ("colour", "red", "colour"),
    ],
)
def test_schema_violations_are_refused_naming_the_field(tmp_path, field, value, needle):
    with DirectoryStore(tmp_path) as store:
        store.append(vote())
        with pytest.raises(RecordError, match=f"field '{needle}'"):
            store.append(vote(**{field: value}))
    assert len(read_events(tmp_path)) == 1, "the refused record is not stored, the good one is"


def test_strength_on_a_tie_and_retract_without_target_are_refused(tmp_path):
    with DirectoryStore(tmp_path) as store:
        with pytest.raises(RecordError, match="strength"):
            store.append(vote(choice="tie", strength=1))
        with pytest.raises(RecordError, match="retracts"):
            store.append(vote(kind="retract", choice=None, strength=None))


def test_append_many_is_all_or_nothing_and_names_the_item(tmp_path):
    with DirectoryStore(tmp_path) as store:
        good = [vote() for _ in range(5)]
        with pytest.raises(RecordError, match=r"hh\.jsonl item 3: field 'choice'"):
            store.append_many(good[:3] + [vote(choice="??")] + good[3:], where="hh.jsonl")
        assert len(read_events(tmp_path)) == 0
        store.append_many(good)
    assert len(read_events(tmp_path)) == 5


# ---- damage ------------------------------------------------------------------------------


def test_damaged_part_file_is_reported_and_skipped(tmp_path, caplog):
    for _ in range(3):  # three writers -> three part files
        with DirectoryStore(tmp_path) as store:
            store.append(vote())
            store.append(vote())
    parts = list_store(tmp_path).parts
    assert len(parts) == 3
    parts[1].write_bytes(parts[1].read_bytes()[:40])  # truncated mid-file
    with caplog.at_level(logging.WARNING):
        table = read_events(tmp_path)
    assert len(table) == 4
    assert parts[1].name in caplog.text and "damaged" in caplog.text


def test_torn_last_line_of_a_tail_is_dropped_and_the_rest_kept(tmp_path):
    store = DirectoryStore(tmp_path, flush_every=100)
    acked = [store.append(vote())["event_id"] for _ in range(4)]
    segment = list_store(tmp_path).tails[0]
    with open(segment, "ab") as f:
        f.write(b'{"schema_version": 1, "event_id": "half-writ')
    assert set(read_events(tmp_path)["event_id"].to_pylist()) == set(acked)


# ---- several processes, kill -9, recovery ----------------------------------------------

WRITER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    from trainer.store.directory_writer import DirectoryStore
    from trainer.store import messages_to_json
    store = DirectoryStore(sys.argv[1], flush_every=int(sys.argv[3]))
    prompt = messages_to_json([{{"role": "user", "content": "hi"}}])
    for i in range(int(sys.argv[2])):
        rec = store.append(dict(kind="vote", pair_id=f"pair-{{i}}", prompt_id="p", prompt=prompt,
                                response_a="x", response_b="y", model_a="m", model_b="m",
                                left="a", choice="a", annotator=sys.argv[4]))
        print(rec["event_id"], flush=True)   # the acknowledgement, after fsync
    if sys.argv[5] == "close":
        store.close()
""")


def start_writer(store_dir, n, flush_every, name, close=True):
    code = WRITER.format(repo=str(REPO))
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(store_dir),
            str(n),
            str(flush_every),
            name,
            "close" if close else "keep",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_concurrent_writer_processes_lose_and_duplicate_nothing(tmp_path):
    writers = [
        start_writer(tmp_path, 300, flush_every, f"w{k}") for k, flush_every in enumerate((7, 50, 1000, 13))
    ]
    acked = []
    for w in writers:
        out, _ = w.communicate(timeout=120)
        assert w.returncode == 0
        acked += out.split()
    events = read_events(tmp_path)
    ids = events["event_id"].to_pylist()
    assert len(acked) == 1200
    assert len(ids) == len(set(ids)) == 1200
    assert set(ids) == set(acked)
    assert sorted(pc.unique(events["annotator"]).to_pylist()) == ["w0", "w1", "w2", "w3"]


@pytest.mark.parametrize("flush_every", [7, 10**9], ids=["killed-among-flushes", "all-in-tail"])
def test_kill_9_mid_stream_loses_no_acknowledged_event(tmp_path, flush_every):
    writer = start_writer(tmp_path, 10**6, flush_every, "victim", close=False)
    acked = []
    while len(acked) < 400:  # the parent records each ack as it arrives
        line = writer.stdout.readline()
        assert line, "writer died early"
        acked.append(line.strip())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    acked += writer.stdout.read().split()  # acks already in the pipe count too

    stored = read_events(tmp_path)["event_id"].to_pylist()
    assert set(acked) <= set(stored), f"lost {len(set(acked) - set(stored))} acknowledged events"
    assert len(stored) == len(set(stored))

    # The next writer to open the store turns the orphaned tail into part files.
    with DirectoryStore(tmp_path) as survivor:
        if flush_every > 10**6:
            assert survivor.recovered_events == len(stored)
    assert not list_store(tmp_path).tails
    assert not list((tmp_path / "tail").iterdir()), "the dead writer's files are cleaned up"
    ids = read_events(tmp_path)["event_id"].to_pylist()
    assert len(ids) == len(set(ids)), "recovery duplicated events"
    assert set(ids) == set(stored)


def test_recovery_leaves_live_writers_alone(tmp_path):
    live = DirectoryStore(tmp_path, flush_every=100)
    acked = [live.append(vote())["event_id"] for _ in range(3)]
    assert recover_orphans(tmp_path) == 0
    assert list_store(tmp_path).tails, "a live writer's tail must not be touched"
    live.append(vote())  # the live writer still works after someone else tried recovery
    live.close()
    assert set(acked) <= set(read_events(tmp_path)["event_id"].to_pylist())


def test_crash_between_part_rename_and_segment_unlink_reads_each_event_once(tmp_path):
    store = DirectoryStore(tmp_path, flush_every=100)
    for _ in range(5):
        store.append(vote())
    segment = list_store(tmp_path).tails[0]
    saved = segment.read_bytes()
    store.flush()
    segment.write_bytes(saved)  # as if the process died right after the rename
    assert len(read_events(tmp_path)) == 5
    store.close()


# ---- compaction --------------------------------------------------------------------------


def canonical(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: r["event_id"])


def test_compact_merges_parts_without_changing_what_is_read(tmp_path):
    for k in range(6):
        with DirectoryStore(tmp_path, flush_every=4) as store:
            for i in range(10):
                r = store.append(vote(annotator=f"a{k}", choice="ab"[i % 2]))
            store.retract(r["event_id"], f"a{k}", vote=r)
    before_events, before_votes = canonical(read_events(tmp_path)), canonical(read_comparisons(tmp_path))
    assert len(list_store(tmp_path).parts) > 6
    result = compact(tmp_path)
    assert result["parts_after"] == 1 and result["events"] == 66
    assert canonical(read_events(tmp_path)) == before_events
    assert canonical(read_comparisons(tmp_path)) == before_votes


def test_crash_after_compacted_rename_does_not_duplicate(tmp_path):
    for _ in range(3):
        with DirectoryStore(tmp_path) as store:
            store.append(vote())
    saved = {p.name: p.read_bytes() for p in list_store(tmp_path).parts}
    compact(tmp_path)
    for name, data in saved.items():  # the sources "survived" the crash
        (tmp_path / "parts" / name).write_bytes(data)
    assert len(read_events(tmp_path)) == 3
    compact(tmp_path)  # the next compaction cleans them up
    assert len(list(tmp_path.glob("parts/*.parquet"))) == 1
    assert len(read_events(tmp_path)) == 3


def test_compact_leaves_damaged_parts_in_place(tmp_path):
    for _ in range(3):
        with DirectoryStore(tmp_path) as store:
            store.append(vote())
    bad = list_store(tmp_path).parts[0]
    bad.write_bytes(b"PAR1 garbage")
    compact(tmp_path)
    assert bad.exists(), "damaged data is never deleted"
    assert len(read_events(tmp_path)) == 2


def test_reads_during_writes_and_compactions_never_lose_or_duplicate(tmp_path):
    writer = start_writer(tmp_path, 3000, 20, "busy")
    acked: list[str] = []
    reads = 0
    while writer.poll() is None or reads == 0:
        line = writer.stdout.readline()
        if line:
            acked.append(line.strip())
        if len(acked) % 150 == 0 and acked:
            known = set(acked)
            if reads % 2:
                compact(tmp_path)
            ids = read_events(tmp_path)["event_id"].to_pylist()
            reads += 1
            assert len(ids) == len(set(ids))
            assert known <= set(ids)
    acked += writer.stdout.read().split()
    assert reads >= 5
    ids = read_events(tmp_path)["event_id"].to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(acked)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such comparison store"):
        read_events(tmp_path / "nope")


def test_cli_compact_and_info(tmp_path):
    for _ in range(3):
        with DirectoryStore(tmp_path) as store:
            store.append(vote())
    out = preflab("compact", "--data", tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 part files -> 1" in out.stdout
    out = preflab("info", "--data", tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 standing" in out.stdout
