"""When a model behind an endpoint fails, against helpers.FailingServer (the test's own
small HTTP server: 500, a stall past the timeout, a stream cut off, a malformed stream,
a 400 for one prompt) and a server that is gone: each failure one clear message without
the key (redacted before the message is cut); its pair dropped and nothing stored, the
other models going on; a prompt that always fails given up so generation ends; a model
that failed passed over, a newcomer's opponent included; nothing but the entry's key
sent; a stop cancels; the page names the failed endpoint to admins only."""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import EP_HELLO as HELLO
from helpers import EP_KEY as KEY
from helpers import (
    TRAIN_DEVICE,
    Server,
    client,
    endpoints_file,
    free_port,
    write_jsonl,
)
from helpers import ep_entry as entry

openai = pytest.importorskip("openai")


def test_each_failure_is_one_clear_message_without_the_key(failing, tmp_path):
    from trainer.endpoint_client import EndpointFailure, EndpointModel
    from trainer.endpoints import load_endpoints

    gone = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: a server that died
    path = endpoints_file(
        tmp_path / "e.json",
        failing=failing,
        slow=entry(failing.base, "fail-slow", api_key=KEY, timeout=0.5, max_retries=0),
        drop=entry(failing.base, "fail-drop", api_key=KEY, max_retries=0),
        gone=entry(gone, "tiny", api_key=KEY, max_retries=0),
        badjson=entry(failing.base, "fail-badjson", api_key=KEY, max_retries=0),
        oddchunk=entry(failing.base, "fail-oddchunk", api_key=KEY, max_retries=0),
    )
    eps = load_endpoints(path)
    before = dict(failing.requests)
    said = {}
    for name, how in [
        ("ep-500", "HTTP 500"),
        ("slow", "timed out (nothing from the server for 0.5 s)"),
        ("drop", "the stream ended before the answer did"),
        ("gone", "connection failed or lost"),
        ("badjson", "the server sent a malformed stream"),
        ("oddchunk", "the server sent a malformed stream"),
    ]:
        model = EndpointModel(eps[name])
        (failure,) = model.answers([HELLO], max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0)
        assert isinstance(failure, EndpointFailure), (name, failure)
        said[name] = str(failure)
        assert said[name].startswith(f"endpoint {name!r} ({eps[name].model_name} at {eps[name].api_base}): ")
        assert how in said[name], said[name]
        assert KEY not in said[name]  # the 500 echoes the Authorization header: scrubbed
        assert model.cooling_down  # passed over for a while where another model can answer
        with pytest.raises(EndpointFailure):
            list(model.stream(HELLO, max_new_tokens=8, temperature=1.0, top_p=1.0))
    assert "[key]" in said["ep-500"]
    sent = {m: failing.requests.get(m, 0) - before.get(m, 0) for m in ("fail-500", "fail-slow")}
    assert sent["fail-500"] == 2 * 2  # max_retries 1: each of the two calls tried twice
    assert sent["fail-slow"] == 2  # no retries asked for: once per call


def test_a_key_echoed_where_the_message_is_cut_is_redacted_whole(failing, tmp_path):
    """The error text is cut at 300 characters: the key is taken out before, so a cut
    inside the key leaves none of it (the padding puts the echoed key across the cut)."""
    from trainer.endpoint_client import EndpointModel
    from trainer.endpoints import load_endpoints

    pads = range(230, 300, 3)
    path = endpoints_file(tmp_path / "e.json", **{
        f"pad-{n}": entry(failing.base, f"fail-pad-{n}", api_key=KEY, max_retries=0) for n in pads
    })  # fmt: skip
    eps = load_endpoints(path)
    cut_inside = 0
    for n in pads:
        (failure,) = EndpointModel(eps[f"pad-{n}"]).answers(
            [HELLO], max_new_tokens=8, temperature=1.0, top_p=1.0
        )
        said = str(failure)
        assert "HTTP 500" in said and "boom" in said, said
        assert not any(KEY[i : i + 6] in said for i in range(len(KEY) - 5)), said  # no 6 characters of it
        cut_inside += "[key]" not in said and "Bearer" in said
    assert cut_inside  # some padding did put the cut where the key was


def test_the_generator_drops_failed_pairs_and_goes_on_with_the_others(model_server, failing, tmp_path,
                                                                     monkeypatch, caplog):  # fmt: skip
    """An arena of the in-process tiny, the same model behind serve-model, and a model
    whose server answers 500: every pair that reaches the queue is between the two that
    work, every prompt gets one, and the failures were logged."""
    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue
    from trainer.endpoint_client import connect
    from trainer.endpoints import load_endpoints

    monkeypatch.setenv("PREFLAB_EP_KEY", KEY)
    remote = connect(load_endpoints(endpoints_file(tmp_path / "e.json", model_server, failing)))
    pool = [type("P", (), {"id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i}."}]})()
            for i in range(4)]  # fmt: skip
    queue = AssignmentQueue()
    names = ["tiny", "ep-tiny", "ep-500"]
    gen = Generator(names, pool, queue, cache_dir=tmp_path / "pairs", batch_size=2, max_new_tokens=6,
                    per_annotator=100, device=TRAIN_DEVICE, endpoints={n: remote[n] for n in names[1:]})  # fmt: skip
    before = failing.requests.get("fail-500", 0)
    with caplog.at_level("WARNING", logger="preflab.pairs"):
        worker = threading.Thread(target=gen.run, daemon=True)
        worker.start()
        worker.join(300)
    assert gen.status()["state"] == "done", gen.status()
    cached = [
        json.loads(line) for f in (tmp_path / "pairs").glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    assert sorted(r["prompt_id"] for r in cached) == ["p0", "p1", "p2", "p3"]
    assert queue.overview()["pairs"] == 4
    for row in cached:
        assert {row["model_a"], row["model_b"]} == {"tiny", "ep-tiny"}, row
        params = json.loads(row["gen_params"])
        side = params["a"] if row["model_a"] == "ep-tiny" else params["b"]
        assert side["endpoint"] == "ep-tiny" and side["model_name"] == "tiny" and side["temperature"] == 0.5
    warned = [r.getMessage() for r in caplog.records]
    assert any("endpoint 'ep-500'" in m and "HTTP 500" in m and "dropped" in m for m in warned), warned
    assert failing.requests.get("fail-500", 0) - before >= 2  # it was drawn, and retried once
    assert KEY not in json.dumps(cached) and KEY not in "\n".join(warned)


def test_a_prompt_that_always_fails_is_given_up_and_generation_ends(failing, tmp_path, caplog):
    """A prompt the server refuses (400: too long for its context) is given up at once, one
    it always fails (500) after three tries; the other prompts get their pairs and the
    generator is done."""
    from annotate.pair_generator import MAX_TRIES, Generator
    from annotate.queue import AssignmentQueue
    from trainer.endpoint_client import connect
    from trainer.endpoints import load_endpoints

    path = endpoints_file(tmp_path / "e.json", **{
        name: entry(failing.base, name, api_key=KEY, max_retries=0) for name in ("picky-a", "picky-b")
    })  # fmt: skip
    remote = connect(load_endpoints(path))
    texts = ["Say hi.", "Say TOO LONG.", "Say FLAKY.", "Say bye."]
    pool = [type("P", (), {"id": f"p{i}", "messages": [{"role": "user", "content": t}]})()
            for i, t in enumerate(texts)]  # fmt: skip
    queue = AssignmentQueue()
    gen = Generator(list(remote), pool, queue, cache_dir=tmp_path / "pairs", batch_size=4, max_new_tokens=6,
                    per_annotator=100, endpoints=remote)  # fmt: skip
    with caplog.at_level("WARNING", logger="preflab.pairs"):
        worker = threading.Thread(target=gen.run, daemon=True)
        worker.start()
        worker.join(120)
    status = gen.status()
    assert status["state"] == "done", status
    assert "2 prompt(s) given up" in status["message"], status
    assert queue.overview()["pairs"] == 2
    cached = [
        json.loads(line) for f in (tmp_path / "pairs").glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    assert sorted(r["prompt_id"] for r in cached) == ["p0", "p3"]
    assert failing.prompts["Say TOO LONG."] == 2  # one try, both sides asked
    assert failing.prompts["Say FLAKY."] == 2 * MAX_TRIES
    warned = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert len(warned) == 2 and any("p1 given up after 1 failed try" in m for m in warned), warned


def test_a_newcomers_opponent_passes_over_a_model_that_just_failed(failing, tmp_path):
    """A newcomer's pairs are against a random other model: not one that failed in the
    last COOL_DOWN_S while another can answer, as for the base rounds."""
    import random

    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue
    from trainer.endpoint_client import connect
    from trainer.endpoints import load_endpoints

    path = endpoints_file(tmp_path / "e.json", failing=failing, **{
        name: entry(failing.base, "picky-" + name, api_key=KEY, max_retries=0) for name in ("ok", "newcomer")
    })  # fmt: skip
    remote = connect(load_endpoints(path))
    remote["ep-500"].answers([HELLO], max_new_tokens=4, temperature=1.0, top_p=1.0)  # it fails: cooling down
    assert remote["ep-500"].cooling_down and not remote["ok"].cooling_down
    gen = Generator(list(remote), [], AssignmentQueue(), cache_dir=None, endpoints=remote)
    gen._load_new_models()
    opponents = {gen._sides(None, "newcomer", 0, random.Random(k))[1][0] for k in range(50)}
    assert opponents == {"ok"}


def test_only_the_files_key_goes_to_the_server_and_a_stop_cancels(failing, tmp_path, monkeypatch):
    """The openai client would send $OPENAI_ORG_ID and $OPENAI_PROJECT_ID to any server:
    nothing from the environment goes with a request but the entry's own key. A `stop`
    set before the request sends nothing; set midway, the answer is Cancelled, never a
    partial one passed off as whole, and the model is not marked as failed. close()
    closes the client."""
    from trainer.endpoint_client import Cancelled, EndpointModel
    from trainer.endpoints import load_endpoints

    for name, value in (
        ("OPENAI_ORG_ID", "org-leak"),
        ("OPENAI_PROJECT_ID", "proj-leak"),
        ("OPENAI_API_KEY", "sk-leak"),
    ):
        monkeypatch.setenv(name, value)
    path = endpoints_file(
        tmp_path / "e.json", plain=entry(failing.base, "picky-plain", api_key=KEY, max_retries=0)
    )
    model = EndpointModel(load_endpoints(path)["plain"])
    settings = dict(max_new_tokens=4, temperature=1.0, top_p=1.0)
    assert model.answer(HELLO, **settings).text == "Fine."
    sent = failing.headers["picky-plain"]
    assert sent["authorization"] == f"Bearer {KEY}"
    assert (
        "openai-organization" not in sent and "openai-project" not in sent and "leak" not in json.dumps(sent)
    )

    stop = threading.Event()
    stop.set()
    before = failing.requests["picky-plain"]
    with pytest.raises(Cancelled):
        model.answer(HELLO, stop=stop, **settings)
    assert failing.requests["picky-plain"] == before  # nothing was sent
    stop.clear()
    pieces = []
    with pytest.raises(Cancelled):
        for piece in model.stream(HELLO, stop=stop, **settings):
            pieces.append(piece)
            stop.set()  # after the first piece: the next chunk is not taken
    assert pieces == ["Fine."] and not model.cooling_down
    model.close()
    assert model.client.is_closed()


def test_serve_reports_a_failing_endpoint_on_the_page_and_stores_nothing(failing, tmp_path):
    """Every pair of this arena has the model whose server answers 500: the page says
    so while it waits, the log names it, no pair is kept and no vote is possible."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p0", "prompt": "Say hi."}])
    store = tmp_path / "store"
    eps = endpoints_file(tmp_path / "e.json", failing=failing)
    server = Server(tmp_path, "--endpoints", str(eps), "--model", "tiny", "--model", "ep-500",
                    "--prompts", str(prompts), "--data", str(store), "--max-new-tokens", "4",
                    "--user", "solo", "--device", TRAIN_DEVICE)  # fmt: skip
    with server:
        c = client(server.url)
        for _ in range(600):
            view = c.predict(api_name="/next")
            if "ep-500" in json.dumps(view["waiting"]):
                break
            time.sleep(0.2)
        log = server.output()
    assert view["pair"] is None
    message = view["waiting"]["message"]
    # The local user is the admin: told which model failed (an annotator is not: the arena is anonymous).
    assert "endpoint 'ep-500' (fail-500 at " in message and "HTTP 500" in message
    assert "that pair was dropped and is made again" in message
    assert "endpoint 'ep-500'" in log and "its pair is dropped" in log
    assert KEY not in message and KEY not in log
    kept = [line for f in (store / "pairs").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert kept == []
    from trainer.store import read_comparisons, store_exists

    assert not store_exists(store) or read_comparisons(store).num_rows == 0


def test_only_an_admin_is_told_which_model_failed(tmp_path):
    """The waiting message names the failed endpoint to an admin; an annotator learns that
    a model's server failed, not which one (the arena's models stay anonymous to them)."""
    from helpers import add_users

    from annotate.accounts import Accounts
    from annotate.pair_generator import Generator
    from annotate.queue import AssignmentQueue
    from annotate.service import Service
    from trainer.store.directory_writer import DirectoryStore

    add_users(tmp_path / "users.toml", ann="annotator", boss="admin")
    queue = AssignmentQueue()
    gen = Generator(["tiny"], [], queue, cache_dir=None)
    problem = "endpoint 'gpt-x' (gpt-x at http://10.0.0.7:8000/v1): HTTP 500: boom"
    gen._set(state="generating", message="generating pair 1 of 4", endpoint_error=problem)
    with DirectoryStore(tmp_path / "store") as store:
        service = Service(store, queue, data=tmp_path / "store", accounts=Accounts(tmp_path / "users.toml"),
                          generator=gen)  # fmt: skip
        boss, ann = (service.next(user)["waiting"]["message"] for user in ("boss", "ann"))
    assert problem in boss and "that pair was dropped and is made again" in boss
    assert "gpt-x" not in ann and "10.0.0.7" not in ann
    assert "a model's server failed" in ann and "that pair was dropped and is made again" in ann
