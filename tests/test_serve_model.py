"""`preflab serve-model`: a real server process over the tiny model, driven by the real
`openai` client, as any OpenAI-compatible tool would drive it.

Covered: /v1/models, a plain and a streamed completion (the stream's pieces joined are
what the model itself generates for that seed, and what the plain request answered),
usage counts, stop sequences, finish_reason, OpenAI's error shape and statuses through
the client's exception types (404 unknown model, 401 bad key, 400 bad field, 413 too big,
503 busy with Retry-After), a client that times out (the server goes on serving), a
stream the client drops (its slot comes free), and a server killed mid-stream (the client
gets an error, not a hang). The refusal to listen beyond loopback without a key.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request

import helpers
import pytest
from helpers import TRAIN_DEVICE, preflab

openai = pytest.importorskip("openai")

KEY = "test-key-123"
HELLO = [{"role": "user", "content": "Say something about bananas."}]
WITH_KEY = ("--api-key-env", "PREFLAB_TEST_KEY")
LONG = 1500  # tokens: a generation that outlives the client's patience


class ModelServer(helpers.ModelServer):
    key = KEY


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-model")
    # --concurrency 1: the busy test needs the second request to find the batch full
    with ModelServer(
        tmp, "--max-new-tokens", str(LONG), "--concurrency", "1", *WITH_KEY, env={"PREFLAB_TEST_KEY": KEY}
    ) as s:
        yield s


def _stream_text(client, **kwargs) -> tuple[str, int, list]:
    stream = client.chat.completions.create(model="tiny", messages=HELLO, stream=True, **kwargs)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    return text, pieces, chunks


def test_models_and_completions_match_the_model(server):
    from trainer import models, sampling

    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"

    settings = dict(temperature=1.0, top_p=1.0, seed=7, max_tokens=24)
    plain = client.chat.completions.create(model="tiny", messages=HELLO, **settings)
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length")

    streamed, pieces, chunks = _stream_text(client, stream_options={"include_usage": True}, **settings)
    assert pieces > 1  # token by token, not one lump at the end
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason

    # What the model itself writes for that seed, loaded here through preflab's own
    # generation code (which strips the answer's ends).
    model, tokenizer = models.load_model("tiny", device=TRAIN_DEVICE)
    ((expected,),) = sampling.generate(model, tokenizer, [HELLO], n=1, progress=False, **_gen(settings))
    assert text.strip() == expected
    rendered = sampling.render_prompt(tokenizer, HELLO)  # the chat template, assistant turn open
    assert plain.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert plain.usage.completion_tokens >= len(tokenizer(text, add_special_tokens=False).input_ids)
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    # Greedy: the same answer twice, and the cap gives finish_reason "length" at exactly 5 tokens.
    greedy = [
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=5)
        for _ in range(2)
    ]
    assert greedy[0].choices[0].message.content == greedy[1].choices[0].message.content
    assert greedy[0].usage.completion_tokens == 5 and greedy[0].choices[0].finish_reason == "length"


def _gen(settings):
    return dict(
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        seed=settings["seed"],
        max_new_tokens=settings["max_tokens"],
    )


def test_stop_sequence_cuts_the_answer(server):
    client = server.client()
    settings = dict(temperature=1.0, top_p=1.0, seed=11, max_tokens=40, model="tiny", messages=HELLO)
    full = client.chat.completions.create(**settings).choices[0].message.content
    words = full.split()
    assert len(words) > 4, full
    stop = words[len(words) // 2]
    expected = full[: full.find(stop)]
    cut = client.chat.completions.create(stop=[stop], **settings)
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed, _, _ = _stream_text(
        client, stop=stop, **{k: settings[k] for k in ("temperature", "top_p", "seed", "max_tokens")}
    )
    assert streamed == expected


def test_errors_in_openai_shape(server, tmp_path):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=7)
    assert e.value.param == "temperature" and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, n=2)
    assert e.value.param == "n" and "must be 1" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=0)
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, stop=["a", "b", "c", "d", "e"])
    assert e.value.param == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a\x00b"}])
    assert e.value.param == "messages[0].content" and "NUL" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * (1 << 20)}])
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as e:  # longer than the model's context
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "banana " * 6000}])
    assert e.value.code in ("context_length_exceeded", None) and e.value.param in (
        "messages",
        "messages[0].content",
    )

    with pytest.raises(openai.NotFoundError) as e:  # a route this server does not have
        client.completions.create(model="tiny", prompt="x")
    assert "/v1/completions" in e.value.message

    for bad in (server.client(api_key="wrong"), server.client(api_key=KEY + "x")):
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="tiny", messages=HELLO)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    # Still serving after all that.
    assert (
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3).usage.completion_tokens
        == 3
    )


def test_busy_timeout_and_dropped_stream(server):
    client = server.client()
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, stream=True, max_tokens=LONG, temperature=1
    )
    next(iter(stream))  # generating now, in the only slot
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    assert [m.id for m in client.models.list()] == ["tiny"]  # the event loop is free meanwhile
    stream.close()  # the client goes away: its generation ends, the slot comes free

    # A client that gives up (its timeout) on a long answer; the server notices and frees the slot.
    impatient = server.client(timeout=0.2, max_retries=3)  # retries a 503 until the stream's slot is free
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny", messages=HELLO, max_tokens=LONG, temperature=1)
    # Retry-After honoured by the client's own retries while the server notices.
    patient = server.client(max_retries=5)
    answer = patient.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert answer.usage.completion_tokens == 4
    # Both abandoned generations stopped early, not at LONG tokens.
    gone = [int(n) for n in re.findall(r"(\d+) new tokens, ended: the client went away", server.output())]
    assert len(gone) >= 2 and max(gone) < LONG, server.output()[-3000:]


def test_server_killed_mid_stream(tmp_path):
    with ModelServer(tmp_path, "--max-new-tokens", str(LONG), "--api-key-env", "PREFLAB_TEST_KEY",
                     env={"PREFLAB_TEST_KEY": KEY}) as server:  # fmt: skip
        stream = server.client(timeout=30).chat.completions.create(
            model="tiny", messages=HELLO, stream=True, max_tokens=LONG, temperature=1
        )
        chunks = iter(stream)
        next(chunks)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        with pytest.raises(openai.APIConnectionError):
            for _ in chunks:
                pass
        with pytest.raises(openai.APIConnectionError):
            server.client().models.list()


def test_refuses_other_hosts_without_a_key():
    r = preflab("serve-model", "tiny", "--host", "0.0.0.0", timeout=60)
    assert r.returncode == 2 and "--api-key-env" in r.stderr
    r = preflab("serve-model", "tiny", "--api-key-env", "PREFLAB_NO_SUCH_VAR_X", timeout=60)
    assert r.returncode == 2 and "PREFLAB_NO_SUCH_VAR_X" in r.stderr


def test_without_a_key_only_this_machine(tmp_path):
    """No key: loopback only, and a request must name this machine in its Host header
    (DNS rebinding) and be JSON (a cross-site form cannot send that without a preflight)."""
    with ModelServer(tmp_path, "--max-new-tokens", "8", "--concurrency", "2") as server:
        client = server.client(api_key="anything")
        answer = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0)
        assert answer.usage.completion_tokens <= 8  # the server's cap over the default
        # Two streams at once (two slots): read turn about, both finish, both greedy answers.
        streams = [
            iter(client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, stream=True))
            for _ in range(2)
        ]
        texts = ["", ""]
        for _ in range(3):
            for k, stream in enumerate(streams):
                chunk = next(stream)
                texts[k] += chunk.choices[0].delta.content or ""
        for k, stream in enumerate(streams):
            texts[k] += "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert texts == [answer.choices[0].message.content] * 2
        url = server.base + "/chat/completions"
        body = json.dumps({"model": "tiny", "messages": HELLO}).encode()
        for headers in (
            {"Host": "evil.example.com", "Content-Type": "application/json"},
            {"Content-Type": "text/plain"},
        ):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=30)
            assert e.value.code == 400
            assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"
    # SIGTERM: a clean stop (uvicorn ends by re-raising the signal it caught), no traceback
    assert server.proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in server.output()
