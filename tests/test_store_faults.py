"""The directory store under the faults ordinary servers meet: a hostname with dots, a
full disk, a failed part write, files it may not read, a second server.

Each fault is real: a UTS namespace with a dotted hostname (`unshare --uts`), a tiny
tmpfs that fills up, an unprivileged user (`setpriv`) meeting root-only files, and
real `preflab serve` processes. They need root, as CI and the developers' machines
run; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest
from helpers import child_env, vote_record, write_pairs

from trainer.store import read_comparisons, read_events
from trainer.store.directory_reader import list_store
from trainer.store.directory_writer import DirectoryStore
from trainer.store.errors import StoreWriteError
from trainer.store.pg_testserver import free_port

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root: namespaces, mounts and setpriv")


def vote(i: int, **fields) -> dict:
    """Vote number i, with the event id ev-<i>."""
    return vote_record(
        "Name a prime number.",
        "7",
        "Nine.",
        event_id=f"ev-{i:05d}",
        pair_id=f"pair-{i}",
        prompt_id="p-1",
        **fields,
    )


def stored_ids(store_dir) -> list[str]:
    return read_events(store_dir)["event_id"].to_pylist()


# A writer in its own process: appends votes with known event ids, prints "ack <id>"
# after each acknowledgement (or "fail <id>" when append raised), and reads commands
# from stdin: "N" appends N votes, "wait" blocks forever (to be killed).
WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from trainer.store.directory_writer import DirectoryStore
    from trainer.store import messages_to_json
    from trainer.store.errors import StoreWriteError
    store = DirectoryStore(sys.argv[1], flush_every=10**9)
    print("writer", store.writer_id, flush=True)
    prompt = messages_to_json([{{"role": "user", "content": "hi"}}])
    i = 0
    for command in sys.stdin:
        for _ in range(int(command)):
            eid = f"{{sys.argv[2]}}-{{i:05d}}"
            i += 1
            try:
                store.append(dict(event_id=eid, kind="vote", pair_id=f"pair-{{i}}", prompt_id="p",
                                  prompt=prompt, response_a="x", response_b="y", model_a="m",
                                  model_b="m", left="a", choice="a", annotator="w",
                                  rationale=sys.argv[3] * int(sys.argv[4])))
                print("ack", eid, flush=True)
            except StoreWriteError as e:
                print("fail", eid, e, flush=True)
        print("done", flush=True)
""")


class Writer:
    """The WRITER script as a process, optionally under a prefix (unshare ...)."""

    def __init__(self, store_dir, *, prefix=(), tag="w", pad=0):
        code = WRITER.format(repo=str(REPO))
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", code, str(store_dir), tag, "x", str(pad)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self.proc.stdout.readline().split()
        assert first and first[0] == "writer", f"writer did not start: {first}"
        self.writer_id = first[1]
        self.acked: list[str] = []
        self.failed: list[str] = []

    def append(self, n: int) -> None:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            assert line, "writer died"
            word, *rest = line.split()
            if word == "done":
                return
            (self.acked if word == "ack" else self.failed).append(rest[0])

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


# ---- 1. a hostname with dots ----------------------------------------------------------


@needs_root
def test_a_dotted_hostname_does_not_make_a_live_writer_look_dead(tmp_path):
    """The report: on node-7.rack-2.cluster.local a second writer opening the store
    "recovered" the live server's segment, and kill -9 then lost half its votes."""
    server = Writer(
        tmp_path,
        prefix=("unshare", "--uts", "sh", "-c", 'hostname node-7.rack-2.cluster.local && exec "$0" "$@"'),
    )
    assert "." not in server.writer_id and server.writer_id.startswith("node-7-rack-2-cluster-local-")
    server.append(6)
    with DirectoryStore(tmp_path) as importer:  # `preflab import` opening the same store
        assert importer.recovered_events == 0, "a live writer's segment was taken for an orphan"
        importer.append(vote(0, annotator="import:x"))
    assert list_store(tmp_path).tails, "the live writer's segment must still be there"
    server.append(6)
    server.kill()
    assert len(server.acked) == 12
    assert set(server.acked) <= set(stored_ids(tmp_path))
    with DirectoryStore(tmp_path) as survivor:  # the dead writer's tail becomes a part
        assert survivor.recovered_events == 12
    assert sorted(stored_ids(tmp_path)) == sorted([*server.acked, "ev-00000"])


def test_a_writer_id_with_a_dot_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain a dot"):
        DirectoryStore(tmp_path, writer_id="host.example-1")


# ---- 2. a full disk -------------------------------------------------------------------


@pytest.fixture
def tiny_disk():
    """A 512 KiB tmpfs (unmounted afterwards) and a filler file to eat its space."""
    mount = Path(tempfile.mkdtemp(prefix="preflab-tiny-"))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk until about `leave` bytes are free."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


@needs_root
def test_a_full_disk_acknowledges_nothing_it_did_not_keep(tiny_disk):
    """The report: with ~40 KB free a vote that did not fit was acknowledged, the next
    was glued onto the torn line, and recovery deleted the segment."""
    store_dir = tiny_disk / "store"
    writer = Writer(store_dir, pad=3000)  # ~3 KB a vote
    writer.append(3)
    filler = fill(tiny_disk, leave=8 * 1024)
    writer.append(8)  # some fit, then the disk is full
    assert writer.failed, "the disk never filled up"
    acked_before = list(writer.acked)
    filler.unlink()  # space comes back
    writer.append(3)  # the writer goes on, on a fresh segment
    assert len(writer.acked) == len(acked_before) + 3
    writer.kill()

    stored = stored_ids(store_dir)
    assert set(writer.acked) <= set(stored), f"lost {set(writer.acked) - set(stored)}"
    assert not set(writer.failed) & set(stored), "an event reported as not saved was kept"
    assert len(stored) == len(set(stored))
    with DirectoryStore(store_dir):  # recovery of the dead writer
        pass
    assert sorted(stored_ids(store_dir)) == sorted(writer.acked)
    quarantined = list((store_dir / "quarantine").glob("*")) if (store_dir / "quarantine").exists() else []
    assert not list(store_dir.glob("tail/*.jsonl")), "every segment was turned into a part or kept aside"
    for q in quarantined:  # kept aside, never deleted: raw bytes still there
        assert q.stat().st_size > 0


@needs_root
def test_a_part_write_that_fails_leaves_no_temp_file_and_loses_nothing(tiny_disk):
    store_dir = tiny_disk / "store"
    store = DirectoryStore(store_dir, flush_every=10**9)
    acked = [store.append(vote(i, rationale="y" * 2000))["event_id"] for i in range(20)]
    filler = fill(tiny_disk, leave=4 * 1024)
    store.flush()  # the part does not fit: the segment stays
    assert not list((store_dir / "parts").glob(".*.tmp")), "a failed part write left its temp file"
    assert sorted(stored_ids(store_dir)) == sorted(acked)
    with pytest.raises(StoreWriteError, match="not saved"):
        store.append(vote(99, rationale="z" * 8000))
    filler.unlink()
    store.close()
    with DirectoryStore(store_dir) as again:  # the left-over segment becomes a part now
        assert again.recovered_events == 20
    assert sorted(stored_ids(store_dir)) == sorted(acked)
    assert not list(store_dir.glob("tail/*.jsonl"))


def test_a_dead_writers_temp_files_are_cleaned_up(tmp_path):
    writer = Writer(tmp_path)
    writer.append(2)
    leftover = tmp_path / "parts" / f".{writer.writer_id}.000000.parquet.{uuid.uuid4().hex[:8]}.tmp"
    leftover.write_bytes(b"half a part")  # as if killed in the middle of a part write
    writer.kill()
    with DirectoryStore(tmp_path) as survivor:
        assert survivor.recovered_events == 2
    assert not leftover.exists()
    assert len(stored_ids(tmp_path)) == 2


def test_recovery_keeps_the_bytes_it_cannot_read(tmp_path):
    writer = Writer(tmp_path)
    writer.append(3)
    segment = next((tmp_path / "tail").glob("*.jsonl"))
    writer.kill()
    lines = segment.read_bytes().split(b"\n")
    lines.insert(1, b"{this line is damaged")
    segment.write_bytes(b"\n".join(lines))
    with DirectoryStore(tmp_path) as survivor:
        assert survivor.recovered_events == 3
    kept = tmp_path / "quarantine" / segment.name
    assert kept.exists() and b"{this line is damaged" in kept.read_bytes()
    assert sorted(stored_ids(tmp_path)) == sorted(writer.acked)


# ---- 3. permissions -------------------------------------------------------------------


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "annotate.cli",
            *argv,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=120,
    )


@pytest.fixture
def shared_tmp():
    """A directory an unprivileged user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="preflab-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_an_unreadable_part_is_a_permission_error_never_damaged(shared_tmp):
    store_dir = shared_tmp / "store"
    for i in range(2):
        with DirectoryStore(store_dir) as store:
            store.append(vote(i))
    for p in [store_dir, *store_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    secret = sorted((store_dir / "parts").glob("*.parquet"))[0]
    secret.chmod(0o600)
    r = as_nobody("info", "--data", str(store_dir))
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(secret) in r.stderr and "permission denied" in r.stderr
    assert "damaged" not in r.stderr and "Traceback" not in r.stderr
    r = as_nobody("export", "--data", str(store_dir), "--out", str(shared_tmp / "out.parquet"))
    assert r.returncode == 2 and "permission denied" in r.stderr and "Traceback" not in r.stderr


@needs_root
def test_a_read_only_store_refuses_writes_with_a_clear_error(shared_tmp):
    store_dir = shared_tmp / "store"
    with DirectoryStore(store_dir) as store:
        store.append(vote(1))
    for p in [store_dir, *store_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    rows = shared_tmp / "prefs.jsonl"
    rows.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    rows.chmod(0o644)
    r = as_nobody("import", str(rows), "--data", str(store_dir), "--source", "t")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "permission denied" in r.stderr and str(store_dir) in r.stderr
    assert "Traceback" not in r.stderr
    pairs = shared_tmp / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "response_a": "a", "response_b": "b"}) + "\n")
    pairs.chmod(0o644)
    r = as_nobody("serve", "--pairs", str(pairs), "--data", str(store_dir), "--port", "1")
    assert r.returncode == 2 and "permission denied" in r.stderr and "Traceback" not in r.stderr
    r = as_nobody("info", "--data", str(store_dir))  # reading still works
    assert r.returncode == 0 and "1 standing" in r.stdout


# ---- 4. a second server on one directory store ----------------------------------------


def serve_cmd(store_dir: Path, pairs: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "annotate.cli",
        "serve",
        "--pairs",
        str(pairs),
        "--data",
        str(store_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--overlap",
        "2",
    ]


def test_a_second_server_on_a_directory_store_refuses_and_names_the_first(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "response_a": f"a{i}", "response_b": f"b{i}"}) + "\n"
            for i in range(3)
        )
    )
    ports = [free_port(), free_port()]
    store_dir = tmp_path / "store"
    env = child_env()
    first = subprocess.Popen(
        serve_cmd(store_dir, pairs, ports[0]),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:  # up and serving
            if line.startswith("open http"):
                break
        else:
            pytest.fail("the first server did not start")
        second = subprocess.run(
            serve_cmd(store_dir, pairs, ports[1]),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and f"127.0.0.1:{ports[0]}" in second.stderr
        assert "postgresql://" in second.stderr and "Traceback" not in second.stderr
        # readers and imports stay free to run alongside the server
        with DirectoryStore(store_dir) as importer:
            importer.append(vote(1, annotator="import:side"))
        assert "ev-00001" in stored_ids(store_dir)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    # once the first server is gone, the store serves again
    again = subprocess.Popen(
        serve_cmd(store_dir, pairs, ports[1]),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert any(line.startswith("open http") for line in again.stdout)
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=30)


@needs_root
def test_the_annotator_is_told_not_saved_and_keeps_the_pair(tiny_disk):
    from annotate.pairs import load_pairs
    from annotate.queue import AssignmentQueue
    from annotate.service import Service

    pairs, _ = load_pairs(write_pairs(tiny_disk / "pairs.jsonl", 5))
    queue = AssignmentQueue(seed=1)
    queue.add(pairs)
    store_dir = tiny_disk / "store"
    with DirectoryStore(store_dir, flush_every=10**9) as store:
        service = Service(store, queue, data=store_dir, local_user="me")
        view = service.next("me")
        filler = fill(tiny_disk, leave=0)
        long_reason = "because " * 250  # as long as a rationale may be, and more than the disk has left
        failed = service.vote("me", view["pair"]["pair_id"], "left", "", long_reason)
        assert failed["ok"] is False and "Not saved" in failed["message"] and "try again" in failed["message"]
        assert failed["pair"]["pair_id"] == view["pair"]["pair_id"], "the same pair stays on screen"
        assert failed["ack"] is None
        filler.unlink()
        saved = service.vote("me", view["pair"]["pair_id"], "left", "", long_reason)
        assert saved["ok"] and saved["ack"]
    assert stored_ids(store_dir) == [saved["ack"]["event_id"]]


@needs_root
def test_a_chat_vote_the_disk_cannot_hold_is_not_saved_and_the_turn_stays_votable(tiny_disk):
    from annotate.chat import ChatService
    from annotate.chat_models import InProcessChat
    from annotate.model_engine import Engine
    from trainer import models

    model, tokenizer = models.load_model("tiny", device="cpu")
    engine = Engine(model, tokenizer, max_new_tokens=8, concurrency=2)
    pair = {"m-one": InProcessChat(engine), "m-two": InProcessChat(engine)}
    store_dir = tiny_disk / "store"
    sampling = {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": 8}
    with DirectoryStore(store_dir, flush_every=10**9) as store:
        chat = ChatService(store, pair, sampling=sampling)
        *_, view = chat.send("me", "", "Hello")
        cid = view["conversation_id"]
        filler = fill(tiny_disk, leave=0)
        long_reason = "because " * 250  # more than the disk has left
        failed = chat.vote("me", cid, "left", "", long_reason)
        assert failed["ok"] is False and "Not saved" in failed["message"] and failed["ack"] is None
        assert failed["can_vote"] and not failed["voted"]  # the same turn, still to vote on
        filler.unlink()
        saved = chat.vote("me", cid, "left", "", long_reason)
        assert saved["ok"] and saved["ack"] and saved["voted"]
        assert stored_ids(store_dir) == [saved["ack"]["event_id"]]

        # A take-back the disk cannot hold: not taken back, the vote stands, a retry works
        filler = fill(tiny_disk, leave=0)
        failed = chat.take_back("me", cid)
        assert failed["ok"] is False and "Not taken back" in failed["message"] and not failed["taken_back"]
        from annotate.web.chat_tab import status_html

        shown = status_html(failed)  # what the Chat tab puts over the message box: the error, not "Saved"
        assert 'class="status error"' in shown and "Not taken back" in shown and "Saved" not in shown
        assert read_comparisons(store_dir)["event_id"].to_pylist() == [saved["ack"]["event_id"]]
        filler.unlink()
        back = chat.take_back("me", cid)
        assert back["ok"] and back["taken_back"]
    assert read_comparisons(store_dir).num_rows == 0
    (retract,) = [e for e in read_events(store_dir).to_pylist() if e["kind"] == "retract"]
    assert retract["retracts"] == saved["ack"]["event_id"]
