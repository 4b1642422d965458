"""The prompts annotators wrote in chat mode as a prompt pool (annotate/chat_prompts.py):
which votes give one, loaded back by trainer/prompts.py, and the admins' download
`chat-prompts.jsonl` from the Dashboard (the /chat_prompts API), refused to annotators."""

from __future__ import annotations

import json

import pytest
from helpers import (
    Server,
    add_users,
    chat_vote_record,
    client,
    raw_get,
    vote_record,
    write_pairs,
    write_store,
)

from annotate.chat_prompts import chat_prompt_pool, write_chat_prompts
from trainer.prompts import load_prompt_pool
from trainer.store import read_comparisons


def source(kind: str, turn: int = 1) -> str:
    return json.dumps({"a": {}, "b": {}, "chat": {"turn": turn, "prompt_source": kind}})


def chat_votes():
    return [
        chat_vote_record(
            [("Write a haiku about rain.", "Drops.", "Puddles.")], gen_params=source("annotator")
        ),
        # the same conversation opening again, at turn 2: one prompt, not two
        chat_vote_record(
            [("Write a haiku about rain.", "Drops.", "Puddles."), ("Shorter?", "Rain.", "Wet.")],
            gen_params=source("annotator", 2),
        ),
        chat_vote_record(
            [("What is 2+2?", "4", "5")], system="Answer tersely.", gen_params=source("annotator")
        ),
        chat_vote_record(
            [("From the pool?", "yes", "no")], gen_params=source("pool")
        ),  # not written by anyone
        vote_record("A pair vote.", "a", "b", gen_params=json.dumps({"a": {"temperature": 0.7}})),
        vote_record("No gen params.", "a", "b"),
    ]


def test_the_pool_is_the_openings_annotators_wrote_each_once_and_loads_back(tmp_path):
    votes = read_comparisons(write_store(tmp_path / "s", chat_votes()))
    pool = chat_prompt_pool(votes)
    assert [p["messages"] for p in pool] == [
        [{"role": "user", "content": "Write a haiku about rain."}],
        [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "What is 2+2?"}],
    ]
    assert write_chat_prompts(votes, tmp_path / "chat-prompts.jsonl") == 2
    loaded = load_prompt_pool(tmp_path / "chat-prompts.jsonl")
    assert loaded.report.skipped == 0
    assert [(p.id, p.messages, p.tags) for p in loaded] == [(p["id"], p["messages"], ["chat"]) for p in pool]
    assert (tmp_path / "chat-prompts.jsonl").stat().st_mode & 0o077 == 0


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chatprompts")
    add_users(tmp / "users.toml", ann="annotator", boss="admin")
    write_store(tmp / "store", chat_votes())
    pairs = write_pairs(tmp / "pairs.jsonl", 2)
    server = Server(
        tmp, "--pairs", str(pairs), "--data", str(tmp / "store"), "--auth", str(tmp / "users.toml")
    )
    with server:
        yield server


def test_an_admin_downloads_chat_prompts_jsonl_and_an_annotator_cannot(team, tmp_path):
    boss, ann = client(team.url, "boss"), client(team.url, "ann")
    with pytest.raises(Exception, match="admins"):
        ann.predict(False, api_name="/chat_prompts")
    report, links = boss.predict(False, api_name="/chat_prompts")
    assert "2 prompts written by annotators" in report
    assert [link["name"] for link in links] == ["chat-prompts.jsonl"]
    download = raw_get(links[0]["url"], boss)
    assert download.status_code == 200 and download.headers["content-disposition"].startswith("attachment")
    (tmp_path / "chat-prompts.jsonl").write_bytes(download.content)
    assert [p.messages[-1]["content"] for p in load_prompt_pool(tmp_path / "chat-prompts.jsonl")] == [
        "Write a haiku about rain.",
        "What is 2+2?",
    ]
    # The link an admin got, replayed by an annotator with their own login: refused.
    replay = raw_get(links[0]["url"], ann)
    assert replay.status_code == 403 and "haiku" not in replay.text
