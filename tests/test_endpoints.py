"""Models behind an endpoint (`--endpoints FILE`, trainer/endpoints.py and
trainer/endpoint_client.py), against a real OpenAI-compatible server: `preflab serve-model`
on the tiny model, driven through the real openai client.

Covered: the file's checks (each error names the file, the entry and the field); the
missing-extra message; streaming and whole answers (what the model itself writes for
that seed, with recommended_config's settings over the command's); the per-model
semaphore (two callers at once never send a 2-slot server a third request); `generate`
and `serve` with an endpoint model beside an in-process one (gen_params name the
endpoint and the served model); failures of a small server of the test's own (500, a
stall past the timeout, a stream cut off midway) and of a server that is gone: each a
clear message, its pair dropped and nothing stored, the other models going on; and the
key in none of the pairs, the store, the log or the page.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helpers
import pytest
from helpers import TRAIN_DEVICE, Server, client, free_port, preflab, write_jsonl

openai = pytest.importorskip("openai")

KEY = "ep-test-key-5d1c0a9e"  # distinctive: grepped for wherever it must not be
HELLO = [{"role": "user", "content": "Say something about bananas."}]


class ModelServer(helpers.ModelServer):
    key = KEY


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("endpoint-server")
    args = ("--max-new-tokens", "16", "--concurrency", "2", "--api-key-env", "PREFLAB_EP_KEY")
    with ModelServer(tmp, *args, env={"PREFLAB_EP_KEY": KEY}) as server:
        yield server


class FailingServer:
    """The failure modes under test, by the requested model's name: "fail-500" answers 500
    (echoing the Authorization header, as a careless server might; "fail-pad-N" after N
    characters of padding), "fail-slow" stalls
    past the client's timeout, "fail-drop" starts a stream and hangs up mid-answer,
    "fail-badjson" and "fail-oddchunk" send a stream that is not JSON or not a chunk.
    "picky-*" answers "Fine." but 400 to a prompt with "TOO LONG" and 500 to one with
    "FLAKY". `requests` counts the requests per model (retries included), `prompts` per
    prompt."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        self.prompts: dict[str, int] = {}  # requests per prompt (its messages' text)
        self.headers: dict[str, dict] = {}  # the last request's headers per model, names lowercased
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                model = body["model"]
                outer.requests[model] = outer.requests.get(model, 0) + 1
                outer.headers[model] = {k.lower(): v for k, v in self.headers.items()}
                said = " ".join(m["content"] for m in body["messages"])
                outer.prompts[said] = outer.prompts.get(said, 0) + 1
                if model.startswith("picky") and "TOO LONG" not in said and "FLAKY" not in said:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for delta, finish in (({"content": "Fine."}, None), ({}, "stop")):
                        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if model.startswith("picky") and "TOO LONG" in said:
                    data = json.dumps({"error": {"message": "context too long", "type": "invalid_request"}})
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data.encode())
                    return
                if model == "fail-slow":
                    time.sleep(3)
                if model in ("fail-badjson", "fail-oddchunk"):  # a stream that is not what the API sends
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    data = "{not json" if model == "fail-badjson" else json.dumps({"id": "x", "choices": 5})
                    self.wfile.write(f"data: {data}\n\n".encode())
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if model == "fail-drop":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    delta = {"index": 0, "delta": {"content": "half an"}, "finish_reason": None}
                    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [delta]}  # fmt: skip
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    self.close_connection = True
                    return
                pad = "x" * int(model.rsplit("-", 1)[1]) if model.startswith("fail-pad-") else ""
                error = {
                    "error": {
                        "message": f"boom {pad}({self.headers.get('authorization')})",
                        "type": "server_error",
                    }
                }
                data = json.dumps(error).encode()
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def failing():
    server = FailingServer()
    yield server
    server.close()


def entry(base: str, model: str = "tiny", **extra) -> dict:
    return {"model_name": model, "api_type": "openai", "api_base": base, "anony_only": False, **extra}


def endpoints_file(path: Path, model_server=None, failing=None, concurrency=1, **more) -> Path:
    """ep-tiny: the model server (at `concurrency`: above 1 its sampled answers share
    torch's generator, and a seed no longer says what they are); ep-500: the failing one."""
    entries = dict(more)
    if model_server is not None:
        entries["ep-tiny"] = entry(
            model_server.base,
            api_key_env="PREFLAB_EP_KEY",
            recommended_config={"temperature": 0.5, "top_p": 1.0},
            concurrency=concurrency,
            max_retries=0,  # the semaphore must keep us within the server's 2 slots on its own
        )
    if failing is not None:
        entries["ep-500"] = entry(failing.base, "fail-500", api_key=KEY, max_retries=1, timeout=5)
    path.write_text(json.dumps(entries, indent=2))
    return path


@functools.cache
def _tiny():
    from trainer import models

    return models.load_model("tiny", device=TRAIN_DEVICE)


def in_process_answer(messages, *, temperature, top_p, seed, max_new_tokens) -> str:
    from trainer import models

    model, tokenizer = _tiny()
    ((text,),) = models.generate(
        model, tokenizer, [messages], n=1, temperature=temperature, top_p=top_p, seed=seed,
        max_new_tokens=max_new_tokens, progress=False,
    )  # fmt: skip
    return text


# ---- the file --------------------------------------------------------------------------


GOOD = {"model_name": "m", "api_type": "openai", "api_base": "http://127.0.0.1:8000/v1"}


@pytest.mark.parametrize(
    "change, where, why",
    [
        ({"api_type": "anthropic"}, "api_type", "'anthropic' is not supported"),
        ({"api_type": None}, "api_type", "required"),
        ({"api_base": None}, "api_base", "required"),
        ({"api_base": "ftp://host/v1"}, "api_base", "scheme must be http or https"),
        ({"api_base": "http:///v1"}, "api_base", "no host"),
        ({"api_base": "http://user:pw@host/v1"}, "api_base", "no user or password"),
        ({"api_base": "http://host:port/v1"}, "api_base", "not a URL"),
        ({"model_name": ""}, "model_name", "required"),
        ({"api_bsae": "http://x"}, "api_bsae", "unknown field"),
        ({"api_key": "k", "api_key_env": "K"}, "api_key_env", "not both"),
        ({"api_key_env": "not a name"}, "api_key_env", "name of an environment variable"),
        ({"api_key_env": "PREFLAB_SURELY_UNSET_VAR"}, "api_key_env", "PREFLAB_SURELY_UNSET_VAR is not set"),
        ({"api_key": "sk-1 2"}, "api_key", "printable ASCII without spaces"),
        ({"api_key": "sk-ké"}, "api_key", "printable ASCII without spaces"),
        ({"anony_only": "no"}, "anony_only", "true or false"),
        ({"recommended_config": {"temperature": 9}}, "recommended_config.temperature", "from 0 to 2"),
        ({"recommended_config": {"top_p": 0}}, "recommended_config.top_p", "from 0 to 1"),
        ({"recommended_config": {"temprature": 1}}, "recommended_config.temprature", "unknown setting"),
        (
            {"recommended_config": {"max_new_tokens": 1.5}},
            "recommended_config.max_new_tokens",
            "an integer from 1",
        ),
        ({"recommended_config": {"top_p": True}}, "recommended_config.top_p", "a number from 0 to 1"),
        ({"concurrency": 0}, "concurrency", "from 1 to 256"),
        ({"timeout": True}, "timeout", "a number"),
    ],
)
def test_each_error_names_the_file_the_entry_and_the_field(tmp_path, change, where, why):
    from trainer.endpoints import EndpointsError, load_endpoints

    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "api_endpoints.json"
    path.write_text(json.dumps({"good": GOOD, "my-model": bad}))
    with pytest.raises(EndpointsError) as e:
        load_endpoints(path)
    assert str(e.value).startswith(f"{path}: entry 'my-model': {where}: "), e.value
    assert why in str(e.value)


@pytest.mark.parametrize("value", [KEY + "\n", " " + KEY, KEY[:6] + "é" + KEY[6:], KEY[:6] + "\t" + KEY[6:]])
def test_a_key_from_the_environment_is_checked_as_a_literal_one(tmp_path, monkeypatch, value):
    """A trailing newline (`export K=$(cat key)` keeps none, a .env file may) or a
    character no header carries: an error naming the entry, the field and the variable,
    never the value; nothing is stripped behind the user's back."""
    from trainer.endpoints import EndpointsError, load_endpoints

    monkeypatch.setenv("PREFLAB_EP_BAD_KEY", value)
    path = tmp_path / "api_endpoints.json"
    path.write_text(json.dumps({"my-model": {**GOOD, "api_key_env": "PREFLAB_EP_BAD_KEY"}}))
    with pytest.raises(EndpointsError) as e:
        load_endpoints(path)
    said = str(e.value)
    assert said.startswith(
        f"{path}: entry 'my-model': api_key_env: the environment variable PREFLAB_EP_BAD_KEY"
    ), said
    assert "printable ASCII" in said and KEY[6:] not in said and KEY[:6] not in said


def test_whole_file_errors_and_what_is_accepted(tmp_path, monkeypatch):
    from trainer.endpoints import EndpointsError, load_endpoints

    path = tmp_path / "e.json"
    for text, why in [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ("{}", "at least one"),
        ('{"a": {}, "a": {}}', "entry 'a' is given twice"),
        ('{"m": {"api_base": "http://a/v1", "api_base": "http://b/v1"}}', "entry 'm': api_base: given twice"),
        (
            json.dumps({"m": {**GOOD, "recommended_config": {}}}).replace("{}", '{"top_p": 1, "top_p": 0.5}'),
            "entry 'm': recommended_config.top_p: given twice",
        ),
        ('{"a": 3}', "entry 'a': must be a JSON object"),
        ('{" a": {}}', "entry ' a': a display name"),
    ]:
        path.write_text(text)
        with pytest.raises(EndpointsError) as e:
            load_endpoints(path)
        assert str(e.value).startswith(f"{path}: ") and why in str(e.value), (text, e.value)
    with pytest.raises(EndpointsError) as e:
        load_endpoints(tmp_path / "missing.json")
    assert "missing.json: cannot read" in str(e.value)

    # An Arena user's file as FastChat documents it: its tab flags are accepted and ignored.
    monkeypatch.setenv("PREFLAB_EP_KEY", KEY)
    path.write_text(json.dumps({
        "gpt-4o": {**GOOD, "api_key": "sk-literal", "anony_only": True, "text-arena": True, "vision-arena": False,
                   "recommended_config": {"temperature": 0.7, "top_p": 1.0}},
        "local": {**GOOD, "api_base": "https://example.com/v1/", "api_key_env": "PREFLAB_EP_KEY"},
        "open": {**GOOD, "api_key": None},
    }))  # fmt: skip
    eps = load_endpoints(path)
    assert eps["gpt-4o"].api_key == "sk-literal" and eps["gpt-4o"].anony_only is True
    assert eps["gpt-4o"].sampling(0.8, 0.95, 64) == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64}
    assert eps["local"].api_key == KEY and eps["local"].api_base == "https://example.com/v1"
    assert eps["open"].api_key == "EMPTY"  # no key: never $OPENAI_API_KEY sent to a server not named for it
    assert "sk-literal" not in repr(eps) and KEY not in repr(eps)

    # The README's example file is one that loads.
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    example = load_endpoints(helpers.REPO / "examples" / "api_endpoints.json")
    assert example["llama-3.1-8b"].concurrency == 8 and example["policy-1"].api_key == "EMPTY"


def test_commands_report_a_bad_file_and_a_missing_extra(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p0", "prompt": "Hi."}])
    bad = tmp_path / "eps.json"
    bad.write_text(json.dumps({"m": {**GOOD, "api_base": "file:///etc/passwd"}}))
    for command in (
        ["generate", "--prompts", prompts, "--model", "m"],
        ["serve", "--prompts", prompts, "--data", tmp_path / "store", "--model", "m"],
        ["eval-policy", "--policy", tmp_path / "no-run", "--reference", "m"],
    ):
        r = preflab(*command, "--endpoints", bad, timeout=120)
        assert r.returncode == 2, (command, r.stderr)
        assert f"{bad}: entry 'm': api_base: the scheme must be http or https" in r.stderr, r.stderr
    assert not (tmp_path / "store").exists()  # serve refused before it opened or created the store

    # Without the openai package: one line naming the extra.
    code = (
        "import sys; sys.modules['openai'] = None; from annotate.cli import main; "
        f"sys.exit(main(['generate', '--prompts', {str(prompts)!r}, '--endpoints', {str(bad)!r}]))"
    )
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=helpers.child_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "pip install 'preflab[endpoints]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---- the client against a real server ------------------------------------------------


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
    assert failing.requests["fail-500"] == 2 * 2  # max_retries 1: each of the two calls tried twice
    assert failing.requests["fail-slow"] == 2  # no retries asked for: once per call


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
    assert failing.requests.get("fail-500", 0) >= 2  # it was drawn, and retried once
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


# ---- the commands ----------------------------------------------------------------------


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


def test_a_literal_key_in_a_file_others_can_read_is_warned_about(tmp_path, caplog):
    from trainer.endpoints import load_endpoints

    path = tmp_path / "e.json"
    path.write_text(json.dumps({"m": {**GOOD, "api_key": KEY}}))
    for mode, warned in ((0o600, False), (0o644, True)):
        path.chmod(mode)
        caplog.clear()
        with caplog.at_level("WARNING", logger="preflab.endpoints"):
            load_endpoints(path)
        text = caplog.text
        assert ("other users may read it" in text) is warned, (oct(mode), text)
        assert KEY not in text


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
