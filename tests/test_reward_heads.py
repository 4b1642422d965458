"""Reward heads per rubric criterion: `train-reward --criteria x,y` (trainer/criteria.py,
trainer/reward_data.py, trainer/reward.py) and `RewardModel.score(criterion=)`.

The simulated annotators judge two criteria with hidden rules of their own: criterion x
prefers the answer with "banana", criterion y the one with "cherry", independently of
each other (each answer of a pair has one fruit of each kind or not, opposite sides), and
their overall vote follows x.
"""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    TINY,
    TRAIN_DEVICE,
    banana_rows,
    preflab,
    sigterm_mid_run,
    vote_record,
    write_jsonl,
    write_store,
)

from trainer.errors import PolicyInputError
from trainer.policy import train as train_policy
from trainer.reward import train
from trainer.reward_blend import WeightedReward, parse_reward_weights
from trainer.reward_data import RewardDataError, read_pairs
from trainer.reward_model import RewardHeadError, RewardModel

WORDS = "the a of to and in is it you that for on with as are this be at or by from".split()


def fruit_votes(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        banana_a, cherry_a = rng.random() < 0.5, rng.random() < 0.5

        def answer(banana: bool, cherry: bool) -> str:
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
            for fruit, on in (("banana", banana), ("cherry", cherry)):
                if on:
                    words.insert(rng.randrange(len(words) + 1), fruit)
            return " ".join(words)

        a, b = answer(banana_a, cherry_a), answer(not banana_a, not cherry_a)
        x, y = "a" if banana_a else "b", "a" if cherry_a else "b"
        prompt = f"Question {i % 30} about fruit: what should I eat?"
        records.append(vote_record(prompt, a, b, x, criteria=json.dumps({"x": x, "y": y})))
    return records


@pytest.fixture(scope="module")
def fruit_run(tmp_path_factory):
    """A finished reward run with heads overall, x, y on the fruit votes (shared: ~10 s)."""
    base = tmp_path_factory.mktemp("fruit")
    store = write_store(base / "store", fruit_votes(240))
    run_dir = base / "rm"
    settings = dict(epochs=2, lr=3e-3, batch_size=16, val_fraction=0.25)
    code = train({**TINY, **settings, "data": str(store), "run_dir": str(run_dir), "criteria": "x,y"})
    assert code == 0
    return run_dir


def test_each_criterion_trains_its_own_head(fruit_run):
    run_dir = fruit_run
    meta = json.loads((run_dir / "checkpoint" / "preflab_reward.json").read_text())
    assert meta["heads"] == ["overall", "x", "y"]
    assert set(meta["head_norm"]) == {"overall", "x", "y"}
    hf_config = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    assert hf_config["id2label"] == {"0": "overall", "1": "x", "2": "y"}
    # every vote gave three pairs, each trained its own head
    snapshot = pq.read_table(run_dir / "data.parquet").to_pydict()
    assert sorted(set(snapshot["head"])) == [0, 1, 2] and len(snapshot["head"]) == 3 * 240
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["criteria"]["x"]["pairs"] == 240

    rm = RewardModel.load(run_dir, device=TRAIN_DEVICE)
    assert rm.heads == ["overall", "x", "y"]
    held = fruit_votes(80, seed=7)  # fresh pairs no head saw
    prompts = [json.loads(r["prompt"]) for r in held]
    a = [r["response_a"] for r in held]
    b = [r["response_b"] for r in held]
    rule = {k: np.array([json.loads(r["criteria"])[k] == "a" for r in held]) for k in ("x", "y")}

    def agreement(head, k):
        sa = np.array(rm.score(prompts, a, criterion=head))
        sb = np.array(rm.score(prompts, b, criterion=head))
        return float(((sa > sb) == rule[k]).mean())

    assert agreement("x", "x") >= 0.85 and agreement("y", "y") >= 0.85
    # ... and each head follows its own rule, not the other's (the rules are independent)
    assert agreement("x", "x") - agreement("y", "x") >= 0.25
    assert agreement("y", "y") - agreement("x", "y") >= 0.25
    # the default head is the first, the overall vote's; all heads in one forward agree with score()
    assert rm.score(prompts[:4], a[:4]) == rm.score(prompts[:4], a[:4], criterion="overall")
    both = rm.score_heads(prompts[:4], a[:4])
    assert np.allclose(both[:, 2], rm.score(prompts[:4], a[:4], criterion="y"))
    # normalised per head: each head has its own gain and bias
    raw = np.array(rm.score(prompts[:4], a[:4], criterion="y", normalize=False))
    norm = meta["head_norm"]["y"]
    assert np.allclose(both[:, 2], norm["gain"] * raw + norm["bias"])
    # the checkpoint is a plain HF model with three outputs that computes the raw heads itself
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "checkpoint").eval()
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "checkpoint")
    ids, _ = rm.encode(prompts[:4], a[:4])
    with torch.no_grad():
        logits = hf(**hf_tok.pad({"input_ids": ids}, return_tensors="pt")).logits
    assert logits.shape == (4, 3)
    raw_all = rm.score_heads(prompts[:4], a[:4], normalize=False)
    exact = rm.device.type == "cpu"
    assert np.allclose(raw_all, logits.numpy(), atol=1e-4 if exact else 0.05 * float(logits.abs().max()))
    with pytest.raises(RewardHeadError, match="no head 'z'; its heads: overall, x, y"):
        rm.score(prompts[:1], a[:1], criterion="z")


def test_eval_reward_scores_the_head_it_is_asked_for(fruit_run, tmp_path):
    # A preference file on criterion y (cherry preferred): head y gets it right, head x is
    # at chance on it (its rule, banana, is independent); each result is saved as its own.
    held = fruit_votes(60, seed=11)
    rows = []
    for r in held:
        y = json.loads(r["criteria"])["y"]
        chosen, rejected = (
            (r["response_a"], r["response_b"]) if y == "a" else (r["response_b"], r["response_a"])
        )
        rows.append({"prompt": json.loads(r["prompt"]), "chosen": chosen, "rejected": rejected})
    data = write_jsonl(tmp_path / "cherry.jsonl", rows)
    results = {}
    for head in ("y", "x"):
        out = preflab("eval-reward", str(fruit_run), "--data", str(data), "--criterion", head, "--json")
        assert out.returncode == 0, out.stderr
        results[head] = json.loads(out.stdout.strip().splitlines()[-1])
        assert results[head]["criterion"] == head
    assert results["y"]["accuracy"] >= 0.85 and results["y"]["accuracy"] - results["x"]["accuracy"] >= 0.25
    saved = sorted(p.name for p in (fruit_run / "reward-evals").glob("cherry*.json"))
    assert len(saved) == 2 and saved[0].startswith("cherry.x-") and saved[1].startswith("cherry.y-")
    # The first head by name is the default: saved as the default's, no second copy.
    out = preflab("eval-reward", str(fruit_run), "--data", str(data), "--criterion", "overall", "--json")
    assert out.returncode == 0 and "criterion" not in json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(p.name.split("-")[0] for p in (fruit_run / "reward-evals").glob("cherry*.json")) == [
        "cherry",
        "cherry.x",
        "cherry.y",
    ]
    from annotate.web.leaderboard_html import reward_evals_html
    from trainer.reward_eval import evaluations_of

    table = reward_evals_html(evaluations_of(fruit_run))
    assert "cherry.jsonl (head y)" in table and "cherry.jsonl (head x)" in table
    bad = preflab("eval-reward", str(fruit_run), "--data", str(data), "--criterion", "tone")
    assert bad.returncode == 2 and "--criterion: this reward model has no head 'tone'" in bad.stderr


def test_an_old_single_head_run_loads_with_one_overall_head(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(32))
    run_dir = tmp_path / "one"
    assert train({**TINY, "data": str(data), "run_dir": str(run_dir), "batch_size": 16}) == 0
    meta = json.loads((run_dir / "checkpoint" / "preflab_reward.json").read_text())
    assert "heads" not in meta and "head_norm" not in meta  # what a run before --criteria wrote
    assert "head" not in pq.read_table(run_dir / "data.parquet").column_names
    rm = RewardModel.load(run_dir, device="cpu")
    assert rm.heads == ["overall"] and rm.model.config.num_labels == 1
    scores = rm.score("hi", ["a banana", "b"])
    assert scores == rm.score("hi", ["a banana", "b"], criterion="overall")
    raw = np.array(rm.score("hi", ["a banana", "b"], normalize=False))
    assert np.allclose(scores, meta["gain"] * raw + meta["bias"])


def test_criteria_that_cannot_train_a_head_are_named(tmp_path):
    records = fruit_votes(6)
    records.append(
        vote_record("q", "p", "r", "a", criteria=json.dumps({"tone": {"a": 3, "b": 3}, "allties": "tie"}))
    )
    records.append(vote_record("q", "s", "t", "a", criteria=json.dumps({"tone": {"a": 2, "b": 5}})))
    store = write_store(tmp_path / "store", records)
    with pytest.raises(
        RewardDataError, match="--criteria nope: no standing vote judged it .*judge: allties, tone, x, y"
    ):
        read_pairs(store, criteria=["x", "nope"])
    with pytest.raises(
        RewardDataError, match="--criteria allties: none of its 1 judgments prefers one answer"
    ):
        read_pairs(store, criteria=["allties"])
    # a scale counts as the preference its two scores imply: equal scores are a tie
    pairs = read_pairs(store, criteria=["tone"], ties="include")
    tone = sorted(
        (c, r, label) for c, r, label, h in zip(pairs.chosen, pairs.rejected, pairs.label, pairs.head) if h
    )
    assert tone == [("p", "r", 0.5), ("t", "s", 1.0)]
    assert read_pairs(store, criteria=["tone"]).head.count(1) == 1  # ties left out by default
    file = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(4))
    with pytest.raises(RewardDataError, match="--criteria needs a comparison store"):
        read_pairs(file, criteria=["x"])
    for bad, why in (
        ("x,x", "'x' is given twice"),
        ("overall", "overall vote's head"),
        ("X!", "not a criterion name"),
    ):
        run = tmp_path / f"bad-{len(why)}"
        assert train({**TINY, "data": str(store), "run_dir": str(run), "criteria": bad}) == 2
        assert why in json.loads((run / "status.json").read_text())["message"]


# --------------------------------------------------------------------------------------
# train-policy --reward-weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, why",
    [
        ("x", "'x' is not HEAD=WEIGHT"),
        ("x=1,=2", "'=2' is not HEAD=WEIGHT"),
        ("x=lots", "x='lots': the weight is not a number"),
        ("x=inf", "the weight must be finite"),
        ("x=1,x=2", "'x' is given twice"),
        ("x=0,y=0", "every weight is 0"),
    ],
)
def test_reward_weights_that_do_not_parse_are_named(text, why):
    with pytest.raises(PolicyInputError, match=f"--reward-weights: .*{why}"):
        parse_reward_weights(text)


def test_reward_weights_parse():
    assert parse_reward_weights(" overall=1 , x=2.5,y=-0.5") == {"overall": 1.0, "x": 2.5, "y": -0.5}
    assert parse_reward_weights(None) == {} == parse_reward_weights("")


def test_the_weighted_reward_is_the_sum_of_normalised_heads(fruit_run):
    rm = RewardModel.load(fruit_run, device="cpu")
    prompts = ["what should I eat?"] * 3
    answers = ["a banana", "a cherry", "the a of"]
    x, y = (np.array(rm.score(prompts, answers, criterion=h)) for h in ("x", "y"))
    got = WeightedReward(rm, {"x": 1.0, "y": 2.0}).score(prompts, answers)
    assert np.allclose(got, 1.0 * x + 2.0 * y)
    assert not np.allclose(got, x)  # the heads differ, so the weights matter


def test_train_policy_checks_the_weights_against_the_reward_model_and_records_them(fruit_run, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"what should I eat {i}?"}) + "\n" for i in range(6)))
    base = {"model": "tiny", "prompts": str(pool), "reward": str(fruit_run), "progress": False}
    for i, (weights, why) in enumerate(
        [
            ("x=1,zz=2", "has no head 'zz'; its heads: overall, x, y"),
            ("x=many", "--reward-weights x='many': the weight is not a number"),
        ]
    ):
        run_dir = tmp_path / f"bad{i}"
        assert train_policy({**base, "run_dir": str(run_dir), "reward_weights": weights}) == 2
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "failed" and why in status["message"], status
    run_dir = tmp_path / "policy"
    settings = dict(algo="reinforce", steps=1, batch_size=2, max_new_tokens=6, eval_prompts=0, device="cpu")
    assert train_policy({**base, **settings, "run_dir": str(run_dir), "reward_weights": "x=1,y=2"}) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert (
        config["reward_weights"] == {"x": 1.0, "y": 2.0} and config["config"]["reward_weights"] == "x=1,y=2"
    )
    meta = json.loads((run_dir / "policy" / "preflab_policy.json").read_text())
    assert meta["reward_weights"] == {"x": 1.0, "y": 2.0}


def test_a_multi_head_lora_run_cancelled_by_sigterm_resumes_with_its_heads(tmp_path):
    pytest.importorskip("peft")
    store = write_store(tmp_path / "store", fruit_votes(400))  # 1,200 pairs: SIGTERM lands mid-run
    run_dir = tmp_path / "runs" / "heads"
    cmd = [sys.executable, "-m", "trainer.reward", "--data", str(store), "--model", "tiny"]
    cmd += ["--run-dir", str(run_dir), "--criteria", "x,y", "--lora-r", "4", "--batch-size", "2"]
    cmd += ["--max-length", "64", "--lr", "1e-3", "--no-progress", "--save-every", "1000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code, out, status = sigterm_mid_run(cmd, env, run_dir, lambda lines: len(lines) >= 3, timeout=90)
    assert code == 128 + signal.SIGTERM and status["state"] == "cancelled", out
    saved = status["step"]
    # the same command again, told to stop a few steps on: it goes on from the saved step
    resumed = subprocess.run([*cmd, "--max-steps", str(saved + 3)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir} from step {saved}" in resumed.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == saved + 3
    ckpt = run_dir / "checkpoint"
    meta = json.loads((ckpt / "preflab_reward.json").read_text())
    assert meta["heads"] == ["overall", "x", "y"] and meta["lora"] is True
    assert not (ckpt / "adapter_config.json").exists()  # merged: a plain 3-output checkpoint
    rm = RewardModel.load(run_dir, device="cpu")
    assert rm.model.config.num_labels == 3 and len(rm.score("hi", ["a banana"], criterion="y")) == 1
