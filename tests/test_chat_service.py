"""Chat mode's service (annotate/chat.py) against real models: the tiny model in process
(annotate/model_engine.py's Engine) and behind a real OpenAI-compatible server
(`preflab serve-model tiny`, the model_server fixture), with real stores."""

import json

import pytest
from helpers import EP_KEY, ModelServer, endpoints_file

from annotate.chat import ChatService
from annotate.chat_filter import BlocklistError, PromptFilter, load_blocklist
from annotate.chat_models import EndpointChat, InProcessChat
from annotate.service import BadRequest
from trainer.store import open_store, read_comparisons, read_events, store_exists

SAMPLING = {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": 12}
NAMES = ("model-zebra", "model-yak")  # distinctive: grepped for in every view


@pytest.fixture(scope="module")
def engine():
    from annotate.model_engine import Engine
    from trainer import models

    model, tokenizer = models.load_model("tiny", device="cpu")
    return Engine(model, tokenizer, max_new_tokens=16, concurrency=2)


@pytest.fixture
def endpoint_models(model_server, failing, tmp_path, monkeypatch):
    """ep-tiny (the real server) and ep-500 (always HTTP 500) as EndpointModels."""
    from trainer.endpoint_client import close_all, connect
    from trainer.endpoints import load_endpoints

    monkeypatch.setenv("PREFLAB_EP_KEY", EP_KEY)
    connected = connect(load_endpoints(endpoints_file(tmp_path / "eps.json", model_server, failing)))
    yield connected
    close_all(connected)


def in_process_pair(engine):
    return {NAMES[0]: InProcessChat(engine), NAMES[1]: InProcessChat(engine)}


def run(views, seen=None):
    """Iterate a chat generator to its end; every view goes into `seen`; the last one back."""
    view = None
    for view in views:
        if seen is not None:
            seen.append(view)
    return view


def assistant_turns(side_view):
    return [m["content"] for m in side_view["messages"] if m["role"] == "assistant"]


def test_two_turns_keep_each_sides_own_history_and_the_vote_stores_both(engine, tmp_path):
    store = open_store(tmp_path / "store")
    chat = ChatService(store, in_process_pair(engine), sampling=SAMPLING)
    seen = []
    first = run(chat.send("ann", "", "Tell me about plants."), seen)
    cid = first["conversation_id"]
    assert first["turn"] == 1 and first["can_vote"] and not first["voted"]
    assert not first["left"]["streaming"] and not first["right"]["streaming"]
    second = run(chat.send("ann", cid, "  And trees?  "), seen)
    assert second["turn"] == 2 and second["conversation_id"] == cid
    for key in ("left", "right"):
        users = [m["content"] for m in second[key]["messages"] if m["role"] == "user"]
        assert users == ["Tell me about plants.", "And trees?"]  # the user's turns: the same
        assert [m["role"] for m in second[key]["messages"]] == ["user", "assistant"] * 2
    # each side's earlier answer is its own: side by side they differ (two samples)
    assert assistant_turns(second["left"])[0] == assistant_turns(first["left"])[0]
    assert assistant_turns(second["right"])[0] == assistant_turns(first["right"])[0]
    assert second["left"]["messages"] != second["right"]["messages"]
    for view in seen:  # the names: in no view before the vote
        text = json.dumps(view)
        assert NAMES[0] not in text and NAMES[1] not in text
        assert view["ack"] is None

    voted = chat.vote("ann", cid, "right", "clearly", " the right one is better ")
    assert voted["voted"] and not voted["can_vote"]
    ack = voted["ack"]
    assert ack["choice"] == "right" and {ack["left_model"], ack["right_model"]} == set(NAMES)
    store.close()

    (row,) = read_comparisons(tmp_path / "store").to_pylist()
    assert row["event_id"] == ack["event_id"] and row["schema_version"] == 3
    assert row["annotator"] == "ann" and row["rationale"] == "the right one is better"
    assert row["pair_id"] == f"chat-{cid}-t2"
    assert json.loads(row["prompt"]) == [{"role": "user", "content": "Tell me about plants."}]
    assert sorted([row["model_a"], row["model_b"]]) == [row["model_a"], row["model_b"]]  # a sorts first
    left_key = row["left"]
    shown = {"left": left_key, "right": "b" if left_key == "a" else "a"}
    assert row["choice"] == shown["right"] and row["strength"] == 2
    assert ack["left_model"] == row[f"model_{left_key}"]
    for where, letter in shown.items():  # each side's whole conversation, as it was shown
        assert json.loads(row[f"conversation_{letter}"]) == second[where]["messages"]
        assert row[f"response_{letter}"] == assistant_turns(second[where])[-1]
    params = json.loads(row["gen_params"])
    assert params["chat"] == {"turn": 2, "prompt_source": "annotator"}
    for letter in ("a", "b"):
        assert params[letter]["temperature"] == 0.8 and params[letter]["max_new_tokens"] == 12
        assert isinstance(params[letter]["seed"], int) and isinstance(params[letter]["cut"], bool)
        assert params[letter]["ttft_ms"] is not None

    with pytest.raises(BadRequest, match="already voted"):  # the conversation is closed
        chat.vote("ann", cid, "left")
    with pytest.raises(BadRequest, match="voted on"):
        chat.send("ann", cid, "one more")


def test_an_endpoint_and_an_in_process_model_and_a_pool_prompt(engine, endpoint_models, tmp_path):
    models = {"ep-tiny": EndpointChat(endpoint_models["ep-tiny"]), "local-tiny": InProcessChat(engine)}
    store = open_store(tmp_path / "store")
    chat = ChatService(store, models, prompts=["Name a fruit."], sampling=SAMPLING)
    prompt = chat.random_prompt("ann")
    assert prompt == "Name a fruit."
    seen = []
    view = run(chat.send("ann", "", prompt, from_pool=True), seen)
    assert all(assistant_turns(view[k]) for k in ("left", "right"))  # both answered
    assert all("ep-tiny" not in json.dumps(v) and "local-tiny" not in json.dumps(v) for v in seen)
    tokens = [view[k]["tokens_per_s"] for k in ("left", "right")]
    assert all(t is None or t > 0 for t in tokens)
    chat.vote("ann", view["conversation_id"], "tie")
    store.close()
    (row,) = read_comparisons(tmp_path / "store").to_pylist()
    params = json.loads(row["gen_params"])
    assert params["chat"]["prompt_source"] == "pool" and row["choice"] == "tie" and row["strength"] is None
    ep_side = "a" if row["model_a"] == "ep-tiny" else "b"
    # the endpoint's side as endpoint_client.side_params records it: its served name, its settings
    assert params[ep_side]["endpoint"] == "ep-tiny" and params[ep_side]["model_name"] == "tiny"
    assert params[ep_side]["temperature"] == 0.5  # its recommended_config wins


def test_an_edited_pool_prompt_is_the_annotators(engine, tmp_path):
    store = open_store(tmp_path / "store")
    chat = ChatService(store, in_process_pair(engine), prompts=["Name a fruit."], sampling=SAMPLING)
    view = run(chat.send("ann", "", "Name a fruit. A red one.", from_pool=True))
    chat.vote("ann", view["conversation_id"], "left")
    store.close()
    (row,) = read_comparisons(tmp_path / "store").to_pylist()
    assert json.loads(row["gen_params"])["chat"]["prompt_source"] == "annotator"


def test_stop_mid_stream_keeps_what_was_written_as_a_cut_answer(engine, tmp_path):
    long = {**SAMPLING, "max_new_tokens": 600}
    store = open_store(tmp_path / "store")
    chat = ChatService(store, in_process_pair(engine), sampling=long)
    views = chat.send("ann", "", "Write a long story.")
    stopped = None
    for view in views:
        if view["left"]["streaming"] and view["right"]["streaming"] and stopped is None:
            if any(assistant_turns(view[k]) and assistant_turns(view[k])[-1] for k in ("left", "right")):
                cid = view["conversation_id"]
                # nothing else happens to a conversation while it streams
                with pytest.raises(BadRequest, match="still coming"):
                    chat.vote("ann", cid, "left")
                with pytest.raises(BadRequest, match="still coming"):
                    chat.send("ann", cid, "next")
                with pytest.raises(BadRequest, match="still coming"):
                    chat.regenerate("ann", cid)
                stopped = chat.stop("ann", cid)
    assert stopped is not None, "the answers never streamed"
    final = view
    for v in (stopped, final):
        assert not v["left"]["streaming"] and not v["right"]["streaming"]
        assert v["left"]["cut"] and v["right"]["cut"] and v["can_vote"]
    tokenizer = engine.tokenizer
    for key in ("left", "right"):  # far short of the 600 tokens it was allowed
        (answer,) = assistant_turns(final[key]) or [""]
        assert len(tokenizer(answer).input_ids) < 200
    chat.vote("ann", final["conversation_id"], "both_bad")
    store.close()
    (row,) = read_comparisons(tmp_path / "store").to_pylist()
    params = json.loads(row["gen_params"])
    assert params["a"]["cut"] is True and params["b"]["cut"] is True and row["choice"] == "both_bad"


def test_regenerate_answers_the_last_turn_again(engine, tmp_path):
    store = open_store(tmp_path / "store")
    chat = ChatService(store, in_process_pair(engine), sampling=SAMPLING)
    first = run(chat.send("ann", "", "Hi"))
    cid = first["conversation_id"]
    again = run(chat.regenerate("ann", cid))
    assert again["conversation_id"] == cid and again["turn"] == 1
    for key in ("left", "right"):
        assert [m["role"] for m in again[key]["messages"]] == ["user", "assistant"]  # replaced, not added
    assert [assistant_turns(again[k]) for k in ("left", "right")] != [
        assistant_turns(first[k]) for k in ("left", "right")
    ]  # new seeds: new samples
    chat.vote("ann", cid, "left", "slightly")
    store.close()
    (row,) = read_comparisons(tmp_path / "store").to_pylist()
    assert row["pair_id"] == f"chat-{cid}-t1"
    left = row["left"]
    assert row[f"response_{left}"] == assistant_turns(again["left"])[0]


def test_a_failing_endpoint_shows_an_error_on_its_side_and_nothing_is_stored(
    engine, endpoint_models, tmp_path
):
    models = {"ep-500": EndpointChat(endpoint_models["ep-500"]), "local-tiny": InProcessChat(engine)}
    store = open_store(tmp_path / "store")
    chat = ChatService(store, models, sampling=SAMPLING)
    seen = []
    view = run(chat.send("ann", "", "Hello"), seen)
    errors = [view[k]["error"] for k in ("left", "right")]
    assert sum(e is not None for e in errors) == 1
    failed = "left" if errors[0] else "right"
    other = "right" if failed == "left" else "left"
    assert "HTTP 500" in view[failed]["error"] and not view[failed]["streaming"]
    assert assistant_turns(view[other]) and view[other]["error"] is None  # the other side answered
    assert not view["can_vote"]
    for v in seen:  # anonymous, failures included; and the key is nowhere
        text = json.dumps(v)
        assert (
            "ep-500" not in text
            and "fail-500" not in text
            and "local-tiny" not in text
            and EP_KEY not in text
        )
    with pytest.raises(BadRequest, match="failed"):
        chat.vote("ann", view["conversation_id"], "left")
    with pytest.raises(BadRequest, match="failed"):
        chat.send("ann", view["conversation_id"], "go on")
    store.close()
    assert not store_exists(tmp_path / "store") or read_events(tmp_path / "store").num_rows == 0


def test_a_killed_endpoint_shows_an_error_and_nothing_is_stored(engine, tmp_path, monkeypatch):
    from trainer.endpoint_client import connect
    from trainer.endpoints import load_endpoints

    monkeypatch.setenv("PREFLAB_EP_KEY", EP_KEY)
    server = ModelServer(tmp_path, "--max-new-tokens", "16", "--api-key-env", "PREFLAB_EP_KEY",
                         env={"PREFLAB_EP_KEY": EP_KEY})  # fmt: skip
    with server:
        connected = connect(load_endpoints(endpoints_file(tmp_path / "eps.json", server)))
        models = {"ep-tiny": EndpointChat(connected["ep-tiny"]), "local-tiny": InProcessChat(engine)}
        store = open_store(tmp_path / "store")
        chat = ChatService(store, models, sampling=SAMPLING)
        alive = run(chat.send("ann", "", "Hello"))
        assert alive["left"]["error"] is None and alive["right"]["error"] is None
    # the server is gone now (SIGTERM, waited for): the next turn fails on its side
    view = run(chat.send("ann", alive["conversation_id"], "Still there?"))
    errors = [view[k]["error"] for k in ("left", "right")]
    assert sum(e is not None for e in errors) == 1 and not view["can_vote"]
    with pytest.raises(BadRequest, match="failed"):
        chat.vote("ann", view["conversation_id"], "right")
    regenerated = run(chat.regenerate("ann", view["conversation_id"]))  # still gone: still an error
    assert any(regenerated[k]["error"] for k in ("left", "right"))
    store.close()
    assert not store_exists(tmp_path / "store") or read_events(tmp_path / "store").num_rows == 0
    connected["ep-tiny"].close()


def test_the_filter_refuses_and_nothing_is_generated_or_stored(engine, tmp_path):
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("# words\nbanana\nred  herring\n\n")
    phrases = load_blocklist(blocked)
    assert phrases == ["banana", "red herring"]
    store = open_store(tmp_path / "store")
    chat = ChatService(
        store,
        in_process_pair(engine),
        prompt_filter=PromptFilter(max_chars=40, blocklist=phrases),
        sampling=SAMPLING,
        max_turns=2,
    )
    for message, why in (
        ("x" * 41, "41 characters; at most 40"),
        ("I like BANANA bread", "BANANA"),
        ("a Red\nHerring here", "Herring"),
        ("bad \x00 byte", "NUL"),
        ("bad \udc80 byte", "surrogate"),
        ("   ", "empty"),
    ):
        with pytest.raises(BadRequest, match=why):
            chat.send("ann", "", message)
    assert chat.new("ann")["conversation_id"] == ""  # nothing was started
    view = run(chat.send("ann", "", "bananas are fine: not the whole word"))  # whole words only
    cid = view["conversation_id"]
    with pytest.raises(BadRequest, match="banana"):  # a follow-up is filtered too
        chat.send("ann", cid, "banana")
    assert view["turn"] == 1 and run(chat.send("ann", cid, "second"))["turn"] == 2
    with pytest.raises(BadRequest, match="2 turns"):
        chat.send("ann", cid, "third")
    with pytest.raises(BadRequest, match="rationale is 2,001 characters"):
        chat.vote("ann", cid, "left", "", "r" * 2001)
    with pytest.raises(BadRequest, match="choice must be"):
        chat.vote("ann", cid, "middle")
    with pytest.raises(BadRequest, match="strength must be"):
        chat.vote("ann", cid, "left", "hugely")
    store.close()
    assert not store_exists(tmp_path / "store") or read_events(tmp_path / "store").num_rows == 0
    with pytest.raises(BlocklistError, match="cannot read"):
        load_blocklist(tmp_path / "missing.txt")


def test_one_live_conversation_per_user_and_idle_ones_are_dropped(engine, tmp_path):
    now = [1000.0]
    store = open_store(tmp_path / "store")
    chat = ChatService(store, in_process_pair(engine), sampling=SAMPLING, idle_s=60, clock=lambda: now[0])
    first = run(chat.send("ann", "", "one"))
    second = run(chat.send("ann", "", "two"))  # a new conversation replaces the first
    with pytest.raises(BadRequest, match="no longer open"):
        chat.vote("ann", first["conversation_id"], "left")
    with pytest.raises(BadRequest, match="no longer open"):  # nobody else's conversation is yours
        chat.vote("bob", second["conversation_id"], "left")
    bobs = run(chat.send("bob", "", "bob here"))
    now[0] += 61  # both idle past the limit
    with pytest.raises(BadRequest, match="no longer open"):
        chat.send("ann", second["conversation_id"], "still there?")
    assert chat._conversations == {}  # dropped: memory does not grow with idle annotators
    with pytest.raises(BadRequest, match="no longer open"):
        chat.vote("bob", bobs["conversation_id"], "left")
    store.close()


def test_a_vote_goes_to_postgresql(engine, pg_url):
    store = open_store(pg_url)
    try:
        chat = ChatService(store, in_process_pair(engine), sampling=SAMPLING)
        first = run(chat.send("ann", "", "Hello"))
        second = run(chat.send("ann", first["conversation_id"], "More"))
        ack = chat.vote("ann", second["conversation_id"], "left", "slightly")["ack"]
    finally:
        store.close()
    (row,) = read_comparisons(pg_url).to_pylist()
    assert row["event_id"] == ack["event_id"] and row["schema_version"] == 3
    left = row["left"]
    assert json.loads(row[f"conversation_{left}"]) == second["left"]["messages"]
    other = "b" if left == "a" else "a"
    assert json.loads(row[f"conversation_{other}"]) == second["right"]["messages"]


@pytest.mark.parametrize("kind", ["directory", "postgresql"])
def test_a_vote_taken_back_counts_nowhere_and_the_conversation_stays_closed(engine, kind, tmp_path, request):
    where = tmp_path / "store" if kind == "directory" else request.getfixturevalue("pg_url")
    store = open_store(where)
    try:
        chat = ChatService(store, in_process_pair(engine), sampling=SAMPLING)
        view = run(chat.send("ann", "", "Hello"))
        cid = view["conversation_id"]
        with pytest.raises(BadRequest, match="no vote to take back"):  # nothing voted yet
            chat.take_back("ann", cid)
        ack = chat.vote("ann", cid, "left", "slightly")["ack"]
        with pytest.raises(BadRequest, match="no longer open"):  # only the voter takes it back
            chat.take_back("bob", cid)
        back = chat.take_back("ann", cid)
        assert back["ok"] and back["taken_back"] and back["voted"] and not back["can_vote"]
        assert back["ack"] == ack  # the names stay shown
        with pytest.raises(BadRequest, match="already taken back"):
            chat.take_back("ann", cid)
        with pytest.raises(BadRequest, match="already voted"):  # not reopened: it would not be blind
            chat.vote("ann", cid, "right")
    finally:
        store.close()
    assert read_comparisons(where).num_rows == 0
    events = read_events(where).to_pylist()
    (retract,) = [e for e in events if e["kind"] == "retract"]
    (vote,) = [e for e in events if e["kind"] == "vote"]
    assert retract["retracts"] == ack["event_id"] == vote["event_id"] and retract["annotator"] == "ann"
    # the record asks a chat vote's retract for both conversations too
    assert (
        retract["conversation_a"] == vote["conversation_a"]
        and retract["conversation_b"] == vote["conversation_b"]
    )


def test_fewer_than_two_models_is_refused(engine, tmp_path):
    from annotate.chat import ChatError

    with pytest.raises(ChatError, match="two or more models"):
        ChatService(None, {"one": InProcessChat(engine)}, sampling=SAMPLING)
