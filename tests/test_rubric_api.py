"""A rubric (serve --rubric) through the JSON API of a real server process: `/next`
describes the rubric, a client builds its vote's criteria from that description alone,
a vote missing a required criterion is refused naming it, and after a restart `/undo`
gives the judgments back in the terms of the screen."""

import json
import signal

import pytest
from helpers import Server, client, write_pairs

from trainer.store import read_comparisons, read_events, store_exists

RUBRIC = """
[[criteria]]
name = "helpful"
label = "More helpful"
kind = "pairwise"
required = true
help = "Which answer does more of what was asked?"

[[criteria]]
name = "clarity"
label = "Clarity"
kind = "scale"
required = true

[[criteria]]
name = "tone"
label = "Tone"
kind = "pairwise"

[[flags]]
name = "unsafe"
label = "Unsafe"

[[flags]]
name = "off_topic"
label = "Off topic"
"""


def criteria_from(description: dict) -> dict:
    """What a client that knows only /next's description sends: every required
    criterion judged (a pairwise one the first value, a scale a different score for each
    side, so that a swap of sides would show), and the first flag on the right answer."""
    left, right = description["sides"]
    out = {}
    for c in description["criteria"]:
        if not c["required"]:
            continue
        values = c["values"]
        out[c["name"]] = values[0] if c["kind"] == "pairwise" else {left: values[-1], right: values[0]}
    out["flags"] = {right: [description["flags"][0]["name"]]}
    return out


@pytest.mark.parametrize("backend", ["directory", "postgresql"])
def test_next_describes_the_rubric_and_undo_after_a_restart_gives_judgments_back(tmp_path, backend, request):
    (tmp_path / "rubric.toml").write_text(RUBRIC)
    store = tmp_path / "store" if backend == "directory" else request.getfixturevalue("pg_url")
    args = ("--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 4)), "--data", str(store), "--user", "solo")
    args += ("--rubric", str(tmp_path / "rubric.toml"))
    server = Server(tmp_path, *args).start()
    try:
        c = client(server.url)
        view = c.predict(api_name="/next")
        description = view["rubric"]
        assert [(x["name"], x["kind"], x["required"]) for x in description["criteria"]] == [
            ("helpful", "pairwise", True),
            ("clarity", "scale", True),
            ("tone", "pairwise", False),
        ]
        assert description["criteria"][0]["help"] == "Which answer does more of what was asked?"
        assert description["criteria"][0]["values"] == ["left", "right", "tie"]
        assert description["criteria"][1]["values"] == [1, 2, 3, 4, 5]
        assert [f["name"] for f in description["flags"]] == ["unsafe", "off_topic"]
        sent = criteria_from(description)
        pair_id = view["pair"]["pair_id"]

        incomplete = {k: v for k, v in sent.items() if k != "clarity"}
        with pytest.raises(Exception, match=r"Clarity is required"):
            c.predict(pair_id, "left", "", "", incomplete, api_name="/vote")
        assert not store_exists(store) or read_comparisons(store).num_rows == 0  # nothing stored

        done = c.predict(pair_id, "right", "clearly", "", sent, api_name="/vote")
        assert done["ack"] is not None and done["pair"]["pair_id"] != pair_id
        assert done["rubric"] == description  # every answer with a pair describes the rubric
        (vote,) = read_comparisons(store).to_pylist()
        left, right = vote["left"], "b" if vote["left"] == "a" else "a"
        assert json.loads(vote["criteria"]) == {
            "helpful": left,
            "clarity": {left: 5, right: 1},
            "flags": {right: ["unsafe"]},
        }
    finally:
        server.stop(signal.SIGKILL)  # the vote was acknowledged: it and its judgments survive

    server = Server(tmp_path, *args).start()
    try:
        c = client(server.url)
        undone = c.predict(api_name="/undo")  # the queue was rebuilt from the store
        assert undone["pair"]["pair_id"] == pair_id
        assert undone["undone"]["choice"] == "right" and undone["undone"]["strength"] == "clearly"
        assert undone["undone"]["criteria"] == sent  # as the screen had them, not a/b
        assert read_comparisons(store).num_rows == 0  # the retract stands
        again = c.predict(pair_id, "right", "clearly", "", undone["undone"]["criteria"], api_name="/vote")
        assert again["ack"] is not None
    finally:
        server.stop()
    events = read_events(store).to_pylist()
    assert sorted(e["kind"] for e in events) == ["retract", "vote", "vote"]
    (retract,) = [e for e in events if e["kind"] == "retract"]
    assert retract["retracts"] == vote["event_id"] and retract["criteria"] is None
    (standing,) = read_comparisons(store).to_pylist()
    assert standing["event_id"] != vote["event_id"] and standing["left"] == vote["left"]
    assert standing["criteria"] == vote["criteria"]  # the same judgments, sent back as shown


def test_next_says_there_is_no_rubric(tmp_path):
    args = ("--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 2)), "--data", str(tmp_path / "s"))
    with Server(tmp_path, *args, "--user", "solo") as server:
        assert client(server.url).predict(api_name="/next")["rubric"] is None
