"""Flag events are read in the store's order, not by their writers' clocks: with two
servers on one PostgreSQL store a skewed clock must not let an earlier decision win over
a later one. (A directory store has one server, so one clock: its order is created_at.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from helpers import make_pairs, preflab, vote_record

from annotate.queue import AssignmentQueue
from trainer.flags import (
    confirmed_flags,
    decision_record,
    flag_record,
    flag_states,
    read_counted_votes,
    read_flag_events,
)
from trainer.store import open_store

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
RULE_ROW = {"annotator": "mallory", "gold_n": 4, "gold_correct": 0, "flag_rule": True}


def skewed_decisions(store) -> None:
    """flag, then a confirm from a server whose clock runs 10 s fast, then a clear from
    one whose clock runs right: stored in that order, stamped confirm-last."""
    raised = store.append({**flag_record(RULE_ROW, min_failed_gold=2, flag_below=0.6), "created_at": T0})
    confirm = decision_record("flag_confirm", "mallory", "boss", raised["event_id"])
    store.append({**confirm, "created_at": T0 + timedelta(seconds=10)})
    clear = decision_record("flag_clear", "mallory", "other-admin", raised["event_id"], "wrong call")
    store.append({**clear, "created_at": T0 + timedelta(seconds=5)})


@pytest.mark.usefixtures("postgres_server")
def test_on_postgresql_the_later_stored_decision_wins_over_a_later_stamped_one(pg_url):
    from trainer.store.postgres import PostgresStore

    with PostgresStore(pg_url) as store:
        store.append(vote_record(annotator="mallory"))
        queue = AssignmentQueue(shared=store)
        votes, cursor = store.snapshot()
        queue.restore(votes, cursor=cursor)
        skewed_decisions(store)
        events = read_flag_events(pg_url)
        assert [e["kind"] for e in events] == ["flag", "flag_confirm", "flag_clear"]
        assert events[1]["created_at"] > events[2]["created_at"]  # the clocks say otherwise
        assert flag_states(events)["mallory"]["state"] == "cleared"
        assert confirmed_flags(events) == set()
        counted, exclusion = read_counted_votes(pg_url)
        assert counted.num_rows == 1 and exclusion.annotators == ()
        queue.sync()  # what another server learns of the decisions: the same order
        assert queue.excluded_annotators() == set()
        fresh = AssignmentQueue()  # what a restarted server learns (annotate/serve.py)
        fresh.learn_flags(read_flag_events(pg_url))
        assert fresh.excluded_annotators() == set()


def test_a_directory_orders_flags_by_its_one_clock_and_reads_only_flag_events(tmp_path):
    data = tmp_path / "store"
    with open_store(data) as store:
        store.append(vote_record(annotator="mallory"))
        skewed_decisions(store)
    events = read_flag_events(data)
    assert [e["kind"] for e in events] == ["flag", "flag_clear", "flag_confirm"]
    assert confirmed_flags(events) == {"mallory"}
    queue = AssignmentQueue(overlap=1)
    queue.learn_flags(events)
    queue.add(make_pairs(1))
    assert queue.excluded_annotators() == {"mallory"}


@pytest.mark.usefixtures("postgres_server")
def test_preflab_copy_hands_a_database_the_flags_in_the_sources_order(tmp_path, pg_url):
    """The directory's file order (confirm, then clear) is not its order (created_at:
    clear, then confirm); the database must end up deciding as the directory does."""
    from trainer.store.copy import copy_store

    data = tmp_path / "store"
    with open_store(data) as store:
        store.append(vote_record(annotator="mallory"))
        skewed_decisions(store)
    copy_store(str(data), pg_url)
    assert [e["kind"] for e in read_flag_events(pg_url)] == ["flag", "flag_clear", "flag_confirm"]
    assert confirmed_flags(read_flag_events(pg_url)) == confirmed_flags(read_flag_events(data)) == {"mallory"}


@pytest.mark.usefixtures("postgres_server")
def test_preflab_copy_refuses_to_reverse_a_databases_flag_decision_into_a_directory(tmp_path, pg_url):
    """A database decides by seq (confirm, then clear: cleared), a directory by created_at
    (clear, then confirm): the copy names mallory and writes nothing, until an admin's new
    decision is the latest in both orders."""
    from trainer.store.copy import copy_store

    with open_store(pg_url) as store:
        store.append(vote_record(annotator="mallory"))
        skewed_decisions(store)
    backup = tmp_path / "backup"
    with pytest.raises(ValueError, match="for mallory the latest flag decision"):
        copy_store(pg_url, str(backup))
    assert not backup.exists()
    result = preflab("copy", "--from", pg_url, "--to", str(backup))
    assert result.returncode == 2 and "mallory" in result.stderr and "nothing was written" in result.stderr
    assert confirmed_flags(read_flag_events(pg_url)) == set()
    with open_store(pg_url) as store:  # decided again: latest by seq and by created_at
        store.append(
            {
                **decision_record("flag_clear", "mallory", "boss", None),
                "created_at": T0 + timedelta(seconds=20),
            }
        )
    assert copy_store(pg_url, str(backup))["copied"] == 5
    assert confirmed_flags(read_flag_events(backup)) == confirmed_flags(read_flag_events(pg_url)) == set()


@pytest.mark.usefixtures("postgres_server")
def test_on_postgresql_a_decision_committed_late_loses_to_a_later_stored_one_in_sync_as_on_restart(pg_url):
    """A confirm takes its seq first but commits after a clear: the database's order says
    cleared. A server learning both with sync (commit order: clear, then confirm) must end
    where a restarted server does."""
    import psycopg

    from trainer.store.postgres import PostgresStore

    with PostgresStore(pg_url) as store:
        raised = store.append({**flag_record(RULE_ROW, min_failed_gold=2, flag_below=0.6), "created_at": T0})
        queue = AssignmentQueue(shared=store)
        votes, cursor = store.snapshot()
        queue.restore(votes, cursor=cursor)
        queue.learn_flags(store.flag_events())
        slow = psycopg.connect(pg_url)  # a transaction left open: its seq is taken now
        confirm = store._validated(decision_record("flag_confirm", "mallory", "boss", raised["event_id"]))
        PostgresStore._insert(slow, confirm)
        store.append(
            decision_record("flag_clear", "mallory", "other-admin", raised["event_id"], "wrong call")
        )
        queue.sync()
        assert queue.excluded_annotators() == set()
        slow.commit()
        slow.close()
        queue.sync()  # the confirm arrives last, with the lower seq
        assert [e["kind"] for e in read_flag_events(pg_url)] == ["flag", "flag_confirm", "flag_clear"]
        assert queue.excluded_annotators() == set() == confirmed_flags(read_flag_events(pg_url))
        restarted = AssignmentQueue(shared=store)
        restarted.learn_flags(store.flag_events())
        assert restarted.excluded_annotators() == set()


def test_the_queue_keeps_each_annotators_highest_seq_decision_and_its_own_until_sync_brings_it_back():
    queue = AssignmentQueue()
    queue.learn_flags([{"kind": "flag_confirm", "subject": "mallory", "seq": 30}])
    queue.learn_flags([{"kind": "flag_clear", "subject": "mallory"}])  # this server's own, no seq yet
    assert queue.excluded_annotators() == set()
    queue.learn_flags([{"kind": "flag_clear", "subject": "mallory", "seq": 20}])  # it was older after all
    assert queue.excluded_annotators() == {"mallory"}
    queue.learn_flags([{"kind": "flag", "subject": "mallory", "seq": 10}])
    assert queue.excluded_annotators() == {"mallory"}
