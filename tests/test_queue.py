"""The assignment queue (annotate/queue.py) and the pairs-file loader (annotate/pairs.py).

Pure Python, no server: overlap, never-twice, leases, skip, undo, restart from a real
comparison store, and the generator's "keep two pairs ready" signal.
"""

import json
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import chat_vote_record, make_pairs, vote_record, write_store

from annotate.pairs import PairsFileError, load_pairs
from annotate.queue import AssignmentQueue, StaleVote
from trainer.store import read_comparisons
from trainer.store.directory_writer import DirectoryStore


def vote(q, name, choice="a"):
    """Take the next pair and vote on it (without a store); returns its pair_id or None."""
    a = q.next(name)
    if a is None:
        return None
    q.begin_vote(name, a.pair.pair_id)
    q.finish_vote(
        a,
        {
            "event_id": f"{name}-{a.pair.pair_id}",
            "pair_id": a.pair.pair_id,
            "left": a.left,
            "choice": choice,
            "annotator": name,
            **a.pair.record_fields(),
        },
    )
    return a.pair.pair_id


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# --------------------------------------------------------------------------------------
# overlap, never twice, balance
# --------------------------------------------------------------------------------------


def test_overlap_gives_each_pair_to_k_different_annotators_and_balances_work():
    q = AssignmentQueue(overlap=2, seed=0)
    q.add(make_pairs(6))
    voted = {name: [] for name in ("ann", "ben", "cat")}
    for _ in range(10):  # round robin until nothing is left
        for name in voted:
            pid = vote(q, name)
            if pid is not None:
                voted[name].append(pid)
    for name, pids in voted.items():
        assert len(pids) == len(set(pids)), f"{name} got a pair twice"
    per_pair = {}
    for name, pids in voted.items():
        for pid in pids:
            per_pair.setdefault(pid, set()).add(name)
    assert len(per_pair) == 6 and all(len(v) == 2 for v in per_pair.values())
    # 12 votes over 3 people: 4 each, and every two of them share some pairs (kappa exists)
    assert sorted(len(p) for p in voted.values()) == [4, 4, 4]
    for x, y in (("ann", "ben"), ("ann", "cat"), ("ben", "cat")):
        assert set(voted[x]) & set(voted[y])
    assert q.overview()["complete"] == 6 and q.overview()["open"] == 0
    assert all(
        q.progress(name) == {"done": 4, "assigned": 4, "pool_done": 6, "pool_total": 6} for name in voted
    )


def test_progress_reads_the_same_when_someone_logs_in_and_after_a_restart():
    q = AssignmentQueue(overlap=1, seed=0)
    q.add(make_pairs(12))
    cast = [("ann", vote(q, "ann")) for _ in range(3)] + [("ben", vote(q, "ben")) for _ in range(3)]
    before = q.progress("ann")
    assert before == {"done": 3, "assigned": 6, "pool_done": 6, "pool_total": 12}
    q.next("cat")  # a third annotator logs in and holds a pair, no vote yet
    assert q.progress("ann") == before  # nobody's target moved
    assert q.progress("cat")["assigned"] == 4  # cat's own share counts cat
    cast.append(("cat", vote(q, "cat")))  # once cat has voted, the pool is shared three ways
    assert q.progress("ann")["assigned"] == 4

    fresh = AssignmentQueue(overlap=1, seed=0)  # a restart: the same pool, the votes from the store
    fresh.add(make_pairs(12))
    fresh.restore([{"pair_id": p, "annotator": who, "created_at": k} for k, (who, p) in enumerate(cast)])
    assert fresh.progress("ann") == q.progress("ann")


def test_pool_done_matches_a_count_of_the_votes_through_votes_undos_requeues_and_restore():
    """progress()/overview() count complete pairs from the queue's open set; after any mix
    of votes, undos, skips, relabel requests and a restore it must equal a plain count."""
    import random

    rng = random.Random(7)
    pairs = make_pairs(12)
    q = AssignmentQueue(overlap=2, seed=1)
    q.add(pairs[:8])
    names = ["ann", "ben", "cat"]

    def counted(queue):
        return sum(
            1 for p in queue.pool() if len(queue._votes.get(p.pair_id, ())) >= queue._wanted(p.pair_id)
        )

    for step in range(120):
        name = rng.choice(names)
        move = rng.random()
        if move < 0.55:
            vote(q, name)
        elif move < 0.7:
            record = q.begin_undo(name)
            if record is not None:
                q.finish_undo(name, record)
        elif move < 0.8:
            a = q.next(name)
            if a is not None:
                q.skip(name, a.pair.pair_id)
        elif move < 0.9:
            q.requeue([rng.choice(q.pool())])
        elif step == 60:
            q.add(pairs[8:])
        assert q.overview()["complete"] == counted(q) == q.progress(name)["pool_done"], f"step {step}"
    votes = [
        {**r, "created_at": i} for i, r in enumerate(r for name in names for r in q._person(name).history)
    ]
    fresh = AssignmentQueue(overlap=2, seed=1)
    fresh.add(q.pool())
    fresh.restore(votes)
    assert fresh.overview()["complete"] == counted(fresh)


def test_partly_done_pairs_go_first():
    q = AssignmentQueue(overlap=2, seed=0)
    pairs = make_pairs(5)
    q.add(pairs)
    first = vote(q, "ann")
    # ben could take any of five; the one ann already voted on completes an agreement set
    assert q.next("ben").pair.pair_id == first


def test_leases_keep_two_annotators_off_the_same_slot():
    q = AssignmentQueue(overlap=1, seed=0)
    q.add(make_pairs(3))
    got = [q.next(name).pair.pair_id for name in ("ann", "ben", "cat")]
    assert len(set(got)) == 3
    assert q.next("dan") is None  # all three slots are leased
    assert q.next("ann").pair.pair_id == got[0]  # asking again returns the same pair


def test_an_expired_lease_frees_the_slot_but_its_holder_can_still_vote():
    clock = Clock()
    q = AssignmentQueue(overlap=1, lease_s=60, clock=clock, seed=0)
    q.add(make_pairs(1))
    held = q.next("ann")
    assert q.next("ben") is None
    clock.t += 61
    assert q.next("ben").pair.pair_id == held.pair.pair_id
    q.begin_vote("ann", held.pair.pair_id)  # not a StaleVote: ann still holds it


def test_many_threads_never_get_one_slot_twice():
    q = AssignmentQueue(overlap=1, seed=0)
    q.add(make_pairs(200))
    got, lock = [], threading.Lock()

    def worker(name):
        for _ in range(10):
            pid = vote(q, name)
            with lock:
                got.append(pid)

    threads = [threading.Thread(target=worker, args=(f"u{i}",)) for i in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert None not in got and len(got) == len(set(got)) == 200


# --------------------------------------------------------------------------------------
# votes, skips, undo
# --------------------------------------------------------------------------------------


def test_a_second_vote_on_the_same_pair_is_stale():
    q = AssignmentQueue(seed=0)
    q.add(make_pairs(2))
    a = q.next("ann")
    q.begin_vote("ann", a.pair.pair_id)
    with pytest.raises(StaleVote):  # a double click, or a second tab
        q.begin_vote("ann", a.pair.pair_id)
    with pytest.raises(StaleVote):  # a pair never given to ann
        q.begin_vote("ann", "pair-made-up")


def test_a_cancelled_vote_gives_the_pair_back():
    q = AssignmentQueue(seed=0)
    q.add(make_pairs(2))
    a = q.next("ann")
    q.begin_vote("ann", a.pair.pair_id)
    q.cancel_vote(a)  # the store refused the write
    assert q.next("ann").pair.pair_id == a.pair.pair_id
    assert q.progress("ann")["done"] == 0


def test_skip_sends_the_pair_to_someone_else_not_back():
    q = AssignmentQueue(overlap=1, seed=0)
    q.add(make_pairs(2))
    skipped = q.next("ann").pair.pair_id
    assert q.skip("ann", skipped)
    assert q.next("ann").pair.pair_id != skipped
    assert q.next("ben").pair.pair_id == skipped
    assert not q.skip("ann", skipped)  # not hers any more
    assert q.progress("ann")["assigned"] == 1  # a skipped pair is not hers to do


def test_undo_brings_the_pair_back_the_same_way_round_and_frees_its_slot():
    q = AssignmentQueue(overlap=1, seed=0)
    q.add(make_pairs(3))
    first = q.next("ann")
    vote_pid = vote(q, "ann")
    assert vote_pid == first.pair.pair_id
    looking_at = q.next("ann").pair.pair_id
    record = q.begin_undo("ann")
    assert record["pair_id"] == first.pair.pair_id
    back = q.finish_undo("ann", record)
    assert back.pair.pair_id == first.pair.pair_id and back.left == first.left
    assert q.next("ann").pair.pair_id == first.pair.pair_id
    assert q.progress("ann")["done"] == 0
    assert q.next("ben").pair.pair_id == looking_at  # released when the old pair came back
    assert q.begin_undo("ann") is None


def test_needs_pairs_keeps_two_ready_per_active_annotator():
    clock = Clock()
    q = AssignmentQueue(overlap=1, active_s=300, clock=clock, seed=0)
    assert q.needs_pairs(2)  # cold start: nothing at all
    q.add(make_pairs(2))
    assert not q.needs_pairs(2)  # two ready for a first annotator
    q.next("ann")
    assert q.needs_pairs(2)  # ann holds one: only one left for her
    q.add(make_pairs(3, prefix="more"))
    assert not q.needs_pairs(2)
    q.next("ben")
    q.next("cat")  # 3 active, 2 free slots left
    assert q.needs_pairs(2)
    clock.t += 301  # they all went away
    assert not q.needs_pairs(2)


# --------------------------------------------------------------------------------------
# restart: state from the store
# --------------------------------------------------------------------------------------


def test_restore_from_the_store_counts_votes_and_keeps_undo(tmp_path):
    pairs = make_pairs(4)
    q = AssignmentQueue(overlap=2, seed=0)
    q.add(pairs)
    with DirectoryStore(tmp_path / "store") as store:
        for name in ("ann", "ann", "ben"):
            a = q.next(name)
            q.begin_vote(name, a.pair.pair_id)
            rec = store.append(
                {
                    **a.pair.record_fields(),
                    "kind": "vote",
                    "left": a.left,
                    "choice": "a",
                    "annotator": name,
                    "decision_ms": 5,
                }
            )
            q.finish_vote(a, rec)
        # and one vote that was taken back: it must not count after the restart
        a = q.next("ben")
        q.begin_vote("ben", a.pair.pair_id)
        rec = store.append(
            {**a.pair.record_fields(), "kind": "vote", "left": a.left, "choice": "b", "annotator": "ben"}
        )
        store.retract(rec["event_id"], "ben", vote=rec)
    votes = read_comparisons(tmp_path / "store")
    assert votes.num_rows == 3

    fresh = AssignmentQueue(overlap=2, seed=1)
    fresh.restore(votes)  # before add(): a restart may load the votes first
    fresh.add(pairs)
    ann_voted = set(votes.filter(pc.equal(votes["annotator"], "ann"))["pair_id"].to_pylist())
    assert fresh.progress("ann")["done"] == 2
    for _ in range(2):
        a = fresh.next("ann")
        assert a.pair.pair_id not in ann_voted
        fresh.skip("ann", a.pair.pair_id)
    assert fresh.next("ann") is None
    # ben's retracted pair is open to him again; his standing vote is still undoable
    last = fresh.begin_undo("ben")
    assert last["choice"] == "a" and last["event_id"] in votes["event_id"].to_pylist()


def test_restore_keeps_only_the_latest_votes_for_undo():
    q = AssignmentQueue(history=3)
    rows = [{"pair_id": f"p{i}", "annotator": "ann", "created_at": i, "event_id": f"e{i}"} for i in range(10)]
    table = pa.Table.from_pylist(rows)
    q.restore(table)
    assert [q.begin_undo("ann")["event_id"] for _ in range(3)] == ["e9", "e8", "e7"]
    assert q.begin_undo("ann") is None


def test_restored_chat_votes_are_not_undoable_in_the_pair_queue(tmp_path):
    # A chat turn shown again as a pool pair would lose the history before it, and the
    # vote again would store it without (annotate/queue.py restore).
    store = write_store(
        tmp_path / "s",
        [
            vote_record("Plain?", "yes", "no", "a", annotator="ann"),
            chat_vote_record([("Hi.", "One.", "Two."), ("More?", "Three.", "Four.")], "a", annotator="ann"),
        ],
    )
    q = AssignmentQueue()
    q.restore(read_comparisons(store))
    last = q.begin_undo("ann")
    assert last is not None and last["conversation_a"] is None and last["response_a"] == "yes"
    assert q.begin_undo("ann") is None  # the chat vote was never in the undo history


# --------------------------------------------------------------------------------------
# pairs files
# --------------------------------------------------------------------------------------


def test_pairs_file_reports_bad_rows_as_file_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "Hi?", "response_a": "x", "response_b": "y"}
    lines = [
        json.dumps(good),
        "{broken json",
        json.dumps({"prompt": "no answers"}),
        "",
        json.dumps({"prompt": [{"role": "robot", "content": "hi"}], "response_a": "x", "response_b": "y"}),
        json.dumps(good),  # the same pair again
        json.dumps(
            {
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "response_a": "",
                "response_b": "Hello",
                "model_a": "m1",
                "model_b": "m2",
                "pair_id": "custom-1",
                "gen_params": {"a": {"seed": 1}},
            }
        ),
    ]
    path.write_text("\n".join(lines) + "\n")
    pairs, problems = load_pairs(path)
    assert [p.pair_id for p in pairs][1] == "custom-1" and len(pairs) == 2
    assert problems[0].startswith(f"{path}:2: invalid JSON")
    assert problems[1] == f"{path}:3: missing 'response_a'"
    assert problems[2].startswith(f"{path}:5: 'prompt' message 0 has role 'robot'")
    assert problems[3].startswith(f"{path}:6: duplicate pair_id") and "first on 1" in problems[3]
    first, chat = pairs
    assert json.loads(first.prompt) == [{"role": "user", "content": "Hi?"}]
    assert first.model_a == "unknown" and first.prompt_id.startswith("p-")
    assert chat.messages[0]["role"] == "system" and json.loads(chat.gen_params) == {"a": {"seed": 1}}


def test_pairs_file_parquet_and_errors(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": [{"role": "user", "content": "Q?"}], "response_a": "x", "response_b": "y"},
                {"prompt": [{"role": "user", "content": "R?"}], "response_a": None, "response_b": "y"},
            ]
        ),
        path,
    )
    pairs, problems = load_pairs(path)
    assert len(pairs) == 1 and problems == [f"{path}:row 2: missing 'response_a'"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{bad\n")
    with pytest.raises(PairsFileError, match="no usable pairs"):
        load_pairs(empty)
    with pytest.raises(PairsFileError, match="no such pairs file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "pairs.csv").write_text("prompt,response_a,response_b\n")
    with pytest.raises(PairsFileError, match="unknown pairs file type"):
        load_pairs(tmp_path / "pairs.csv")


def test_imported_votes_do_not_fill_slots_and_held_pairs_are_reported():
    pairs = make_pairs(2)
    q = AssignmentQueue(overlap=1, seed=0)
    q.restore([{"pair_id": pairs[0].pair_id, "annotator": "import:hh", "created_at": 1, "event_id": "e1"}])
    q.add(pairs)
    assert q.next("ann").pair.pair_id == pairs[0].pair_id  # an import is no one's work here
    assert q.begin_undo("import:hh") is None
    q.next("ben")
    assert q.next("cat") is None
    assert q.held_by_others("cat") == 2 and q.held_by_others("ann") == 1
    q.skip("ben", pairs[1].pair_id)
    assert q.next("cat").pair.pair_id == pairs[1].pair_id
