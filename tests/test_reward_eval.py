"""`preflab eval-reward` (trainer/reward_eval.py) on a real (tiny) trained reward model and
real preference files: pairwise and best-of-N accuracy, per subset, RewardBench's section
scores, length bias and calibration, each checked against scores taken here one by one."""

import json

import numpy as np
import pytest
from helpers import banana_rows, preflab, train_tiny_reward_run, write_jsonl

from trainer.reward_eval import (
    EXAMPLE_COUNTS,
    RewardEvalError,
    evaluate_rows,
    read_eval_rows,
    rewardbench_sections,
)
from trainer.reward_model import RewardModel


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    return train_tiny_reward_run(tmp_path_factory.mktemp("eval") / "runs")


def _file(tmp_path):
    rows = banana_rows(14, seed=5)
    subsets = ["alpacaeval-easy"] * 4 + ["mt-bench-hard"] * 4 + ["hep-go"] * 2 + [None] * 4
    for row, subset in zip(rows, subsets, strict=True):
        if subset:
            row["subset"] = subset
    extra = banana_rows(6, seed=9)
    rows.append({**extra[0], "rejected": [extra[1]["rejected"], extra[2]["rejected"], extra[3]["rejected"]]})
    rows.append(  # conversational: a message-list prompt and answers
        {
            "prompt": [{"role": "user", "content": extra[4]["prompt"]}],
            "chosen": [{"role": "assistant", "content": extra[4]["chosen"]}],
            "rejected": [{"role": "assistant", "content": extra[4]["rejected"]}],
        }
    )
    return write_jsonl(tmp_path / "prefs.jsonl", rows), rows


def test_the_numbers_are_those_of_the_scores_one_by_one(reward_run, tmp_path):
    path, raw = _file(tmp_path)
    rows = read_eval_rows(path)
    assert len(rows[14]["rejected"]) == 3 and len(rows[15]["rejected"]) == 1  # best-of-N / conversational
    model = RewardModel.load(reward_run)
    result = evaluate_rows(rows, model, batch_size=5)

    def score(row, answer):
        return model.score([row["prompt"]], [answer], normalize=False)[0]

    wins, per_row = [], []
    for row in rows:
        c = score(row, row["chosen"])
        w = [1.0 if c > r else 0.5 if c == r else 0.0 for r in (score(row, x) for x in row["rejected"])]
        wins += w
        per_row.append(float(all(x == 1.0 for x in w)) if len(w) > 1 else w[0])
    assert result["pairs"] == len(wins) == 14 + 3 + 1 and result["rows"] == 16
    assert result["accuracy"] == pytest.approx(np.mean(wins), abs=1e-9)
    assert result["accuracy_ci"][0] <= result["accuracy"] <= result["accuracy_ci"][1]
    assert result["best_of_n"] == {"rows": 1, "accuracy": per_row[14]}
    by_subset = {
        s: np.mean(per_row[a:b])
        for s, a, b in (("alpacaeval-easy", 0, 4), ("mt-bench-hard", 4, 8), ("hep-go", 8, 10))
    }
    assert {k: v["accuracy"] for k, v in result["subsets"].items()} == pytest.approx(by_subset)
    # One subset per section here, so each section is its subset; the score their mean.
    assert result["sections"] == pytest.approx(
        {
            "Chat": by_subset["alpacaeval-easy"],
            "Chat Hard": by_subset["mt-bench-hard"],
            "Reasoning": by_subset["hep-go"],
        }
    )
    assert result["rewardbench_score"] == pytest.approx(np.mean(list(by_subset.values())))
    assert 0 <= result["ece"] <= 1 and result["length"]["pairs"] > 0

    # The command prints the same numbers.
    done = preflab("eval-reward", reward_run, "--data", path, "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        printed["accuracy"] == pytest.approx(result["accuracy"]) and printed["subsets"] == result["subsets"]
    )
    table = preflab("eval-reward", reward_run, "--data", path).stdout
    assert "pairwise accuracy" in table and "RewardBench score" in table and "hep-go" in table


def test_sections_weigh_subsets_as_rewardbench_does():
    acc = {
        "math-prm": 1.0,
        "hep-cpp": 0.0,
        "hep-go": 0.0,
        "alpacaeval-easy": 0.5,
        "mt-bench-easy": 1.0,
        "other": 0.0,
    }
    got = rewardbench_sections(acc)
    # math-prm weighs 984, as much as all six code subsets: against two of them it is 984 : 328.
    assert got["sections"]["Reasoning"] == pytest.approx(984 / (984 + 2 * 164))
    assert got["sections"]["Chat"] == pytest.approx((100 * 0.5 + 28 * 1.0) / 128)
    assert set(got["sections"]) == {"Reasoning", "Chat"}  # "other" is no section's
    assert got["rewardbench_score"] == pytest.approx(np.mean(list(got["sections"].values())))
    assert EXAMPLE_COUNTS["math-prm"] == 6 * EXAMPLE_COUNTS["hep-go"]
    assert rewardbench_sections({"mine": 1.0}) == {}


def test_a_bad_file_fails_before_a_model_loads_naming_the_file(tmp_path, reward_run):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(RewardEvalError, match="missing rejected"):
        read_eval_rows(bad)
    done = preflab("eval-reward", tmp_path / "no-run", "--data", bad)
    assert done.returncode == 2 and f"{bad}: needs the columns" in done.stderr
    good = write_jsonl(tmp_path / "good.jsonl", banana_rows(2))
    done = preflab("eval-reward", tmp_path / "no-run", "--data", good)
    assert done.returncode == 2 and "no reward model here" in done.stderr


def test_a_result_is_saved_in_its_run_and_listed_for_the_leaderboard_and_review_tabs(reward_run, tmp_path):
    import shutil

    from annotate.web.leaderboard_html import reward_evals_html
    from trainer.reward_eval import EVALS_DIR, evaluations_of, saved_evaluations

    run = shutil.copytree(reward_run, tmp_path / "runs" / "rm-copy")  # this test's own run
    saved = run / EVALS_DIR
    shutil.rmtree(saved, ignore_errors=True)  # what the other tests' commands saved in the shared run
    first, _ = _file(tmp_path)
    done = preflab("eval-reward", run, "--data", first, "--json")
    assert done.returncode == 0 and f"saved in {saved}" in done.stderr, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    (file,) = saved.glob("*.json")
    kept = json.loads(file.read_text())
    assert kept["accuracy"] == printed["accuracy"] and kept["data"] == str(first.resolve())
    assert file.name.startswith("prefs-")

    # the same file again replaces its result; another file adds one; --no-save adds nothing
    assert preflab("eval-reward", run, "--data", first).returncode == 0
    (tmp_path / "other").mkdir()
    other = write_jsonl(tmp_path / "other" / "prefs.jsonl", banana_rows(6, seed=2))  # same name, elsewhere
    assert preflab("eval-reward", run, "--data", other).returncode == 0
    third = write_jsonl(tmp_path / "third.jsonl", banana_rows(4, seed=3))
    quiet = preflab("eval-reward", run, "--data", third, "--no-save")
    assert quiet.returncode == 0 and "saved" not in quiet.stderr
    assert len(list(saved.glob("*.json"))) == 2

    (saved / "torn.json").write_text('{"accuracy": 0.5, "pai')  # a run directory's file: never trusted
    forged = {"accuracy": 1.0, "pairs": 3, "created_at": 1.0, "data": "<script>alert(1)</script>"}
    (saved / "forged.json").write_text(json.dumps(forged))
    # shapes that would break the page: skipped, never rendered
    for i, odd in enumerate([{"accuracy_ci": 0.5}, {"accuracy_ci": {"lo": 0}}, {"length": [1]},
                             {"best_of_n": "x"}, {"pairs": float("inf")}, {"ece": True}, {"data": 7}]):  # fmt: skip
        (saved / f"odd-{i}.json").write_text(json.dumps({**forged, "data": "odd", **odd}))
    listed = saved_evaluations(tmp_path / "runs")
    assert [r["data"] for r in listed] == [str(other.resolve()), str(first.resolve()), forged["data"]]
    assert all(r["run_id"] == "rm-copy" for r in listed) and evaluations_of(run) == listed
    html = reward_evals_html(listed)
    assert html.count('<tr data-run="rm-copy">') == 3 and "<script>" not in html
    assert f"{100 * kept['accuracy']:.1f}%" in html
    assert "No reward-model evaluations yet" in reward_evals_html([])
