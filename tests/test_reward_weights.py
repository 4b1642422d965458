"""Vote weights in reward training: `train-reward --weights none|gold|competence`
(trainer/reward_data.py carries them, trainer/reward.py weighs the Bradley-Terry loss).

The team is helpers.team_votes: two careful annotators, a random clicker and an
adversary voting on the hidden-rule task (the banana answer is the better one).
"""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import TINY, banana_rows, preflab, team_votes, vote_record, write_jsonl, write_store

from trainer.annotator_quality import annotator_weights
from trainer.pair_snapshot import load_snapshot, save_snapshot
from trainer.reward import train
from trainer.reward_data import RewardDataError, read_pairs, split_by_prompt
from trainer.reward_model import RewardModel
from trainer.store import read_comparisons


def oriented(record) -> tuple[str, str]:
    a, b = record["response_a"], record["response_b"]
    return (a, b) if record["choice"] == "a" else (b, a)


def test_pairs_carry_the_weight_of_their_vote_computed_from_all_votes(tmp_path):
    records = team_votes(60)
    # a tie and a both-bad vote: they count for the weights even where training leaves them out
    records += [
        vote_record("q?", "x", "y", "tie", annotator="careful-1"),
        vote_record("q?", "x", "y", "both_bad", annotator="adversary"),
    ]
    store = write_store(tmp_path / "store", records)
    per_annotator = annotator_weights(read_comparisons(store), "competence")
    assert per_annotator["adversary"] == 0.0 and per_annotator["careful-1"] > 0.7

    pairs = read_pairs(store, weights="competence")
    got = Counter((c, r, round(w, 6)) for c, r, w in zip(pairs.chosen, pairs.rejected, pairs.weight))
    decisive = [r for r in records if r["choice"] in ("a", "b")]
    expect = Counter((*oriented(r), round(per_annotator[r["annotator"]], 6)) for r in decisive)
    assert got == expect  # each pair has its own vote's weight
    info = pairs.summary["weights"]
    assert info["mode"] == "competence" and info["per_annotator"]["adversary"] == 0.0
    assert info["zero_weight_pairs"] == sum(r["annotator"] == "adversary" for r in decisive)

    assert read_pairs(store).weight == [1.0] * len(decisive)  # --weights none
    with pytest.raises(RewardDataError, match="--weights gold: the store holds no gold votes"):
        read_pairs(store, weights="gold")
    trl = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(8))
    with pytest.raises(RewardDataError, match="--weights competence needs a comparison store"):
        read_pairs(trl, weights="competence")


def test_the_snapshot_keeps_the_weights_and_reads_an_old_one_as_unweighted(tmp_path):
    store = write_store(tmp_path / "store", team_votes(30))
    pairs = read_pairs(store, weights="competence")
    train_idx, val_idx = split_by_prompt(pairs, 0.25, 0)
    save_snapshot(pairs, train_idx, val_idx, tmp_path / "data.parquet")
    again, t, v = load_snapshot(tmp_path / "data.parquet")
    assert np.allclose(again.weight, pairs.weight) and list(t) == list(train_idx)
    # a snapshot written before --weights existed has no weight column: every vote weighed 1
    table = pq.read_table(tmp_path / "data.parquet").drop_columns(["weight"])
    pq.write_table(table, tmp_path / "old.parquet")
    assert load_snapshot(tmp_path / "old.parquet")[0].weight == [1.0] * len(pairs)


def test_bad_weights_fail_before_a_model_is_loaded(tmp_path):
    store = write_store(tmp_path / "store", team_votes(10))
    out = preflab("train-reward", "--data", store, "--weights", "trust-me", "--model", "tiny")
    assert out.returncode == 2 and "--weights" in out.stderr and "invalid choice" in out.stderr
    out = preflab(
        "train-reward",
        "--data",
        store,
        "--weights",
        "gold",
        "--model",
        "tiny",
        "--runs-dir",
        tmp_path / "runs",
    )
    assert out.returncode == 2, out.stderr
    assert "--weights gold: the store holds no gold votes" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # bad input: no run directory left behind


def test_gold_weights_reach_the_pairs(tmp_path):
    def gold(answer):
        return json.dumps({"selection": {"method": "gold", "gold": answer}})

    records = team_votes(20)
    # careful-1 passes 4 of 4 gold checks, the adversary fails all 4
    for i in range(4):
        for name, choice in (("careful-1", "a"), ("adversary", "b")):
            records.append(
                vote_record(
                    f"gold {i}?", f"good {i}", f"bad {i}", choice, annotator=name, gen_params=gold("a")
                )
            )
    store = write_store(tmp_path / "store", records)
    pairs = read_pairs(store, weights="gold")
    by_answer = {(c, r): w for c, r, w in zip(pairs.chosen, pairs.rejected, pairs.weight)}
    pooled, prior = 0.5, 4.0  # 4 right of 8; a Beta prior worth 4 checks at that rate
    assert by_answer[("good 0", "bad 0")] == pytest.approx((4 + prior * pooled) / (4 + prior))
    assert by_answer[("bad 0", "good 0")] == pytest.approx((0 + prior * pooled) / (4 + prior))
    # careful-2 and the random clicker have no gold of their own: the team's rate
    others = sum(r["annotator"] in ("careful-2", "random") for r in records)
    assert sum(w == pytest.approx(pooled) for w in pairs.weight) == others


def true_accuracy(run_dir) -> tuple[float, int]:
    """The reward model's accuracy on the TRUE labels (the banana answer is better) of the
    distinct validation pairs: the votes' own labels are half wrong by design."""
    snap = [r for r in pq.read_table(run_dir / "data.parquet").to_pylist() if r["split"] == "val"]
    distinct = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))): r for r in snap}
    prompts, good, bad = [], [], []
    for (prompt, _), r in distinct.items():
        banana_first = "banana" in r["chosen"].split()
        prompts.append(json.loads(prompt))
        good.append(r["chosen"] if banana_first else r["rejected"])
        bad.append(r["rejected"] if banana_first else r["chosen"])
    scores = np.array(RewardModel.load(run_dir, device=TINY["device"]).score(prompts * 2, good + bad))
    return float((scores[: len(good)] > scores[len(good) :]).mean()), len(good)


def test_competence_weights_beat_unweighted_training_on_a_team_with_bad_annotators(tmp_path):
    """The issue's test. Half the pairs are voted by both careful annotators and the
    adversary, the other half by the adversary and the random clicker: the adversary, the
    most prolific, is on every pair (spammers are). So the unweighted votes carry no net
    signal (about half of them prefer the banana answer), while Dawid-Skene sees, on the
    first half, two annotators who agree and one who always says the opposite, and gives
    the careful ones most of the weight and the other two almost none.

    (With every annotator on a random 3 of 4 pairs instead, 62% of the votes are right and
    both models learn this easy rule perfectly, so that team could not tell them apart.)"""

    def voters(rng):
        return ["careful-1", "careful-2", "adversary"] if rng.random() < 0.5 else ["adversary", "random"]

    records = team_votes(160, voters=voters)
    right = np.mean(["banana" in oriented(r)[0].split() for r in records])
    assert 0.45 < right < 0.55  # no majority for the truth among all the votes
    store = write_store(tmp_path / "store", records)
    settings = {**TINY, "data": str(store), "epochs": 2, "lr": 3e-3, "batch_size": 16, "val_fraction": 0.25}
    results = {}
    for mode in ("none", "competence"):
        run_dir = tmp_path / "runs" / mode
        assert train({**settings, "run_dir": str(run_dir), "weights": mode}) == 0
        results[mode] = true_accuracy(run_dir)
    (weighted, n), (unweighted, _) = results["competence"], results["none"]
    assert n >= 30
    assert weighted >= 0.85 and weighted - unweighted >= 0.2, results

    # The weighting is on record: the settings, what it did, the summary.
    config = json.loads((tmp_path / "runs" / "competence" / "config.json").read_text())
    assert config["config"]["weights"] == "competence" and config["weights"] == "competence"
    per = config["data"]["weights"]["per_annotator"]
    assert per["adversary"] == 0.0 and min(per["careful-1"], per["careful-2"]) > 0.7 > per["random"]
    assert "have weight 0 and are left out" in config["weights_note"]
    plain = json.loads((tmp_path / "runs" / "none" / "config.json").read_text())
    assert config["train_pairs"] < plain["train_pairs"]  # the adversary's votes were left out
    summary = json.loads((tmp_path / "runs" / "competence" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["kind"] == "summary" and summary["weights"] == "competence"
    # Validation is unweighted and on every vote as cast: both runs were measured on the
    # same validation votes.
    assert (
        summary["val_pairs"]
        == json.loads((tmp_path / "runs" / "none" / "metrics.jsonl").read_text().splitlines()[-1])[
            "val_pairs"
        ]
    )
