"""Gold items in a real Chromium: with --gold-feedback an annotator is told after a gold
vote whether they matched and why, /config says nothing of gold, and an admin sees the
gold-accuracy plot and confirms the flag the rule raised, which is stored as an event."""

import json
from pathlib import Path

import pytest
from helpers import CHROMIUM, Server, add_users, client, login, write_jsonl, write_pairs

from trainer.flags import confirmed_flags, read_flag_events

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

EXPLANATION = "Paris is the capital of France; Lyon is not."


def gold_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": f"What is the capital of France? ({i})",
            "response_a": f"Lyon ({i}).",
            "response_b": f"Paris ({i}).",
            "model_a": "alpha",
            "model_b": "beta",
            "gold": "b",
            "explanation": EXPLANATION,
        }
        for i in range(n)
    ]


def test_gold_feedback_and_the_admins_flag_confirmation(tmp_path, browser):
    add_users(tmp_path / "users.toml", ann="annotator", mallory="annotator", boss="admin")
    store = tmp_path / "store"
    args = ["--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 6)), "--data", str(store)]
    args += [
        "--auth",
        str(tmp_path / "users.toml"),
        "--gold",
        str(write_jsonl(tmp_path / "g.jsonl", gold_rows(4))),
    ]
    with Server(tmp_path, *args, "--gold-rate", "1", "--gold-feedback") as server:
        # mallory fails all four checks through the API (the page would do the same)
        api = client(server.url, "mallory")
        view = api.predict(api_name="/next")
        for _ in range(4):
            wrong = "right" if view["pair"]["left"].startswith("Paris") else "left"
            view = api.predict(view["pair"]["pair_id"], wrong, "", "", api_name="/vote")
            assert view["ack"]["gold"]["matched"] is False

        page = login(browser, server.url, "ann")
        config = page.request.get(server.url + "config").text()
        # Nothing of the gold items themselves (the admins' panel has its labels here on
        # every server, with --gold or without: they tell no pair apart).
        assert "Paris" not in config and "Lyon" not in config and "capital of France" not in config
        assert EXPLANATION not in config and '"selection"' not in config
        side = "#vote-left" if page.inner_text("#answer-left").find("Paris") >= 0 else "#vote-right"
        page.locator(side).click()
        page.wait_for_selector("#gold-feedback", timeout=15_000)
        feedback = page.locator("#gold-feedback")
        assert feedback.get_attribute("data-matched") == "true"
        assert "You matched" in feedback.inner_text() and EXPLANATION in feedback.inner_text()
        page.context.close()

        boss = login(browser, server.url, "boss")
        boss.get_by_role("tab", name="Dashboard").click()
        boss.wait_for_selector("#gold-plot .annotator-point[data-annotator='mallory']", timeout=20_000)
        point = boss.locator("#gold-plot .annotator-point[data-annotator='mallory']")
        assert (
            point.get_attribute("data-state") == "flagged" and float(point.get_attribute("data-high")) < 0.6
        )
        assert boss.locator("#gold-plot .annotator-point[data-annotator='ann']").get_attribute(
            "data-accuracy"
        ) == ("1.0000")
        boss.get_by_role("button", name="Confirm flag (exclude their votes)").click()
        boss.wait_for_function(
            "() => (document.querySelector('#flag-status') || {}).innerText?.includes('confirmed')",
            timeout=15_000,
        )
        boss.context.close()
    events = read_flag_events(store)
    assert [(e["kind"], e["subject"]) for e in events] == [("flag", "mallory"), ("flag_confirm", "mallory")]
    assert events[1]["annotator"] == "boss" and confirmed_flags(events) == {"mallory"}
    assert json.loads(events[0]["detail"])["gold_failed"] == 4
