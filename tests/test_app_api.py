"""`preflab serve` through its API: a real server process, driven with gradio_client.

The server helpers (Server, write_pairs, add_users, client) live in helpers.py.
"""

import json
import signal
import time

import pytest
from helpers import XSS_LEFT, XSS_RIGHT, Server, add_users, client, preflab, raw_get, write_pairs

from annotate.pairs import load_pairs
from annotate.queue import AssignmentQueue
from annotate.service import Service
from annotate.web.html import render_markdown, render_prompt
from trainer.store import read_comparisons, read_events
from trainer.store.directory_writer import DirectoryStore

# --------------------------------------------------------------------------------------
# without a server: rendering and the Service
# --------------------------------------------------------------------------------------


def test_model_text_is_markdown_with_every_tag_escaped():
    out = render_markdown(
        XSS_LEFT + "\n\n" + XSS_RIGHT + "\n\n**bold** and `code <b>`\n\n"
        "[fine](https://example.com) ![pixel](https://example.com/p.png)"
    )
    assert "<script" not in out and "<img" not in out and '<a href="javascript' not in out.lower()
    assert "&lt;script&gt;" in out and "&lt;img src=x onerror=" in out
    assert "[here](javascript:window.__pwned=3)" in out  # left as plain text
    assert "<strong>bold</strong>" in out and "<code>code &lt;b&gt;</code>" in out
    assert '<a href="https://example.com" target="_blank" rel="noopener noreferrer nofollow">fine</a>' in out
    chat = render_prompt([{"role": "user", "content": "<b>hi</b>"}])
    assert "<b>" not in chat and "&lt;b&gt;hi&lt;/b&gt;" in chat


def test_service_maps_left_and_right_to_the_canonical_choice(tmp_path):
    pairs, _ = load_pairs(write_pairs(tmp_path / "pairs.jsonl", 40))
    q = AssignmentQueue(seed=3)
    q.add(pairs)
    with DirectoryStore(tmp_path / "store") as store:
        service = Service(store, q, data=tmp_path / "store", local_user="me")
        view = service.next("me")
        acks = []
        for i in range(40):
            shown_left = view["pair"]["left"]
            choice = ("left", "right", "tie", "both_bad")[i % 4]
            view = service.vote("me", view["pair"]["pair_id"], choice, "clearly", f"why {i}")
            acks.append((choice, shown_left, view["ack"]["event_id"]))
    votes = {r["event_id"]: r for r in read_comparisons(tmp_path / "store").to_pylist()}
    lefts = set()
    for choice, shown_left, event_id in acks:
        r = votes[event_id]
        lefts.add(r["left"])
        assert r[f"response_{r['left']}"] == shown_left  # `left` says what was on the left
        other = "b" if r["left"] == "a" else "a"
        assert r["choice"] == {"left": r["left"], "right": other}.get(choice, choice)
        assert r["strength"] == (2 if choice in ("left", "right") else None)
        assert r["decision_ms"] >= 0 and r["annotator"] == "me"
    assert lefts == {"a", "b"}  # the side shown on the left is random


# --------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------


def test_refuses_to_listen_publicly_without_auth(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    r = preflab("serve", "--pairs", pairs, "--host", "0.0.0.0", "--data", tmp_path / "store", timeout=60)
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0 without --auth" in r.stderr
    assert not (tmp_path / "store").exists()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """One server with accounts and --overlap 2; six pairs."""
    tmp = tmp_path_factory.mktemp("team")
    add_users(tmp / "users.toml", ann="annotator", ben="annotator", boss="admin")
    pairs = write_pairs(tmp / "pairs.jsonl", 6)
    with pairs.open("a") as f:
        f.write("{not json\n")
    server = Server(
        tmp,
        "--pairs",
        str(pairs),
        "--data",
        str(tmp / "store"),
        "--auth",
        str(tmp / "users.toml"),
        "--overlap",
        "2",
    )
    with server:
        yield server, tmp / "store"


def test_bad_pairs_rows_are_reported_with_file_and_line(team):
    server, _ = team
    assert "pairs.jsonl:7: invalid JSON" in server.output()


def test_login_is_required(team):
    server, _ = team
    from gradio_client import Client

    # gradio_client raises ValueError (AuthenticationError, a subclass, for a missing login).
    with pytest.raises(ValueError, match="credentials were not provided"):
        client(server.url)
    with pytest.raises(ValueError, match="Could not login"):
        Client(server.url, auth=("ann", "wrong"), verbose=False)


def test_two_annotators_with_overlap_two(team):
    server, store = team
    ann, ben = client(server.url, "ann"), client(server.url, "ben")
    seen = {"ann": [], "ben": []}
    views = {"ann": ann.predict(api_name="/next"), "ben": ben.predict(api_name="/next")}
    assert views["ann"]["progress"] == {"done": 0, "assigned": 6, "pool_done": 0, "pool_total": 6}
    for _ in range(8):  # interleaved, until both run out
        for name, c in (("ann", ann), ("ben", ben)):
            pair = views[name]["pair"]
            if pair is None:
                continue
            seen[name].append(pair["pair_id"])
            assert set(pair) == {
                "pair_id",
                "prompt",
                "left",
                "right",
                "left_cut",
                "right_cut",
            }  # no model names yet
            views[name] = c.predict(pair["pair_id"], "left", "slightly", "", api_name="/vote")
            assert views[name]["ok"] and views[name]["ack"]["left_model"] in ("alpha", "beta")
    assert views["ann"]["pair"] is None and views["ann"]["waiting"]["state"] == "done"
    assert views["ann"]["progress"]["done"] == views["ann"]["progress"]["assigned"] == 6
    assert views["ben"]["progress"] == {"done": 6, "assigned": 6, "pool_done": 6, "pool_total": 6}  # ben last
    assert sorted(seen["ann"]) == sorted(seen["ben"]) and len(set(seen["ann"])) == 6
    votes = read_comparisons(store)
    assert votes.num_rows == 12
    by_pair = {}
    for r in votes.select(["pair_id", "annotator"]).to_pylist():
        by_pair.setdefault(r["pair_id"], []).append(r["annotator"])
    assert all(sorted(v) == ["ann", "ben"] for v in by_pair.values())


def test_annotators_are_refused_admin_endpoints(team):
    server, store = team
    ann = client(server.url, "ann")
    for api_name, args in (
        ("/dashboard", ()),
        ("/export", ("standard", "exclude", "none", "parquet", False)),
    ):
        with pytest.raises(Exception, match="admins"):
            ann.predict(*args, api_name=api_name)
    boss = client(server.url, "boss")
    board = boss.predict(api_name="/dashboard")
    n = read_comparisons(store).num_rows
    assert board["summary"]["votes"] == n
    assert board["queue"]["overlap"] == 2
    report, files = boss.predict("conversational", "separate", "none", "jsonl", True, api_name="/export")
    assert "standing votes" in report
    # links to the admins' download route: a script fetches them with its login cookies
    assert [f["name"].endswith(".jsonl") for f in files] == [True, True]  # the votes, and the ties
    download = raw_get(files[0]["url"], boss)
    assert download.status_code == 200, download.text
    assert download.headers["content-disposition"].startswith("attachment")
    rows = [json.loads(line) for line in download.text.splitlines()]
    assert len(rows) == n and set(rows[0]) == {"prompt", "chosen", "rejected", "margin"}
    assert rows[0]["prompt"][0]["role"] == "user"


def test_restart_after_kill_rebuilds_assignment_from_the_store(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    args = ("--pairs", str(pairs), "--data", str(tmp_path / "store"), "--user", "solo")
    server = Server(tmp_path, *args).start()
    try:
        c = client(server.url)
        view = c.predict(api_name="/next")
        voted = []
        for choice in ("left", "tie"):
            voted.append(view["pair"]["pair_id"])
            view = c.predict(view["pair"]["pair_id"], choice, "", "", api_name="/vote")
    finally:
        server.stop(signal.SIGKILL)  # acknowledged votes must survive this
    server = Server(tmp_path, *args).start()
    try:
        c = client(server.url)
        view = c.predict(api_name="/next")
        assert view["progress"]["done"] == 2
        assert view["pair"]["pair_id"] not in voted
        undone = c.predict(api_name="/undo")  # undo reaches a vote cast before the restart
        assert undone["pair"]["pair_id"] == voted[1] and undone["undone"]["choice"] == "tie"
        assert undone["progress"]["done"] == 1
    finally:
        server.stop()
    events = read_events(tmp_path / "store").to_pylist()
    retracts = [e for e in events if e["kind"] == "retract"]
    assert len(events) == 3 and len(retracts) == 1
    assert retracts[0]["pair_id"] == voted[1] and retracts[0]["annotator"] == "solo"


def test_generation_worker_with_the_tiny_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"Say {w}."}) + "\n"
            for i, w in enumerate(["hello", "goodbye", "thanks"])
        )
    )
    server = Server(
        tmp_path,
        "--model",
        "tiny",
        "--prompts",
        str(prompts),
        "--data",
        str(tmp_path / "store"),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--user",
        "solo",
    )
    with server:
        c = client(server.url)
        states = []
        for _ in range(600):  # cold start: the page reports progress until a pair is ready
            view = c.predict(api_name="/next")
            if view["pair"] is not None:
                break
            states.append(view["waiting"]["state"])
            assert view["waiting"]["state"] in ("loading", "generating", "waiting"), view["waiting"]
            time.sleep(0.2)
        assert view["pair"] is not None, states
        done = c.predict(view["pair"]["pair_id"], "right", "clearly", "", api_name="/vote")
        assert done["ack"]["left_model"] == done["ack"]["right_model"] == "tiny"
        for _ in range(600):  # the rest of the pool arrives in the background
            if done["pair"] is not None or done["waiting"]["state"] == "done":
                break
            time.sleep(0.2)
            done = c.predict(api_name="/next")
        assert done["progress"]["assigned"] == 3
    (record,) = read_comparisons(tmp_path / "store").to_pylist()
    params = json.loads(record["gen_params"])
    assert record["model_a"] == "tiny" and params["a"]["seed"] != params["b"]["seed"]
    assert record["prompt_id"] in {"p0", "p1", "p2"}
    cached = list((tmp_path / "store" / "pairs").glob("generated-*.jsonl"))
    assert cached and record["pair_id"] in cached[0].read_text()


def test_arena_generator_pairs_two_different_models_and_caches_its_pairs(tmp_path):
    from annotate.pair_generator import Generator
    from trainer.models import build_tiny_model
    from trainer.prompts import load_prompt_pool

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Count to {i}."}) + "\n" for i in range(4))
    )
    pool = load_prompt_pool(prompts).prompts
    other = str(build_tiny_model())  # the same weights under a second name: a two-model arena
    q = AssignmentQueue()
    gen = Generator(
        ["tiny", other],
        pool,
        q,
        cache_dir=tmp_path / "pairs",
        batch_size=2,
        max_new_tokens=4,
        per_annotator=100,
    )  # never "enough": run to the end
    gen.run()
    assert gen.status()["state"] == "done", gen.status()
    pairs = [q._pairs[p] for p in q._pairs]
    assert len(pairs) == 4 and {p.prompt_id for p in pairs} == {"p0", "p1", "p2", "p3"}
    assert all({p.model_a, p.model_b} == {"tiny", other} for p in pairs)
    # a restarted server reads the same pairs back instead of generating again
    again = Generator(
        ["tiny", other], pool, AssignmentQueue(), cache_dir=tmp_path / "pairs", max_new_tokens=4
    )
    assert sorted(p.pair_id for p in again.load_cache()) == sorted(p.pair_id for p in pairs)
    assert again._next_jobs(2) == []


def test_a_port_in_use_is_one_line_and_creates_nothing(tmp_path):
    import socket

    from trainer.store.pg_testserver import free_port

    pairs = write_pairs(tmp_path / "pairs.jsonl", 1)
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = preflab("serve", "--pairs", pairs, "--data", tmp_path / "store", "--port", str(port), timeout=120)
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"error: cannot listen on 127.0.0.1:{port} (in use); try another --port"
    )
    assert "GRADIO_SERVER_PORT" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()  # failed before doing anything: no store made


def test_without_accounts_only_requests_that_name_this_machine_get_in(tmp_path):
    """DNS rebinding: a page elsewhere reaching 127.0.0.1 through its own name sends its
    own Host; the single-user server, whose user is an admin, answers it with 400."""
    import urllib.error
    import urllib.request

    from annotate.web.host_check import host_name

    assert [host_name(h) for h in ("127.0.0.1:7860", "[::1]:7860", "LocalHost", "evil.example.com:80")] == [
        "127.0.0.1",
        "::1",
        "localhost",
        "evil.example.com",
    ]
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    with Server(tmp_path, "--pairs", str(pairs), "--data", str(tmp_path / "store")) as server:
        for host, status in (
            (f"127.0.0.1:{server.port}", 200),
            (f"localhost:{server.port}", 200),
            ("evil.example.com", 400),
            (f"evil.example.com:{server.port}", 400),
        ):
            request = urllib.request.Request(server.url + "config", headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    got = r.status
            except urllib.error.HTTPError as e:
                got = e.code
            assert got == status, host
        assert client(server.url).predict(api_name="/next")["pair"] is not None  # the real client still works


def test_sigterm_during_generation_stops_cleanly(tmp_path):
    """SIGTERM while the worker is inside model.generate: generation ends at its next
    token and the server exits 0, without torch's C++ abort ("terminate called without
    an active exception") that an exit mid-generate gives."""
    import signal

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Tell story {i}."}) + "\n" for i in range(40))
    )
    server = Server(tmp_path, "--model", "tiny", "--prompts", str(prompts), "--data", str(tmp_path / "store"),
                    "--max-new-tokens", "400", "--batch-size", "4", "--user", "solo")  # fmt: skip
    with server:
        c = client(server.url)
        for _ in range(600):
            view = c.predict(api_name="/next")
            if view["pair"] is not None or view["waiting"]["state"] == "generating":
                break
            time.sleep(0.2)
        assert "generating" in json.dumps(view["waiting"]) or view["pair"] is not None
        time.sleep(1.0)  # well inside a batch of 400-token answers
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(90)
        output = server.output()
    assert code == 0, output[-2000:]
    assert "terminate called" not in output and "Aborted" not in output
