"""The Review tab in a real Chromium: voted pairs with the reward model's scores beside
the human vote, the disagreements, and a pair sent back for one more vote, which then
comes to the next annotator. The server runs with --sampling uncertain on the same
(tiny, real) reward run, so the votes cast here record how their pair was chosen.
"""

import json
import math
import time
from pathlib import Path

import pytest
from helpers import CHROMIUM, Server, add_users, login, train_tiny_reward_run, write_pairs

from annotate.pairs import load_pairs
from trainer.store import read_comparisons
from trainer.store.directory_writer import DirectoryStore

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

VOTES = [
    (0, "ann", "a", 2, "a"),
    (1, "ann", "b", None, "a"),
    (2, "ben", "tie", None, "b"),
    (3, "ben", "a", 1, "b"),  # ben saw answer b on the left and chose the right one
    (1, "ben", "a", 2, "a"),  # against ann's vote on the same pair: the model disagrees with one
]  # pair index (0 is the XSS pair), annotator, choice, strength, the answer shown on the left


@pytest.fixture(scope="module")
def review_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review-browser")
    run = train_tiny_reward_run(tmp / "runs")
    pairs_file = write_pairs(tmp / "pairs.jsonl", 4, xss=True)  # 5 pairs; 4 get votes, 1 stays fresh
    pairs, _ = load_pairs(pairs_file)
    with DirectoryStore(tmp / "store") as store:
        for i, who, choice, strength, left in VOTES:
            store.append(
                {
                    **pairs[i].record_fields(),
                    "kind": "vote",
                    "left": left,
                    "choice": choice,
                    "strength": strength,
                    "annotator": who,
                    "decision_ms": 1500,
                }
            )
    add_users(tmp / "users.toml", ann="annotator", boss="admin")
    server = Server(
        tmp,
        "--pairs",
        str(pairs_file),
        "--data",
        str(tmp / "store"),
        "--runs",
        str(tmp / "runs"),
        "--auth",
        str(tmp / "users.toml"),
        "--sampling",
        "uncertain",
        "--reward-model",
        str(run),
    )
    with server:
        yield server, tmp / "store", run, pairs


def wait_done(page, timeout=180_000):
    page.wait_for_selector(
        "#review-state[data-state=done], #review-state[data-state=failed]", timeout=timeout
    )
    assert page.get_attribute("#review-state", "data-state") == "done", page.inner_text("#review-state")


def test_review_tab_shows_reward_scores_beside_the_human_vote(review_app, browser):
    from trainer.reward_model import RewardModel

    server, store, run, pairs = review_app
    page = login(browser, server.url, "boss")
    fresh_id = page.get_attribute(".prompt-card", "data-pair-id")  # the one pair nobody voted on
    assert fresh_id == pairs[4].pair_id

    page.get_by_role("tab", name="Review").click()
    wait_done(page)
    assert page.input_value("#review-run input") == run.name  # the newest finished run, picked for you

    # -- every vote, with the reward model's numbers beside the human vote -------------
    votes = {r["event_id"]: r for r in read_comparisons(store).to_pylist()}
    rows = page.locator("#review-votes-table tbody tr")
    assert rows.count() == len(VOTES)
    rm = RewardModel.load(run)
    against = 0  # decisive votes the model gives less than even odds
    for k in range(rows.count()):
        row = rows.nth(k)
        vote = votes[row.get_attribute("data-event-id")]
        cells = row.locator("td")
        assert cells.nth(1).inner_text() == vote["annotator"]
        a, b = rm.score([vote["prompt"]] * 2, [vote["response_a"], vote["response_b"]])
        left, right = (a, b) if vote["left"] == "a" else (b, a)  # as the annotator saw them
        if vote["choice"] in ("a", "b"):
            side = "left" if vote["choice"] == vote["left"] else "right"
            assert cells.nth(2).inner_text().startswith(f"{side} better")
            assert cells.nth(2).inner_text().endswith(f"answer {vote['choice'].upper()}")
            against += (left > right) != (side == "left")
        else:
            assert cells.nth(2).inner_text() == {"tie": "tie", "both_bad": "both bad"}[vote["choice"]]
        assert float(cells.nth(3).inner_text()) == pytest.approx(left, abs=0.006)
        assert float(cells.nth(4).inner_text()) == pytest.approx(right, abs=0.006)
        p_left = 1 / (1 + math.exp(-(left - right)))
        assert float(row.get_attribute("data-p-left")) == pytest.approx(p_left, abs=1e-3)
        assert float(cells.nth(5).inner_text()) == pytest.approx(p_left, abs=0.006)
        p_a = 1 / (1 + math.exp(-(a - b)))
        assert cells.nth(6).inner_text() == (
            "–"
            if vote["choice"] not in ("a", "b")
            else "yes"
            if (p_a > 0.5) == (vote["choice"] == "a")
            else "no"
        )
    summary = page.inner_text("#review-metrics")
    assert f"Votes scored\n{len(VOTES)}" in summary and "Decisive votes\n4" in summary

    # -- model text is shown, never run --------------------------------------------------
    page.locator(f'#review-votes-table tr[data-pair-id="{pairs[0].pair_id}"] details summary').click()
    assert page.evaluate("window.__pwned") is None and page.title() == "preflab"
    assert (
        page.locator(
            "#review-votes script, #review-votes img, #review-disagreements script, #review-disagreements img"
        ).count()
        == 0
    )
    assert "<script>window.__pwned" in page.inner_text("#review-votes")

    # -- disagreements: the worst one goes back for one more vote ------------------------
    ranked = page.locator("#review-disagreements-table tbody tr")
    assert against >= 1 and ranked.count() == against  # only real disagreements; no tie
    p_human = [float(ranked.nth(k).get_attribute("data-p-human")) for k in range(against)]
    assert p_human == sorted(p_human) and max(p_human) < 0.5
    worst = ranked.first.get_attribute("data-pair-id")
    page.locator("#review-topn input").fill("1")
    page.locator("#review-send-top").click()
    page.wait_for_function(
        "() => (document.querySelector('#review-report') || {}).innerText?.includes('Queued')", timeout=15_000
    )
    assert "Queued 1 pair for one more vote" in page.inner_text("#review-report")

    # -- boss (who voted on nothing) gets it right after the pair on screen ---------------
    page.get_by_role("tab", name="Annotate").click()
    page.keyboard.press("1")
    page.wait_for_function(
        "old => { const c = document.querySelector('.prompt-card');"
        " return c && c.getAttribute('data-pair-id') !== old; }",
        arg=fresh_id,
        timeout=15_000,
    )
    assert page.get_attribute(".prompt-card", "data-pair-id") == worst
    page.keyboard.press("2")
    page.wait_for_function(
        "old => { const c = document.querySelector('.prompt-card');"
        " return !c || c.offsetParent === null || c.getAttribute('data-pair-id') !== old; }",
        arg=worst,
        timeout=15_000,
    )

    # -- the store: how each pair was chosen is in gen_params -----------------------------
    mine = [r for r in read_comparisons(store).to_pylist() if r["annotator"] == "boss"]
    how = {r["pair_id"]: json.loads(r["gen_params"])["selection"] for r in mine}
    assert how[worst] == {"method": "relabel", "reward_run": run.name}
    assert how[fresh_id]["method"] in ("random", "uncertain", "unscored")
    assert how[fresh_id]["reward_run"] == run.name and how[fresh_id]["mix"] == 0.5

    # -- a second look: the new votes' pairs were scored already (by the sampler) ---------
    page.get_by_role("tab", name="Review").click()
    page.locator("#review-score").click()
    page.wait_for_function(
        "n => document.querySelectorAll('#review-votes-table tbody tr').length === n",
        arg=len(VOTES) + 2,
        timeout=120_000,
    )
    wait_done(page)
    assert "0 pairs newly scored" in page.inner_text("#review-state")
    assert (run / "review_scores.parquet").is_file()
    page.context.close()

    # -- an annotator gets no Review tab ---------------------------------------------------
    ann = login(browser, server.url, "ann")
    ann.get_by_role("tab", name="Guidelines").wait_for(state="visible", timeout=15_000)
    time.sleep(1.0)  # the tab's own load event has answered by now
    assert not ann.get_by_role("tab", name="Review").is_visible()
    ann.context.close()
