"""Annotator quality (trainer/annotator_quality.py, trainer/dawid_skene.py) and
`preflab annotators` (annotate/annotators_command.py), on real Parquet stores.

The simulated team on the hidden-rule task is helpers.team_votes; the Dawid-Skene
test simulates its own annotators of known reliability.
"""

import json
import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from helpers import TEAM, preflab, team_votes, vote_record, write_store

from trainer.annotator_quality import (
    GOLD_PRIOR_CHECKS,
    AnnotatorQualityError,
    annotator_table,
    dawid_skene,
    spearman,
    vote_weights,
    wilson_interval,
)
from trainer.selection import gold_of, selection_of
from trainer.store import read_comparisons

T0 = datetime(2026, 1, 5, 9, tzinfo=UTC)


def gold_params(answer: str) -> str:
    return json.dumps({"a": {}, "b": {}, "selection": {"method": "gold", "gold": answer, "item": "g"}})


def vote(pair: str, who: str, choice: str, at: float = 0.0, **fields):
    """A vote on pair `pair` (its own prompt and answers) by `who`, `at` seconds after T0."""
    return vote_record(
        f"prompt of {pair}",
        f"answer a of {pair}",
        f"answer b of {pair}",
        choice,
        pair_id=pair,
        annotator=who,
        created_at=T0 + timedelta(seconds=at),
        **fields,
    )


def by_name(rows):
    return {r["annotator"]: r for r in rows}


# --------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    low, high = wilson_interval(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)  # Wilson 1927, z = 1.96
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert wilson_interval(7, 10, z=1.0)[1] < high  # a narrower interval at a lower z


def test_gold_is_read_from_the_selection_in_canonical_terms():
    assert gold_of(gold_params("b")) == "b"
    assert gold_of(json.dumps({"selection": {"method": "random"}})) is None
    assert gold_of(json.dumps({"selection": {"method": "gold", "gold": "left"}})) is None  # not a/b/tie
    assert gold_of("not json") is None and gold_of(None) is None
    assert selection_of(gold_params("a"))["item"] == "g"
    # annotate.sampling keeps its name for the reader that moved down into the library
    from annotate.sampling import selection_of as service_selection_of

    assert service_selection_of is selection_of


def test_spearman_is_a_rank_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear: still 1
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x[:2], x[:2])) and math.isnan(spearman(x, np.ones(5)))


# --------------------------------------------------------------------------------------
# Dawid-Skene
# --------------------------------------------------------------------------------------


def simulated_votes(reliability: dict[str, float], n_items: int, per_item: int, seed: int):
    """Votes of annotators who give the true class with probability `reliability` and
    otherwise one of the two other classes at random; 10% of the true classes are ties."""
    rng = random.Random(seed)
    votes, truth = [], {}
    for i in range(n_items):
        t = "tie" if rng.random() < 0.1 else rng.choice("ab")
        truth[f"p{i}"] = t
        for name in rng.sample(sorted(reliability), per_item):
            c = (
                t
                if rng.random() < reliability[name]
                else rng.choice([x for x in ("a", "b", "tie") if x != t])
            )
            votes.append({"pair_id": f"p{i}", "annotator": name, "choice": c, "created_at": None})
    return votes, truth


def test_dawid_skene_ranks_and_recovers_known_reliabilities():
    reliability = {"ace": 0.95, "good": 0.85, "fair": 0.7, "weak": 0.5, "spoiler": 0.1}
    votes, truth = simulated_votes(reliability, n_items=1500, per_item=3, seed=1)
    fit = dawid_skene(votes)
    assert fit.converged
    est = fit.competence
    assert sorted(reliability, key=est.get) == sorted(reliability, key=reliability.get), est
    for name, r in reliability.items():
        assert est[name] == pytest.approx(r, abs=0.06), (name, est)
    # The posteriors find the true class far better than any single annotator but the best.
    right = np.mean([max(p, key=p.get) == truth[pair] for pair, p in fit.posteriors.items()])
    assert right > 0.9, right
    assert fit.class_prior["tie"] == pytest.approx(0.1, abs=0.03)
    # Weights: chance-corrected; the adversarial annotator gets 0, never a negative weight.
    assert fit.weight("spoiler") == 0.0
    assert fit.weight("ace") > fit.weight("good") > fit.weight("fair") > fit.weight("weak") >= 0


def test_dawid_skene_uses_only_overlapping_pairs_and_each_annotators_latest_vote():
    votes = [vote(f"shared-{i}", who, c) for i in range(20) for who, c in (("ann", "a"), ("bea", "a"))]
    votes += [vote(f"solo-{i}", "solo", "b") for i in range(10)]  # nobody else saw these
    # bea changed her mind on one shared pair: her later vote is the one that counts
    votes += [vote("shared-0", "bea", "b", at=-60), vote("shared-1", "ann", "b", at=60)]
    fit = dawid_skene(votes)
    assert fit.competence["solo"] is None and fit.overlap_votes["solo"] == 0
    assert set(fit.posteriors) == {f"shared-{i}" for i in range(20)}
    assert fit.overlap_votes == {"ann": 20, "bea": 20, "solo": 0}  # latest vote per pair only
    assert fit.posteriors["shared-5"]["a"] > 0.9
    # solo has no evidence either way: the weight of --weights none
    weights = vote_weights(votes, "competence")
    names = [v["annotator"] for v in votes]
    assert {w for w, n in zip(weights, names) if n == "solo"} == {1.0}


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def gold_votes():
    """Gold checks: erin 1 right of 6, frank 0 of 1, gina 6 of 6, hank 3 of 6."""
    out = []
    for name, answers in {
        "erin": "abbbbb",
        "frank": "b",
        "gina": "aaaaaa",
        "hank": "aaabbb",
    }.items():
        out += [vote(f"gold-{i}", name, c, gen_params=gold_params("a")) for i, c in enumerate(answers)]
    # gold in canonical a/b terms: shown with b on the left, answered b, the gold is b: right
    out.append(vote("gold-left", "gina", "b", left="b", gen_params=gold_params("b")))
    # a both-bad vote on a gold tie is a right answer (both-bad counts as a tie)
    out.append(vote("gold-tie", "gina", "both_bad", gen_params=gold_params("tie")))
    return out


def test_gold_accuracy_intervals_and_the_flag_rule(tmp_path):
    store = write_store(tmp_path / "store", gold_votes())
    rows = annotator_table(read_comparisons(store))
    t = by_name(rows)
    assert [r["annotator"] for r in rows] == ["erin", "frank", "gina", "hank"]
    assert (t["gina"]["gold_n"], t["gina"]["gold_correct"], t["gina"]["gold_accuracy"]) == (8, 8, 1.0)
    assert (t["erin"]["gold_n"], t["erin"]["gold_correct"]) == (6, 1)
    low, high = wilson_interval(1, 6)
    assert (t["erin"]["gold_low"], t["erin"]["gold_high"]) == (round(low, 4), round(high, 4))
    assert high < 0.6
    flagged = {name for name, r in t.items() if r["flag_rule"]}
    assert flagged == {"erin"}, rows  # 5 failed, and the interval's upper end 0.56 < 0.6
    assert "failed 5 of 6" in t["erin"]["flag_reason"]
    assert "needs 2" in t["frank"]["flag_reason"]  # one failed check is never enough
    assert "reaches 0.6" in t["hank"]["flag_reason"]  # 3 failed, but up to 0.81 is possible
    # The rule's settings are settings: one failure and a higher bar flag frank too.
    t = by_name(annotator_table(read_comparisons(store), min_failed_gold=1, flag_below=0.8))
    assert {name for name, r in t.items() if r["flag_rule"]} == {"erin", "frank"}
    json.dumps(rows, allow_nan=False)  # JSON-able, no NaN
    with pytest.raises(AnnotatorQualityError, match="--min-failed-gold"):
        annotator_table(gold_votes(), min_failed_gold=0)
    with pytest.raises(AnnotatorQualityError, match="--flag-below"):
        annotator_table(gold_votes(), flag_below=1.5)


def test_agreement_with_and_without_ties_and_pace(tmp_path):
    votes = [
        vote("p1", "alice", "a"),
        vote("p1", "bob", "b", at=-100),  # replaced by bob's later vote
        vote("p1", "bob", "a", at=10),
        vote("p1", "carol", "b"),
        vote("p2", "alice", "tie"),
        vote("p2", "bob", "both_bad"),  # both-bad is a tie: they agree
        vote("p3", "alice", "a"),  # nobody else: not compared
    ]
    # dave: three votes a minute apart, a two-hour break, one more a minute later
    votes += [vote(f"d{i}", "dave", "a", at=at) for i, at in enumerate((0, 60, 120, 7320, 7380))]
    t = by_name(annotator_table(read_comparisons(write_store(tmp_path / "store", votes))))
    assert t["alice"]["agreement"] == round(2 / 3, 4)  # p1: bob yes, carol no; p2: bob yes
    assert t["alice"]["agreement_no_ties"] == 0.5  # p1 only
    assert t["bob"]["agreement"] == round(2 / 3, 4) and t["bob"]["votes"] == 3
    assert (t["carol"]["agreement"], t["carol"]["agreement_no_ties"]) == (0.0, 0.0)
    assert t["dave"]["agreement"] is None and t["dave"]["competence"] is None
    assert t["dave"]["votes_per_hour"] == 60.0  # 4 votes in 4 minutes of work, the break left out
    assert t["carol"]["votes_per_hour"] is None  # one vote: no pace


def test_the_team_table_tells_careful_from_random_and_adversarial(tmp_path):
    store = write_store(tmp_path / "store", team_votes(150))
    t = by_name(annotator_table(read_comparisons(store)))
    assert set(t) == set(TEAM)
    for careful in ("careful-1", "careful-2"):
        assert t[careful]["competence"] > 0.85 and t[careful]["competence_weight"] > 0.7
        assert t[careful]["decision_length_corr"] > 0.8  # reads: longer pairs take longer
    assert t["adversary"]["competence"] < 0.1 and t["adversary"]["competence_weight"] == 0.0
    assert abs(t["random"]["competence"] - 0.5) < 0.1 and t["random"]["competence_weight"] < 0.2
    assert abs(t["random"]["decision_length_corr"]) < 0.3  # clicks without reading
    assert t["random"]["median_decision_ms"] < 1500 < t["careful-1"]["median_decision_ms"]
    assert t["random"]["votes_per_hour"] > 2 * t["careful-1"]["votes_per_hour"]
    assert t["adversary"]["agreement"] < 0.3 < t["careful-1"]["agreement"]


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def test_vote_weights_none_gold_and_competence():
    votes = gold_votes() + [vote("plain", "ivy", "a")]  # ivy has no gold votes
    names = [v["annotator"] for v in votes]
    assert vote_weights(votes, "none").tolist() == [1.0] * len(votes)
    gold = vote_weights(votes, "gold")
    pooled = (1 + 0 + 8 + 3) / (6 + 1 + 8 + 6)  # right answers / gold votes, everyone
    expect = {
        name: (right + GOLD_PRIOR_CHECKS * pooled) / (n + GOLD_PRIOR_CHECKS)
        for name, right, n in (("erin", 1, 6), ("frank", 0, 1), ("gina", 8, 8), ("hank", 3, 6))
    }
    expect["ivy"] = pooled  # no gold of her own: the team's accuracy
    assert gold.tolist() == pytest.approx([expect[n] for n in names])
    assert len(gold) == len(votes)
    with pytest.raises(AnnotatorQualityError, match="--weights must be one of"):
        vote_weights(votes, "trust-me")
    with pytest.raises(AnnotatorQualityError, match="no gold votes"):
        vote_weights([vote("plain", "ivy", "a")], "gold")
    with pytest.raises(AnnotatorQualityError, match="nothing to estimate competence from"):
        vote_weights([vote("plain", "ivy", "a"), vote("other", "jo", "b")], "competence")
    with pytest.raises(AnnotatorQualityError, match="choice"):
        annotator_table([{**vote("p", "x", "a"), "choice": None}])


# --------------------------------------------------------------------------------------
# preflab annotators
# --------------------------------------------------------------------------------------


def test_the_command_prints_an_aligned_table_and_json(tmp_path):
    store = write_store(tmp_path / "store", team_votes(40) + gold_votes())
    out = preflab("annotators", "--data", store)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0]
    rows = lines[1 : 1 + len(TEAM) + 4]
    assert [r.split()[0] for r in rows] == sorted([*TEAM, "erin", "frank", "gina", "hank"])
    # aligned: each row's competence figure ends where the header's column does
    end = header.index("competence") + len("competence")
    for r in rows:
        assert r[end - 1] != " " and r[end] == " ", (header, r)
    assert "erin: flagged: failed 5 of 6" in out.stdout
    assert "standing votes of 8 annotators" in out.stdout

    out = preflab("annotators", "--data", store, "--json", "--min-failed-gold", "1", "--flag-below", "0.8")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["min_failed_gold"] == 1 and doc["flag_below"] == 0.8
    expected = annotator_table(read_comparisons(store), min_failed_gold=1, flag_below=0.8)
    assert doc["annotators"] == expected
    assert {r["annotator"] for r in doc["annotators"] if r["flag_rule"]} == {"erin", "frank"}


def test_the_command_says_what_is_wrong(tmp_path):
    out = preflab("annotators", "--data", tmp_path / "missing")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "missing" in out.stderr
    store = write_store(tmp_path / "store", [vote("p", "x", "a")])
    out = preflab("annotators", "--data", store, "--min-failed-gold", "0")
    assert out.returncode == 2 and "--min-failed-gold" in out.stderr and "Traceback" not in out.stderr
    out = preflab("annotators", "--data", write_store(tmp_path / "empty", []))
    assert out.returncode == 0 and "no standing votes yet" in out.stdout
    out = preflab("annotators", "--help")
    for flag in ("--data", "--json", "--min-failed-gold", "--flag-below"):
        assert flag in out.stdout


def test_the_command_reads_a_postgresql_store_the_same(tmp_path, pg_url):
    records = team_votes(30) + gold_votes()
    directory = write_store(tmp_path / "store", records)
    write_store(pg_url, records)
    from_db = json.loads(preflab("annotators", "--data", pg_url, "--json").stdout)
    from_dir = json.loads(preflab("annotators", "--data", directory, "--json").stdout)
    assert from_db["annotators"] == from_dir["annotators"] and from_db["votes"] == len(records)
