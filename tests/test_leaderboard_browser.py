"""The Leaderboard tab in a real Chromium: an admin sees the ranked models, the SVG plot
of ratings with intervals, the win-rate matrix and the policy evaluations; the anchor
dropdown re-anchors; the style-control toggle shows the style-controlled ratings and the
coefficients; a model name full of HTML is shown as text; an annotator sees no
Leaderboard tab and is refused the /leaderboard API.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    CHROMIUM,
    Server,
    add_users,
    client,
    login,
    screenshot,
    vote_record,
    write_pairs,
    write_store,
)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

EVIL = '<img src=x onerror="window.__pwned = 1">'
STRENGTH = {"alpha": 1.0, "beta": 0.3, "gamma": -0.4, EVIL: -0.9}


def seed_votes(store: Path, n: int = 600) -> None:
    """n votes between random pairs of the four models, by strength; imported votes
    (annotator import:...) so that the annotation queue leaves them alone."""
    rng = np.random.default_rng(0)
    names = list(STRENGTH)
    records = []
    for i in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        p = 1 / (1 + np.exp(STRENGTH[names[b]] - STRENGTH[names[a]]))
        choice = "tie" if rng.random() < 0.1 else ("a" if rng.random() < p else "b")
        # answers of random lengths (for the style-control toggle), unrelated to the votes
        length_a, length_b = rng.integers(5, 80, 2)
        records.append(
            vote_record(
                f"Q{i % 5}",
                " ".join(["x"] * int(length_a)),
                " ".join(["y"] * int(length_b)),
                choice,
                pair_id=f"seed-{i}",
                prompt_id=f"p-{i % 5}",
                model_a=names[a],
                model_b=names[b],
                annotator="import:seed",
            )
        )
    write_store(store, records)


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaderboard")
    add_users(tmp / "users.toml", ann="annotator", boss="admin")
    seed_votes(tmp / "store")
    (tmp / "runs" / "policy-7").mkdir(parents=True)
    (tmp / "runs" / "policy-7" / "eval.json").write_text(
        json.dumps(
            {
                "policy": "policy-7",
                "reference": "alpha",
                "prompts": 40,
                "rm_win_rate": 0.625,
                "rm_win_rate_ci": [0.47, 0.76],
                "reward_run": "runs/reward-1",
            }
        )
    )
    # a saved `preflab eval-reward` result of a reward run (trainer/reward_eval.py's file)
    (tmp / "runs" / "reward-1" / "reward-evals").mkdir(parents=True)
    (tmp / "runs" / "reward-1" / "reward-evals" / "heldout-0a1b2c3d.json").write_text(
        json.dumps(
            {
                "accuracy": 0.6875,
                "accuracy_ci": [0.61, 0.76],
                "pairs": 160,
                "rows": 160,
                "created_at": 1.0,
                "data": "/data/heldout.jsonl",
                "ece": 0.042,
                "rewardbench_score": 0.7,
                "length": {"pairs": 150, "longer_scored_higher": 0.58, "chosen_longer": 0.55, "corr": 0.1},
            }
        )  # fmt: skip
    )
    pairs = write_pairs(tmp / "pairs.jsonl", 3)
    with Server(
        tmp,
        "--pairs",
        str(pairs),
        "--data",
        str(tmp / "store"),
        "--runs",
        str(tmp / "runs"),
        "--auth",
        str(tmp / "users.toml"),
    ) as server:
        yield server


def ranked(page) -> list[dict]:
    return page.evaluate("""() => [...document.querySelectorAll('#lb-ranked tbody tr')].map(tr => ({
        model: tr.dataset.model, rank: tr.cells[0].innerText, rating: parseFloat(tr.cells[2].innerText)}))""")


def test_admin_sees_the_leaderboard_and_annotators_do_not(arena, browser):
    ann = login(browser, arena.url, "ann")
    assert ann.get_by_role("tab", name="Annotate").is_visible()
    assert not ann.get_by_role("tab", name="Leaderboard").is_visible()
    ann.context.close()
    with pytest.raises(Exception, match="admins"):
        client(arena.url, "ann").predict("", api_name="/leaderboard")

    page = login(browser, arena.url, "boss")
    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_selector("#lb-ranked tbody tr", timeout=30_000)
    rows = ranked(page)
    assert [r["model"] for r in rows] == list(STRENGTH)  # strongest first, as simulated
    assert rows[0]["rank"] == "1" and rows[-1]["rank"] != "1"
    assert abs(sum(r["rating"] for r in rows) / len(rows) - 1000) < 1  # centred on the mean
    assert "600 battles between 4 models" in page.inner_text("#lb-message")

    # the plot: an inline SVG with one dot and one interval bar per model
    assert page.locator("#lb-plot svg.lb-plot").is_visible()
    assert page.locator("#lb-plot svg circle").count() == 4
    assert page.locator("#lb-plot svg line[stroke='#6366f1']").count() == 4
    # the matrix and the policy evaluation next to the humans' (no votes on policy-7 yet)
    assert page.locator("#lb-matrix table.lb-matrix tbody tr").count() == 4
    evals = page.inner_text("#lb-evals")
    assert "policy-7" in evals and "62.5%" in evals and "no votes yet" in evals
    reward_evals = page.inner_text("#lb-reward-evals")
    assert "reward-1" in reward_evals and "heldout.jsonl" in reward_evals and "68.8%" in reward_evals
    assert "0.042" in reward_evals and "58.0% (chosen longer: 55.0%)" in reward_evals

    # the HTML in a model name is text, never markup
    time.sleep(0.5)
    assert page.evaluate("window.__pwned") is None
    assert EVIL in page.inner_text("#lb-ranked")
    assert page.locator("#lb-table img, #lb-plot img, #lb-matrix img").count() == 0

    # anchor on beta: beta at exactly 1000, the order unchanged
    page.locator("#lb-anchor input").click()
    page.get_by_role("option", name="beta", exact=True).click()
    page.wait_for_function(
        "() => (document.querySelector('#lb-message') || {}).innerText?.includes('beta = 1000')",
        timeout=30_000,
    )
    rows = ranked(page)
    assert [r["model"] for r in rows] == list(STRENGTH)
    assert next(r for r in rows if r["model"] == "beta")["rating"] == 1000
    page.context.close()

    data = client(arena.url, "boss").predict("gamma", api_name="/leaderboard")
    by_model = {r["model"]: r for r in data["models"]}
    assert by_model["gamma"]["rating"] == 1000.0 and data["votes"] == 600
    assert data["policy_evals"][0]["policy"] == "policy-7"


def test_style_control_toggle_shows_the_controlled_ratings_and_the_coefficients(arena, browser):
    page = login(browser, arena.url, "boss")
    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_selector("#lb-ranked tbody tr", timeout=30_000)
    assert page.locator("#lb-style-coefs").count() == 0  # off by default
    page.locator("#lb-style input").check()
    page.wait_for_selector("#lb-style-coefs table.lb-coefs", timeout=30_000)
    # lengths were drawn without regard to the votes: only length varies (no markdown),
    # and the ranking is the plain one's, the plain rating shown beside each model
    assert page.locator("#lb-style-coefs tbody tr").count() == 1
    assert page.locator("#lb-style-coefs tbody tr").get_attribute("data-feature") == "length"
    assert "left out of the fit, no pair differs in them: headers, lists, bold" in page.inner_text(
        "#lb-style-coefs"
    )
    assert "plain rating" in page.inner_text("#lb-ranked thead")
    assert [r["model"] for r in ranked(page)] == list(STRENGTH)
    assert "style-controlled" in page.inner_text("#lb-message")
    assert EVIL in page.inner_text("#lb-ranked") and page.evaluate("window.__pwned") is None
    screenshot(page, "leaderboard-style-control")  # for a person to look at
    page.locator("#lb-style input").uncheck()
    page.wait_for_function("() => !document.querySelector('#lb-style-coefs')", timeout=30_000)
    assert "plain rating" not in page.inner_text("#lb-ranked thead")
    page.context.close()

    data = client(arena.url, "boss").predict("", True, api_name="/leaderboard")
    assert [c["feature"] for c in data["style_control"]["coefficients"]] == ["length"]
    assert {r["model"] for r in data["style_control"]["models"]} == set(STRENGTH)
