"""Uncertainty sampling (annotate/sampling.py) through the assignment queue, and the
`preflab serve` flags that turn it on. No model: gaps are set by hand here; the
reward-model scoring itself (annotate/scoring.py) is tested in test_review.py and
test_review_browser.py.
"""

import json
import random

import pytest
from helpers import fake_run, make_pairs, write_pairs

from annotate.pairs import pair_from_row
from annotate.queue import AssignmentQueue
from annotate.sampling import SamplingError, UncertaintySampler, selection_of, with_selection
from trainer.store import read_comparisons
from trainer.store.directory_writer import DirectoryStore


def hand_out_all(q, name="ann"):
    """One annotator takes and votes every pair; returns [(pair_id, selection)] in order."""
    out = []
    while True:
        a = q.next(name)
        if a is None:
            return out
        out.append((a.pair.pair_id, selection_of(a.pair.gen_params)))
        q.begin_vote(name, a.pair.pair_id)
        q.finish_vote(
            a,
            {
                "event_id": f"{name}-{a.pair.pair_id}",
                "pair_id": a.pair.pair_id,
                "left": a.left,
                "choice": "a",
                "annotator": name,
                **a.pair.record_fields(),
            },
        )


def queue_with(pairs, gaps, *, mix, seed, overlap=1):
    q = AssignmentQueue(overlap=overlap, seed=0)
    q.add(pairs)
    sampler = UncertaintySampler(mix, reward_run="rm-test", seed=seed)
    sampler.set_gaps(gaps)
    q.policy = sampler
    return q


def test_smallest_gaps_go_first_apart_from_the_random_share():
    pairs = make_pairs(80)
    rng = random.Random(5)
    gaps = {p.pair_id: rng.uniform(0, 3) for p in pairs}
    order = hand_out_all(queue_with(pairs, gaps, mix=0.3, seed=11))
    assert sorted(pid for pid, _ in order) == sorted(gaps)  # every pair, once
    methods = [how["method"] for _, how in order]
    assert set(methods) == {"random", "uncertain"}
    assert 0.1 <= methods.count("random") / len(methods) <= 0.5  # about mix of the handouts
    remaining = set(gaps)
    for pid, how in order:
        assert how["mix"] == 0.3 and how["reward_run"] == "rm-test"
        assert how["gap"] == pytest.approx(gaps[pid], abs=1e-5)
        if how["method"] == "uncertain":  # the most uncertain pair still open, every time
            assert gaps[pid] == min(gaps[p] for p in remaining)
        remaining.discard(pid)
    # so the model-chosen ones come out in rising gap order
    chosen = [gaps[pid] for pid, how in order if how["method"] == "uncertain"]
    assert chosen == sorted(chosen)
    # without the random share, exactly smallest gap first
    strict = hand_out_all(queue_with(pairs, gaps, mix=0.0, seed=11))
    assert [pid for pid, _ in strict] == sorted(gaps, key=gaps.get)


def test_mix_one_hands_out_independently_of_the_scores():
    pairs = make_pairs(40)
    ids = [p.pair_id for p in pairs]
    one = {pid: float(k) for k, pid in enumerate(ids)}
    other = {pid: float(-k) for k, pid in enumerate(ids)}
    first = hand_out_all(queue_with(pairs, one, mix=1.0, seed=3))
    second = hand_out_all(queue_with(pairs, other, mix=1.0, seed=3))
    unscored = hand_out_all(queue_with(pairs, {}, mix=1.0, seed=3))
    assert [p for p, _ in first] == [p for p, _ in second] == [p for p, _ in unscored]
    assert all(how["method"] == "random" for _, how in first + second + unscored)
    assert [p for p, _ in first] != ids  # drawn, not arrival order


def test_unscored_pairs_still_go_out():
    pairs = make_pairs(20)
    gaps = {p.pair_id: 0.1 * k for k, p in enumerate(pairs[:10])}  # half the pool scored so far
    order = hand_out_all(queue_with(pairs, gaps, mix=0.0, seed=1))
    assert len(order) == 20
    assert [p for p, _ in order[:10]] == sorted(gaps, key=gaps.get)  # scored ones first, by gap
    assert {how["method"] for _, how in order[10:]} == {"unscored"}
    assert {p for p, _ in order[10:]} == {p.pair_id for p in pairs[10:]}
    # scores that arrive while annotators work are used from the next handout on
    q = queue_with(pairs, {}, mix=0.0, seed=1)
    first = q.next("ann")
    assert selection_of(first.pair.gen_params)["method"] == "unscored"
    q.policy.set_gaps({pairs[15].pair_id: 0.01})
    assert q.next("ben").pair.pair_id == pairs[15].pair_id


def test_partly_done_pairs_keep_their_selection_and_go_first():
    pairs = make_pairs(10)
    gaps = {p.pair_id: float(k) for k, p in enumerate(pairs)}
    q = queue_with(pairs, gaps, mix=0.0, seed=0, overlap=2)
    a = q.next("ann")
    assert a.pair.pair_id == pairs[0].pair_id
    b = q.next("ben")  # the pair ann holds has a free slot: agreement sets first
    assert b.pair.pair_id == a.pair.pair_id
    assert a.pair.gen_params == b.pair.gen_params
    assert selection_of(b.pair.gen_params) == {
        "method": "uncertain",
        "gap": 0.0,
        "mix": 0.0,
        "reward_run": "rm-test",
    }


def test_selection_goes_into_the_stored_vote_and_survives_a_restart(tmp_path):
    rows = [
        {
            "prompt": f"q{i}?",
            "response_a": f"a{i}",
            "response_b": f"b{i}",
            "gen_params": {"a": {"seed": 2 * i}, "b": {"seed": 2 * i + 1}},
        }
        for i in range(4)
    ]
    rows.append({"prompt": "odd?", "response_a": "x", "response_b": "y", "gen_params": "[1, 2]"})
    pairs = [pair_from_row(r) for r in rows]
    gaps = {p.pair_id: float(k) for k, p in enumerate(pairs)}
    q = queue_with(pairs, gaps, mix=0.0, seed=0, overlap=2)
    with DirectoryStore(tmp_path / "store") as store:
        for _ in range(len(pairs)):  # ann votes on everything; each vote is stored
            a = q.next("ann")
            q.begin_vote("ann", a.pair.pair_id)
            stored = store.append(
                {**a.pair.record_fields(), "kind": "vote", "left": a.left, "choice": "a", "annotator": "ann"}
            )
            q.finish_vote(a, stored)
    votes = read_comparisons(tmp_path / "store")
    by_pair = {r["pair_id"]: json.loads(r["gen_params"]) for r in votes.to_pylist()}
    for k, p in enumerate(pairs[:4]):
        params = by_pair[p.pair_id]
        assert params["a"] == {"seed": 2 * k} and params["b"] == {"seed": 2 * k + 1}  # kept
        assert params["selection"]["method"] == "uncertain" and params["selection"]["gap"] == float(k)
    assert by_pair[pairs[4].pair_id]["original"] == [1, 2]  # a non-object gen_params is kept too
    # A restarted server: the second vote on each pair records the selection of the first.
    q2 = queue_with(pairs, {}, mix=1.0, seed=0, overlap=2)
    q2.restore(votes)
    b = q2.next("ben")
    assert b.pair.pair_id == pairs[0].pair_id
    assert selection_of(b.pair.gen_params)["method"] == "uncertain"
    assert json.loads(b.pair.gen_params)["a"] == {"seed": 0}
    # and the selection is replaced, never nested, when recorded again
    again = with_selection(b.pair, {"method": "relabel"})
    assert json.loads(again.gen_params)["selection"] == {"method": "relabel"}


def test_mix_must_be_a_share():
    with pytest.raises(SamplingError, match="between 0 and 1"):
        UncertaintySampler(1.5)


# --------------------------------------------------------------------------------------
# preflab serve flags
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "no_reward_model",
        "not_done",
        "policy_run",
        "no_such_run",
        "bad_mix",
        "reward_model_without_uncertain",
        "mix_without_uncertain",
    ],
)
def test_serve_flag_errors(tmp_path, case, capsys):
    from annotate.cli import main as preflab

    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = ["serve", "--pairs", str(pairs), "--data", str(tmp_path / "store"), "--port", "1"]
    if case == "no_reward_model":
        extra, expect = ["--sampling", "uncertain"], "--sampling uncertain needs --reward-model"
    elif case == "not_done":
        run = fake_run(tmp_path / "runs" / "rm-busy", state="running")
        extra, expect = (
            ["--sampling", "uncertain", "--reward-model", str(run)],
            "the reward run is running, not done",
        )
    elif case == "policy_run":
        run = fake_run(tmp_path / "runs" / "policy-1", reward=False)
        extra, expect = ["--sampling", "uncertain", "--reward-model", str(run)], "not a reward model run"
    elif case == "no_such_run":
        extra, expect = (
            ["--sampling", "uncertain", "--reward-model", str(tmp_path / "nope")],
            "no such run directory",
        )
    elif case == "bad_mix":
        run = fake_run(tmp_path / "runs" / "rm-1")
        extra = ["--sampling", "uncertain", "--reward-model", str(run), "--uncertain-mix", "1.5"]
        expect = "--uncertain-mix must be between 0 and 1"
    elif case == "reward_model_without_uncertain":
        run = fake_run(tmp_path / "runs" / "rm-1")
        extra, expect = ["--reward-model", str(run)], "--reward-model is for --sampling uncertain"
    else:
        extra, expect = ["--uncertain-mix", "0.2"], "--uncertain-mix is for --sampling uncertain"
    assert preflab(args + extra) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert not (tmp_path / "store").exists()  # refused before anything was written
