"""Confirmed-flagged annotators' votes are left out downstream by default (trainer/flags.py,
`read_counted_votes`): the leaderboard (the command, the tab's view, the /leaderboard
JSON and the policy evaluations' human win rate), the dashboard's statistics and the
Review tab's votes; `--include-flagged` / `include_flagged` / the page's box keeps them;
a cleared flag counts again; on a directory and on PostgreSQL, the flags read from the
store each time.

The store: ann and bob agree on six alpha-vs-beta pairs (alpha wins four of each's six),
mallory votes beta on all six. Without her alpha leads and Krippendorff's alpha is 1;
with her beta leads and the agreement collapses.
"""

import json
from pathlib import Path

import pytest
from helpers import (
    CHROMIUM,
    Server,
    add_users,
    login,
    preflab,
    train_tiny_reward_run,
    vote_record,
    write_pairs,
    write_store,
)

from annotate.leaderboard import leaderboard_json, standings
from annotate.queue import AssignmentQueue
from annotate.review import Reviewer
from annotate.service import Service
from annotate.web.leaderboard_tab import page as leaderboard_page
from trainer.flags import FlagExclusion, decision_record, flag_record, read_counted_votes
from trainer.store import open_store

LEFT_OUT = "6 votes of 1 confirmed-flagged annotator left out (mallory)"


def arena_votes() -> list[dict]:
    votes = []
    for i in range(6):
        honest = "a" if i < 4 else "b"
        for who, choice in (("ann", honest), ("bob", honest), ("mallory", "b")):
            votes.append(
                vote_record(
                    f"Question {i}?",
                    f"alpha's answer {i}",
                    f"beta's answer {i}",
                    choice,
                    model_a="alpha",
                    model_b="beta",
                    annotator=who,
                    decision_ms=1000 + i,
                )
            )
    return votes


def raise_flag(target, subject: str = "mallory") -> str:
    """The rule's flag about `subject` (as trainer.flags.flag_record writes it); its id."""
    row = {
        "annotator": subject,
        "gold_n": 4,
        "gold_correct": 0,
        "gold_accuracy": 0.0,
        "gold_high": 0.49,
        "flag_reason": "4 of 4 gold checks failed",
    }
    with open_store(target) as store:
        return store.append(flag_record(row, min_failed_gold=2, flag_below=0.6))["event_id"]


def decide(target, kind: str, flag_id: str, subject: str = "mallory") -> None:
    with open_store(target) as store:
        store.append(decision_record(kind, subject, "boss", flag_id, "checked by hand"))


@pytest.fixture(params=["directory", "postgresql"])
def target(request, tmp_path):
    """A store of arena_votes(), nobody flagged yet."""
    url = str(tmp_path / "store") if request.param == "directory" else request.getfixturevalue("pg_url")
    return write_store(url, arena_votes())


def order(board_json: dict) -> list[str]:
    return [row["model"] for row in board_json["models"]]


# ---- the shared helper ------------------------------------------------------------------


def test_the_helper_reads_the_flags_from_the_store_each_time(target):
    votes, exclusion = read_counted_votes(target, ["model_a", "choice"])
    assert votes.num_rows == 18 and votes.column_names == ["model_a", "choice"]
    assert exclusion == FlagExclusion() and exclusion.note() == ""

    flag_id = raise_flag(target)  # flagged, not yet confirmed: still counted
    assert read_counted_votes(target)[0].num_rows == 18

    decide(target, "flag_confirm", flag_id)
    votes, exclusion = read_counted_votes(target)
    assert votes.num_rows == 12 and set(votes["annotator"].to_pylist()) == {"ann", "bob"}
    assert exclusion == FlagExclusion(("mallory",), 6, False) and exclusion.dropped == 6
    assert exclusion.note() == f"{LEFT_OUT}; --include-flagged keeps them"
    votes, exclusion = read_counted_votes(target, include_flagged=True)
    assert votes.num_rows == 18 and exclusion.dropped == 0
    assert (
        exclusion.note() == "6 votes of 1 confirmed-flagged annotator included (mallory; --include-flagged)"
    )

    decide(target, "flag_clear", flag_id)
    votes, exclusion = read_counted_votes(target)
    assert votes.num_rows == 18 and exclusion == FlagExclusion()


# ---- the leaderboard --------------------------------------------------------------------


def test_the_leaderboard_command_leaves_a_confirmed_annotator_out_and_the_switch_keeps_her(target):
    before = json.loads(preflab("leaderboard", "--data", target, "--json", "--rounds", "0").stdout)
    assert order(before) == ["beta", "alpha"] and before["battles"] == 18
    assert before["excluded_flagged"]["annotators"] == []

    flag_id = raise_flag(target)
    decide(target, "flag_confirm", flag_id)
    result = preflab("leaderboard", "--data", target, "--json", "--rounds", "0")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert order(out) == ["alpha", "beta"] and out["battles"] == 12 and out["votes"] == 12
    assert out["excluded_flagged"] == {
        "annotators": ["mallory"],
        "votes": 6,
        "included": False,
        "dropped": 6,
        "note": f"{LEFT_OUT}; --include-flagged keeps them",
    }
    result = preflab("leaderboard", "--data", target, "--rounds", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{LEFT_OUT}; --include-flagged keeps them"
    assert "12 battles between 2 models, from 12 standing votes" in result.stdout

    out = json.loads(preflab("leaderboard", "--data", target, "--json", "--include-flagged").stdout)
    assert order(out) == ["beta", "alpha"] and out["battles"] == 18
    assert out["excluded_flagged"]["included"] is True and out["excluded_flagged"]["dropped"] == 0

    decide(target, "flag_clear", flag_id)  # cleared: her votes count again, with no switch
    out = json.loads(preflab("leaderboard", "--data", target, "--json", "--rounds", "0").stdout)
    assert order(out) == ["beta", "alpha"] and out["excluded_flagged"]["annotators"] == []


def test_the_tab_the_api_and_the_human_win_rate_leave_her_out_too(target, tmp_path):
    runs = tmp_path / "runs"
    (runs / "policy-1").mkdir(parents=True)
    (runs / "policy-1" / "eval.json").write_text(
        json.dumps(
            {
                "policy": "alpha",
                "reference": "beta",
                "prompts": 10,
                "rm_win_rate": 0.6,
                "rm_win_rate_ci": [0.3, 0.85],
                "reward_run": "runs/rm",
            }
        )
    )
    decide(target, "flag_confirm", raise_flag(target))

    view = leaderboard_page(target, runs, rounds=0)
    assert view["ok"] and view["models"] == ["alpha", "beta"]
    assert view["message"].startswith(f'{LEFT_OUT}; the box "Include confirmed-flagged annotators')
    assert view["board"].models == ["alpha", "beta"] and view["flagged"]["dropped"] == 6
    view = leaderboard_page(target, runs, rounds=0, include_flagged=True)
    assert view["board"].models == ["beta", "alpha"] and "included (mallory" in view["message"]
    styled = standings(target, runs, rounds=0, style_control=True)
    assert styled["board"].votes == 12 and styled["flagged"]["annotators"] == ["mallory"]

    api = leaderboard_json(target, runs)
    assert order(api) == ["alpha", "beta"] and api["excluded_flagged"]["dropped"] == 6
    human = api["policy_evals"][0]["human"]
    assert (human["n"], human["wins"], human["losses"]) == (12, 8, 4)
    api = leaderboard_json(target, runs, include_flagged=True, style_control=True)
    assert order(api) == ["beta", "alpha"] and api["style_control"]["votes"] == 18
    human = api["policy_evals"][0]["human"]
    assert (human["n"], human["wins"], human["losses"]) == (18, 8, 10)


def test_a_board_left_with_nothing_to_rank_says_whose_votes_were_left_out(tmp_path):
    data = write_store(
        tmp_path / "store",
        [v for v in arena_votes() if v["annotator"] == "mallory"],
    )
    decide(data, "flag_confirm", raise_flag(data))
    view = standings(data, tmp_path / "runs", rounds=0)
    assert not view["ok"] and not view["error"] and LEFT_OUT in view["message"]
    result = preflab("leaderboard", "--data", data)
    assert result.returncode == 2 and LEFT_OUT in result.stderr


# ---- the dashboard ----------------------------------------------------------------------


def test_the_dashboard_statistics_leave_her_out_unless_asked(target):
    with open_store(target) as store:
        service = Service(store, AssignmentQueue(), data=target, local_user="boss")
        honest = service.dashboard("boss")["summary"]
        flag_id = raise_flag(target)
        decide(target, "flag_confirm", flag_id)
        d = service.dashboard("boss")
        s, tables = d["summary"], d["tables"]
        assert s["votes"] == 12 and s["annotators"] == 2
        assert s["alpha"] == pytest.approx(1.0) and s["mean_kappa"] == pytest.approx(1.0)
        assert s["kappa_pairs"] == 1 and s["share_b"] == pytest.approx(4 / 12)
        assert [r["annotator"] for r in tables["by_annotator"]] == ["ann", "bob"]
        assert d["excluded_flagged"]["note"].startswith(LEFT_OUT)

        d = service.dashboard("boss", include_flagged=True)
        assert d["summary"] == honest  # as before the confirmation: every vote
        assert honest["votes"] == 18 and honest["annotators"] == 3 and honest["alpha"] < 0.2
        assert "included (mallory" in d["excluded_flagged"]["note"]

        decide(target, "flag_clear", flag_id)
        d = service.dashboard("boss")
        assert d["summary"] == honest and d["excluded_flagged"]["note"] == ""


# ---- the Review tab ---------------------------------------------------------------------


def test_the_review_reads_the_same_votes(target, tmp_path):
    reviewer = Reviewer(target, tmp_path / "runs")
    assert len(reviewer.read_votes()) == 18
    decide(target, "flag_confirm", raise_flag(target))
    rows, exclusion = reviewer.read_counted()
    assert len(rows) == 12 and {r["annotator"] for r in rows} == {"ann", "bob"}
    assert exclusion.dropped == 6
    assert len(reviewer.read_votes(include_flagged=True)) == 18


def test_a_review_job_scores_without_her_and_says_so(tmp_path):
    run = train_tiny_reward_run(tmp_path / "runs")
    data = write_store(tmp_path / "store", arena_votes())
    decide(data, "flag_confirm", raise_flag(data))
    reviewer = Reviewer(data, run.parent)
    reviewer.start(run.name)
    job = reviewer.wait(run.name)
    assert job["state"] == "done", job
    assert len(job["rows"]) == 12 and {r["annotator"] for r in job["rows"]} == {"ann", "bob"}
    assert LEFT_OUT in job["message"] and job["flagged"]["dropped"] == 6
    reviewer.start(run.name, include_flagged=True)
    job = reviewer.wait(run.name)
    assert len(job["rows"]) == 18 and job["include_flagged"] and "included (mallory" in job["message"]


# ---- the page ---------------------------------------------------------------------------


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")
def test_the_page_says_whose_votes_it_left_out_and_the_box_brings_them_back(tmp_path, browser):
    add_users(tmp_path / "users.toml", boss="admin")
    data = write_store(tmp_path / "store", arena_votes())
    decide(data, "flag_confirm", raise_flag(data))
    pairs = write_pairs(tmp_path / "pairs.jsonl", 3)
    args = ("--pairs", str(pairs), "--data", str(data), "--auth", str(tmp_path / "users.toml"))
    with Server(tmp_path, *args) as server:
        page = login(browser, server.url, "boss")
        page.get_by_role("tab", name="Leaderboard").click()
        page.wait_for_selector("#lb-ranked tbody tr", timeout=30_000)
        models = "() => [...document.querySelectorAll('#lb-ranked tbody tr')].map(tr => tr.dataset.model)"
        assert page.evaluate(models) == ["alpha", "beta"]
        assert LEFT_OUT in page.inner_text("#lb-message")
        page.locator("#lb-include-flagged input").check()
        page.wait_for_function(
            "() => (document.querySelector('#lb-message') || {}).innerText?.includes('included')",
            timeout=30_000,
        )
        assert page.evaluate(models) == ["beta", "alpha"]

        page.get_by_role("tab", name="Dashboard").click()
        page.wait_for_selector("#dash-flagged", timeout=30_000)
        assert LEFT_OUT in page.inner_text("#dash-flagged")
        assert page.get_attribute("#dash-flagged", "data-state") == "excluded"
        page.locator("#dash-include-flagged input").check()
        page.wait_for_selector("#dash-flagged[data-state='included']", timeout=30_000)
        assert "included (mallory" in page.inner_text("#dash-flagged")
        page.context.close()
