"""The page's layout in a real Chromium, at phone size (390x844) and desktop size
(1300x900): on a phone the two answers are stacked, no answer text runs past its card,
a long answer says there is more below (and a short one does not), and the vote buttons
stay on screen wherever the page is scrolled; a vote cast there is stored as the side
that was tapped. On a desktop the answers stay side by side.

The last test saves a screenshot of every tab at both sizes under
test-artifacts/screenshots/ (or $PREFLAB_ARTIFACTS/screenshots/), for a person to look at.
"""

from pathlib import Path

import pytest
from helpers import (
    CHROMIUM,
    DESKTOP,
    PHONE,
    Server,
    add_users,
    login,
    screenshot,
    train_tiny_reward_run,
    vote_record,
    write_jsonl,
    write_store,
)

from trainer.store import read_comparisons

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

LAST_LINE = "The last paragraph of the long answer."
LONG_ANSWER = "\n\n".join(
    [
        "Here is a long answer, with every shape of text that can run past a narrow card.",
        "A word with no place to break: " + "Pneumonoultramicroscopicsilicovolcanoconiosis" * 4,
        "A link: https://example.org/" + "a-very-long-path-segment/" * 8,
        "```python\nresult = compute(" + ", ".join(f"argument_{i}" for i in range(14)) + ")\n```",
        "| model | wins | losses | ties | both bad | share | interval |\n"
        "|---|---|---|---|---|---|---|\n"
        "| SmolLM2-135M-Instruct | 120 | 80 | 10 | 5 | 0.58 | 0.51-0.65 |",
        *(f"Paragraph {i}: " + "a sentence that fills the card with plain words. " * 4 for i in range(12)),
        LAST_LINE,
    ]
)
SHORT_ANSWER = "Four."


def seed_votes(store: Path) -> None:
    """Imported votes between three models, so that the Dashboard, the Leaderboard and
    Review have something to show; the queue leaves imported votes alone."""
    models = ["alpha", "beta", "gamma"]
    records = []
    for i in range(30):
        a, b = models[i % 3], models[(i + 1) % 3]
        records.append(
            vote_record(
                f"Seeded question {i % 6}?",
                f"{a} says {i}",
                f"{b} says {i}",
                "a" if i % 4 else "b",
                pair_id=f"seed-{i}",
                prompt_id=f"p-{i % 6}",
                model_a=a,
                model_b=b,
                annotator="import:seed",
            )
        )
    write_store(store, records)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    add_users(tmp / "users.toml", ann="annotator", ben="annotator", boss="admin")
    rows = [
        {
            "prompt": "What is two plus two? Explain at length.",
            "response_a": LONG_ANSWER,
            "response_b": SHORT_ANSWER,
            "model_a": "alpha",
            "model_b": "beta",
        },
        *(
            {
                "prompt": f"Question {i}: what is {i} plus {i}?",
                "response_a": f"alpha answer {i}",
                "response_b": f"beta answer {i}",
                "model_a": "alpha",
                "model_b": "beta",
            }
            for i in range(3)
        ),
    ]
    pairs = write_jsonl(tmp / "pairs.jsonl", rows)
    seed_votes(tmp / "store")
    train_tiny_reward_run(tmp / "runs")  # the Train tab's plots and Review's scores
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
        "--overlap",
        "3",  # ann, ben and boss all get the long pair first
    ) as server:
        yield server, tmp / "store"


def boxes(page) -> dict:
    """Where the two answer cards are, and which one holds the long answer."""
    return page.evaluate(
        """last => {
          const out = {};
          for (const side of ["left", "right"]) {
            const card = document.querySelector(`#answer-${side} .answer`);
            const r = card.getBoundingClientRect();
            out[side] = {top: r.top, bottom: r.bottom, left: r.left, right: r.right,
                         long: card.innerText.includes(last)};
          }
          return out;
        }""",
        LAST_LINE,
    )


# gradio's container clips what runs past the window (the page itself never scrolls
# sideways): what is cut shows as its inner box being wider than the window.
WIDER_THAN_WINDOW = """() => {
  const main = document.querySelector(".gradio-container > .main");
  return main.scrollWidth > document.documentElement.clientWidth;
}"""


def overflowing(page) -> list[str]:
    """Every piece of the prompt's and answers' text that runs past the right edge of its
    card, or of the window, except inside a block that scrolls sideways on its own (code,
    a table)."""
    bad = ["the page is wider than the window"] if page.evaluate(WIDER_THAN_WINDOW) else []
    return bad + page.evaluate(
        """() => {
          const bad = [];
          const width = document.documentElement.clientWidth;
          for (const card of document.querySelectorAll(".prompt-card, #answer-left .answer, #answer-right .answer")) {
            const edge = Math.min(card.getBoundingClientRect().right, width) + 1;
            if (card.scrollWidth > card.clientWidth) bad.push(`${card.parentElement.id}: scrollWidth`);
            for (const el of card.querySelectorAll("*")) {
              const scroller = el.closest("pre, .table-scroll");
              if (scroller && scroller !== el) continue;  // inside a sideways scroller
              const r = el.getBoundingClientRect();
              if (r.width && r.right > edge) bad.push(`${el.tagName}: right ${r.right} > ${edge}`);
            }
          }
          return bad;
        }"""
    )


def on_screen(page, selector: str) -> bool:
    """The button is inside the viewport and nothing covers its middle (a tap hits it)."""
    return page.evaluate(
        """sel => {
          const el = document.querySelector(sel);
          const button = el.tagName === "BUTTON" ? el : el.querySelector("button");
          const r = button.getBoundingClientRect();
          if (r.top < 0 || r.bottom > window.innerHeight || r.left < 0 || r.right > window.innerWidth) return false;
          const hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
          return hit !== null && button.contains(hit);
        }""",
        selector,
    )


def cue_visible(page, side: str) -> bool:
    return page.locator(f"#answer-{side} .more-cue").is_visible()


def test_phone_stacks_the_answers_and_keeps_the_vote_buttons_on_screen(app, browser):
    server, store = app
    page = login(browser, server.url, "ann", PHONE)
    pair_id = page.get_attribute(".prompt-card", "data-pair-id")
    b = boxes(page)
    assert b["right"]["top"] >= b["left"]["bottom"]  # B under A, not beside it
    assert b["left"]["left"] >= 0 and b["left"]["right"] <= 390
    assert overflowing(page) == []
    long_side, short_side = ("left", "right") if b["left"]["long"] else ("right", "left")
    assert b[short_side]["long"] is False

    # The long answer says it goes on; all of its text is on the page (screen readers read it).
    page.wait_for_selector(f"#answer-{long_side} .answer[data-more]", timeout=5_000)
    assert cue_visible(page, long_side) and not cue_visible(page, short_side)
    assert LAST_LINE in page.inner_text(f"#answer-{long_side}")
    assert page.locator(f"#answer-{long_side} [aria-hidden=true]").all_inner_texts() == ["more below ↓"]

    # The vote buttons are on screen at the top of the page and half-way down.
    assert page.evaluate("document.documentElement.scrollHeight") > 844 + 200  # a page that scrolls
    for where in ("0", "(document.documentElement.scrollHeight - window.innerHeight) / 2"):
        page.evaluate(f"window.scrollTo(0, {where})")
        for button in ("#vote-left", "#vote-right", "#vote-tie", "#vote-both-bad"):
            assert on_screen(page, button), (button, where)
    page.evaluate("window.scrollTo(0, 0)")

    # Scrolled to its end, the long answer has no more to show: the cue goes.
    page.eval_on_selector(f"#answer-{long_side} .answer", "el => el.scrollTo(0, el.scrollHeight)")
    page.wait_for_function(
        f"() => !document.querySelector('#answer-{long_side} .answer').hasAttribute('data-more')",
        timeout=5_000,
    )
    assert not cue_visible(page, long_side)
    page.eval_on_selector(f"#answer-{long_side} .answer", "el => el.scrollTo(0, 0)")
    page.wait_for_selector(f"#answer-{long_side} .answer[data-more]", timeout=5_000)

    # Tapping the cue shows the whole answer in place.
    page.locator(f"#answer-{long_side} .more-cue").tap()
    page.wait_for_selector(f"#answer-{long_side} .answer[data-expanded]", timeout=5_000)
    assert page.eval_on_selector(
        f"#answer-{long_side} .answer", "el => el.scrollHeight <= el.clientHeight + 1"
    )
    assert not cue_visible(page, long_side)
    screenshot(page, "annotate-phone-expanded", full_page=False)

    # A tap on "B is better" in the bar is a vote for the answer shown second (right).
    page.locator("#vote-right").tap()
    page.wait_for_function(
        "old => (document.querySelector('.prompt-card') || {}).dataset?.pairId !== old", arg=pair_id
    )
    (vote,) = [v for v in read_comparisons(store).to_pylist() if v["annotator"] == "ann"]
    assert vote["pair_id"] == pair_id
    right = "b" if vote["left"] == "a" else "a"
    assert vote["choice"] == right
    shown_right = LONG_ANSWER if long_side == "right" else SHORT_ANSWER
    assert vote[f"response_{right}"] == shown_right
    page.context.close()


def test_desktop_keeps_the_answers_side_by_side(app, browser):
    server, _ = app
    page = login(browser, server.url, "ben", DESKTOP)
    b = boxes(page)
    assert b["right"]["left"] >= b["left"]["right"]  # B beside A
    assert abs(b["right"]["top"] - b["left"]["top"]) < 2
    assert overflowing(page) == []
    long_side, short_side = ("left", "right") if b["left"]["long"] else ("right", "left")
    page.wait_for_selector(f"#answer-{long_side} .answer[data-more]", timeout=5_000)
    assert cue_visible(page, long_side) and not cue_visible(page, short_side)
    for button in ("#vote-left", "#vote-right", "#vote-tie", "#vote-both-bad"):
        assert on_screen(page, button), button
    page.context.close()


# What each tab shows once it has loaded (the admin tabs fill themselves on load).
TABS = {
    "Annotate": ".prompt-card",
    "Guidelines": "text=Annotator guidelines",
    "Dashboard": ".metrics",
    "Leaderboard": "#lb-table table",
    "Review": "#review-votes-table",
    "Train": "#run-plot-a .series-line",
    "Users": "#users-table",
}


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_screenshots_of_every_tab(app, browser, size):
    server, _ = app
    page = login(browser, server.url, "boss", DESKTOP if size == "desktop" else PHONE)
    width = page.viewport_size["width"]
    saved = []
    for tab, ready in TABS.items():
        button = page.get_by_role("tab", name=tab)
        if not button.is_visible():  # a tab that overflows into gradio's "..." menu
            page.locator(".overflow-menu button").first.click()
            button = page.locator(".overflow-dropdown button", has_text=tab)
        button.click()
        page.locator(ready).first.wait_for(timeout=120_000 if tab == "Review" else 30_000)
        page.wait_for_timeout(300)  # let plots and fonts settle before the picture
        saved.append(screenshot(page, f"{tab.lower()}-{size}"))
        if tab == "Annotate":
            saved.append(screenshot(page, f"annotate-{size}-viewport", full_page=False))
        # Nothing on any tab runs past the window's edge (tables and plots scroll in their box).
        assert not page.evaluate(WIDER_THAN_WINDOW), tab
        assert page.evaluate("document.documentElement.scrollWidth") <= width, tab
    assert all(p.stat().st_size > 0 for p in saved)
    page.context.close()
