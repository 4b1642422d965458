"""The leaderboard: Bradley-Terry ratings against choix and against known strengths,
bootstrap intervals, interval-respecting ranks, anchoring, ties / both-bad / self-pairs,
the errors that make a leaderboard meaningless, policy evaluations, and the CLI on a
real store.
"""

import json
import math
import subprocess
from pathlib import Path

import choix
import numpy as np
import pyarrow as pa
import pytest
from helpers import preflab, vote_record, write_store

from annotate import cli
from annotate.bradley_terry import battles_from_votes, fit_bradley_terry
from annotate.policy_evals import head_to_head, policy_evals
from annotate.ratings import CENTER, SCALE, LeaderboardError, interval_ranks, leaderboard
from annotate.web.leaderboard_html import matrix_html, plot_svg, table_html
from annotate.web.leaderboard_tab import page
from trainer.store import read_comparisons
from trainer.store.directory_writer import DirectoryStore

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def simulate(theta, battles: int, seed: int, tie_share: float = 0.3):
    """Battles between random pairs of different models with known strengths theta.

    A tie happens with probability q (at most tie_share, for equal models); otherwise the
    win goes to a with probability (p - q/2) / (1 - q), so that a's expected score (win 1,
    tie 1/2) is exactly p = sigmoid(theta_a - theta_b): "a tie is half a win" is then an
    unbiased estimate and the fit must recover theta.
    Returns (model_a index, model_b index, choice) arrays.
    """
    rng = np.random.default_rng(seed)
    K = len(theta)
    a = rng.integers(0, K, battles)
    b = (a + rng.integers(1, K, battles)) % K
    p = 1 / (1 + np.exp(-(theta[a] - theta[b])))
    q = tie_share * 2 * np.minimum(p, 1 - p)
    choice = np.where(
        rng.random(battles) < q, "tie", np.where(rng.random(battles) < (p - q / 2) / (1 - q), "a", "b")
    )
    return a, b, choice


def name(k: int) -> str:
    return f"model-{k}"


def votes_table(rows) -> pa.Table:
    """(model_a, model_b, choice) tuples -> the three columns the leaderboard reads."""
    a, b, c = zip(*rows) if rows else ((), (), ())
    return pa.table(
        {
            "model_a": pa.array(a, pa.string()),
            "model_b": pa.array(b, pa.string()),
            "choice": pa.array(c, pa.string()),
        }
    )


def simulated_votes(theta, battles, seed, **kw) -> pa.Table:
    a, b, choice = simulate(np.asarray(theta), battles, seed, **kw)
    names = np.array([name(k) for k in range(len(theta))])
    return pa.table({"model_a": names[a], "model_b": names[b], "choice": choice})


def rating_of(board, model: str) -> float:
    return float(board.rating[board.models.index(model)])


def true_ratings(theta) -> dict[str, float]:
    theta = np.asarray(theta, dtype=float)
    return {name(k): CENTER + SCALE * (t - theta.mean()) for k, t in enumerate(theta)}


def battle(i: int, model_a: str, model_b: str, choice: str) -> dict:
    """Vote number i of a battle between two models, by one of three judges."""
    return vote_record(
        f"Question {i % 7}?",
        f"answer a {i}",
        f"answer b {i}",
        choice,
        pair_id=f"pair-{i}",
        prompt_id=f"p-{i % 7}",
        model_a=model_a,
        model_b=model_b,
        left="ab"[i % 2],
        annotator=f"judge{i % 3}",
    )


def write_battles(path: Path, rows) -> Path:
    """A store of (model_a, model_b, choice) battles."""
    return write_store(path, (battle(i, *row) for i, row in enumerate(rows)))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`preflab leaderboard ...` with nothing in its environment but the bare minimum."""
    return preflab(
        "leaderboard",
        *argv,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PATH": "/usr/bin:/bin"},
    )


THETA = np.array([1.2, 0.8, 0.3, 0.0, -0.2, -0.7, -1.1, -1.6])


# --------------------------------------------------------------------------------------
# the fit
# --------------------------------------------------------------------------------------


def test_ratings_match_choix_on_battles_without_ties():
    """choix's ILSR on the raw (winner, loser) list: an independent path from the votes to
    the maximum-likelihood strengths (no aggregation of ours involved)."""
    a, b, choice = simulate(THETA, 20_000, seed=1, tie_share=0.0)
    votes = simulated_votes(THETA, 20_000, seed=1, tie_share=0.0)
    board = leaderboard(votes, rounds=0)
    data = [(int(x), int(y)) if c == "a" else (int(y), int(x)) for x, y, c in zip(a, b, choice)]
    params = choix.ilsr_pairwise(len(THETA), data, alpha=0.0, tol=1e-12, max_iter=1000)
    theirs = CENTER + SCALE * (params - params.mean())
    for k in range(len(THETA)):
        assert rating_of(board, name(k)) == pytest.approx(theirs[k], abs=0.01)


def test_ratings_match_choix_with_ties_as_half_wins_and_recover_the_true_strengths():
    votes = simulated_votes(THETA, 40_000, seed=2)
    a, b, choice = simulate(THETA, 40_000, seed=2)
    assert (choice == "tie").mean() > 0.1
    # choix's dense form takes any non-negative "wins" matrix: half a win each for a tie
    comp = np.zeros((len(THETA), len(THETA)))
    np.add.at(comp, (a[choice == "a"], b[choice == "a"]), 1.0)
    np.add.at(comp, (b[choice == "b"], a[choice == "b"]), 1.0)
    np.add.at(comp, (a[choice == "tie"], b[choice == "tie"]), 0.5)
    np.add.at(comp, (b[choice == "tie"], a[choice == "tie"]), 0.5)
    params = choix.ilsr_pairwise_dense(comp, alpha=0.0, tol=1e-12, max_iter=1000)
    theirs = CENTER + SCALE * (params - params.mean())
    board = leaderboard(votes, rounds=0)
    truth = true_ratings(THETA)
    for k in range(len(THETA)):
        assert rating_of(board, name(k)) == pytest.approx(theirs[k], abs=0.01)
        # ~5k battles a model: a standard error of ~4 points; 25 is > 5 of them
        assert rating_of(board, name(k)) == pytest.approx(truth[name(k)], abs=25)
    assert board.models == [name(k) for k in range(len(THETA))]  # strongest first


def test_batched_fit_equals_one_fit_per_matrix_and_an_undefeated_model_stays_finite():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 30, (5, 6, 6)).astype(float)
    batch[:, np.arange(6), np.arange(6)] = 0
    batch[2, :, 0] = 0  # model 0 never loses in matrix 2
    together = fit_bradley_terry(batch)
    for k in range(5):
        assert np.allclose(together[k], fit_bradley_terry(batch[k]), atol=1e-8)
    assert np.isfinite(together).all()
    assert together[2, 0] == together[2].max() and together[2, 0] > 3


# --------------------------------------------------------------------------------------
# intervals, ranks, anchor
# --------------------------------------------------------------------------------------


def test_bootstrap_intervals_cover_the_true_strengths():
    """Fixed seeds, so never flaky. Four simulated arenas of 8 models: 32 intervals of
    nominal 95% coverage; at least 28 covered (expected ~30; fewer than 28 has a
    probability well under 1% for correct intervals). Intervals that were too narrow would
    fail this; too wide would fail the width check."""
    truth = true_ratings(THETA)
    covered = []
    for seed in range(4):
        board = leaderboard(simulated_votes(THETA, 30_000, seed=20 + seed), rounds=200, seed=seed)
        covered += [bool(board.low[k] <= truth[m] <= board.high[k]) for k, m in enumerate(board.models)]
        width = board.high - board.low
        assert (width > 5).all() and (width < 40).all(), width  # ~4 points of standard error
    assert sum(covered) >= 28, covered
    # a well-sampled model of one arena: its true rating lies inside its interval
    board = leaderboard(simulated_votes(THETA, 30_000, seed=3), rounds=200, seed=4)
    k = board.models.index(name(3))
    assert board.low[k] <= truth[name(3)] <= board.high[k]


def test_more_rounds_same_seed_is_reproducible():
    votes = simulated_votes(THETA[:4], 4_000, seed=5)
    one, two = leaderboard(votes, rounds=50, seed=7), leaderboard(votes, rounds=50, seed=7)
    assert np.array_equal(one.low, two.low) and np.array_equal(one.high, two.high)
    other = leaderboard(votes, rounds=50, seed=8)
    assert not np.array_equal(one.low, other.low)


def test_ranks_respect_the_intervals():
    low = np.array([1100.0, 1050.0, 900.0, 950.0])
    high = np.array([1200.0, 1150.0, 1000.0, 1060.0])
    # A and B overlap: both first. D is cleared by A only: 2nd. C by A and B (not D): 3rd.
    assert interval_ranks(low, high).tolist() == [1, 1, 3, 2]
    # end to end: two strong models that cannot be told apart share rank 1
    votes = simulated_votes([1.0, 1.0, -1.0], 3_000, seed=6)
    board = leaderboard(votes, rounds=100)
    assert board.rank.tolist() == [1, 1, 3]
    assert board.models[2] == name(2)


def test_anchor_is_exactly_1000_and_only_shifts_the_ratings():
    votes = simulated_votes(THETA[:5], 5_000, seed=9)
    centred = leaderboard(votes, rounds=30, seed=1)
    anchored = leaderboard(votes, anchor=name(2), rounds=30, seed=1)
    k = anchored.models.index(name(2))
    assert anchored.rating[k] == 1000.0
    assert anchored.low[k] == anchored.high[k] == 1000.0  # the distance to itself is certain
    assert centred.rating.mean() == pytest.approx(1000.0, abs=1e-9)
    assert centred.models == anchored.models
    assert np.allclose(np.diff(centred.rating), np.diff(anchored.rating))
    with pytest.raises(LeaderboardError, match=r"unknown anchor 'gpt-9'; the models are: model-0, model-1"):
        leaderboard(votes, anchor="gpt-9")


# --------------------------------------------------------------------------------------
# what counts: ties, both bad, self-pairs
# --------------------------------------------------------------------------------------


def test_ties_are_half_wins_and_both_bad_is_a_tie_or_dropped():
    rows = (
        [("A", "B", "a")] * 3
        + [("B", "A", "a")]
        + [("A", "B", "both_bad")] * 2
        + [("B", "A", "both_bad")] * 2
    )
    votes = votes_table(rows)
    as_tie = leaderboard(votes, rounds=0)
    dropped = leaderboard(votes, rounds=0, both_bad="drop")
    # A scored 3 wins + 4 half wins of 8 votes; without both-bad, 3 of 4
    assert as_tie.models == ["A", "B"] and as_tie.win_rate[0] == pytest.approx(5 / 8)
    assert as_tie.played.tolist() == [8, 8] and as_tie.ties.tolist() == [4, 4]
    # the maximum-likelihood gap is log(points A / points B); the ridge (a prior with sd ~5,500
    # points) shifts it by a fraction of a point at 4 to 8 votes
    assert as_tie.rating[0] - as_tie.rating[1] == pytest.approx(SCALE * math.log(5 / 3), abs=0.5)
    assert dropped.win_rate[0] == pytest.approx(3 / 4) and dropped.both_bad_dropped == 4
    assert dropped.played.tolist() == [4, 4]
    assert dropped.rating[0] - dropped.rating[1] == pytest.approx(SCALE * math.log(3), abs=0.5)
    assert as_tie.win_matrix[0, 1] == pytest.approx(5 / 8) and as_tie.games[0, 1] == 8
    # only ties: equal ratings
    even = leaderboard(votes_table([("A", "B", "tie"), ("B", "A", "tie")]), rounds=0)
    assert even.rating.tolist() == pytest.approx([1000.0, 1000.0])


def test_self_pairs_are_left_out_and_counted():
    rows = [("A", "B", "a"), ("A", "B", "b"), ("B", "C", "a"), ("C", "A", "tie"), ("A", "B", "a")]
    selfish = rows + [("A", "A", "a")] * 5 + [("C", "C", "b")] * 2 + [("D", "D", "tie")]
    plain, board = leaderboard(votes_table(rows), rounds=0), leaderboard(votes_table(selfish), rounds=0)
    assert board.models == plain.models == ["A", "B", "C"]  # D only met itself: no rating
    assert np.allclose(board.rating, plain.rating)
    assert board.self_pairs == 8 and board.votes == len(selfish) and board.used == len(rows)
    assert any("8 votes left out: both answers from the same model" in n for n in board.notes())
    assert board.unrated == ["D"] and "no rating for D: no vote against another model" in board.notes()
    battles = battles_from_votes(votes_table(selfish))
    assert battles.games.diagonal().sum() == 0


# --------------------------------------------------------------------------------------
# errors that make a leaderboard meaningless
# --------------------------------------------------------------------------------------


def test_disconnected_graph_is_an_error_naming_the_groups():
    rows = [("A", "B", "a"), ("B", "A", "tie"), ("C", "D", "b"), ("D", "E", "a")]
    with pytest.raises(LeaderboardError, match=r"not connected.*\{A, B\} \| \{C, D, E\}"):
        leaderboard(votes_table(rows))


def test_empty_and_single_model_votes_are_clear_errors():
    with pytest.raises(LeaderboardError, match="no votes yet"):
        leaderboard(votes_table([]))
    with pytest.raises(LeaderboardError, match="none of the 2 votes compares two different models.*itself"):
        leaderboard(votes_table([("A", "A", "a"), ("A", "A", "tie")]))
    with pytest.raises(LeaderboardError, match="both-bad votes, dropped"):
        leaderboard(votes_table([("A", "B", "both_bad")]), both_bad="drop")


# --------------------------------------------------------------------------------------
# head to head, policy evaluations
# --------------------------------------------------------------------------------------


def test_head_to_head_and_policy_evals_next_to_the_human_win_rate(tmp_path, caplog):
    rows = (
        [("policy-1", "ref", "a")] * 6
        + [("ref", "policy-1", "a")] * 2
        + [("ref", "policy-1", "tie")] * 2
        + [("ref", "other", "a")] * 3
    )
    votes = votes_table(rows)
    h = head_to_head(votes, "policy-1", "ref")
    assert (h["n"], h["wins"], h["losses"], h["ties"]) == (10, 6, 2, 2)
    assert h["win_rate"] == pytest.approx(0.7) and h["ci"][0] < 0.7 < h["ci"][1]
    assert head_to_head(votes, "ref", "policy-1")["win_rate"] == pytest.approx(0.3)
    assert head_to_head(votes, "policy-2", "ref")["n"] == 0

    runs = tmp_path / "runs"
    for run_id, rate in (("policy-1", 0.81), ("policy-2", 0.64)):
        (runs / run_id).mkdir(parents=True)
        (runs / run_id / "eval.json").write_text(
            json.dumps(
                {
                    "policy": run_id,
                    "reference": "ref",
                    "prompts": 50,
                    "rm_win_rate": rate,
                    "rm_win_rate_ci": [rate - 0.1, rate + 0.1],
                    "reward_run": "runs/reward-1",
                }
            )
        )
    (runs / "broken").mkdir()
    (runs / "broken" / "eval.json").write_text("{not json")
    (runs / "reward-1").mkdir()  # no eval.json: not a policy run
    evals = policy_evals(runs, votes)
    assert [e["policy"] for e in evals] == ["policy-1", "policy-2"]
    assert evals[0]["rm_win_rate"] == 0.81 and evals[0]["human"]["win_rate"] == pytest.approx(0.7)
    assert evals[1]["human"]["n"] == 0
    assert "broken/eval.json: skipped" in caplog.text


def test_html_escapes_model_names():
    evil = '<img src=x onerror="alert(1)">'
    board = leaderboard(votes_table([(evil, "B", "a"), ("B", evil, "tie"), (evil, "B", "b")]), rounds=10)
    for part in (table_html(board), plot_svg(board), matrix_html(board)):
        assert "<img" not in part and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in part
    assert plot_svg(board).count("<circle") == 2


# --------------------------------------------------------------------------------------
# the command line on a real store
# --------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    votes = simulated_votes([0.9, 0.2, -0.4], 600, seed=11)
    rows = list(zip(*(votes[c].to_pylist() for c in ("model_a", "model_b", "choice"))))
    rows += [(name(0), name(0), "a")] * 3 + [(name(1), name(2), "both_bad")] * 4
    path = write_battles(tmp_path / "store", rows)
    with DirectoryStore(path) as s:  # an undo: that vote must not count
        first = read_comparisons(path).to_pylist()[0]
        s.retract(first["event_id"], first["annotator"], vote=first)
    return path


def test_cli_prints_the_ranked_table(store, tmp_path):
    runs = tmp_path / "runs"
    (runs / "pol").mkdir(parents=True)
    (runs / "pol" / "eval.json").write_text(
        json.dumps(
            {
                "policy": "pol",
                "reference": name(0),
                "prompts": 20,
                "rm_win_rate": 0.55,
                "rm_win_rate_ci": [0.4, 0.7],
                "reward_run": "runs/rw",
            }
        )
    )
    r = run_cli("--data", str(store), "--rounds", "50", "--runs", str(runs))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    n = read_comparisons(store).num_rows
    assert f"from {n} standing votes" in out and "3 votes left out: both answers from the same model" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    assert "rating" in lines[header] and "95% CI" in lines[header] and "win rate" in lines[header]
    table = [line.split() for line in lines[header + 1 : header + 4]]
    assert [row[1] for row in table] == [name(0), name(1), name(2)]
    assert [row[0] for row in table] == ["1", "2", "3"]
    ratings = [float(row[2]) for row in table]
    assert ratings == sorted(ratings, reverse=True) and abs(sum(ratings) / 3 - 1000) < 0.2
    assert "reward model vs humans" in out and "no votes yet" in out and "55.0%" in out


def test_cli_json_and_anchor(store):
    r = run_cli("--data", str(store), "--rounds", "20", "--anchor", name(1), "--json", "--both-bad", "drop")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    by_model = {row["model"]: row for row in data["models"]}
    assert by_model[name(1)]["rating"] == 1000.0 and by_model[name(1)]["ci"] == [1000.0, 1000.0]
    assert data["anchor"] == name(1) and data["both_bad_dropped"] == 4 and data["self_pairs_ignored"] == 3
    assert data["votes"] == read_comparisons(store).num_rows
    assert data["battles"] == data["votes"] - 3 - 4
    assert sum(row["votes"] for row in data["models"]) == 2 * data["battles"]
    assert data["pairs"]["models"] == [row["model"] for row in data["models"]]
    games = np.array(data["pairs"]["games"])
    assert (games == games.T).all() and games.sum() == 2 * data["battles"]
    lo, hi = by_model[name(0)]["ci"]
    assert lo <= by_model[name(0)]["rating"] <= hi


def test_cli_errors_exit_2_with_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    DirectoryStore(empty).close()
    assert cli.main(["leaderboard", "--data", str(empty)]) == 2
    assert "no votes yet" in capsys.readouterr().err
    assert cli.main(["leaderboard", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no such comparison store" in capsys.readouterr().err
    one = write_battles(tmp_path / "one", [("solo", "solo", "a")])
    assert cli.main(["leaderboard", "--data", str(one)]) == 2
    assert "compares two different models" in capsys.readouterr().err
    two = write_battles(tmp_path / "two", [("x", "y", "a"), ("y", "x", "a")])
    assert cli.main(["leaderboard", "--data", str(two), "--anchor", "z"]) == 2
    assert "unknown anchor 'z'; the models are: x, y" in capsys.readouterr().err


def test_reading_only_the_vote_columns_still_applies_retractions(store):
    """The CLI reads model_a, model_b, choice only (trainer.store columns=): same
    rows as a full read, retracted votes gone, live tail events included."""
    with DirectoryStore(store, flush_every=10_000) as s:  # an un-flushed tail: one vote, one undo
        kept = s.append(battle(9000, name(2), name(0), "a"))
        gone = s.append(battle(9001, name(2), name(0), "a"))
        s.retract(gone["event_id"], gone["annotator"], vote=gone)
        full = read_comparisons(store)
        slim = read_comparisons(store, columns=["choice", "model_a", "model_b"])
    assert slim.column_names == ["choice", "model_a", "model_b"]
    assert sorted(zip(*(slim[c].to_pylist() for c in ("model_a", "model_b", "choice")))) == sorted(
        zip(*(full[c].to_pylist() for c in ("model_a", "model_b", "choice")))
    )
    assert (
        kept["event_id"] in full["event_id"].to_pylist()
        and gone["event_id"] not in full["event_id"].to_pylist()
    )
    with pytest.raises(ValueError, match="unknown column 'modle_a'"):
        read_comparisons(store, columns=["modle_a"])


def test_help_texts(capsys):
    for argv in (["--help"], ["leaderboard", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "leaderboard" in out and "--anchor MODEL" in out and "--both-bad {tie,drop}" in out


def test_the_tab_view_explains_an_empty_store_and_a_vanished_anchor(store, tmp_path):
    empty = tmp_path / "empty"
    DirectoryStore(empty).close()
    view = page(empty, tmp_path / "runs")
    assert not view["ok"] and "no votes yet" in view["message"] and view["table"] == ""
    assert not view["error"]  # an arena's normal start, not a failure: not shown in red
    unreadable = tmp_path / "not-a-store"
    unreadable.write_text("a file where the store should be")
    broken = page(unreadable, tmp_path / "runs")
    assert not broken["ok"] and broken["error"], broken["message"]
    view = page(store, tmp_path / "runs", anchor="retired-model")
    assert (
        view["ok"]
        and view["anchor"] is None
        and view["message"].startswith("The anchor retired-model has no votes")
    )
    assert view["models"] == [name(0), name(1), name(2)] and "<svg" in view["plot"]
    assert page(store, tmp_path / "runs", anchor=name(2))["board"].rating[-1] == 1000.0


def test_few_votes_give_a_provisional_model_and_no_false_certainty():
    # One vote: both models provisional, no ranks, and no interval (every bootstrap
    # round resamples the same single vote): nothing on the board claims to be sure.
    one = leaderboard(votes_table([("big", "small", "a")]), rounds=50)
    rows = {r["model"]: r for r in one.to_dict()["models"]}
    assert all(r["provisional"] and r["rank"] is None and r["ci"] == [None, None] for r in rows.values())
    assert any("provisional" in n for n in one.notes()) and any("no interval" in n for n in one.notes())
    assert "provisional" in table_html(one) and all(
        line[:4].strip() in ("rank", "–") for line in one.table().splitlines()
    )
    # Two well-voted models and a newcomer with three votes: the newcomer is rated, not ranked,
    # and the two others are ranked.
    rows = [("a", "b", "a")] * 14 + [("a", "b", "b")] * 6 + [("c", "a", "b")] * 3
    board = leaderboard(votes_table(rows), rounds=50)
    table = {r["model"]: r for r in board.to_dict()["models"]}
    assert table["c"]["provisional"] and table["c"]["rank"] is None and table["c"]["rating"] is not None
    assert not table["a"]["provisional"] and not table["b"]["provisional"]
    assert table["a"]["rank"] == 1 and table["b"]["rank"] in (1, 2)
    # Counted with no minimum, the newcomer would be ranked on its three votes.
    assert leaderboard(votes_table(rows), rounds=50, min_votes=0).to_dict()["models"][-1]["rank"] is not None


def test_a_unanimous_result_keeps_its_ranks_without_a_false_interval():
    board = leaderboard(votes_table([("a", "b", "a")] * 30), rounds=50)
    assert board.models == ["a", "b"] and board.rank.tolist() == [1, 2]  # 30 of 30 is a ranking
    assert board.no_interval == ["a", "b"] and all(r["ci"] == [None, None] for r in board.to_dict()["models"])


def test_votes_on_gold_items_do_not_rate_the_models(tmp_path):
    """A gold item's answers are written for the check and only carry the pool's model
    names (annotate/gold.py): votes on them are left out of the ratings, with both
    spellings of the gen_params JSON."""
    from annotate.leaderboard import standings

    gold = json.dumps({"selection": {"method": "gold", "gold": "a"}})
    gold_spaced = '{"selection":{"method":"gold","gold":"a"}}'
    pool = [vote_record(f"q{i}", "x", "y", "b" if i % 4 else "a", annotator=f"p{i % 3}") for i in range(24)]
    checks = [
        vote_record(
            f"g{i}", "right", "wrong", "a", annotator=f"p{i % 3}", gen_params=gold if i % 2 else gold_spaced
        )
        for i in range(60)
    ]
    store = write_store(tmp_path / "store", pool + checks)
    got = standings(store, tmp_path / "runs", rounds=5)
    ratings = {r["model"]: r["rating"] for r in got["board"].to_dict()["models"]}
    assert (
        ratings["m2"] > ratings["m1"]
    )  # the pool's votes: m2 wins 3 in 4; the 60 gold votes for m1 left out
    assert got["board"].to_dict()["votes"] == 24
