"""`serve --suggest judge:<name>`: the judge's choice in the vote's acknowledgement (never
before the vote), and people's votes that differ from it in the Review tab's list.

The judge's votes are made by `preflab judge` against the scripted OpenAI-compatible
server (conftest's judge_server); the service, queue, store and reviewer are the real ones.
"""

import json

import pytest
from helpers import Server, client, ep_entry, preflab, write_jsonl

from annotate.pairs import load_pairs
from annotate.queue import AssignmentQueue
from annotate.review import Reviewer
from annotate.service import Service
from annotate.suggestions import JudgeSuggestions, SuggestError
from annotate.web.page import status_html
from trainer.store import read_comparisons
from trainer.store.directory_writer import DirectoryStore

JUDGE = "judge:scripted"


@pytest.fixture
def judged_pairs(tmp_path, judge_server):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "one: which?", "response_a": "plain", "response_b": "GOOD <b>answer</b>"},
            {"prompt": "two: which?", "response_a": "GOOD answer", "response_b": "meh"},
        ],
    )
    eps = tmp_path / "eps.json"
    eps.write_text(json.dumps({"scripted": ep_entry(judge_server.base, "m", max_retries=0)}))
    store = tmp_path / "store"
    r = preflab(
        "judge", "--data", store, "--pairs", pairs, "--model", "scripted", "--endpoints", eps, "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    return pairs, store


def test_the_judge_is_shown_after_the_vote_only_and_disagreements_reach_review(judged_pairs, tmp_path):
    pairs_file, store_dir = judged_pairs
    pairs, _ = load_pairs(pairs_file)
    judge = {v["pair_id"]: v["choice"] for v in read_comparisons(store_dir).to_pylist()}
    assert sorted(judge.values()) == ["a", "b"]
    queue = AssignmentQueue(overlap=1, seed=3)
    queue.add(pairs)
    suggestions = JudgeSuggestions(store_dir, JUDGE)
    with DirectoryStore(store_dir) as store:
        service = Service(store, queue, data=store_dir, local_user="me", suggestions=suggestions)
        reviewer = Reviewer(store_dir, tmp_path / "runs", queue, suggestions=suggestions)
        view = service.next("me")
        agreed = None
        for round in range(2):
            # nothing of the judge's about the pair shown (the ack is the last vote's)
            assert "judge" not in json.dumps({k: v for k, v in view.items() if k != "ack"})
            pair = view["pair"]
            by_judge = judge[pair["pair_id"]]
            a = queue.current("me")
            judge_side = "left" if a.left == by_judge else "right"
            mine = judge_side if round == 0 else {"left": "right", "right": "left"}[judge_side]
            view = service.vote("me", pair["pair_id"], mine)
            assert view["ok"], view["message"]
            assert view["ack"]["suggestion"] == {"judge": JUDGE, "choice": judge_side, "agrees": round == 0}
            html = status_html(view)
            assert 'id="judge-suggestion"' in html and f'data-agrees="{str(round == 0).lower()}"' in html
            if round == 0:
                agreed = pair["pair_id"]
        (row,) = reviewer.judge_disagreements()
        assert row["annotator"] == "me" and row["pair_id"] != agreed
        assert row["choice"] != row["judge_choice"] and {row["choice"], row["judge_choice"]} == {
            "left",
            "right",
        }
        report = reviewer.requeue_judged([row["pair_id"]])
        assert report["queued"] == 1
        again = service.next("someone-else")["pair"]
        assert again is not None and again["pair_id"] == row["pair_id"]  # sent back, first in line


def test_suggest_takes_only_a_judge(tmp_path):
    with pytest.raises(SuggestError, match="judge:<name>"):
        JudgeSuggestions(tmp_path / "store", "alice")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "response_a": "x", "response_b": "y"}])
    r = preflab("serve", "--pairs", pairs, "--data", tmp_path / "store", "--suggest", "alice")
    assert r.returncode == 2 and "--suggest takes a judge's annotator name" in r.stderr


def test_the_page_api_acknowledges_a_vote_with_the_judges_choice(judged_pairs, tmp_path):
    pairs_file, store_dir = judged_pairs
    judge = {v["pair_id"]: v["choice"] for v in read_comparisons(store_dir).to_pylist()}
    args = ("--pairs", str(pairs_file), "--data", str(store_dir), "--suggest", JUDGE)
    with Server(tmp_path, *args) as server:
        me = client(server.url)
        view = me.predict(api_name="/next")
        assert "judge" not in json.dumps(view["pair"])
        view = me.predict(view["pair"]["pair_id"], "tie", "", "", api_name="/vote")
        suggestion = view["ack"]["suggestion"]
        assert suggestion["judge"] == JUDGE and suggestion["agrees"] is False
        assert suggestion["choice"] in ("left", "right") and judge  # the judge never said tie here
