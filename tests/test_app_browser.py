"""The annotation page in a real Chromium: log in, vote with the mouse and the keyboard,
undo, skip; model text that tries to run script runs nothing; two annotators share
pairs with --overlap 2; an annotator gets no dashboard; the login page says why a
login failed, lockout included, and logging out ends the session; an admin adds and
removes an account in the Users tab, and the removed person's open page is logged out. After acting in the page, each
test reads the comparison store to check what was recorded.
"""

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import CHROMIUM, Server, add_users, login, write_pairs

from trainer.store import read_comparisons, read_events

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs {CHROMIUM}")

N_PAIRS = 5  # plus the XSS pair, which comes first


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    add_users(tmp / "users.toml", ann="annotator", ben="annotator", boss="admin", eve="annotator")
    pairs = write_pairs(tmp / "pairs.jsonl", N_PAIRS, xss=True)
    with Server(
        tmp,
        "--pairs",
        str(pairs),
        "--data",
        str(tmp / "store"),
        "--auth",
        str(tmp / "users.toml"),
        "--overlap",
        "2",
    ) as server:
        yield server, tmp / "store"


def shown(page) -> dict:
    """What the page shows now: pair id, the text of both answers, the progress."""

    def text(side):
        # the answer's own text: not its heading, nor the "more below" cue of a long one
        parts = page.locator(f"#answer-{side} .answer > :not(h4, .more-cue)").all_inner_texts()
        return "\n".join(parts).strip()

    return {
        "pair_id": page.get_attribute(".prompt-card", "data-pair-id"),
        "left": text("left"),
        "right": text("right"),
        "progress": page.inner_text("#progress"),
    }


def wait_for_new_pair(page, old_id: str | None) -> dict:
    page.wait_for_function(
        "old => { const c = document.querySelector('.prompt-card');"
        " return c && c.getAttribute('data-pair-id') !== old; }",
        arg=old_id,
        timeout=15_000,
    )
    return shown(page)


def wait_for_status(page, text: str) -> None:
    page.wait_for_function(
        "t => (document.querySelector('#status') || {}).innerText?.includes(t)", arg=text, timeout=15_000
    )


def events_of(store: Path, user: str) -> list[dict]:
    return sorted(
        (e for e in read_events(store).to_pylist() if e["annotator"] == user), key=lambda e: e["created_at"]
    )


def test_one_annotator_votes_with_mouse_and_keyboard_undoes_and_skips(app, browser):
    server, store = app
    page = login(browser, server.url, "ann")

    # -- the first pair is the XSS pair: shown as text, nothing runs ------------------
    first = shown(page)
    time.sleep(0.7)  # time for an onerror handler to fire, were there an <img>
    assert page.evaluate("window.__pwned") is None
    assert page.title() == "preflab"
    both = first["left"] + "\n" + first["right"]
    assert "<script>window.__pwned = 1;" in both and "<img src=x onerror=" in both
    assert "[here](javascript:window.__pwned=3)" in both and '<a href="javascript:' in both
    assert (
        page.locator(
            "#answer-left script, #answer-right script, #answer-left img, #answer-right img,"
            " #answer-left a, #answer-right a"
        ).count()
        == 0
    )
    # the keys are on the page, the progress too, and the guidelines one click away
    assert first["progress"] == f"0 / {N_PAIRS + 1}"
    top = page.inner_text("#topbar")
    assert all(k in top for k in ("1", "2", "3", "4", "skip", "undo"))
    page.get_by_role("tab", name="Guidelines").click()
    page.get_by_text("Annotator guidelines").wait_for(state="visible", timeout=5_000)
    page.get_by_role("tab", name="Annotate").click()

    # -- mouse: "A is better" on the XSS pair ----------------------------------------
    page.locator("#vote-left").click()
    second = wait_for_new_pair(page, first["pair_id"])
    wait_for_status(page, "Saved: A is better")
    assert "A was evil-" in page.inner_text("#status")  # models revealed after the vote
    assert second["progress"] == f"1 / {N_PAIRS + 1}"

    # -- keyboard: keys typed in the rationale are text, not votes ---------------------
    box = page.locator("#rationale textarea, #rationale input").first
    box.click()
    box.type("B says 2+2 right; keys 1 2 3 4 s u stay text")
    time.sleep(0.3)
    assert shown(page)["pair_id"] == second["pair_id"] and len(events_of(store, "ann")) == 1
    page.keyboard.press("Escape")
    page.get_by_label("clearly").check()
    page.keyboard.press("2")
    third = wait_for_new_pair(page, second["pair_id"])
    page.keyboard.press("3")
    fourth = wait_for_new_pair(page, third["pair_id"])

    # -- undo: the tie is taken back and its pair returns; then vote "both bad" --------
    page.keyboard.press("u")
    back = wait_for_new_pair(page, fourth["pair_id"])
    assert back["pair_id"] == third["pair_id"] and back["left"] == third["left"]
    assert back["progress"] == f"2 / {N_PAIRS + 1}"
    page.keyboard.press("4")
    after = wait_for_new_pair(page, third["pair_id"])
    assert after["pair_id"] == fourth["pair_id"]  # the pair on screen before the undo

    # -- skip: the pair goes away, nothing is recorded -------------------------------
    n_before = len(events_of(store, "ann"))
    page.keyboard.press("s")
    skipped_to = wait_for_new_pair(page, after["pair_id"])
    assert skipped_to["pair_id"] not in (first["pair_id"], second["pair_id"], third["pair_id"])
    assert len(events_of(store, "ann")) == n_before
    page.context.close()

    # -- what the store says ---------------------------------------------------------
    events = events_of(store, "ann")
    votes = [e for e in events if e["kind"] == "vote"]
    (retract,) = [e for e in events if e["kind"] == "retract"]
    assert [v["pair_id"] for v in votes] == [
        first["pair_id"],
        second["pair_id"],
        third["pair_id"],
        third["pair_id"],
    ]
    xss, keyed, tie, both_bad = votes

    def canonical(v, shown_side):
        other = "b" if v["left"] == "a" else "a"
        return v["left"] if shown_side == "left" else other

    assert xss["choice"] == xss["left"] and xss[f"response_{xss['left']}"] == first["left"]
    assert xss["decision_ms"] >= 600
    assert keyed["choice"] == canonical(keyed, "right") and keyed["strength"] == 2
    assert keyed[f"response_{keyed['left']}"] == second["left"]
    assert keyed["rationale"] == "B says 2+2 right; keys 1 2 3 4 s u stay text"
    assert tie["choice"] == "tie" and tie["strength"] is None
    assert retract["retracts"] == tie["event_id"] and retract["pair_id"] == tie["pair_id"]
    assert both_bad["choice"] == "both_bad" and both_bad["left"] == tie["left"]
    assert all(v["decision_ms"] is not None and v["decision_ms"] > 0 for v in votes)
    standing = read_comparisons(store)
    assert tie["event_id"] not in standing["event_id"].to_pylist()


def test_second_annotator_with_overlap_two(app, browser):
    server, store = app
    page = login(browser, server.url, "ben")
    seen = []
    view = shown(page)
    while view["pair_id"] is not None:
        seen.append(view["pair_id"])
        page.keyboard.press("1")
        page.wait_for_function(
            "old => { const c = document.querySelector('.prompt-card');"
            " return !c || c.offsetParent === null || c.getAttribute('data-pair-id') !== old; }",
            arg=view["pair_id"],
            timeout=15_000,
        )
        visible = page.locator(".prompt-card").is_visible()
        view = shown(page) if visible else {"pair_id": None}
    assert "Nothing left for you" in page.inner_text("#waiting")
    assert len(seen) == len(set(seen)) == N_PAIRS + 1  # ben gets every pair, each once
    page.context.close()
    votes = read_comparisons(store).select(["pair_id", "annotator"]).to_pylist()
    by_pair = {}
    for v in votes:
        by_pair.setdefault(v["pair_id"], []).append(v["annotator"])
    assert all(len(names) == len(set(names)) <= 2 for names in by_pair.values())
    assert sorted(v["pair_id"] for v in votes if v["annotator"] == "ben") == sorted(seen)


def test_dashboard_is_for_admins_only(app, browser):
    server, store = app
    ann = login(browser, server.url, "ann")
    assert not ann.get_by_role("tab", name="Dashboard").is_visible()
    ann.context.close()

    boss = login(browser, server.url, "boss")
    boss.get_by_role("tab", name="Dashboard").click()
    boss.wait_for_selector(".metrics", timeout=15_000)
    n = read_comparisons(store).num_rows
    assert f"Votes\n{n}" in boss.inner_text(".metrics")
    boss.get_by_role("button", name="Export", exact=True).click()
    link = boss.locator("#export-links a").first
    link.wait_for(timeout=15_000)
    assert ".parquet" in boss.inner_text("#export-links")
    assert "standing votes" in boss.inner_text("#export-report")
    with boss.expect_download() as download:  # the admins' route, with the page's login cookie
        link.click()
    assert download.value.suggested_filename.endswith(".parquet")
    exported = pq.read_table(download.value.path())
    assert {"prompt", "chosen", "rejected"} <= set(exported.column_names) and 0 < exported.num_rows <= n
    boss.context.close()


def test_the_login_page_says_why_and_logout_ends_the_session(app, browser):
    from annotate.logins import FREE_FAILURES

    server, _ = app
    page = browser.new_context().new_page()
    page.goto(server.url)
    assert page.url.endswith("/login")  # no session: the login page, not the app

    def attempt(password: str) -> str:
        page.goto(server.url + "login")  # a fresh form (the page's CSP forbids test-side eval)
        page.locator("input[type=text]").fill("eve")
        page.locator("input[type=password]").fill(password)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#error:not(:empty)", timeout=15_000)
        return page.inner_text("#error")

    assert attempt("wrong") == "Incorrect credentials."
    for _ in range(FREE_FAILURES - 1):
        attempt("wrong")
    assert "too many failed logins for account 'eve'; try again in" in attempt("eve-pw")

    page = login(browser, server.url, "ann")  # another account is not locked out
    page.goto(server.url + "logout")
    page.wait_for_url("**/login", timeout=15_000)
    page.goto(server.url)
    assert page.url.endswith("/login")  # the session ended: back to the login page


def test_an_admin_manages_accounts_in_the_users_tab(app, browser):
    server, _ = app
    ann = login(browser, server.url, "ann")
    assert not ann.get_by_role("tab", name="Users").is_visible()  # admins only
    ann.context.close()

    boss = login(browser, server.url, "boss")
    boss.get_by_role("tab", name="Users").click()
    boss.wait_for_selector("#users-table", timeout=15_000)
    assert "ann" in boss.inner_text("#users-table")

    def submit(button: str, name: str, password: str = "") -> str:
        before = boss.inner_text("#users-report").strip()
        boss.locator("#users-name input").fill(name)
        boss.locator("#users-password input").fill(password)
        boss.get_by_role("button", name=button, exact=True).click()
        boss.wait_for_function(
            "before => { const t = document.querySelector('#users-report').innerText.trim();"
            " return t !== before && /^(Done|Refused)/.test(t); }",
            arg=before,
            timeout=15_000,
        )
        return boss.inner_text("#users-report").strip()

    assert submit("Add", "newbie", "short").startswith("Refused: password of 5 characters refused")
    assert boss.locator("#users-password input").input_value() == ""  # emptied even when refused
    assert submit("Add", "newbie", "a fine long password").startswith("Done: added annotator 'newbie'")
    assert boss.locator('#users-table tr[data-user="newbie"]').count() == 1

    newbie = browser.new_context().new_page()
    newbie.goto(server.url)
    newbie.locator("input[type=text]").fill("newbie")
    newbie.locator("input[type=password]").fill("a fine long password")
    newbie.get_by_role("button", name="Login").click()
    newbie.wait_for_selector("#progress", timeout=30_000)

    assert submit("Remove", "newbie").startswith("Done: removed 'newbie'")
    assert boss.locator('#users-table tr[data-user="newbie"]').count() == 0
    newbie.reload()
    newbie.wait_for_url("**/login", timeout=15_000)  # the removed account's session has ended
    boss.context.close()
    newbie.context.close()
