"""Review (annotate/review.py, scoring in annotate/scoring.py): voted pairs scored by a
real (tiny) reward model, the score cache per reward run, the disagreement ranking, and sending pairs back to the
queue for one more vote by someone else.

The reward model is the tiny random Llama, trained for a few steps
(helpers.train_tiny_reward_run): it does not need to be good, only real (scores come
from RewardModel.score).
"""

import json
import math

import pytest
from helpers import fake_run, train_tiny_reward_run

from annotate.pairs import pair_from_row
from annotate.queue import AssignmentQueue
from annotate.review import Reviewer, disagreements, review_rows, sigmoid, top_pairs
from annotate.scoring import PairScorer, content_key, item, items_from_pairs, items_from_votes
from trainer.runs import CHECKPOINT, RunDirError, reward_model_path, reward_runs
from trainer.store import messages_to_json, read_comparisons
from trainer.store.directory_writer import DirectoryStore


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    return train_tiny_reward_run(tmp_path_factory.mktemp("review") / "runs")


def pair_row(i: int, prompt: str | None = None) -> dict:
    return {
        "prompt": prompt or f"Question {i} about plants: what should I do?",
        "response_a": f"water it banana {i}",
        "response_b": f"the soil of day {i}",
        "model_a": "m1",
        "model_b": "m2",
    }


def cast(store, pair, annotator, choice, strength=None, left="a"):
    return store.append(
        {
            **pair.record_fields(),
            "kind": "vote",
            "left": left,
            "choice": choice,
            "strength": strength if choice in ("a", "b") else None,
            "annotator": annotator,
            "decision_ms": 1000,
        }
    )


# --------------------------------------------------------------------------------------
# Scoring and its cache
# --------------------------------------------------------------------------------------


def test_scores_are_the_reward_models_and_cached_per_run(reward_run, tmp_path):
    from trainer.reward_model import RewardModel

    pairs = [pair_from_row(pair_row(i)) for i in range(5)]
    data = tmp_path / "store"
    with DirectoryStore(data) as store:
        cast(store, pairs[0], "ann", "a", 2)
        cast(store, pairs[0], "ben", "b", 1)  # two votes on one pair: scored once
        cast(store, pairs[1], "ann", "tie")
        cast(store, pairs[2], "ann", "b")
        cast(store, pairs[3], "ben", "both_bad")
    reviewer = Reviewer(data, reward_run.parent)
    assert [r["id"] for r in reviewer.runs()] == [reward_run.name]
    reviewer.start(reward_run.name)
    job = reviewer.wait(reward_run.name)
    assert job["state"] == "done", job
    assert job["new"] == 4 and job["total"] == 4  # 4 distinct pairs went through the model
    rows = job["rows"]
    assert len(rows) == 5
    # the numbers are RewardModel.score's (normalised), and P(a beats b) their sigmoid
    rm = RewardModel.load(reward_run)
    for r in rows:
        a, b = rm.score([r["prompt"]] * 2, [r["response_a"], r["response_b"]])
        assert (r["score_a"], r["score_b"]) == pytest.approx((a, b), abs=1e-4)
        assert r["p_a"] == pytest.approx(1 / (1 + math.exp(-(a - b))), abs=1e-4)
        expected = {"a": r["p_a"], "b": 1 - r["p_a"]}.get(r["choice"])
        assert r["p_human"] == (pytest.approx(expected) if expected is not None else None)
    assert (reward_run / "review_scores.parquet").is_file()

    # A second look scores nothing new and gives the same numbers.
    reviewer.start(reward_run.name)
    again = reviewer.wait(reward_run.name)
    assert again["state"] == "done" and again["new"] == 0 and again["total"] == 0
    assert sorted((r["event_id"], r["score_a"], r["score_b"]) for r in again["rows"]) == sorted(
        (r["event_id"], r["score_a"], r["score_b"]) for r in rows
    )

    # A new vote on a new pair: only that pair is scored.
    with DirectoryStore(data) as store:
        cast(store, pairs[4], "cat", "a", 1)
    reviewer.start(reward_run.name)
    third = reviewer.wait(reward_run.name)
    assert third["new"] == 1 and len(third["rows"]) == 6

    # Another process (a restarted server) finds every score on disk: no model is loaded.
    def refuse(path):
        raise AssertionError("the model was loaded although every score is cached")

    fresh = PairScorer(reward_run, loader=refuse)
    votes = read_comparisons(data).to_pylist()
    assert fresh.missing(items_from_votes(votes)) == []
    assert len(fresh.score(items_from_votes(votes))) == 5 and fresh.computed == 0


def test_cache_belongs_to_one_checkpoint(reward_run, tmp_path):
    """Scores cached for other weights are never served for these."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    it = item("p-x", messages_to_json([{"role": "user", "content": "hi"}]), "yes", "no")
    copy = tmp_path / "runs" / "rm-copy"
    import shutil

    shutil.copytree(reward_run, copy)
    pq.write_table(
        pa.table(
            {
                "key": [it.key],
                "pair_id": ["p-x"],
                "checkpoint": ["someone-else"],
                "score_a": [9.0],
                "score_b": [-9.0],
            }
        ),
        copy / "review_scores.parquet",
    )
    scorer = PairScorer(copy)
    assert scorer.missing([it]) == [it]
    a, b = scorer.score([it])[it.key]
    assert (a, b) != (9.0, -9.0) and scorer.computed == 1


# --------------------------------------------------------------------------------------
# Ranking disagreements (hand-made scores)
# --------------------------------------------------------------------------------------


def test_disagreements_rank_decisive_votes_by_how_sure_the_model_is_against_them():
    def v(event_id, pair_id, choice, i):
        return {
            "event_id": event_id,
            "pair_id": pair_id,
            "prompt": messages_to_json([{"role": "user", "content": f"q{i}"}]),
            "response_a": f"a{i}",
            "response_b": f"b{i}",
            "choice": choice,
            "annotator": "ann",
            "model_a": "m1",
            "model_b": "m2",
            "created_at": None,
        }

    votes = [
        v("e1", "p1", "a", 1),  # model: a far ahead -> agrees
        v("e2", "p2", "a", 2),  # model: b far ahead -> strong disagreement
        v("e3", "p3", "b", 3),  # model: a slightly ahead -> mild disagreement
        v("e4", "p4", "tie", 4),  # no side: never a disagreement
        v("e5", "p2", "b", 2),  # a second vote on p2, agreeing with the model
        v("e6", "p6", "both_bad", 6),
        v("e7", "p7", "b", 7),
    ]  # model: b ahead -> agrees
    scores = {}
    for s, (_i, sa, sb) in zip(
        votes,
        [
            (1, 3.0, -1.0),
            (2, -2.0, 2.0),
            (3, 0.3, 0.0),
            (4, 0.0, 5.0),
            (2, -2.0, 2.0),
            (6, 1.0, 1.0),
            (7, -1.0, 0.5),
        ],
    ):
        scores[content_key(s["prompt"], s["response_a"], s["response_b"])] = (sa, sb)
    rows = review_rows(votes, scores)
    by_event = {r["event_id"]: r for r in rows}
    assert by_event["e2"]["p_human"] == pytest.approx(sigmoid(-4.0))
    assert by_event["e3"]["p_human"] == pytest.approx(1 - sigmoid(0.3))
    assert by_event["e4"]["p_human"] is None and by_event["e4"]["agree"] is None
    ranked = [r["event_id"] for r in disagreements(rows)]
    assert ranked == ["e2", "e3"]  # real disagreements only, lowest P(human's side) first
    assert all(r["agree"] is False for r in disagreements(rows))
    assert top_pairs(rows, 1) == ["p2"]
    assert top_pairs(rows, 10) == ["p2", "p3"]  # nothing the model agrees with is sent back


def test_review_rows_say_it_as_the_annotator_saw_it():
    def vote(left, choice):
        return {"event_id": "e", "pair_id": "p", "prompt": "[]", "response_a": "x", "response_b": "y",
                "left": left, "choice": choice}  # fmt: skip

    scores = {content_key("[]", "x", "y"): (2.0, -1.0)}  # the model prefers answer a
    shown_a_left, shown_b_left = review_rows([vote("a", "a"), vote("b", "a")], scores)
    assert shown_a_left["side"] == "left" and shown_b_left["side"] == "right"  # a was on the right
    assert shown_a_left["p_left"] == pytest.approx(sigmoid(3.0))
    assert shown_b_left["p_left"] == pytest.approx(1 - sigmoid(3.0))
    assert (shown_b_left["score_left"], shown_b_left["score_right"]) == (-1.0, 2.0)
    assert shown_a_left["p_human"] == shown_b_left["p_human"]  # the same vote, either way shown
    (tie,) = review_rows([vote("b", "tie")], scores)
    assert tie["side"] is None and tie["p_human"] is None


# --------------------------------------------------------------------------------------
# Sending pairs back for one more vote
# --------------------------------------------------------------------------------------


def test_requeue_sends_a_pair_to_a_different_annotator_never_the_same_twice(tmp_path):
    pairs = [pair_from_row(pair_row(i)) for i in range(4)]
    data = tmp_path / "store"
    with DirectoryStore(data) as store:
        for p in pairs[:3]:
            cast(store, p, "ann", "a", 2)
        cast(store, pairs[0], "ben", "b")
    # a server restarted on the store: pairs 0-2 are done (overlap 1), pair 3 is fresh
    q = AssignmentQueue(overlap=1, seed=0)
    q.add(pairs)
    q.restore(read_comparisons(data))
    reviewer = Reviewer(data, tmp_path / "runs", q)
    report = reviewer.requeue("rm-x", [pairs[0].pair_id, pairs[1].pair_id, "pair-unknown"])
    assert (report["queued"], report["unknown"]) == (2, 1)
    assert "Queued 2 pairs" in report["message"]
    again = reviewer.requeue("rm-x", [pairs[1].pair_id])
    assert again["queued"] == 0 and again["waiting"] == 1  # already waiting: not asked twice

    # ann voted on both: she gets only the fresh pair, never a requeued one
    a = q.next("ann")
    assert a.pair.pair_id == pairs[3].pair_id
    q.skip("ann", a.pair.pair_id)
    assert q.next("ann") is None
    # ben voted on pair 0 only: pair 1 comes to him before the fresh pair, pair 0 never
    b = q.next("ben")
    assert b.pair.pair_id == pairs[1].pair_id
    how = json.loads(b.pair.gen_params)["selection"]
    assert how == {"method": "relabel", "reward_run": "rm-x"}
    with DirectoryStore(data) as store:
        q.begin_vote("ben", b.pair.pair_id)
        q.finish_vote(b, cast(store, b.pair, "ben", "b"))
    assert q.next("ben").pair.pair_id == pairs[3].pair_id
    # cat is the one who gets pair 0 back; pair 1 had its extra vote and is done
    c = q.next("cat")
    assert c.pair.pair_id == pairs[0].pair_id
    q.skip("cat", c.pair.pair_id)
    assert q.next("cat") is None  # pair 1 had its extra vote, pair 3 is with ben
    votes = read_comparisons(data).to_pylist()
    relabel = [r for r in votes if r["gen_params"] and "relabel" in r["gen_params"]]
    assert [(r["pair_id"], r["annotator"]) for r in relabel] == [(pairs[1].pair_id, "ben")]
    per_pair = {}
    for r in votes:
        per_pair.setdefault(r["pair_id"], []).append(r["annotator"])
    assert all(len(names) == len(set(names)) for names in per_pair.values())


def test_a_pair_outside_the_pool_joins_it_when_sent_back(tmp_path):
    """Votes from an earlier pairs file (or imported ones) can be relabelled too."""
    old = pair_from_row(pair_row(0, prompt="An old question?"))
    data = tmp_path / "store"
    with DirectoryStore(data) as store:
        cast(store, old, "ann", "a")
    q = AssignmentQueue(overlap=1, seed=0)
    q.add([pair_from_row(pair_row(1))])
    q.restore(read_comparisons(data))
    assert Reviewer(data, tmp_path / "runs", q).requeue("rm", [old.pair_id])["queued"] == 1
    assert q.next("ann").pair.pair_id != old.pair_id
    assert q.next("ben").pair.pair_id == old.pair_id


# --------------------------------------------------------------------------------------
# Which runs can be used
# --------------------------------------------------------------------------------------


def test_only_finished_reward_runs_are_offered(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "rm-done")
    fake_run(runs / "rm-busy", state="running")
    fake_run(runs / "policy-1", reward=False)
    (runs / "notes").mkdir()
    assert [r["id"] for r in reward_runs(runs)] == ["rm-done"]
    assert reward_model_path(runs / "rm-done") == runs / "rm-done" / CHECKPOINT
    with pytest.raises(RunDirError, match="running, not done .training: step 4 of 10."):
        reward_model_path(runs / "rm-busy")
    with pytest.raises(RunDirError, match="not a reward model run"):
        reward_model_path(runs / "policy-1")
    with pytest.raises(RunDirError, match="not a run directory"):
        reward_model_path(runs / "notes")
    reviewer = Reviewer(tmp_path / "store", runs)
    with pytest.raises(RunDirError, match="running, not done"):
        reviewer.start("rm-busy")


# --------------------------------------------------------------------------------------
# The sampler's scores come from the same scorer (tests of the policy: test_sampling.py)
# --------------------------------------------------------------------------------------


def test_sampler_scores_a_pairs_file_in_the_background(reward_run):
    from annotate.sampling import UncertaintySampler, selection_of

    pairs = [pair_from_row(pair_row(i, prompt=f"Sampler question {i}?")) for i in range(6)]  # not cached yet
    q = AssignmentQueue(overlap=1, seed=0)
    q.add(pairs)
    sampler = UncertaintySampler(0.0, reward_run=reward_run.name, seed=0)
    sampler.scorer = PairScorer(reward_run)
    sampler.attach(q)
    sampler.thread.join(120)
    assert sampler.status()["state"] == "done", sampler.status()
    items = items_from_pairs(pairs)
    scores = sampler.scorer.cached(items)
    assert len(scores) == 6 and sampler.scorer.computed == 6
    gaps = {it.pair_id: abs(scores[it.key][0] - scores[it.key][1]) for it in items}
    assert sampler.gaps == pytest.approx(gaps)
    a = q.next("ann")
    assert a.pair.pair_id == min(gaps, key=gaps.get)
    assert selection_of(a.pair.gen_params)["gap"] == pytest.approx(gaps[a.pair.pair_id], abs=1e-5)


def test_generated_batches_are_scored_before_they_enter_the_queue(reward_run, tmp_path):
    from annotate.pair_generator import Generator
    from annotate.sampling import UncertaintySampler
    from trainer.prompts import load_prompt_pool

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Name a fruit, {i}."}) + "\n" for i in range(3))
    )
    q = AssignmentQueue()
    sampler = UncertaintySampler(0.0, reward_run=reward_run.name, seed=0)
    sampler.scorer = PairScorer(reward_run)
    unscored_on_arrival = []
    add = q.add

    def checked_add(new):
        new = list(new)
        unscored_on_arrival.extend(p.pair_id for p in new if p.pair_id not in sampler.gaps)
        return add(new)

    q.add = checked_add
    gen = Generator(
        ["tiny"],
        load_prompt_pool(prompts).prompts,
        q,
        cache_dir=None,
        batch_size=2,
        max_new_tokens=4,
        per_annotator=100,
    )
    sampler.attach(q, gen)
    gen.run()
    assert gen.status()["state"] == "done", gen.status()
    assert len(q.pool()) == 3 and unscored_on_arrival == []
    assert set(sampler.gaps) == {p.pair_id for p in q.pool()}
