"""A rubric (serve --rubric) on the real page, in Chromium: the criteria show beside the
overall vote, a vote without a required one is refused and nothing is stored, a vote with
them is stored in the record's a/b terms; the JSON API takes and checks them the same way;
on a phone the criteria fit the screen."""

import json
from pathlib import Path

import pytest
from helpers import CHROMIUM, PHONE, Server, add_users, client, login, screenshot, write_pairs

from trainer.store import read_comparisons

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

RUBRIC = """
[[criteria]]
name = "helpful"
label = "More helpful"
kind = "pairwise"
required = true

[[criteria]]
name = "clarity"
label = "Clarity"
kind = "scale"

[[flags]]
name = "unsafe"
label = "Unsafe"
"""


def stored(store: Path) -> list[dict]:
    return read_comparisons(store).to_pylist() if store.exists() else []


def test_criteria_on_the_page_and_the_api(tmp_path, browser):
    add_users(tmp_path / "users.toml", ann="annotator", bob="annotator")
    (tmp_path / "rubric.toml").write_text(RUBRIC)
    store = tmp_path / "store"
    args = ["--pairs", str(write_pairs(tmp_path / "pairs.jsonl", 6)), "--data", str(store)]
    args += ["--auth", str(tmp_path / "users.toml"), "--rubric", str(tmp_path / "rubric.toml")]
    with Server(tmp_path, *args) as server:
        api = client(server.url, "bob")
        view = api.predict(api_name="/next")
        with pytest.raises(Exception, match="More helpful is required"):
            api.predict(view["pair"]["pair_id"], "left", "", "", None, api_name="/vote")
        assert stored(store) == []
        done = api.predict(view["pair"]["pair_id"], "left", "", "", {"helpful": "right"}, api_name="/vote")
        assert done["ack"] is not None
        (vote,) = stored(store)
        assert json.loads(vote["criteria"]) == {"helpful": "b" if vote["left"] == "a" else "a"}

        page = login(browser, server.url, "ann")
        page.wait_for_selector("#criterion-helpful", timeout=20_000)
        assert "More helpful (required) [q / w / e]" in page.inner_text("#rubric")
        left_text = page.inner_text("#answer-left")
        page.locator("#vote-left").click()  # the required criterion is missing
        page.wait_for_selector("text=More helpful is required", timeout=15_000)
        assert [v["annotator"] for v in stored(store)] == ["bob"]
        page.locator("#answer-left").click()  # off any field: the keys act on the page
        page.keyboard.press("w")  # the first pairwise criterion's B ...
        assert page.locator("#criterion-helpful input:checked").get_attribute("value") == "right"
        page.keyboard.press("q")  # ... and A, by key
        assert page.locator("#criterion-helpful input:checked").get_attribute("value") == "left"
        page.locator("#criterion-clarity-left").get_by_text("4", exact=True).click()
        page.locator("#criterion-clarity-right").get_by_text("2", exact=True).click()
        page.locator("#flags-right").get_by_text("Unsafe", exact=True).click()
        page.locator("#vote-right").click()
        page.wait_for_function(
            "() => (document.querySelector('#status') || {}).innerText?.startsWith('Saved')", timeout=15_000
        )
        (mine,) = [v for v in stored(store) if v["annotator"] == "ann"]
        left, right = mine["left"], "b" if mine["left"] == "a" else "a"
        assert mine[f"response_{left}"].strip() in left_text and mine["choice"] == right
        assert json.loads(mine["criteria"]) == {
            "helpful": left,
            "clarity": {left: 4, right: 2},
            "flags": {right: ["unsafe"]},
        }
        # the next pair starts with nothing judged
        assert page.locator("#criterion-helpful input:checked").count() == 0
        page.context.close()

        phone = login(browser, server.url, "ann", PHONE)
        phone.wait_for_selector("#criterion-helpful", timeout=20_000)
        width = phone.evaluate("document.documentElement.clientWidth")
        assert phone.evaluate("document.documentElement.scrollWidth") <= width
        box = phone.locator("#rubric").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width + 1
        screenshot(phone, "annotate-rubric-phone")
        phone.context.close()
