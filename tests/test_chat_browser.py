"""The Chat tab of `preflab serve --chat` in a real Chromium, against two real models:
the tiny model in the server's own process and the same model behind a real
OpenAI-compatible server (`preflab serve-model`, the `model_server` fixture), streamed.
An annotator writes a message, watches both answers stream in (the text grows while
the panel says it is streaming), follows up with a second turn that goes to both
sides, votes by key (a key typed in the message box stays text), sees the names, and
starts a new conversation; then the store holds the vote with both conversations.
Another takes a random prompt from the pool, stops the answers, regenerates them,
votes with the mouse and takes the vote back. On a phone the answers stack (A above B)
within the screen and a tap votes.
"""

import json
from pathlib import Path

import pytest
from helpers import CHROMIUM, EP_KEY, PHONE, Server, add_users, ep_entry, login, screenshot

from trainer.store import read_comparisons

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

ENDPOINT_NAME = "zebra-endpoint"  # distinctive: it must not be on the page before the vote
IN_PROCESS = "tiny"
XSS_MESSAGE = '<img src=x onerror="window.__pwned = 1"> Tell me about <b>bananas</b>.'
FOLLOW_UP = "And now about apples, please."

# Every change of both panels, as the browser saw it: whether the panel said it was
# streaming, and how long its latest answer was. Recorded by a MutationObserver, so a
# stream faster than any two reads from the test is still seen growing.
WATCH_PANELS = """
() => {
  window.__panels = [];
  const record = () => {
    for (const side of ["left", "right"]) {
      const panel = document.querySelector(`#chat-${side} .chat-panel`);
      if (!panel) continue;
      const answers = panel.querySelectorAll(".turn-assistant .text");
      const last = answers.length ? answers[answers.length - 1].innerText : "";
      window.__panels.push({side, streaming: panel.dataset.streaming === "true",
                            answers: answers.length, length: last.trim().length});
    }
  };
  new MutationObserver(record).observe(document.body, {childList: true, subtree: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def chat_app(tmp_path_factory, model_server):
    tmp = tmp_path_factory.mktemp("chat-browser")
    add_users(tmp / "users.toml", ann="annotator", ben="annotator", pia="annotator")
    endpoints = tmp / "endpoints.json"
    endpoints.write_text(
        json.dumps({ENDPOINT_NAME: ep_entry(model_server.base, api_key=EP_KEY, max_retries=0)})
    )
    store = tmp / "store"
    with Server(
        tmp,
        "--chat",
        "--model",
        IN_PROCESS,
        "--model",
        ENDPOINT_NAME,
        "--endpoints",
        str(endpoints),
        "--data",
        str(store),
        "--auth",
        str(tmp / "users.toml"),
        "--device",
        "cpu",
        # long enough that Stop finds the in-process answer still coming (the endpoint's
        # server stops at 16 tokens of its own)
        "--max-new-tokens",
        "160",
    ) as server:
        yield server, store


def panel(page, side: str) -> dict:
    """What one panel shows: the streaming flag, its turns' texts, its stats line."""
    root = page.locator(f"#chat-{side}")
    return {
        "streaming": root.locator(".chat-panel").get_attribute("data-streaming"),
        "title": root.locator(".chat-panel h4").inner_text(),
        "user": root.locator(".turn-user .text").all_inner_texts(),
        "assistant": root.locator(".turn-assistant .text").all_inner_texts(),
        "ttft_ms": root.locator(".chat-stats").get_attribute("data-ttft-ms"),
        "tokens_per_s": root.locator(".chat-stats").get_attribute("data-tokens-per-s"),
        "stats": root.locator(".chat-stats").inner_text(),
    }


def letters(text: str) -> str:
    """The letters and digits of an answer as stored or as shown (an empty one is shown
    as "(empty answer)")."""
    return "".join(c for c in text if c.isalnum()) if text.strip() != "(empty answer)" else ""


def wait_until_answered(page, turns: int) -> None:
    """Both panels hold `turns` answers and neither streams any more."""
    page.wait_for_function(
        """n => ["left", "right"].every(side => {
             const p = document.querySelector(`#chat-${side} .chat-panel`);
             return p && p.dataset.streaming === "false"
               && p.querySelectorAll(".turn-assistant").length === n;
           })""",
        arg=turns,
        timeout=90_000,
    )


def grew_while_streaming(page, side: str) -> bool:
    """The panel showed a part of its answer while streaming, and later more of it."""
    seen = [s for s in page.evaluate("window.__panels") if s["side"] == side and s["answers"]]
    lengths = [s["length"] for s in seen if s["streaming"] and s["length"] > 0]
    return bool(lengths) and max(s["length"] for s in seen) > min(lengths)


def test_chat_streams_both_sides_votes_by_key_and_records_both_conversations(chat_app, browser):
    server, store = chat_app
    page = login(browser, server.url, "ann", ready="#chat-send")
    assert page.get_by_role("tab", name="Chat").get_attribute("aria-selected") == "true"
    assert page.get_by_role("tab", name="Annotate").count() == 0  # no pairs to annotate
    assert "both bad" in page.inner_text("#topbar")
    page.evaluate(WATCH_PANELS)

    # -- turn 1: Enter sends; both answers stream in -----------------------------------
    box = page.locator("#chat-message textarea")
    box.fill(XSS_MESSAGE)
    box.press("Enter")
    page.locator("#chat-stop").wait_for(state="visible", timeout=30_000)  # Stop while streaming
    wait_until_answered(page, 1)
    assert box.input_value() == ""  # the message went out; the box is ready for the next
    for side in ("left", "right"):
        assert grew_while_streaming(page, side), page.evaluate("window.__panels")
    left, right = panel(page, "left"), panel(page, "right")
    # the user's message is text on both sides, nothing of it runs
    assert left["user"] == right["user"] == [XSS_MESSAGE]
    assert page.locator("#chat-left img, #chat-right img, #chat-left b, #chat-right b").count() == 0
    assert page.evaluate("window.__pwned") is None
    # time to first token and tokens/s under each panel; no name before the vote
    for shown in (left, right):
        assert shown["ttft_ms"].isdigit() and "first token" in shown["stats"]
        assert float(shown["tokens_per_s"]) > 0 and "tokens/s" in shown["stats"]
    assert (left["title"], right["title"]) == ("Model A", "Model B")
    assert ENDPOINT_NAME not in page.inner_text("body")
    assert page.locator("#chat-stop").is_hidden() and page.locator("#chat-send").is_visible()

    # -- turn 2: the follow-up goes to both sides, each keeping its own history --------
    page.evaluate("window.__panels = []")
    box.fill(FOLLOW_UP)
    page.locator("#chat-send").click()
    wait_until_answered(page, 2)
    left2, right2 = panel(page, "left"), panel(page, "right")
    assert left2["user"] == right2["user"] == [XSS_MESSAGE, FOLLOW_UP]
    assert left2["assistant"][0] == left["assistant"][0] and right2["assistant"][0] == right["assistant"][0]

    # -- vote by key: typed in the box a key is text; outside it, a vote ---------------
    box.click()
    page.keyboard.press("2")
    assert box.input_value() == "2"
    assert "Saved" not in page.inner_text("#chat-status")
    page.keyboard.press("Escape")
    page.keyboard.press("2")  # B is better
    page.wait_for_function(
        "() => (document.querySelector('#chat-status') || {}).innerText?.includes('Saved: B is better')",
        timeout=15_000,
    )
    status = page.inner_text("#chat-status")
    names = {IN_PROCESS, ENDPOINT_NAME}
    left_name = next(n for n in names if f"A was {n}" in status)
    right_name = (names - {left_name}).pop()
    assert f"B was {right_name}" in status
    assert left_name in panel(page, "left")["title"] and right_name in panel(page, "right")["title"]
    assert page.locator("#chat-vote-left").is_hidden()  # one vote per conversation
    screenshot(page, "chat-voted-desktop")

    # -- then a new conversation --------------------------------------------------------
    page.locator("#chat-new").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#chat-left .turn, #chat-right .turn').length === 0", timeout=15_000
    )
    assert "Model A" == panel(page, "left")["title"]

    # -- the record: one chat vote, both sides' whole conversations --------------------
    rows = [r for r in read_comparisons(store).to_pylist() if r["annotator"] == "ann"]
    assert len(rows) == 1, rows
    vote = rows[0]
    assert vote["pair_id"].startswith("chat-") and vote["pair_id"].endswith("-t2")
    assert vote["schema_version"] == 3
    shown_left = "a" if vote["model_a"] == left_name else "b"
    assert vote["left"] == shown_left and {vote["model_a"], vote["model_b"]} == names
    assert vote["model_a"] < vote["model_b"]  # canonical order: by display name
    assert vote["choice"] == ("b" if shown_left == "a" else "a")  # B, the right panel, won
    assert json.loads(vote["prompt"]) == [{"role": "user", "content": XSS_MESSAGE}]
    by_side = {"left": left2, "right": right2}
    for x in ("a", "b"):
        conversation = json.loads(vote[f"conversation_{x}"])
        side = "left" if (x == shown_left) else "right"
        assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
        assert [m["content"] for m in conversation if m["role"] == "user"] == [XSS_MESSAGE, FOLLOW_UP]
        assert conversation[-1]["content"] == vote[f"response_{x}"]
        # what the panel showed is that side's own history (as Markdown: compare letters and digits)
        shown = [letters(t) for t in by_side[side]["assistant"]]
        assert shown == [letters(m["content"]) for m in conversation if m["role"] == "assistant"]
    params = json.loads(vote["gen_params"])
    assert params["chat"] == {"turn": 2, "prompt_source": "annotator"}
    assert all(params[x]["ttft_ms"] is not None and "cut" in params[x] for x in ("a", "b"))


def test_random_prompt_stop_regenerate_and_a_mouse_vote(chat_app, browser):
    server, store = chat_app
    page = login(browser, server.url, "ben", ready="#chat-send")
    box = page.locator("#chat-message textarea")
    page.locator("#chat-random").click()
    page.wait_for_function("() => document.querySelector('#chat-message textarea').value.length > 0")
    offered = box.input_value()
    page.locator("#chat-send").click()

    # -- Stop while the answers come: both end, what was written stays, cut ------------
    page.wait_for_function(
        """() => [...document.querySelectorAll('#chat-left .chat-panel, #chat-right .chat-panel')].some(
             p => p.dataset.streaming === "true" && p.querySelector('.turn-assistant .text')?.innerText.trim())""",
        timeout=60_000,
    )
    page.locator("#chat-stop").click()
    wait_until_answered(page, 1)
    stopped = [panel(page, side) for side in ("left", "right")]
    assert any("cut off" in p["stats"] for p in stopped), stopped
    assert all(p["user"] == [offered] for p in stopped)
    assert page.locator("#chat-vote-tie").is_visible()  # a stopped turn can be voted on

    # -- Regenerate: the same turn answered anew ----------------------------------------
    page.evaluate(WATCH_PANELS)
    page.locator("#chat-regenerate").click()
    page.wait_for_function("() => window.__panels.some(s => s.streaming)", timeout=30_000)
    wait_until_answered(page, 1)
    again = [panel(page, side) for side in ("left", "right")]
    assert all(p["user"] == [offered] and len(p["assistant"]) == 1 for p in again)

    # -- the mouse: Tie -----------------------------------------------------------------
    page.locator("#chat-vote-tie").click()
    page.wait_for_function(
        "() => (document.querySelector('#chat-status') || {}).innerText?.includes('Saved: Tie')",
        timeout=15_000,
    )
    (vote,) = [r for r in read_comparisons(store).to_pylist() if r["annotator"] == "ben"]
    assert vote["choice"] == "tie" and vote["pair_id"].endswith("-t1")
    assert json.loads(vote["gen_params"])["chat"] == {"turn": 1, "prompt_source": "pool"}
    for x in ("a", "b"):
        conversation = json.loads(vote[f"conversation_{x}"])
        assert conversation == [
            {"role": "user", "content": offered},
            {"role": "assistant", "content": vote[f"response_{x}"]},
        ]
    shown = {"left": again[0], "right": again[1]}
    for side, x in (("left", vote["left"]), ("right", "b" if vote["left"] == "a" else "a")):
        assert [letters(t) for t in shown[side]["assistant"]] == [letters(vote[f"response_{x}"])]

    # -- Take back the vote: it counts nowhere; the conversation is not reopened --------
    page.locator("#chat-take-back").click()
    page.wait_for_function(
        "() => (document.querySelector('#chat-status') || {}).innerText?.includes('Vote taken back')",
        timeout=15_000,
    )
    assert not page.locator("#chat-take-back").is_visible()
    assert not page.locator("#chat-vote-tie").is_visible()  # no second, unblind vote
    assert not [r for r in read_comparisons(store).to_pylist() if r["annotator"] == "ben"]


def test_on_a_phone_the_answers_stack_within_the_screen_and_a_tap_votes(chat_app, browser):
    server, store = chat_app
    page = login(browser, server.url, "pia", PHONE, ready="#chat-send")
    page.locator("#chat-message textarea").fill("Tell me about rivers.")
    page.locator("#chat-send").tap()
    wait_until_answered(page, 1)
    box = "el => { const r = el.getBoundingClientRect(); return [r.left, r.right, r.top, r.bottom]; }"
    boxes = {side: page.eval_on_selector(f"#chat-{side}", box) for side in ("left", "right")}
    (l_left, l_right, _, l_bottom), (r_left, r_right, r_top, _) = boxes["left"], boxes["right"]
    assert r_top >= l_bottom  # B under A, not beside it
    assert l_left >= 0 and l_right <= 390 and r_left >= 0 and r_right <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off sideways
    screenshot(page, "chat-phone", full_page=True)
    page.locator("#chat-vote-right").scroll_into_view_if_needed()
    page.locator("#chat-vote-right").tap()
    page.wait_for_function(
        "() => (document.querySelector('#chat-status') || {}).innerText?.includes('Saved: B is better')",
        timeout=15_000,
    )
    (vote,) = [r for r in read_comparisons(store).to_pylist() if r["annotator"] == "pia"]
    assert vote["choice"] == ("b" if vote["left"] == "a" else "a")  # the side shown second
    page.context.close()
