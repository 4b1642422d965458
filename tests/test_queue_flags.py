"""The assignment queue and annotator flags: a confirmed-flagged annotator's votes fill no
pair's overlap K (they count nowhere downstream), while the server runs (an admin's
confirm reopens the pairs, a clear closes them again), after a restart rebuilds the queue
from the store, and with several servers on one PostgreSQL store (the database's claims)."""

from __future__ import annotations

import pytest
from helpers import Server, add_users, client, make_pairs, vote_record, write_pairs

from annotate.annotator_review import AnnotatorReview
from annotate.queue import AssignmentQueue
from annotate.service import Service
from trainer.flags import decision_record, flag_record
from trainer.store import open_store, read_comparisons

RULE_ROW = {"annotator": "mallory", "gold_n": 4, "gold_correct": 0, "flag_rule": True}


def raise_flag(store) -> dict:
    return store.append(flag_record(RULE_ROW, min_failed_gold=2, flag_below=0.6))


def vote_all(service: Service, user: str) -> list[str]:
    """Vote on every pair `user` is given; the pair ids, in order."""
    done = []
    view = service.next(user)
    while view["pair"] is not None:
        done.append(view["pair"]["pair_id"])
        view = service.vote(user, view["pair"]["pair_id"], "left")
        assert view["ack"] is not None, view["message"]
    return done


def test_an_admins_confirm_reopens_the_pairs_a_flagged_annotator_filled_and_a_clear_closes_them(tmp_path):
    data = tmp_path / "store"
    pairs = make_pairs(3)
    with open_store(data) as store:
        queue = AssignmentQueue(overlap=1)
        queue.add(pairs)
        service = Service(store, queue, data=data, local_user="boss")
        review = AnnotatorReview(store, service, min_failed_gold=2, flag_below=0.6)
        assert len(vote_all(service, "mallory")) == 3
        assert service.next("bob")["pair"] is None  # K = 1: every pair is done
        raise_flag(store)
        review.table("boss")
        assert service.next("bob")["pair"] is None, "a flag an admin has not confirmed changes nothing"

        review.decide("boss", "mallory", "confirm")
        assert queue.overview()["open"] == 3
        assert service.next("mallory")["pair"] is None, "never twice, flagged or not"
        assert sorted(vote_all(service, "bob")) == sorted(p.pair_id for p in pairs)
        assert service.next("carol")["pair"] is None  # bob's votes count: done again

        review.decide("boss", "mallory", "clear")  # mallory counts again: still done, not over-full
        assert queue.overview()["open"] == 0 and service.next("carol")["pair"] is None
    assert read_comparisons(data).num_rows == 6


def test_a_partly_voted_pair_needs_k_counted_votes(tmp_path):
    data = tmp_path / "store"
    with open_store(data) as store:
        raise_flag(store)
        store.append(decision_record("flag_confirm", "mallory", "boss", None))
        queue = AssignmentQueue(overlap=2)
        queue.learn_flags([{"kind": "flag_confirm", "subject": "mallory"}])
        queue.add(make_pairs(1))
        service = Service(store, queue, data=data, local_user="boss")
        vote_all(service, "mallory")
        vote_all(service, "ann")
        assert queue.overview()["open"] == 1  # mallory + ann: one counted vote of two
        vote_all(service, "bob")
        assert queue.overview()["open"] == 0 and service.next("carol")["pair"] is None


def test_a_restarted_server_leaves_confirmed_annotators_votes_out_of_k(tmp_path):
    add_users(tmp_path / "users.toml", mallory="annotator", bob="annotator")
    data = tmp_path / "store"
    args = ("--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 2)), "--data", str(data))
    args += ("--auth", str(tmp_path / "users.toml"), "--overlap", "1")
    with Server(tmp_path, *args) as server:
        mallory = client(server.url, "mallory")
        view = mallory.predict(api_name="/next")
        voted = []
        while view["pair"] is not None:
            voted.append(view["pair"]["pair_id"])
            view = mallory.predict(view["pair"]["pair_id"], "left", "", "", None, api_name="/vote")
        assert len(voted) == 2
        assert client(server.url, "bob").predict(api_name="/next")["pair"] is None
    with open_store(data) as store:  # the server is gone: an admin's decision, as the store holds it
        raised = raise_flag(store)
        store.append(decision_record("flag_confirm", "mallory", "boss", raised["event_id"]))
    with Server(tmp_path, *args) as server:
        bob = client(server.url, "bob")
        view = bob.predict(api_name="/next")
        assert view["pair"] is not None and view["pair"]["pair_id"] in voted
        assert bob.predict(view["pair"]["pair_id"], "right", "", "", None, api_name="/vote")["ack"]
        assert client(server.url, "mallory").predict(api_name="/next")["pair"] is None


@pytest.mark.usefixtures("postgres_server")
def test_with_postgresql_another_servers_confirm_arrives_with_sync_and_the_database_takes_the_vote(pg_url):
    from trainer.store.postgres import PostgresStore

    pairs = make_pairs(2)
    with PostgresStore(pg_url) as one, PostgresStore(pg_url) as two:
        servers = []
        for store in (one, two):
            queue = AssignmentQueue(overlap=1, shared=store)
            votes, cursor = store.snapshot()
            queue.restore(votes, cursor=cursor)
            queue.add(pairs)
            servers.append(Service(store, queue, data=pg_url, local_user="boss"))
        first, second = servers
        assert len(vote_all(first, "mallory")) == 2
        second.queue.sync()
        assert second.next("bob")["pair"] is None
        raise_flag(one)
        AnnotatorReview(one, first, min_failed_gold=2, flag_below=0.6).decide("boss", "mallory", "confirm")
        second.queue.sync()  # the decision was made on the first server
        # The database counts mallory's standing votes too: the queue asks it for K + 1.
        assert len(vote_all(second, "bob")) == 2
        first.queue.sync()
        assert first.next("carol")["pair"] is None
    assert read_comparisons(pg_url).num_rows == 4


@pytest.mark.usefixtures("postgres_server")
def test_with_postgresql_votes_and_undos_on_one_pair_at_once_never_fail_with_confirmed_voters_on_it(pg_url):
    """The vote path asks the database for K plus the pair's excluded votes, counted from
    the pair's voters, which other threads' votes and undos change meanwhile: counted
    outside the queue's lock it failed votes with "Set changed size during iteration"."""
    import sys
    import threading

    from trainer.store.postgres import PostgresStore

    pair = make_pairs(1)[0]
    # Many confirmed-flagged voters the queue knows of make the count long enough to race.
    bots = [f"bot{i}" for i in range(5000)]  # their votes stored: the database's voters too
    workers = ["ann", "bob", "carol", "dave"]
    with PostgresStore(pg_url) as store:
        store.append_many(vote_record("q 0?", "a0", "b0", annotator=b) for b in bots)
        queue = AssignmentQueue(overlap=len(workers), shared=store)
        votes, cursor = store.snapshot()
        queue.restore(votes, cursor=cursor)
        queue.learn_flags({"kind": "flag_confirm", "subject": b} for b in bots)
        queue.add([pair])
        service = Service(store, queue, data=pg_url, local_user="boss")
        errors: list[BaseException] = []

        def work(user: str) -> None:
            try:
                view = service.next(user)
                for _ in range(20):
                    assert view["pair"] is not None, view["message"]
                    view = service.vote(user, pair.pair_id, "left")
                    assert view["ack"] is not None, view["message"]
                    view = service.undo(user)
                    assert "undone" in view, view["message"]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # threads switch often: the race shows when it is there
        try:
            threads = [threading.Thread(target=work, args=(u,)) for u in workers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
        assert not errors, errors
