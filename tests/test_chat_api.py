"""`preflab serve --chat` as a real process: /chat and /chat_vote through gradio_client,
logged in, with both models behind a real OpenAI-compatible server (the model_server
fixture, `preflab serve-model tiny`); the votes read back from the store."""

import json

import pytest
from gradio_client.exceptions import AppError
from helpers import EP_KEY, Server, add_users, client, endpoints_file, ep_entry, preflab

from trainer.store import read_comparisons

NAMES = ("ep-tiny", "ep-tiny-too")


@pytest.fixture
def chat_server(model_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLAB_EP_KEY", EP_KEY)  # the server's environment is the test's
    second = ep_entry(model_server.base, api_key_env="PREFLAB_EP_KEY", max_retries=0)
    eps = endpoints_file(tmp_path / "eps.json", model_server, **{NAMES[1]: second})
    users = tmp_path / "users.toml"
    add_users(users, ann="annotator", bob="annotator")
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("forbidden phrase\n")
    store = tmp_path / "store"
    server = Server(
        tmp_path, "--chat", "--model", NAMES[0], "--model", NAMES[1], "--endpoints", str(eps),
        "--auth", str(users), "--data", str(store), "--max-new-tokens", "12",
        "--chat-max-chars", "60", "--chat-blocklist", str(blocked),
    )  # fmt: skip
    with server:
        yield server, store


def no_names(view) -> bool:
    text = json.dumps(view)
    return all(name not in text for name in NAMES)


def test_chat_and_vote_through_the_api(chat_server):
    server, store = chat_server
    ann = client(server.url, "ann")
    first = ann.predict("", "Tell me about plants.", api_name="/chat")
    cid = first["conversation_id"]
    for key in ("left", "right"):  # the final view: both answers complete
        assert not first[key]["streaming"] and first[key]["error"] is None
        assert [m["role"] for m in first[key]["messages"]] == ["user", "assistant"]
    assert first["can_vote"] and first["ack"] is None and no_names(first)

    job = ann.submit(cid, "And trees?", api_name="/chat")  # the views as they stream
    views = list(job)
    assert views and all(no_names(v) for v in views)
    second = views[-1]
    assert second["turn"] == 2 and second["can_vote"]
    assert second["left"]["messages"][:2] == first["left"]["messages"]  # each side's own history
    assert second["right"]["messages"][:2] == first["right"]["messages"]

    bob = client(server.url, "bob")  # a conversation is its annotator's alone
    with pytest.raises(AppError, match="no longer open"):
        bob.predict(cid, "left", "", "", api_name="/chat_vote")
    with pytest.raises(AppError, match="at most 60"):  # the filter, as on the page
        ann.predict(cid, "x" * 61, api_name="/chat")
    with pytest.raises(AppError, match="does not accept"):
        ann.predict(cid, "a Forbidden  Phrase here", api_name="/chat")

    voted = ann.predict(cid, "left", "clearly", "more on topic", api_name="/chat_vote")
    ack = voted["ack"]
    assert (
        voted["voted"] and ack["choice"] == "left" and {ack["left_model"], ack["right_model"]} == set(NAMES)
    )
    with pytest.raises(AppError, match="already voted"):
        ann.predict(cid, "right", "", "", api_name="/chat_vote")
    with pytest.raises(AppError, match="no longer open"):  # bob cannot take ann's vote back
        bob.predict(cid, api_name="/chat_take_back")

    (row,) = read_comparisons(store).to_pylist()
    assert row["event_id"] == ack["event_id"] and row["annotator"] == "ann" and row["schema_version"] == 3
    left = row["left"]
    assert row[f"model_{left}"] == ack["left_model"] and row["choice"] == left and row["strength"] == 2
    assert json.loads(row[f"conversation_{left}"]) == second["left"]["messages"]
    other = "b" if left == "a" else "a"
    assert json.loads(row[f"conversation_{other}"]) == second["right"]["messages"]
    assert json.loads(row["gen_params"])["chat"] == {"turn": 2, "prompt_source": "annotator"}

    back = ann.predict(cid, api_name="/chat_take_back")  # a mis-click: the vote counts nowhere
    assert back["taken_back"] and back["ack"] == ack and not back["can_vote"]
    server.stop()
    assert read_comparisons(store).num_rows == 0


def test_chat_flags():
    one = preflab("serve", "--chat", "--model", "tiny")
    assert one.returncode == 2 and "--chat needs two or more different models" in one.stderr
    idle = preflab("serve", "--chat", "--model", "a", "--model", "b", "--chat-idle", "0")
    assert idle.returncode == 2 and "--chat-idle must be a positive" in idle.stderr
    shown = preflab("serve", "--help")
    for flag in ("--chat ", "--chat-max-chars", "--chat-blocklist", "--chat-max-turns", "--chat-idle"):
        assert flag in shown.stdout
