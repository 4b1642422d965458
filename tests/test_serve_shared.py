"""Several `preflab serve` processes on one PostgreSQL store: overlap K and never-twice
hold across servers, an acknowledged vote survives `kill -9` of a server, and a
restarted server picks up where it was. Real servers, a real database, the real API.
"""

from __future__ import annotations

import signal
from collections import Counter

from helpers import Server, add_users, client, write_pairs

from trainer.store import read_comparisons, read_events

PEOPLE = ("ann", "ben", "cat")


def team_servers(tmp_path, pg_url, n_servers=2, n_pairs=10):
    add_users(tmp_path / "users.toml", **{p: "annotator" for p in PEOPLE})
    pairs = write_pairs(tmp_path / "pairs.jsonl", n_pairs)
    args = (
        "--pairs",
        str(pairs),
        "--data",
        pg_url,
        "--auth",
        str(tmp_path / "users.toml"),
        "--overlap",
        "2",
        "--runs",
        str(tmp_path / "runs"),
    )
    return [Server(tmp_path, *args) for _ in range(n_servers)]


def vote_round(clients, acks, turn, only=None):
    """Each annotator asks the server `turn` points them to (or server `only`) for their
    pair and votes on it. Returns whether anyone had a pair."""
    progressed = False
    for k, person in enumerate(PEOPLE):
        c = clients[person][only if only is not None else (turn + k) % len(clients[person])]
        pair = c.predict(api_name="/next")["pair"]
        if pair is None:
            continue
        view = c.predict(pair["pair_id"], "left", "", "", api_name="/vote")
        if view["ok"]:
            acks.append(view["ack"]["event_id"])
        progressed = True
    return progressed


def vote_until_done(clients, acks, rounds=80):
    idle = 0
    for turn in range(rounds):
        idle = 0 if vote_round(clients, acks, turn) else idle + 1
        if idle >= 2:  # nobody had a pair on either server, twice in a row
            return
    raise AssertionError("the annotators never ran out of pairs")


def check_invariants(pg_url, n_pairs, complete=True):
    votes = read_comparisons(pg_url, columns=["pair_id", "annotator"]).to_pylist()
    per_person_pair = Counter((v["annotator"], v["pair_id"]) for v in votes)
    per_pair = Counter(v["pair_id"] for v in votes)
    assert max(per_person_pair.values()) == 1, "an annotator voted twice on one pair"
    assert max(per_pair.values()) <= 2, f"pairs over K=2: {[p for p, n in per_pair.items() if n > 2]}"
    if complete:
        assert len(per_pair) == n_pairs and set(per_pair.values()) == {2}
    return votes


def test_two_servers_with_overlap_two_keep_k_and_never_twice(tmp_path, pg_url):
    servers = team_servers(tmp_path, pg_url)
    for s in servers:
        s.start()
    try:
        clients = {p: [client(s.url, p) for s in servers] for p in PEOPLE}
        acks = []
        vote_until_done(clients, acks)
        votes = check_invariants(pg_url, 10)
        assert len(acks) == len(votes) == 20, "every acknowledged vote is stored, and nothing else"
        assert set(acks) == set(read_events(pg_url)["event_id"].to_pylist())
        for person in PEOPLE:  # both servers tell everyone they are done
            for c in clients[person]:
                view = c.predict(api_name="/next")
                assert view["pair"] is None and view["waiting"]["state"] == "done"
    finally:
        for s in servers:
            s.stop()


def test_kill_9_of_one_server_mid_load_loses_nothing_and_a_restart_goes_on(tmp_path, pg_url):
    servers = team_servers(tmp_path, pg_url, n_pairs=12)
    for s in servers:
        s.start()
    try:
        clients = {p: [client(s.url, p) for s in servers] for p in PEOPLE}
        acks = []
        for turn in range(3):
            vote_round(clients, acks, turn)
        servers[0].stop(signal.SIGKILL)  # acknowledged votes must survive this
        stored = set(read_events(pg_url)["event_id"].to_pylist())
        assert set(acks) <= stored
        for turn in range(2):  # the other server carries on alone
            vote_round(clients, acks, turn, only=1)
        check_invariants(pg_url, 12, complete=False)
        servers[0].start()  # back: it rebuilds from the database
        clients = {p: [client(s.url, p) for s in servers] for p in PEOPLE}
        vote_until_done(clients, acks)
        votes = check_invariants(pg_url, 12)
        assert set(acks) == set(read_events(pg_url)["event_id"].to_pylist())
        assert len(votes) == 24
    finally:
        for s in servers:
            s.stop()


def test_undo_on_a_shared_store_frees_the_slot_and_takes_it_back(tmp_path, pg_url):
    servers = team_servers(tmp_path, pg_url, n_servers=2, n_pairs=3)
    for s in servers:
        s.start()
    try:
        ann = client(servers[0].url, "ann")
        first = ann.predict(api_name="/next")["pair"]
        ann.predict(first["pair_id"], "left", "", "", api_name="/vote")
        back = ann.predict(api_name="/undo")
        assert back["ok"] and back["pair"]["pair_id"] == first["pair_id"], "undo brings the pair back"
        again = ann.predict(first["pair_id"], "right", "", "", api_name="/vote")
        assert again["ok"], again["message"]
        votes = read_comparisons(pg_url).to_pylist()
        assert [(v["pair_id"], v["annotator"]) for v in votes] == [(first["pair_id"], "ann")]
        assert len(read_events(pg_url)) == 3  # vote, retract, vote
        # the other server knows it too: ann is never given that pair there
        other = client(servers[1].url, "ann")
        seen = []
        for _ in range(4):
            pair = other.predict(api_name="/next")["pair"]
            if pair is None:
                break
            seen.append(pair["pair_id"])
            other.predict(pair["pair_id"], "left", "", "", api_name="/vote")
        assert first["pair_id"] not in seen and len(seen) == 2
        check_invariants(pg_url, 3, complete=False)
    finally:
        for s in servers:
            s.stop()
