"""Models behind an endpoint (`--endpoints FILE`, trainer/endpoint_client.py) that work,
against a real OpenAI-compatible server: `preflab serve-model` on the tiny model, driven
through the real openai client (the `model_server` fixture, tests/conftest.py).

Covered: streaming and whole answers (what the model itself writes for that seed, with
recommended_config's settings over the command's); the per-model semaphore (two callers
at once never send a 2-slot server a third request); `generate`, `serve` and
`eval-policy` with an endpoint model beside an in-process one (gen_params and eval.json
name the endpoint and the served model), and the key in none of the pairs, the store,
the log or the page. The file's checks: tests/test_endpoints_file.py; failures:
tests/test_endpoint_failures.py."""

from __future__ import annotations

import json
import threading
import time

import helpers
import pytest
from helpers import EP_HELLO as HELLO
from helpers import EP_KEY as KEY
from helpers import (
    TRAIN_DEVICE,
    Server,
    client,
    endpoints_file,
    in_process_answer,
    preflab,
    write_jsonl,
)

openai = pytest.importorskip("openai")


def test_stream_and_answer_are_what_the_model_writes(model_server, tmp_path, monkeypatch):
    from trainer.endpoint_client import EndpointModel, side_params
    from trainer.endpoints import load_endpoints

    monkeypatch.setenv("PREFLAB_EP_KEY", KEY)
    model = EndpointModel(load_endpoints(endpoints_file(tmp_path / "e.json", model_server))["ep-tiny"])
    # The command's temperature 0.9 gives way to the entry's recommended 0.5.
    settings = dict(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    pieces = list(model.stream(HELLO, **settings))
    assert len(pieces) > 1  # as the server sent them, not one lump
    answer = model.answer(HELLO, **settings)
    assert "".join(pieces).strip() == answer.text
    expected = in_process_answer(HELLO, temperature=0.5, top_p=1.0, seed=7, max_new_tokens=16)
    assert answer.text == expected
    params = side_params(model, {"temperature": 0.9, "top_p": 0.8, "max_new_tokens": 16}, 7)
    assert params == {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 16, "seed": 7,
                      "endpoint": "ep-tiny", "model_name": "tiny"}  # fmt: skip


def test_the_semaphore_keeps_two_callers_within_the_servers_slots(model_server, tmp_path, monkeypatch):
    """The server has 2 slots and answers a third request with 503; the entry allows 2
    requests at once and no retries. Two callers with 3 prompts each would send 4 at
    once without the shared semaphore: every answer must come back."""
    from trainer.endpoint_client import EndpointModel
    from trainer.endpoints import load_endpoints

    monkeypatch.setenv("PREFLAB_EP_KEY", KEY)
    path = endpoints_file(tmp_path / "e.json", model_server, concurrency=2)
    model = EndpointModel(load_endpoints(path)["ep-tiny"])
    results = [None, None]

    def ask(k):
        prompts = [[{"role": "user", "content": f"Tell me about {k}-{j}."}] for j in range(3)]
        results[k] = model.answers(prompts, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=k)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    answers = results[0] + results[1]
    assert len(answers) == 6 and all(hasattr(a, "text") for a in answers), [str(a) for a in answers]


def test_generate_with_an_endpoint_model(model_server, tmp_path):
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Tell story {i}."} for i in range(3)]
    )
    eps = endpoints_file(tmp_path / "e.json", model_server)
    out = tmp_path / "pairs.jsonl"
    r = preflab("generate", "--endpoints", eps, "--model", "ep-tiny", "--model", "tiny", "--prompts", prompts,
                "--out", out, "--max-new-tokens", "8", "--no-progress", "--device", TRAIN_DEVICE,
                env=helpers.child_env(PREFLAB_EP_KEY=KEY), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert {row["model_a"], row["model_b"]} == {"ep-tiny", "tiny"}
        params = json.loads(row["gen_params"])
        ep_side = "a" if row["model_a"] == "ep-tiny" else "b"
        local = params["b" if ep_side == "a" else "a"]
        assert params[ep_side] == {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 8, "seed": 0,
                                   "endpoint": "ep-tiny", "model_name": "tiny", "pregenerated": True,
                                   **({"cut": True} if params[ep_side].get("cut") else {})}  # fmt: skip
        assert "endpoint" not in local and local["temperature"] == 0.8
        # The endpoint's answer is the served model's own for its settings and seed.
        text = row["response_" + ep_side]
        assert text == in_process_answer(row["prompt"], temperature=0.5, top_p=1.0, seed=0, max_new_tokens=8)
    assert KEY not in out.read_text() + r.stdout + r.stderr


def _vote_all(url: str, limit: int = 600) -> list[dict]:
    c = client(url)
    view, views = c.predict(api_name="/next"), []
    for _ in range(limit):
        if view["pair"] is not None:
            views.append(view)
            view = c.predict(view["pair"]["pair_id"], "left", "", "", api_name="/vote")
        elif view["waiting"]["state"] == "done":
            return views
        else:
            time.sleep(0.2)
            view = c.predict(api_name="/next")
    raise AssertionError(f"not done: {view}")


def test_serve_with_an_endpoint_and_an_in_process_model(model_server, tmp_path, monkeypatch):
    from trainer.store import read_comparisons

    monkeypatch.setenv("PREFLAB_EP_KEY", KEY)  # the server's environment is the test's
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Say {w}."}
                                                 for i, w in enumerate(["hi", "bye", "yes"])])  # fmt: skip
    store = tmp_path / "store"
    eps = endpoints_file(tmp_path / "e.json", model_server)
    server = Server(tmp_path, "--endpoints", str(eps), "--model", "ep-tiny", "--model", "tiny",
                    "--prompts", str(prompts), "--data", str(store), "--max-new-tokens", "6",
                    "--batch-size", "2", "--user", "solo", "--device", TRAIN_DEVICE)  # fmt: skip
    with server:
        views = _vote_all(server.url)
        log = server.output()
    assert len(views) == 3
    records = read_comparisons(store).to_pylist()
    assert sorted(r["prompt_id"] for r in records) == ["p0", "p1", "p2"]
    for r in records:
        assert {r["model_a"], r["model_b"]} == {"ep-tiny", "tiny"}
        params = json.loads(r["gen_params"])
        side = params["a" if r["model_a"] == "ep-tiny" else "b"]
        assert (side["endpoint"], side["model_name"], side["temperature"]) == ("ep-tiny", "tiny", 0.5)
    on_disk = b"".join(f.read_bytes() for f in store.rglob("*") if f.is_file())
    assert KEY.encode() not in on_disk and KEY not in log and KEY not in json.dumps(views)


def test_eval_policy_against_an_endpoint_reference(model_server, failing, tmp_path):
    """`eval-policy --reference ep-tiny`: the reference answers from its server and
    eval.json names it; a reference whose every answer fails is one line, exit 2."""
    import shutil

    from helpers import train_tiny_reward_run

    from trainer.models import tiny_model_dir
    from trainer.runs import CONFIG_FILE, EVAL_FILE, POLICY_DIR

    rm = train_tiny_reward_run(tmp_path / "runs")
    run = tmp_path / "runs" / "policy-ep"
    shutil.copytree(tiny_model_dir(), run / POLICY_DIR)  # the policy: the tiny model itself
    config = {"kind": "policy", "config": {"model": "tiny", "max_new_tokens": 6, "temperature": 0.9}}
    (run / CONFIG_FILE).write_text(json.dumps(config))
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"Name a fruit {i}."} for i in range(3)]
    )
    eps = endpoints_file(tmp_path / "e.json", model_server, failing)
    env = helpers.child_env(PREFLAB_EP_KEY=KEY)
    common = ("eval-policy", "--policy", run, "--reward", rm, "--prompts", prompts, "--endpoints", eps,
              "--device", TRAIN_DEVICE)  # fmt: skip
    r = preflab(*common, "--reference", "ep-tiny", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    record = json.loads((run / EVAL_FILE).read_text())
    assert record["reference"] == "ep-tiny" and record["prompts"] == 3 and "failed_prompts" not in record
    assert record["reference_endpoint"] == {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 6, "seed": 0,
                                            "endpoint": "ep-tiny", "model_name": "tiny"}  # fmt: skip
    assert KEY not in (run / EVAL_FILE).read_text() + r.stdout + r.stderr

    r = preflab(*common, "--reference", "ep-500", env=env, timeout=300)
    assert r.returncode == 2 and "every answer failed: endpoint 'ep-500'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and KEY not in r.stderr
