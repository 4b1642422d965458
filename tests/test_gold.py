"""Gold items (annotate/gold.py) in the queue and the service, on both backends: the gold
file's checks, the label under a canonical swap, the rate, never twice, outside the
pool's K, nothing the client receives that tells them apart, and --gold-feedback."""

from __future__ import annotations

import json
import re

import pytest
from helpers import make_pairs, write_jsonl

from annotate.gold import GoldItems, load_gold
from annotate.pair_building import make_pair
from annotate.pairs import PairsFileError
from annotate.queue import AssignmentQueue
from annotate.sampling import selection_of
from annotate.service import Service
from trainer.prompts import Prompt
from trainer.store import open_store, read_comparisons


def gold_rows(n: int, prefix: str = "quiz") -> list[dict]:
    """n gold rows; the right answer is always the one that says 'right', on side a."""
    return [
        {
            "prompt": f"{prefix} question {i}?",
            "response_a": f"right answer {i}",
            "response_b": f"wrong answer {i}",
            "model_a": "m1",
            "model_b": "m2",
            "gold": "a",
            "explanation": f"Answer {i} that says right is right.",
        }
        for i in range(n)
    ]


def gold_items(tmp_path, n: int, rate: float, **kw) -> GoldItems:
    return GoldItems(load_gold(write_jsonl(tmp_path / "gold.jsonl", gold_rows(n))), rate, seed=1, **kw)


def is_gold(record: dict) -> bool:
    how = selection_of(record.get("gen_params"))
    return bool(how) and how.get("method") == "gold"


# ---- the file ------------------------------------------------------------------------


def test_a_bad_gold_row_is_an_error_naming_file_line_and_field(tmp_path):
    rows = gold_rows(5)
    del rows[1]["gold"]
    rows[2]["gold"] = "left"
    rows[3]["explanation"] = 7
    path = write_jsonl(tmp_path / "gold.jsonl", rows)
    with pytest.raises(PairsFileError) as e:
        load_gold(path)
    message = str(e.value)
    assert f"{path}:2: gold: missing" in message
    assert f"{path}:3: gold: must be 'a', 'b' or 'tie'" in message
    assert f"{path}:4: explanation: must be a string" in message
    rows = gold_rows(2)
    rows[1]["response_b"] = None  # a pair field: reported as a pairs file reports it
    with pytest.raises(PairsFileError, match=r"gold2\.jsonl:2: missing 'response_b'"):
        load_gold(write_jsonl(tmp_path / "gold2.jsonl", rows))


def test_the_label_follows_the_answers_when_canonical_order_swaps_them(tmp_path):
    row = {
        "prompt": "Which planet is largest?",
        "response_a": "Jupiter.",
        "response_b": "Mars.",
        "model_a": "zeta-model",  # sorts after alpha: canonical order puts side b first
        "model_b": "alpha-model",
        "gen_params": {"a": {"temperature": 0.1}, "b": {"temperature": 0.9}},
        "gold": "a",
        "explanation": "Jupiter is the largest.",
    }
    (item,) = load_gold(write_jsonl(tmp_path / "gold.jsonl", [row]))
    pair = item.pair
    assert (pair.model_a, pair.response_a, pair.model_b, pair.response_b) == (
        "alpha-model",
        "Mars.",
        "zeta-model",
        "Jupiter.",
    )
    assert item.label == "b", "the file's 'a' (Jupiter) is the canonical 'b' now"
    params = json.loads(pair.gen_params)
    assert params["selection"] == {"method": "gold", "gold": "b"}
    assert params["a"] == {"temperature": 0.9} and params["b"] == {"temperature": 0.1}
    # The same pair as `preflab generate` makes it: the same id.
    made = make_pair(
        Prompt(id=None, messages=[{"role": "user", "content": "Which planet is largest?"}]),
        {"model": "zeta-model", "response": "Jupiter.", "params": {}},
        {"model": "alpha-model", "response": "Mars.", "params": {}},
    )
    assert pair.pair_id == made["pair_id"]

    # A vote for Jupiter, shown on either side, is stored as canonical "b" == gold.
    data = tmp_path / "store"
    gold = GoldItems([item], 1.0, feedback=True, seed=0)
    with open_store(data) as store:
        queue = AssignmentQueue(seed=3)
        queue.gold = gold
        queue.add(make_pairs(3))
        service = Service(store, queue, data=data, local_user="me")
        view = service.next("me")
        assert view["pair"]["pair_id"] == pair.pair_id
        side = "left" if view["pair"]["left"] == "Jupiter." else "right"
        ack = service.vote("me", pair.pair_id, side)["ack"]
        assert ack["gold"]["matched"] is True and ack["gold"]["expected"] == side
    (stored,) = read_comparisons(data).to_pylist()
    assert stored["choice"] == "b" and stored["response_b"] == "Jupiter."
    assert selection_of(stored["gen_params"]) == {"method": "gold", "gold": "b"}


# ---- the queue -----------------------------------------------------------------------


def vote_all(service: Service, user: str, limit: int = 10_000) -> int:
    """Vote 'left' on every pair the user gets; returns how many."""
    n = 0
    view = service.next(user)
    while view["pair"] is not None and n < limit:
        view = service.vote(user, view["pair"]["pair_id"], "left")
        assert view["ok"], view["message"]
        n += 1
    return n


def check_gold_votes(votes: list[dict], n_pool: int, rate: float, people: list[str]) -> None:
    """Each person: every pool pair once, each gold item at most once, gold at about
    `rate` of what they got (binomial: within 4 standard deviations)."""
    for person in people:
        mine = [v for v in votes if v["annotator"] == person]
        gold = [v["pair_id"] for v in mine if is_gold(v)]
        pool = [v["pair_id"] for v in mine if not is_gold(v)]
        assert len(gold) == len(set(gold)), "a gold item was shown twice"
        assert len(pool) == len(set(pool)) == n_pool
        # Gold takes the place of a pool pair with probability rate: gold ~ Binomial(handouts, rate)
        handouts = len(mine)
        sd = (handouts * rate * (1 - rate)) ** 0.5
        assert abs(len(gold) - rate * handouts) <= 4 * sd + 1, (len(gold), handouts)


def test_gold_is_mixed_in_at_the_rate_never_twice_and_outside_the_pools_overlap(tmp_path):
    data = tmp_path / "store"
    rate, n_pool = 0.2, 150
    with open_store(data) as store:
        queue = AssignmentQueue(overlap=2, seed=5)
        queue.gold = gold_items(tmp_path, 80, rate)
        queue.add(make_pairs(n_pool))
        service = Service(store, queue, data=data, local_user="me")
        for person in ("ann", "ben"):
            vote_all(service, person)
        overview = queue.overview()
    votes = read_comparisons(data).to_pylist()
    check_gold_votes(votes, n_pool, rate, ["ann", "ben"])
    # Two votes per pool pair fill it (K=2); gold votes filled none of its slots.
    assert overview["complete"] == overview["pairs"] == n_pool
    gold_votes = [v for v in votes if is_gold(v)]
    assert 40 < len(gold_votes) < 120
    assert all(v["pair_id"] in queue.gold for v in gold_votes)
    assert all(v["pair_id"] not in queue.gold for v in votes if not is_gold(v))


def test_a_restarted_server_never_gives_a_gold_item_again_and_skips_count(tmp_path):
    data = tmp_path / "store"
    with open_store(data) as store:
        queue = AssignmentQueue(seed=0)
        queue.gold = gold_items(tmp_path, 3, 1.0)  # every handout is gold while some are left
        queue.add(make_pairs(4))
        service = Service(store, queue, data=data, local_user="me")
        first = service.next("ann")["pair"]["pair_id"]
        service.skip("ann", first)  # skipped: never again for ann
        seen = {first}
        view = service.next("ann")
        for _ in range(2):
            seen.add(view["pair"]["pair_id"])
            view = service.vote("ann", view["pair"]["pair_id"], "left")
        assert seen == set(queue.gold.items)
    voted_gold = {v["pair_id"] for v in read_comparisons(data).to_pylist() if is_gold(v)}
    assert len(voted_gold) == 2 and first not in voted_gold
    with open_store(data) as store:  # a restart: votes come back from the store
        queue = AssignmentQueue(seed=0)
        queue.gold = gold_items(tmp_path, 3, 1.0)
        queue.add(make_pairs(4))
        queue.restore(read_comparisons(data))
        service = Service(store, queue, data=data, local_user="me")
        got = []
        view = service.next("ann")
        while view["pair"] is not None:
            got.append(view["pair"]["pair_id"])
            view = service.vote("ann", view["pair"]["pair_id"], "left")
    assert not set(got) & voted_gold, "a gold item ann voted on came back after a restart"
    pool = {p.pair_id for p in make_pairs(4)}
    assert pool <= set(got)
    # A directory store keeps skips in memory (annotate/queue.py): the skipped one may return.
    assert set(got) - pool <= {first}


def test_a_gold_item_is_never_a_pool_pair_nor_sent_back_for_relabelling(tmp_path):
    gold = gold_items(tmp_path, 2, 0.5)
    as_pool = [item.pair for item in gold.items.values()]
    queue = AssignmentQueue()
    queue.gold = gold
    assert queue.add([*make_pairs(3), *as_pool]) == 3, "the gold pairs in a pairs file stay gold"
    assert queue.requeue(as_pool) == {"queued": 0, "waiting": 0}
    assert {p.pair_id for p in queue.pool()} == {p.pair_id for p in make_pairs(3)}
    assert queue.overview()["pairs"] == 3


def test_what_the_client_receives_is_the_same_for_gold_and_pool_pairs(tmp_path):
    """The view (what the page renders and the API returns) of a gold item has the same
    keys, the same kind of id and the same acknowledgement as a pool pair's."""
    data = tmp_path / "store"
    with open_store(data) as store:
        queue = AssignmentQueue(seed=2)
        queue.gold = gold_items(tmp_path, 30, 0.5)
        queue.add(make_pairs(30))
        service = Service(store, queue, data=data, local_user="me")
        views = {True: [], False: []}
        acks = {True: [], False: []}
        view = service.next("ann")
        done = 0
        changes = {True: set(), False: set()}  # (done, assigned) after a vote minus before
        while view["pair"] is not None:
            gold = view["pair"]["pair_id"] in queue.gold
            views[gold].append(view)
            assert view["progress"]["done"] == done, "the counter moves on every vote, gold or not"
            before = view["progress"]
            view = service.vote("ann", view["pair"]["pair_id"], "right")
            acks[gold].append(view["ack"])
            after = view["progress"]
            changes[gold].add((after["done"] - before["done"], after["assigned"] - before["assigned"]))
            assert set(after) == {"done", "assigned"}  # no pool numbers: a gold vote completes none
            done += 1
    assert views[True] and views[False]
    assert changes[True] <= changes[False]  # the top bar moves after a gold vote as after any vote
    shape = re.compile(r"pair-[0-9a-f]{20}")
    for g in (True, False):
        for v in views[g]:
            assert set(v) == set(views[False][0]) and set(v["pair"]) == set(views[False][0]["pair"])
            assert shape.fullmatch(v["pair"]["pair_id"])
            assert "gold" not in json.dumps(v).lower() and "selection" not in json.dumps(v)
        for ack in acks[g]:
            assert set(ack) == {"event_id", "choice", "decision_ms", "left_model", "right_model"}
    # Sides are randomised for gold as for the pool: the right answer is on both sides.
    lefts = {v["pair"]["left"].startswith("right answer") for v in views[True]}
    assert lefts == {True, False}


def test_gold_feedback_tells_the_annotator_and_such_a_vote_cannot_be_undone(tmp_path):
    data = tmp_path / "store"
    with open_store(data) as store:
        queue = AssignmentQueue(seed=0)
        queue.gold = gold_items(tmp_path, 2, 1.0, feedback=True)
        queue.add(make_pairs(2))
        service = Service(store, queue, data=data, local_user="me")
        view = service.next("ann")
        wrong = "right" if view["pair"]["left"].startswith("right answer") else "left"
        view = service.vote("ann", view["pair"]["pair_id"], wrong)
        feedback = view["ack"]["gold"]
        assert feedback["matched"] is False and feedback["expected"] == (
            "left" if wrong == "right" else "right"
        )
        assert feedback["explanation"].startswith("Answer ")
        undo = service.undo("ann")
        assert undo["ok"] is False and "check item" in undo["message"]
        assert len(read_comparisons(data)) == 1, "the gold vote stands"
        # A pool vote is undone as always.
        pool_view = service.vote("ann", view["pair"]["pair_id"], "left")  # the second gold item
        while pool_view["pair"] is not None and pool_view["pair"]["pair_id"] in queue.gold:
            pool_view = service.vote("ann", pool_view["pair"]["pair_id"], "left")
        pool_view = service.vote("ann", pool_view["pair"]["pair_id"], "left")
        assert "gold" not in pool_view["ack"]
        assert service.undo("ann")["ok"] is True


def test_an_undone_gold_vote_comes_back_to_its_annotator_and_never_joins_the_pool(tmp_path):
    """Undo of a gold vote (allowed without --gold-feedback): the item is the voter's again,
    and neither the pool's count nor another annotator's next pair is touched by it."""
    data = tmp_path / "store"
    with open_store(data) as store:
        queue = AssignmentQueue(overlap=2, seed=0)
        queue.gold = gold_items(tmp_path, 3, 1.0)
        queue.add(make_pairs(4))
        service = Service(store, queue, data=data, local_user="me")
        view = service.next("ann")
        while view["pair"]["pair_id"] not in queue.gold:
            view = service.vote("ann", view["pair"]["pair_id"], "left")
        gold_id = view["pair"]["pair_id"]
        service.vote("ann", gold_id, "left")
        back = service.undo("ann")
        assert back["ok"] and back["pair"]["pair_id"] == gold_id  # the voter's again
        service.vote("ann", gold_id, "right")
        assert 0 <= queue.overview()["complete"] <= 4 and gold_id not in queue._open
        for name in ("ben", "ann"):  # both work to the end: pool pairs and their gold items
            view = service.next(name)
            while view["pair"] is not None:
                view = service.vote(name, view["pair"]["pair_id"], "left")
        assert queue.overview()["complete"] == 4  # every pool pair has its two votes


def test_a_corrected_gold_label_counts_after_a_restart(tmp_path):
    """Votes carry the gold label their item had; after the file is corrected and the server
    restarted, new votes carry the new label, not the one restored from the store."""
    data = tmp_path / "store"
    rows = gold_rows(1)
    with open_store(data) as store:
        queue = AssignmentQueue(seed=0)
        queue.gold = GoldItems(load_gold(write_jsonl(tmp_path / "gold.jsonl", rows)), 1.0, seed=1)
        queue.add(make_pairs(3))
        service = Service(store, queue, data=data, local_user="me")
        view = service.next("ann")
        while view["pair"]["pair_id"] not in queue.gold:
            view = service.vote("ann", view["pair"]["pair_id"], "left")
        service.vote("ann", view["pair"]["pair_id"], "left")
    (old,) = [r for r in read_comparisons(data).to_pylist() if is_gold(r)]
    rows[0]["gold"] = {"a": "b", "b": "a", "tie": "a"}[rows[0]["gold"]]
    corrected = GoldItems(load_gold(write_jsonl(tmp_path / "gold.jsonl", rows)), 1.0, seed=1)
    with open_store(data) as store:
        queue = AssignmentQueue(seed=0)
        queue.gold = corrected
        queue.add(make_pairs(3))
        queue.restore(read_comparisons(data))
        service = Service(store, queue, data=data, local_user="me")
        view = service.next("ben")
        while view["pair"]["pair_id"] not in queue.gold:
            view = service.vote("ben", view["pair"]["pair_id"], "left")
        service.vote("ben", view["pair"]["pair_id"], "left")
    new = [r for r in read_comparisons(data).to_pylist() if is_gold(r) and r["annotator"] == "ben"]
    assert (
        len(new) == 1
        and selection_of(new[0]["gen_params"])["gold"] != selection_of(old["gen_params"])["gold"]
    )


# ---- PostgreSQL: several servers -----------------------------------------------------


def test_gold_on_a_shared_store_at_the_rate_and_never_twice_across_servers(tmp_path, pg_url):
    from trainer.store.postgres import PostgresStore

    rate, n_pool = 0.25, 40
    stores = [PostgresStore(pg_url) for _ in range(2)]
    try:
        services = []
        for k, store in enumerate(stores):
            queue = AssignmentQueue(overlap=2, shared=store, seed=k)
            queue.gold = gold_items(tmp_path, 30, rate)
            queue.add(make_pairs(n_pool))
            votes, cursor = store.snapshot()
            queue.restore(votes, cursor=cursor)
            services.append(Service(store, queue, data=pg_url, local_user="me"))
        # Each person alternates between the two servers; the servers only learn of each
        # other's votes through the database (claims) and sync.
        for person in ("ann", "ben"):
            for turn in range(400):
                service = services[turn % 2]
                service.queue.sync()
                view = service.next(person)
                if view["pair"] is None:
                    other = services[(turn + 1) % 2]
                    other.queue.sync()
                    if other.next(person)["pair"] is None:
                        break
                    continue
                # Not ok when the pair handed out with the last vote's reply on the other
                # server was voted on there (one person in two tabs): nothing is stored.
                service.vote(person, view["pair"]["pair_id"], "left")
    finally:
        for store in stores:
            store.close()
    votes = read_comparisons(pg_url).to_pylist()
    check_gold_votes(votes, n_pool, rate, ["ann", "ben"])
    per_pair = {}
    for v in votes:
        if not is_gold(v):
            per_pair[v["pair_id"]] = per_pair.get(v["pair_id"], 0) + 1
    assert set(per_pair.values()) == {2}, "K=2 for every pool pair, gold votes aside"


def test_serve_refuses_a_bad_gold_file_before_it_opens_the_store(tmp_path):
    from helpers import preflab, write_pairs

    from trainer.store.pg_testserver import free_port

    rows = gold_rows(2)
    rows[1]["gold"] = "B is better"
    gold = write_jsonl(tmp_path / "gold.jsonl", rows)
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    result = preflab(
        "serve", "--pairs", pairs, "--gold", gold, "--data", tmp_path / "store", "--port", free_port()
    )
    assert result.returncode == 2
    assert f"{gold}:2: gold: must be 'a', 'b' or 'tie'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()
    result = preflab("serve", "--pairs", pairs, "--gold-feedback", "--data", tmp_path / "store")
    assert result.returncode == 2 and "--gold-feedback needs --gold FILE" in result.stderr
