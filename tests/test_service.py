"""`annotate.service.Service` without a server: a real directory store, a real queue.

Vote, stale vote, skip, undo, the dashboard's numbers, export, and who may do what.
What was stored is read back through trainer.store, never from the service itself.
"""

import json
from types import SimpleNamespace

import pytest
from helpers import add_users, write_pairs

from annotate.accounts import Forbidden
from annotate.pairs import load_pairs
from annotate.queue import AssignmentQueue
from annotate.service import Service
from trainer.store import read_comparisons, read_events
from trainer.store.directory_writer import DirectoryStore


@pytest.fixture
def setup(tmp_path):
    """(service, store dir) over four pairs, overlap 2, one local user "me" (admin)."""
    pairs, _ = load_pairs(write_pairs(tmp_path / "pairs.jsonl", 4))
    queue = AssignmentQueue(overlap=2, seed=7)
    queue.add(pairs)
    store_dir = tmp_path / "store"
    with DirectoryStore(store_dir) as store:
        yield Service(store, queue, data=store_dir, local_user="me"), store_dir


def test_a_vote_is_stored_before_it_is_acknowledged_and_the_next_pair_comes_with_it(setup):
    service, store_dir = setup
    view = service.next("me")
    pair = view["pair"]
    assert set(pair) == {"pair_id", "prompt", "left", "right", "left_cut", "right_cut"} and view[
        "progress"
    ] == {
        "done": 0,
        "assigned": 4,
        "pool_done": 0,
        "pool_total": 4,
    }
    after = service.vote("me", pair["pair_id"], "right", "slightly", "  B adds up  ")
    assert after["ok"] and after["message"] == "Saved."
    assert after["ack"]["choice"] == "right" and {
        after["ack"]["left_model"],
        after["ack"]["right_model"],
    } == {"alpha", "beta"}
    assert after["pair"]["pair_id"] != pair["pair_id"] and after["progress"]["done"] == 1
    (stored,) = read_comparisons(store_dir).to_pylist()
    assert stored["event_id"] == after["ack"]["event_id"] and stored["annotator"] == "me"
    assert stored[f"response_{stored['left']}"] == pair["left"]
    assert stored["choice"] == ("b" if stored["left"] == "a" else "a")  # "right" is the other side
    assert stored["strength"] == 1 and stored["rationale"] == "B adds up"


def test_bad_choice_or_strength_is_refused_and_nothing_is_stored(setup):
    service, store_dir = setup
    pair_id = service.next("me")["pair"]["pair_id"]
    with pytest.raises(ValueError, match="choice must be one of"):
        service.vote("me", pair_id, "a")
    with pytest.raises(ValueError, match="strength must be"):
        service.vote("me", pair_id, "left", "very")
    assert not store_dir.exists() or read_comparisons(store_dir).num_rows == 0
    assert service.next("me")["pair"]["pair_id"] == pair_id  # still theirs to vote on


def test_a_stale_vote_is_not_stored_nor_acknowledged_and_the_pair_is_kept(setup):
    service, store_dir = setup
    first = service.next("me")["pair"]["pair_id"]
    service.vote("me", first, "left")
    current = service.next("me")["pair"]["pair_id"]
    stale = service.vote("me", first, "tie")  # a second tab, voting on the old pair again
    assert stale["ok"] is False and stale["ack"] is None and "already answered" in stale["message"]
    assert stale["pair"]["pair_id"] == current  # the pair they hold stays theirs
    assert read_comparisons(store_dir).column("pair_id").to_pylist() == [first]
    never_given = service.vote("me", "no-such-pair", "left")
    assert never_given["ok"] is False and never_given["pair"]["pair_id"] == current


def test_skip_gives_the_pair_to_someone_else_and_only_the_holder_may_skip(setup):
    service, _ = setup
    skipped = service.next("me")["pair"]["pair_id"]
    view = service.skip("me", skipped)
    assert view["ok"] and "Skipped" in view["message"] and view["pair"]["pair_id"] != skipped
    again = service.skip("me", skipped)
    assert again["ok"] is False and "no longer yours" in again["message"]

    def votes_until_done(user):
        seen, view = [], service.next(user)
        while view["pair"] is not None:
            seen.append(view["pair"]["pair_id"])
            view = service.vote(user, view["pair"]["pair_id"], "tie")
        return seen

    assert skipped not in votes_until_done("me")  # never back to the one who skipped
    assert skipped in votes_until_done("you")  # someone else gets it


def test_undo_retracts_the_vote_and_the_pair_comes_back_as_it_was(setup):
    service, store_dir = setup
    shown = service.next("me")["pair"]
    voted = service.vote("me", shown["pair_id"], "left", "clearly", "A is right")
    undone = service.undo("me")
    assert undone["ok"] and undone["pair"] == shown  # same pair, same side on the left
    assert undone["undone"] == {
        "event_id": voted["ack"]["event_id"],
        "choice": "left",
        "strength": "clearly",
        "rationale": "A is right",
    }
    assert undone["progress"]["done"] == 0
    assert read_comparisons(store_dir).num_rows == 0  # the vote no longer stands
    (retract,) = [e for e in read_events(store_dir).to_pylist() if e["kind"] == "retract"]
    assert retract["retracts"] == voted["ack"]["event_id"] and retract["annotator"] == "me"
    nothing = service.undo("me")
    assert nothing["ok"] is False and nothing["message"] == "Nothing to undo."
    revote = service.vote("me", shown["pair_id"], "tie")  # the pair can be voted on again
    assert revote["ok"] and read_comparisons(store_dir).column("choice").to_pylist() == ["tie"]


def test_dashboard_numbers_from_a_few_votes_are_json(setup):
    service, _ = setup
    for user, choices in (("me", ("left", "left", "tie")), ("you", ("left", "both_bad"))):
        view = service.next(user)
        for choice in choices:
            view = service.vote(user, view["pair"]["pair_id"], choice)
    d = service.dashboard("me")
    assert json.loads(json.dumps(d, allow_nan=False)) == d  # JSON-able: no NaN, no numpy, no frames
    assert set(d) == {"summary", "queue", "tables", "excluded_flagged"}
    assert d["excluded_flagged"] == {
        "annotators": [],
        "votes": 0,
        "included": False,
        "dropped": 0,
        "note": "",
    }
    assert d["summary"]["votes"] == 5 and d["summary"]["annotators"] == 2
    assert d["queue"]["overlap"] == 2 and d["queue"]["pairs"] == 4
    by_annotator = {r["annotator"]: r for r in d["tables"]["by_annotator"]}
    assert by_annotator["me"]["votes"] == 3 and by_annotator["me"]["ties"] == 1
    assert by_annotator["you"]["both_bad"] == 1
    choices = {r["choice"]: r for r in d["tables"]["choices"]}
    assert choices["A better"]["votes"] == 3 and choices["Tie"]["votes"] == 1
    assert choices["Both bad"]["share"] == pytest.approx(1 / 5)
    assert sum(r["votes"] for r in d["tables"]["by_day"]) == 5


def test_dashboard_of_an_empty_store_has_no_numbers_not_nan(tmp_path):
    queue = AssignmentQueue()
    with DirectoryStore(tmp_path / "store") as store:
        d = Service(store, queue, data=tmp_path / "store", local_user="me").dashboard("me")
    assert d["summary"]["votes"] == 0 and d["tables"]["by_annotator"] == []
    assert [r["share"] for r in d["tables"]["choices"]] == [None] * 4


def test_export_writes_into_the_folder_it_is_given(setup, tmp_path):
    service, _ = setup
    view = service.next("me")
    for choice in ("left", "right", "tie"):
        view = service.vote("me", view["pair"]["pair_id"], choice)
    folder = tmp_path / "out"
    folder.mkdir()
    files, report = service.export("me", folder, "standard", False, "separate", "none", "jsonl")
    assert [p.startswith(str(folder)) for p in files] == [True, True]  # preferences and the ties beside them
    rows = [json.loads(line) for line in open(files[0])]
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert "standing votes" in report
    with pytest.raises(ValueError, match="filetype must be parquet or jsonl"):
        service.export("me", folder, filetype="csv")


def test_annotators_are_refused_what_is_for_admins(tmp_path):
    add_users(tmp_path / "users.toml", ann="annotator", boss="admin")
    from annotate.accounts import Accounts

    accounts = Accounts(tmp_path / "users.toml")
    with DirectoryStore(tmp_path / "store") as store:
        service = Service(store, AssignmentQueue(), data=tmp_path / "store", accounts=accounts)
        assert service.identify(SimpleNamespace(username="ann")) == ("ann", "annotator")
        with pytest.raises(Forbidden, match="please log in"):
            service.identify(SimpleNamespace(username=None))
        with pytest.raises(Forbidden, match="please log in"):
            service.identify(SimpleNamespace(username="mallory"))
        with pytest.raises(Forbidden, match="ann is an annotator"):
            service.dashboard("ann")
        with pytest.raises(Forbidden, match="for admins"):
            service.export("ann", tmp_path)
        assert list(tmp_path.glob("preferences-*")) == []  # refused before writing anything
        assert service.dashboard("boss")["summary"]["votes"] == 0
    # Without accounts the one local user is the admin, and nobody else is.
    with DirectoryStore(tmp_path / "store") as store:
        local = Service(store, AssignmentQueue(), data=tmp_path / "store", local_user="me")
        assert local.identify(SimpleNamespace(username="whoever")) == ("me", "admin")
        with pytest.raises(Forbidden):
            local.dashboard("someone-else")


def test_an_answer_the_token_limit_cut_is_marked_on_the_side_it_is_shown(tmp_path):
    from annotate.pairs import pair_from_row
    from annotate.web.page import CUT_NOTE, answer_html

    cut_b = pair_from_row(
        {
            "prompt": "Tell a story",
            "response_a": "The end.",
            "response_b": "Once upon a",
            "gen_params": json.dumps({"a": {"seed": 1}, "b": {"seed": 2, "cut": True}}),
        }
    )
    queue = AssignmentQueue()
    queue.add([cut_b])
    with DirectoryStore(tmp_path / "store") as store:
        view = Service(store, queue, data=tmp_path / "store", local_user="me").next("me")
    pair = view["pair"]
    shown_cut = pair["right"] if pair["right_cut"] else pair["left"]
    assert [pair["left_cut"], pair["right_cut"]].count(True) == 1 and shown_cut == "Once upon a"
    assert CUT_NOTE in answer_html("B", "Once upon a", True)
    assert CUT_NOTE not in answer_html("A", "The end.", False)


def test_what_one_vote_may_carry_is_bounded_and_a_refusal_stores_nothing(setup):
    from annotate.service import MAX_RATIONALE_CHARS, BadRequest

    service, store_dir = setup
    pair = service.next("me")["pair"]
    with pytest.raises(BadRequest, match="at most 2,000 are kept"):
        service.vote("me", pair["pair_id"], "left", "", "x" * (MAX_RATIONALE_CHARS + 1))
    with pytest.raises(BadRequest, match="no pair has an id that long"):
        service.vote("me", "p" * 10_000, "left")
    with pytest.raises(BadRequest, match=r"a NUL character \\x00 at character 3"):
        service.vote("me", pair["pair_id"], "left", "", "ok\x00")  # PostgreSQL cannot keep it
    with pytest.raises(BadRequest, match="a lone surrogate"):
        service.vote("me", pair["pair_id"], "left", "", "\ud800")  # nor can UTF-8
    assert read_events(store_dir).num_rows == 0  # refused before the store was touched
    ok = service.vote(
        "me", pair["pair_id"], "left", "", "y" * MAX_RATIONALE_CHARS
    )  # the limit itself is fine
    assert ok["ok"] and read_comparisons(store_dir).column("rationale").to_pylist() == [
        "y" * MAX_RATIONALE_CHARS
    ]
