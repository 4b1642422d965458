"""`preflab serve`: the annotation app, where people rank pairs of model answers.

    preflab serve --pairs pairs.jsonl                     # pre-generated candidates
    preflab serve --model smollm2                         # two samples of one model
    preflab serve --model smollm2 --model ./my-sft        # arena: random pair of models
    preflab serve --pairs pairs.jsonl --auth users.toml --overlap 2 --host 0.0.0.0

The file reads top to bottom:

1. rendering: model text -> safe HTML (Markdown, every raw HTML tag escaped);
2. `Service`: everything the page and the API do, without gradio: who is asking and
   may they, next pair, vote (store first, then the queue), skip, undo, dashboard,
   export. Every vote is durable in the comparison store before it is acknowledged;
   the same call that acknowledges it returns the next pair (one round trip);
3. `build_app`: the gradio page (Annotate, Guidelines, Dashboard) and the JSON API
   (`/next`, `/vote`, `/skip`, `/undo`, `/dashboard`, `/export`). Page and API call
   the same Service methods, and every handler checks the caller's role on the server
   from gr.Request.username: hiding the admin tabs is cosmetic, not security. The admin
   tabs that close the loop build themselves from their own modules: Leaderboard
   (leaderboard.py), Review (review.py), Train (train_tab.py, runs via launcher.py);
4. the command line.

API, for scripts and load tests (gradio_client, logged in with auth=(user, password)):

    client.predict(api_name="/next")  -> {"pair": {"pair_id", "prompt", "left", "right"}, "progress", ...}
    client.predict(pair_id, "left" | "right" | "tie" | "both_bad", "slightly" | "clearly" | "",
                   "rationale", api_name="/vote")   -> {"ack": {"event_id", ...}, "pair": next pair, ...}
    client.predict(pair_id, api_name="/skip"); client.predict(api_name="/undo")
    client.predict(api_name="/dashboard")            (admins)

"left" and "right" are the answers as shown; the store records the canonical a/b choice
and which one was on the left. Model names are revealed in the acknowledgement only.
"""

import argparse
import getpass
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from annotate.web.html import escape as _e, metric_card, pct as _pct, render_markdown, render_prompt
from annotate.pairs import Generator, PairsFileError, load_pairs
from annotate.queue import Assignment, AssignmentQueue, StaleVote
from trainer.store.errors import StoreError, StoreWriteError, VoteConflict

log = logging.getLogger("preflab.app")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO / "data" / "prompts.jsonl"
DEFAULT_GUIDELINES = REPO / "data" / "guidelines.md"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

SHOWN_CHOICES = ("left", "right", "tie", "both_bad")
STRENGTHS = {"slightly": 1, "clearly": 2}
CHOICE_WORDS = {"left": "A is better", "right": "B is better", "tie": "Tie", "both_bad": "Both bad"}


# --------------------------------------------------------------------------------------
# 2. The service: what the page and the API do
# --------------------------------------------------------------------------------------

class Forbidden(Exception):
    """The caller may not do this (not logged in, or not an admin)."""


class Accounts:
    """users.toml, re-read when the file changes (so `preflab user add` works on a
    running server)."""

    def __init__(self, path: str | os.PathLike):
        from annotate import users
        self.users = users
        self.path = Path(path)
        self._mtime = None
        self._accounts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._reload()
        if not self._accounts:
            raise ValueError(f"{self.path}: no accounts; add one with `preflab user add`")

    def _reload(self) -> None:
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                return
            if mtime == self._mtime:
                return
            try:
                self._accounts = self.users.load_users(self.path)
            except ValueError as e:   # a half-edited file: keep the accounts we had
                if self._mtime is None:
                    raise
                log.warning("%s; keeping the accounts loaded before", e)
            self._mtime = mtime

    def verify(self, name: str, password: str) -> bool:
        self._reload()
        return self.users.verify(self._accounts, name, password) is not None

    def role(self, name: str) -> str | None:
        self._reload()
        account = self._accounts.get(name)
        return account.role if account is not None else None


class Service:
    """The annotation workflow, independent of gradio (the tests call it directly too).

    `user` arguments are names already checked by `identify`; each public method that
    acts for someone returns a view: a JSON-able dict the page renders and the API
    returns as is.
    """

    def __init__(self, store, queue: AssignmentQueue, *, data: str | os.PathLike,
                 state_dir: str | os.PathLike | None = None,
                 accounts: Accounts | None = None, local_user: str = "local",
                 generator: Generator | None = None, guidelines: str = "",
                 runs_dir: str | os.PathLike = "runs"):
        self.store = store
        self.queue = queue
        self.data = str(data)   # the store's target: a directory or a postgresql:// URL
        # Local files that are not votes (the arena's arena.json, pair caches): the
        # store's directory itself, or a directory of the server's for a database.
        self.state_dir = Path(state_dir if state_dir is not None else data)
        self.accounts = accounts
        self.local_user = local_user
        self.generator = generator
        self.guidelines = guidelines
        self.runs_dir = Path(runs_dir)   # where trainings started from the page go (Train tab)

    # ---- who is asking ---------------------------------------------------------------

    def identify(self, request) -> tuple[str, str]:
        """(name, role) of the caller. Without --auth there is one local user, an admin
        (the server only listens on 127.0.0.1 then)."""
        if self.accounts is None:
            return self.local_user, "admin"
        name = getattr(request, "username", None)
        role = self.accounts.role(name) if name else None
        if role is None:
            raise Forbidden("please log in")
        return name, role

    def is_admin(self, request) -> bool:
        """For showing the admin tabs (cosmetic: every admin handler checks again)."""
        try:
            return self.identify(request)[1] == "admin"
        except Forbidden:
            return False

    def require_admin(self, request) -> str:
        name, role = self.identify(request)
        if role != "admin":
            raise Forbidden(f"{name} is an annotator; the dashboard and export are for admins")
        return name

    # ---- views -----------------------------------------------------------------------

    def _waiting(self, user: str) -> dict[str, Any]:
        """Why there is no pair to show: still generating, others hold the last pairs,
        or all done."""
        if self.generator is not None:
            status = self.generator.status()
            if status["state"] in ("loading", "generating", "waiting"):
                seconds = int(time.time() - status["started"])
                return {"state": status["state"], "message": status["message"], "seconds": seconds,
                        "generated": status["generated"], "planned": status["planned"]}
            if status["state"] == "failed":
                return {"state": "failed", "message": status["message"]}
        held = self.queue.held_by_others(user)
        if held:
            return {"state": "held", "message": f"The last {held} pair{'s are' if held > 1 else ' is'} "
                    "with other annotators right now; if one comes free it appears here."}
        return {"state": "done", "message": "Nothing left for you to annotate. Thank you!"}

    def _view(self, user: str, a: Assignment | None, *, ok: bool = True, message: str = "",
              ack: dict | None = None) -> dict[str, Any]:
        pair = None
        if a is not None:
            pair = {"pair_id": a.pair.pair_id, "prompt": list(a.pair.messages),
                    "left": a.pair.response(a.left), "right": a.pair.response(a.right)}
        return {"ok": ok, "message": message, "user": user, "ack": ack, "pair": pair,
                "progress": self.queue.progress(user),
                "waiting": None if a is not None else self._waiting(user)}

    def _next(self, user: str) -> tuple[Assignment | None, str]:
        """The annotator's next pair, or (None, why) when a shared store cannot be asked
        right now: whatever was just stored stays stored, the page says so."""
        try:
            return self.queue.next(user), ""
        except StoreError as e:
            log.error("%s", e)
            return None, "The vote store cannot be reached right now; your next pair comes when it is back."

    def next(self, user: str) -> dict[str, Any]:
        a, problem = self._next(user)
        if a is not None:
            a.shown_at = self.queue.clock()   # shown (again) now: decision time starts here
        return self._view(user, a, ok=not problem, message=problem)

    # ---- acting on a pair ------------------------------------------------------------

    def vote(self, user: str, pair_id: str, choice: str, strength: str = "",
             rationale: str = "") -> dict[str, Any]:
        if choice not in SHOWN_CHOICES:
            raise ValueError(f"choice must be one of {', '.join(SHOWN_CHOICES)}, got {choice!r}")
        strength = (strength or "").strip().lower()
        if strength and strength not in STRENGTHS:
            raise ValueError(f"strength must be 'slightly', 'clearly' or empty, got {strength!r}")
        try:
            a = self.queue.begin_vote(user, pair_id)
        except StaleVote:
            a, problem = self._next(user)
            return self._view(user, a, ok=False, message=problem or
                              "That pair was already answered (another tab?); here is your current one.")
        decision_ms = int((self.queue.clock() - a.shown_at) * 1000)
        canonical = {"left": a.left, "right": a.right}.get(choice, choice)
        record = {**a.pair.record_fields(), "event_id": a.event_id, "kind": "vote", "left": a.left,
                  "choice": canonical,
                  # strength only qualifies a preference (the record refuses it on a tie)
                  "strength": STRENGTHS.get(strength) if canonical in ("a", "b") else None,
                  "rationale": (rationale or "").strip() or None, "annotator": user,
                  "decision_ms": max(0, min(decision_ms, 2**31 - 1))}
        try:
            stored = self.queue.record_vote(a, record, self.store)   # durable when it returns
        except VoteConflict:
            # Another server's annotators took the last slot (or this annotator voted on
            # the pair there): nothing was stored; the queue already moved on.
            nxt, problem = self._next(user)
            return self._view(user, nxt, ok=False, message=problem or
                              "That pair was completed meanwhile; here is another one. Nothing was saved.")
        except StoreWriteError as e:
            self.queue.cancel_vote(a)
            log.error("%s", e)
            return self._view(user, a, ok=False,
                              message="Not saved: the store could not write your vote. Please try again.")
        except Exception:
            self.queue.cancel_vote(a)
            raise
        ack = {"event_id": stored["event_id"], "choice": choice, "decision_ms": record["decision_ms"],
               "left_model": a.pair.model(a.left), "right_model": a.pair.model(a.right)}
        nxt, problem = self._next(user)
        return self._view(user, nxt, ack=ack, message="Saved." + (f" {problem}" if problem else ""))

    def skip(self, user: str, pair_id: str) -> dict[str, Any]:
        skipped = self.queue.skip(user, pair_id)
        a, problem = self._next(user)
        return self._view(user, a, ok=skipped and not problem,
                          message=problem or ("Skipped; it goes to someone else." if skipped else
                                              "That pair is no longer yours to skip."))

    def undo(self, user: str) -> dict[str, Any]:
        record = self.queue.begin_undo(user)
        if record is None:
            a, problem = self._next(user)
            return self._view(user, a, ok=False, message=problem or "Nothing to undo.")
        try:
            self.store.retract(record["event_id"], user, vote=record)
        except StoreWriteError as e:
            self.queue.cancel_undo(user, record)
            log.error("%s", e)
            return self._view(user, self.queue.current(user), ok=False,
                              message="Not undone: the store could not write it. Please try again.")
        except Exception:
            self.queue.cancel_undo(user, record)
            raise
        a = self.queue.finish_undo(user, record)
        view = self._view(user, a, message="Vote taken back; here is that pair again.")
        shown = {a.left: "left", a.right: "right"}.get(record["choice"], record["choice"])
        view["undone"] = {"event_id": record["event_id"], "choice": shown,
                          "strength": {1: "slightly", 2: "clearly"}.get(record.get("strength")),
                          "rationale": record.get("rationale") or ""}
        return view

    # ---- admins ----------------------------------------------------------------------

    def dashboard(self) -> dict[str, Any]:
        """Every number of the dashboard. Tables are lists of records (JSON-able)."""
        from annotate import stats
        from trainer.store import read_comparisons

        votes = read_comparisons(self.data)
        summary = stats.summary(votes)
        for key in ("first_vote", "last_vote"):
            if summary[key] is not None:
                summary[key] = summary[key].isoformat(timespec="seconds")
        tables = {f"by_{by}": stats.votes_by(votes, by) for by in stats.BY}
        tables["kappa"] = stats.cohens_kappa(votes)
        tables["choices"] = outcomes_as_shown(votes)
        return {"summary": _clean(summary), "queue": self.queue.overview(),
                "tables": {name: _clean(t.to_dict(orient="records")) for name, t in tables.items()},
                "_frames": tables}

    def export(self, format: str = "standard", margin: bool = False, ties: str = "exclude",
               aggregate: str = "none", filetype: str = "parquet") -> tuple[list[str], str]:
        """Write the standing votes as a preference dataset (annotate/export.py).
        Returns (files, a one-line report)."""
        from annotate.export import export_preferences, ties_path_for, write_table
        from trainer.store import read_comparisons

        if filetype not in ("parquet", "jsonl"):
            raise ValueError(f"filetype must be parquet or jsonl, got {filetype!r}")
        votes = read_comparisons(self.data)
        pairs, ties_table, report = export_preferences(votes, format=format, margin=margin,
                                                       ties=ties, aggregate=aggregate)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        # gradio copies a returned file into its own cache, so ours can go an hour later
        folder = Path(tempfile.gettempdir()) / "preflab-exports"
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            try:
                if time.time() - old.stat().st_mtime > 3600:
                    old.unlink()
            except FileNotFoundError:   # another server cleaned it first
                pass
        out = folder / f"preferences-{format}-{stamp}-{os.urandom(3).hex()}.{filetype}"
        files = [str(write_table(pairs, out))]
        if ties_table is not None:
            files.append(str(write_table(ties_table, ties_path_for(out))))
        return files, " · ".join(report.lines())


def outcomes_as_shown(votes):
    """Share of each outcome as the annotators saw it: the left answer, the right
    answer, tie, both bad. (Canonical a/b say nothing about the screen.)"""
    import pandas as pd
    import pyarrow.compute as pc

    n = votes.num_rows
    decisive = pc.is_in(votes["choice"], value_set=pa_strings("a", "b"))
    left = pc.sum(pc.and_(decisive, pc.equal(votes["choice"], votes["left"]))).as_py() or 0
    right = (pc.sum(decisive).as_py() or 0) - left
    tie = pc.sum(pc.equal(votes["choice"], "tie")).as_py() or 0
    both_bad = pc.sum(pc.equal(votes["choice"], "both_bad")).as_py() or 0
    counts = [left, right, tie, both_bad]
    return pd.DataFrame({"choice": ["A (left) better", "B (right) better", "Tie", "Both bad"],
                         "share": [c / n if n else float("nan") for c in counts], "votes": counts})


def pa_strings(*values: str):
    import pyarrow as pa
    return pa.array(values, pa.string())


def _clean(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python, recursively: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# --------------------------------------------------------------------------------------
# 3. The page and the API
# --------------------------------------------------------------------------------------

# Keyboard shortcuts: 1-4, s, u click the buttons with these element ids. Keys typed in
# a text field are text (radio buttons are not text fields: pick a strength, then press
# 1). Escape leaves the rationale box, so the keys work again without the mouse.
KEYS_JS = """
<script>
(() => {
  const KEYS = {"1": "vote-left", "2": "vote-right", "3": "vote-tie", "4": "vote-both-bad",
                "s": "skip", "u": "undo"};
  const TEXT_INPUTS = /^(text|search|email|number|password|url|tel|date|time)$/i;
  function typing(el) {
    if (!el) return false;
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
    return el.tagName === "INPUT" && TEXT_INPUTS.test(el.type || "text");
  }
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && typing(e.target)) { e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || typing(e.target)) return;
    const id = KEYS[e.key.toLowerCase()];
    if (!id) return;
    const el = document.getElementById(id);
    const button = el && (el.tagName === "BUTTON" ? el : el.querySelector("button"));
    // offsetParent is null when the button is hidden (another tab, no pair shown).
    if (!button || button.disabled || button.offsetParent === null) return;
    e.preventDefault();
    button.click();
  });
})();
</script>
"""

CSS = """
.gradio-container { max-width: 1400px !important; }
#topbar { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: baseline; padding: 2px 4px; }
#topbar .brand { font-weight: 700; font-size: 1.1em; }
#topbar .who { color: var(--body-text-color-subdued); }
#topbar .spacer { flex: 1; }
#topbar a { color: var(--body-text-color-subdued); }
.progress-box { font-variant-numeric: tabular-nums; }
.progress-bar { display: inline-block; width: 140px; height: 8px; border-radius: 4px;
  background: #e4e4e7; vertical-align: middle; margin-left: 6px; overflow: hidden; }
.progress-bar > span { display: block; height: 100%; background: #6366f1; }
.keys { color: var(--body-text-color-subdued); font-size: 0.9em; }
kbd { border: 1px solid var(--border-color-primary); border-bottom-width: 2px; border-radius: 4px;
  padding: 0 5px; font-family: var(--font-mono); font-size: 0.85em; background: var(--background-fill-secondary); }
.card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 16px;
  background: var(--background-fill-primary); overflow-wrap: anywhere; }
.card h4 { margin: 0 0 8px 0; font-size: 0.95em; font-weight: 700; letter-spacing: 0.04em;
  color: var(--color-accent); }
.card.prompt-card { background: var(--background-fill-secondary); }
.card.prompt-card h4 { color: var(--body-text-color-subdued); }
.answer { font-size: 1.02em; line-height: 1.5; }
.answer { min-height: 140px; max-height: 60vh; overflow-y: auto; }
.answer pre, .chat pre { white-space: pre-wrap; background: var(--background-fill-secondary);
  padding: 8px; border-radius: 6px; }
.chat .turn { margin: 4px 0 8px 0; }
.chat .role { font-size: 0.75em; font-weight: 600; text-transform: uppercase; letter-spacing: 0.06em;
  color: var(--body-text-color-subdued); }
.chat .turn-assistant .text { border-left: 3px solid #d4d4d8; padding-left: 8px; }
.chat .turn-system .text { font-style: italic; }
.empty { color: var(--body-text-color-subdued); font-style: italic; }
#vote-row button { font-size: 1.05em; min-height: 48px; }
.status { min-height: 1.6em; color: var(--body-text-color-subdued); }
.status.error { color: var(--error-text-color, #b91c1c); }
.waiting { padding: 40px; text-align: center; font-size: 1.1em; }
.waiting .spinner { display: inline-block; width: 18px; height: 18px; margin-right: 10px;
  border: 3px solid #d4d4d8; border-top-color: #6366f1; border-radius: 50%;
  animation: spin 0.9s linear infinite; vertical-align: middle; }
@keyframes spin { to { transform: rotate(360deg); } }
.metrics { display: grid; grid-template-columns: repeat(auto-fit, minmax(125px, 1fr)); gap: 8px; }
.metric { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 12px; }
.metric .label { font-size: 0.8em; color: var(--body-text-color-subdued); }
.metric .value { font-size: 1.5em; font-weight: 650; font-variant-numeric: tabular-nums; }
.metric .note { font-size: 0.8em; color: var(--body-text-color-subdued); }
"""


def topbar_html(view: dict[str, Any], *, role: str, logout: bool) -> str:
    done, assigned = view["progress"]["done"], view["progress"]["assigned"]
    width = 100 * done / assigned if assigned else 0
    keys = " ".join(f"<kbd>{k}</kbd> {w}" for k, w in
                    (("1", "A"), ("2", "B"), ("3", "tie"), ("4", "both bad"), ("s", "skip"), ("u", "undo")))
    logout_link = '<a href="/logout">log out</a>' if logout else ""
    return (f'<div id="topbar"><span class="brand">preflab</span>'
            f'<span class="who">{_e(view["user"])} · {_e(role)}</span>'
            f'<span class="progress-box">done <b id="progress">{done} / {assigned}</b>'
            f'<span class="progress-bar"><span style="width:{width:.1f}%"></span></span></span>'
            f'<span class="spacer"></span><span class="keys">{keys}</span>{logout_link}</div>')


def status_html(view: dict[str, Any]) -> str:
    """The line under the buttons: what just happened, and after a vote, who wrote what."""
    ack = view.get("ack")
    cls = "status" if view.get("ok", True) else "status error"
    if ack:
        if ack["left_model"] == ack["right_model"]:
            models = f"Both answers were by <b>{_e(ack['left_model'])}</b>."
        else:
            models = f"A was <b>{_e(ack['left_model'])}</b>, B was <b>{_e(ack['right_model'])}</b>."
        return (f'<div class="{cls}" id="status">Saved: {_e(CHOICE_WORDS[ack["choice"]])} '
                f'({ack["decision_ms"] / 1000:.1f}s). {models}</div>')
    return f'<div class="{cls}" id="status">{_e(view.get("message", ""))}</div>'


def waiting_html(waiting: dict[str, Any] | None) -> str:
    if not waiting:
        return ""
    if waiting["state"] == "done":
        return f'<div class="waiting" id="waiting">{_e(waiting["message"])}</div>'
    if waiting["state"] == "failed":
        return f'<div class="waiting status error" id="waiting">{_e(waiting["message"])}</div>'
    if waiting["state"] == "held":
        return f'<div class="waiting" id="waiting"><span class="spinner"></span>{_e(waiting["message"])}</div>'
    return (f'<div class="waiting" id="waiting"><span class="spinner"></span>'
            f'Preparing pairs: {_e(waiting["message"])} ({waiting["seconds"]}s). '
            f'The first pair appears here as soon as it is ready.</div>')


def build_app(service: Service, *, title: str = "preflab"):
    """The gradio Blocks: the page and the JSON API. Returns (blocks, launch_kwargs)."""
    import gradio as gr

    from annotate.leaderboard import build_leaderboard_tab
    from annotate.review import build_review_tab
    from annotate.train_tab import build_train_tab

    logout = service.accounts is not None

    def who(request: gr.Request) -> tuple[str, str]:
        try:
            return service.identify(request)
        except Forbidden as e:
            raise gr.Error(str(e)) from None

    def admin(request: gr.Request) -> str:
        try:
            return service.require_admin(request)
        except Forbidden as e:
            raise gr.Error(str(e)) from None

    def checked(fn, *args):
        """Bad input (an unknown choice from an API caller) is the caller's error."""
        try:
            return fn(*args)
        except ValueError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title=title) as demo:
        shown = gr.State(None)   # pair_id on screen: a vote names it, so a stale tab cannot vote blind
        topbar = gr.HTML(elem_id="topbar-box", js_on_load=None)
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                waiting = gr.HTML(js_on_load=None, visible=False)
                with gr.Column(visible=False) as pair_box:
                    prompt = gr.HTML(elem_id="prompt", js_on_load=None)
                    with gr.Row(equal_height=True):
                        left = gr.HTML(elem_id="answer-left", js_on_load=None)
                        right = gr.HTML(elem_id="answer-right", js_on_load=None)
                    with gr.Row(elem_id="vote-row"):
                        b_left = gr.Button("A is better  [1]", elem_id="vote-left", variant="primary")
                        b_right = gr.Button("B is better  [2]", elem_id="vote-right", variant="primary")
                        b_tie = gr.Button("Tie  [3]", elem_id="vote-tie")
                        b_bad = gr.Button("Both bad  [4]", elem_id="vote-both-bad")
                    with gr.Row():
                        strength = gr.Radio(["slightly", "clearly"], value=None, scale=1,
                                            label="How much better? (optional, with A or B)")
                        rationale = gr.Textbox(label="Rationale (optional; Esc leaves the box)", scale=3,
                                               lines=1, max_lines=4, elem_id="rationale",
                                               placeholder="The deciding reason, in one sentence")
                with gr.Row():
                    status = gr.HTML(js_on_load=None)
                    b_skip = gr.Button("Skip  [s]", elem_id="skip", size="sm", scale=0, min_width=110)
                    b_undo = gr.Button("Undo  [u]", elem_id="undo", size="sm", scale=0, min_width=110)
            with gr.Tab("Guidelines", id="guidelines"):
                gr.Markdown(service.guidelines or "No guidelines were given.")
            with gr.Tab("Dashboard", id="dashboard", visible=False) as dash_tab:
                counts = dict(y_axis_format="d", height=260)   # y_lim comes with the data
                with gr.Row():
                    d_refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
                    d_updated = gr.Markdown()
                d_metrics = gr.HTML(js_on_load=None)
                with gr.Row():
                    p_annotator = gr.BarPlot(x="annotator", y="votes", title="Votes by annotator",
                                             sort="-y", **counts)
                    p_model = gr.BarPlot(x="model", y="votes", title="Votes by model (a vote counts for both sides)",
                                         sort="-y", **counts)
                with gr.Row():
                    p_day = gr.BarPlot(x="day", y="votes", title="Votes by day (UTC)", **counts)
                    p_choice = gr.BarPlot(x="choice", y="share", title="Outcomes", y_lim=[0, 1], height=260)
                with gr.Row():
                    p_bias = gr.BarPlot(x="annotator", y="left_share", y_lim=[0, 1], height=260,
                                        title="Position bias: share of decisive votes for the LEFT answer (0.5 = none)")
                    p_time = gr.BarPlot(x="annotator", y="median_s", title="Median decision time (s)",
                                        y_lim=[0, None], height=260)
                t_annotators = gr.Dataframe(label="Annotators", interactive=False)
                t_kappa = gr.Dataframe(label="Agreement: Cohen's kappa per annotator pair (shared pairs only)",
                                       interactive=False)
                with gr.Accordion("Export a preference dataset (TRL / datasets)", open=True):
                    with gr.Row():
                        x_format = gr.Radio(["standard", "conversational"], value="standard", label="Format")
                        x_ties = gr.Radio(["exclude", "separate"], value="exclude", label="Ties and both-bad")
                        x_aggregate = gr.Radio(["none", "majority"], value="none", label="One row per")
                        x_filetype = gr.Radio(["parquet", "jsonl"], value="parquet", label="File")
                        x_margin = gr.Checkbox(label="margin column (from strength)", value=False)
                    x_button = gr.Button("Export", variant="primary", scale=0)
                    x_report = gr.Markdown(elem_id="export-report")
                    x_files = gr.File(label="Download", file_count="multiple", interactive=False, visible=False,
                                      elem_id="export-files")
            # The admin tabs that close the loop; each has its own load event (admins only).
            with gr.Tab("Leaderboard", id="leaderboard", visible=False) as board_tab:
                build_leaderboard_tab(demo, service, board_tab, admin)   # and the /leaderboard API
            with gr.Tab("Review", id="review", visible=False) as review_tab:
                build_review_tab(service, demo, review_tab, admin)
            build_train_tab(demo, service, admin)
        timer = gr.Timer(1.0, active=False)

        # ---- annotate: one render for every action -----------------------------------
        ui_outputs = [shown, topbar, waiting, pair_box, prompt, left, right, status,
                      strength, rationale, timer, b_skip]

        def render(view: dict[str, Any], role: str, *, keep_inputs: bool = False,
                   strength_value=None, rationale_value=""):
            pair = view["pair"]
            inputs = (gr.skip(), gr.skip()) if keep_inputs else (strength_value, rationale_value)
            return (pair["pair_id"] if pair else None,
                    topbar_html(view, role=role, logout=logout),
                    gr.HTML(waiting_html(view["waiting"]), visible=pair is None),
                    gr.Column(visible=pair is not None),
                    (f'<div class="card prompt-card" data-pair-id="{_e(pair["pair_id"])}"><h4>Prompt</h4>'
                     f'{render_prompt(pair["prompt"])}</div>') if pair else "",
                    f'<div class="card answer"><h4>Answer A</h4>{render_markdown(pair["left"])}</div>' if pair else "",
                    f'<div class="card answer"><h4>Answer B</h4>{render_markdown(pair["right"])}</div>' if pair else "",
                    status_html(view),
                    *inputs,
                    # poll once a second while there is nothing to show but more may come
                    gr.Timer(active=pair is None and view["waiting"]["state"] != "done"
                             and view["waiting"]["state"] != "failed"),
                    gr.Button(visible=pair is not None))

        def on_load(request: gr.Request):
            user, role = who(request)
            return (*render(service.next(user), role), gr.Tab(visible=role == "admin"))

        def on_vote(choice):
            def handler(pair_id, strength_value, rationale_value, request: gr.Request):
                user, role = who(request)
                if not pair_id:
                    return render(service.next(user), role, keep_inputs=True)
                view = checked(service.vote, user, pair_id, choice, strength_value or "", rationale_value or "")
                # a stale vote keeps what was typed, so nothing is lost
                return render(view, role, keep_inputs=not view["ok"])
            handler.__name__ = f"vote_{choice}"
            return handler

        def on_skip(pair_id, request: gr.Request):
            user, role = who(request)
            return render(service.skip(user, pair_id or ""), role)

        def on_undo(request: gr.Request):
            user, role = who(request)
            view = service.undo(user)
            undone = view.get("undone")
            if undone:  # the pair comes back with the strength and rationale it had
                return render(view, role, strength_value=undone["strength"], rationale_value=undone["rationale"])
            return render(view, role, keep_inputs=True)

        def on_tick(pair_id, request: gr.Request):
            user, role = who(request)
            return render(service.next(user), role, keep_inputs=True)

        ui = dict(outputs=ui_outputs, show_progress="hidden", api_visibility="private",
                  concurrency_limit=None, trigger_mode="once")
        demo.load(on_load, None, ui_outputs + [dash_tab], show_progress="hidden",
                  api_visibility="private", concurrency_limit=None)
        for button, choice in ((b_left, "left"), (b_right, "right"), (b_tie, "tie"), (b_bad, "both_bad")):
            button.click(on_vote(choice), [shown, strength, rationale], **ui)
        b_skip.click(on_skip, [shown], **ui)
        b_undo.click(on_undo, None, **ui)
        timer.tick(on_tick, [shown], **ui)

        # ---- dashboard ---------------------------------------------------------------
        def count_plot(frame):
            # The axis runs from 0 to at least 5, so small counts get whole-number ticks.
            top = max(5, int(frame["votes"].max())) if len(frame) else 5
            return gr.BarPlot(value=frame, y_lim=[0, top])

        def on_dashboard(request: gr.Request):
            admin(request)
            d = service.dashboard()
            frames = d["_frames"]
            by_annotator = frames["by_annotator"]
            return (f"Updated {datetime.now().strftime('%H:%M:%S')}",
                    metrics_html(d["summary"], d["queue"]),
                    count_plot(by_annotator), count_plot(frames["by_model"]), count_plot(frames["by_day"]),
                    frames["choices"],
                    by_annotator, by_annotator.assign(median_s=by_annotator["median_decision_ms"] / 1000),
                    _annotator_table(by_annotator), _kappa_table(frames["kappa"]))

        dash_outputs = [d_updated, d_metrics, p_annotator, p_model, p_day, p_choice, p_bias, p_time,
                        t_annotators, t_kappa]
        admin_kw = dict(api_visibility="private", concurrency_limit=2, concurrency_id="admin")
        dash_tab.select(on_dashboard, None, dash_outputs, **admin_kw)
        d_refresh.click(on_dashboard, None, dash_outputs, **admin_kw)

        def on_export(format, ties, aggregate, filetype, margin, request: gr.Request):
            admin(request)
            files, report = checked(service.export, format, bool(margin), ties, aggregate, filetype)
            return report, files

        # The files go out plain (API callers get paths); showing the box is a second step.
        x_button.click(on_export, [x_format, x_ties, x_aggregate, x_filetype, x_margin], [x_report, x_files],
                       api_name="export", concurrency_limit=2, concurrency_id="admin").success(
            lambda: gr.File(visible=True), None, x_files, api_visibility="private", show_progress="hidden")

        # ---- the JSON API: same Service calls, same checks -----------------------------
        def next_pair(request: gr.Request) -> dict:
            """Your current pair (or a new one), with your progress."""
            return service.next(who(request)[0])

        def vote(pair_id: str, choice: str, strength: str = "", rationale: str = "",
                 request: gr.Request = None) -> dict:
            """Vote on the pair you hold: choice is left, right, tie or both_bad (as shown);
            strength slightly, clearly or empty. Returns the acknowledgement and your next pair."""
            return checked(service.vote, who(request)[0], pair_id, choice, strength, rationale)

        def skip(pair_id: str, request: gr.Request = None) -> dict:
            """Give the pair back; returns your next pair."""
            return service.skip(who(request)[0], pair_id)

        def undo(request: gr.Request = None) -> dict:
            """Take back your latest vote; that pair becomes your current pair again."""
            return service.undo(who(request)[0])

        def dashboard(request: gr.Request = None) -> dict:
            """All dashboard numbers (admins only)."""
            admin(request)
            d = service.dashboard()
            d.pop("_frames")
            return d

        api = dict(concurrency_limit=None)
        gr.api(next_pair, api_name="next", **api)
        gr.api(vote, api_name="vote", **api)
        gr.api(skip, api_name="skip", **api)
        gr.api(undo, api_name="undo", **api)
        gr.api(dashboard, api_name="dashboard", concurrency_limit=2, concurrency_id="admin")

    demo.queue(default_concurrency_limit=None)
    launch_kwargs = dict(css=CSS, head=KEYS_JS, theme=gr.themes.Default(
                             primary_hue="indigo", font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]),
                         ssr_mode=False, run_history=False, enable_monitoring=False,
                         footer_links=["api"], max_threads=64)
    return demo, launch_kwargs


def metrics_html(s: dict[str, Any], q: dict[str, Any]) -> str:
    metric = metric_card

    def num(x, fmt="{:.2f}"):
        return "–" if x is None else fmt.format(x)

    bias = "–"
    bias_note = "needs decisive votes"
    if s["left_share"] is not None:
        bias = _pct(s["left_share"])
        bias_note = f"95% CI {_pct(s['left_low'])}–{_pct(s['left_high'])} of {s['decisive_votes']}; "
        bias_note += "no sign of bias" if s["left_low"] <= 0.5 <= s["left_high"] else "biased"
    cards = [
        metric("Votes", str(s["votes"]), f"{s['annotators']} annotators · {s['models']} models"),
        metric("Pairs complete", f"{q['complete']} / {q['planned']}",
               f"overlap {q['overlap']} · {q['in_progress']} in progress"),
        metric("Tie rate", _pct(s["share_tie"])),
        metric("Both-bad rate", _pct(s["share_both_bad"])),
        metric("Left answer wins", bias, bias_note),
        metric("Median decision time", num(s["median_decision_ms"] and s["median_decision_ms"] / 1000, "{:.1f} s")),
        metric("Krippendorff's α", num(s["alpha"]), f"{s['alpha_units']} pairs with 2+ votes"),
        metric("Mean Cohen's κ", num(s["mean_kappa"]), f"{s['kappa_pairs']} annotator pairs"),
    ]
    return '<div class="metrics">' + "".join(cards) + "</div>"


def _annotator_table(frame):
    from annotate.stats import wilson_interval

    out = frame.copy()
    # Position bias per annotator with its 95% interval: a narrow interval away from 50%
    # is an annotator who favours one side, worth a word with them.
    decisive = out["votes"] - out["ties"] - out["both_bad"]
    cells = []
    for share, n in zip(out["left_share"], decisive):
        if n <= 0 or math.isnan(share):
            cells.append("–")
            continue
        low, high = wilson_interval(round(share * n), int(n))
        cells.append(f"{_pct(share)} ({_pct(low)}–{_pct(high)})")
    out["left_share"] = cells
    for c in ("tie_rate", "both_bad_rate"):
        out[c] = out[c].map(_pct)
    out["median_decision_ms"] = out["median_decision_ms"].map(lambda x: "–" if math.isnan(x) else f"{x / 1000:.1f} s")
    return out.rename(columns={"median_decision_ms": "median time", "left_share": "left wins (95% CI)",
                               "tie_rate": "tie rate", "both_bad_rate": "both-bad rate", "both_bad": "both bad"})


def _kappa_table(frame):
    out = frame.copy()
    out["agreement"] = out["agreement"].map(_pct)
    out["kappa"] = out["kappa"].map(lambda x: "–" if math.isnan(x) else f"{x:.2f}")
    return out.rename(columns={"annotator_1": "annotator", "annotator_2": "and annotator",
                               "n_shared": "shared pairs"})


# --------------------------------------------------------------------------------------
# 4. The command line
# --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("where pairs come from (one of)")
    src.add_argument("--pairs", metavar="FILE", help="pre-generated pairs (.jsonl or .parquet): "
                     "prompt, response_a, response_b [, model_a, model_b, pair_id]; no model is loaded")
    src.add_argument("--model", action="append", metavar="M", default=None,
                     help="sample pairs from this model in the background (once: two samples per "
                          "prompt; repeated: arena, a random pair of different models per prompt)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), metavar="FILE", help="prompt pool for --model")
    p.add_argument("--data", default="comparisons", metavar="STORE",
                   help="the comparison store votes go to: a directory (one server), or "
                        "postgresql://user@host:port/db (any number of servers share assignment and overlap K)")
    p.add_argument("--runs", default="runs", metavar="DIR",
                   help="run directories: trainings started from the Train tab, policies for the arena")
    p.add_argument("--auth", metavar="USERS.toml",
                   help="accounts file (preflab user add); without it there is one local user "
                        "and the app only listens on 127.0.0.1")
    p.add_argument("--user", default=None, help="without --auth: the name votes are recorded under; "
                   "None means your login name")
    p.add_argument("--overlap", type=int, default=1, metavar="K", help="each pair goes to K different annotators")
    p.add_argument("--guidelines", default=str(DEFAULT_GUIDELINES), metavar="FILE",
                   help="annotator guidelines (Markdown), one click away on the page")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    gen = p.add_argument_group("generation (with --model)")
    gen.add_argument("--rounds", type=int, default=1, help="pairs per prompt (each round samples anew)")
    gen.add_argument("--batch-size", type=int, default=4, help="prompts generated per batch")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0, help="seeds of the samples and of the arena's model draws")
    gen.add_argument("--device", default="auto", help="cpu, cuda, ...; auto = cuda if available")
    gen.add_argument("--cache-dir", default=None, help="where converted models are kept")
    smp = p.add_argument_group("which pair goes out next (annotate/sampling.py)")
    smp.add_argument("--sampling", choices=("random", "uncertain"), default="random",
                     help="random: no reward model, pairs go out as they come; uncertain: prefer pairs whose "
                          "reward-model score gap is smallest, mixed with uniformly random ones")
    smp.add_argument("--reward-model", metavar="RUN", default=None,
                     help="a finished reward run (runs/<id>) that scores the pairs for --sampling uncertain")
    smp.add_argument("--uncertain-mix", type=float, default=None, metavar="F",
                     help="share of handouts drawn uniformly at random with --sampling uncertain (0.5 if not given); "
                          "each vote records how its pair was chosen in gen_params['selection']")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from trainer.store import describe, is_database, open_store, read_comparisons, store_exists, target_key

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):   # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if bool(args.pairs) == bool(args.model):
        return _error("give either --pairs FILE or --model M (repeat --model for an arena)")
    if not args.auth and args.host not in LOCAL_HOSTS:
        return _error(f"refusing to listen on {args.host} without --auth: anyone who can reach this "
                      f"machine could vote, read the votes and export them. Create accounts with "
                      f"`preflab user add NAME --role annotator --auth users.toml` and pass --auth users.toml, "
                      f"or listen on 127.0.0.1 (the default).")
    for flag, value in (("--overlap", args.overlap), ("--rounds", args.rounds), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            return _error(f"{flag} must be at least 1, got {value}")
    from annotate.sampling import SamplingError, sampler_from_args
    try:
        sampler = sampler_from_args(args)   # --sampling uncertain: checks the reward run, loads no model
    except SamplingError as e:
        return _error(str(e))

    accounts = None
    if args.auth:
        try:
            accounts = Accounts(args.auth)
        except (OSError, ValueError) as e:
            return _error(str(e))
    guidelines = ""
    if args.guidelines:
        try:
            guidelines = Path(args.guidelines).read_text(encoding="utf-8")
        except OSError as e:
            return _error(f"{args.guidelines}: cannot read the guidelines ({e.strerror or e})")

    # One store, one assignment. A directory store's assignment lives in this process, so
    # a second server on it refuses to start (ServeLock); a database shares it.
    serve_lock = store = None
    shared = is_database(args.data)
    try:
        if shared:
            store = open_store(args.data)
            state_dir = Path(args.runs) / "serve-state" / target_key(args.data)
            votes, cursor = store.snapshot()   # one instant: sync goes on exactly from here
        else:
            from trainer.store.directory_writer import ServeLock
            serve_lock = ServeLock(args.data, f"preflab serve on {args.host}:{args.port}")
            state_dir = Path(args.data)
            votes, cursor = read_comparisons(args.data) if store_exists(args.data) else None, None
    except StoreError as e:
        if store is not None:
            store.close()
        return _error(str(e))
    queue = AssignmentQueue(overlap=args.overlap, shared=store if shared else None)
    generator = None

    if args.pairs:
        try:
            pairs, problems = load_pairs(args.pairs)
        except PairsFileError as e:
            return _error(str(e))
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        queue.add(pairs)
        print(f"{args.pairs}: {len(pairs)} pairs loaded, {len(problems)} rows skipped", file=sys.stderr)
    else:
        from trainer.models import ModelLoadError, canonical_name, check_model
        from trainer.prompts import PromptPoolError, load_prompt_pool
        try:
            pool = load_prompt_pool(args.prompts)
            names = list(dict.fromkeys(canonical_name(m) for m in args.model))
            for name in names:  # a bad name fails now, not in the background thread
                check_model(name, args.cache_dir)
        except (PromptPoolError, ModelLoadError) as e:
            return _error(str(e))
        print(pool.report.summary(), file=sys.stderr)
        voted_prompts: dict[str, int] = {}
        if votes is not None and votes.num_rows:
            for row in votes.group_by("prompt_id").aggregate([("prompt_id", "count")]).to_pylist():
                voted_prompts[row["prompt_id"]] = row["prompt_id_count"]
        generator = Generator(names, pool.prompts, queue, cache_dir=state_dir / "pairs",
                              voted_prompts=voted_prompts, rounds=args.rounds, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, device=args.device,
                              model_cache_dir=args.cache_dir)
        from annotate.launcher import restore_arena   # policies added from the Train tab earlier
        for note in restore_arena(generator, state_dir):
            print(note, file=sys.stderr)
        queue.add(generator.load_cache())
        queue.planned = generator.planned
        # Leave a core to the web server: generation would otherwise take every core
        # and make each click wait for a matrix multiply.
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    if sampler is not None:   # scores the pool in the background; a generator's batches before they join it
        sampler.attach(queue, generator)
    if store is None:
        try:
            store = open_store(args.data)
        except StoreError as e:
            return _error(str(e))
    if votes is not None:
        queue.restore(votes, cursor=cursor)
    service = Service(store, queue, data=args.data, state_dir=state_dir, accounts=accounts,
                      local_user=args.user or _login_name(), generator=generator, guidelines=guidelines,
                      runs_dir=args.runs)
    demo, launch_kwargs = build_app(service)
    if generator is not None:
        generator.start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if shared:   # fold in the other servers' votes every second or two
        threading.Thread(target=_sync_forever, args=(queue, stop), daemon=True, name="preflab-sync").start()
    try:
        try:
            demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                        auth=accounts.verify if accounts else None,
                        auth_message="preflab: log in with the account your admin gave you.",
                        **launch_kwargs)
        except OSError as e:
            return _error(f"cannot listen on {args.host}:{args.port} ({e}); try another --port")
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
        mode = ("pairs from " + args.pairs) if args.pairs else (
            "arena of " + ", ".join(args.model) if len(args.model) > 1 else "model " + args.model[0])
        print(f"preflab serve: {mode}; votes go to {describe(args.data)}; "
              f"{'accounts from ' + args.auth if args.auth else 'single local user ' + service.local_user}",
              file=sys.stderr)
        print(f"open {url}", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if generator is not None:
            generator.stop()
        demo.close()
        store.close()
        if serve_lock is not None:
            serve_lock.release()
    return 0


def _sync_forever(queue: AssignmentQueue, stop: threading.Event, every_s: float = 1.5) -> None:
    while not stop.wait(every_s):
        try:
            queue.sync()
        except Exception as e:   # the database away for a moment: the next round catches up
            log.warning("sync with the shared store failed (%s); retrying", e)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "local"
