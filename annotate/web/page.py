"""The page of `preflab serve`: its shell, the Annotate and Guidelines tabs, and the
JSON API, over `annotate.service.Service`.

    demo, launch_kwargs = build_app(ctx)      # ctx: annotate.context.ServeContext
    demo.launch(**launch_kwargs, ...)         # annotate/serve.py

Page and API call the same Service methods, and every handler goes through one
`Guard` (annotate/web/guard.py) that resolves the caller from gr.Request.username and
checks the role on the server: hiding the admin tabs is cosmetic, not security. The
admin tabs (Dashboard, Leaderboard, Review, Train) build themselves from their own
modules, each `build_x_tab(demo, ctx, guard)`; so does `serve --chat`'s Chat tab
(annotate/web/chat_tab.py), the first tab when there is one, with the Annotate tab only
when there are pairs to annotate too.

API, for scripts and load tests (gradio_client, logged in with auth=(user, password)):

    client.predict(api_name="/next")  -> {"pair": {"pair_id", "prompt", "left", "right", "left_cut", "right_cut"},
                                          "progress", "rubric", ...}   (*_cut: the token limit stopped that answer;
        rubric: None, or serve --rubric's criteria and flags, annotate/rubric.py Rubric.describe;
        in /vote's, /skip's and /undo's answers too)
    client.predict(pair_id, "left" | "right" | "tie" | "both_bad", "slightly" | "clearly" | "",
                   "rationale", criteria, api_name="/vote")   -> {"ack": {"event_id", ...}, "pair": next pair, ...}
        (criteria: serve --rubric's judgments as shown, {"helpful": "left", "clarity": {"left": 4,
        "right": 2}, "flags": {"right": ["unsafe"]}}, or None)
    client.predict(pair_id, api_name="/skip"); client.predict(api_name="/undo")
    client.predict(api_name="/dashboard")            (admins; /export and /chat_prompts too, from the Dashboard tab:
        report, [{"name", "url"}]; GET urljoin(client.src, url) with client.cookies: annotate/web/downloads.py)
    /runs, /train_reward, /train_policy, /train_dpo, /arena_add: the loop, for scripts (admins;
    annotate/web/loop_api.py); /leaderboard (admins; annotate/web/leaderboard_tab.py)
    client.predict(conversation_id or "", message, api_name="/chat")   (serve --chat; annotate/web/chat_api.py)
        -> the chat view once both answers are complete (submit() streams every view):
        {"conversation_id", "turn", "left": {"messages", "streaming", "ttft_ms", "tokens_per_s",
        "error", "cut"}, "right": {...}, "can_vote", "voted", "ack", "taken_back", "message"}
        (no model names)
    client.predict(conversation_id, choice, strength, rationale, api_name="/chat_vote")
        -> the view with "ack": {"event_id", "choice", "left_model", "right_model"}
    client.predict(conversation_id, api_name="/chat_take_back")   (a mis-click: the vote is
        retracted, "taken_back" true; the conversation stays closed)
"""

# No `from __future__ import annotations` here: gradio reads the handlers' type hints
# (gr.Request, the API's parameter types) at run time.

import os
from typing import Any

from annotate.service import MAX_RATIONALE_CHARS
from annotate.web.assets import CSS, HEAD_HTML
from annotate.web.guard import Guard
from annotate.web.html import CHOICE_WORDS, escape, render_markdown, render_prompt
from annotate.web.request_limits import MAX_UPLOAD_BYTES
from annotate.web.rubric_panel import RubricPanel

KEYS = (("1", "A"), ("2", "B"), ("3", "tie"), ("4", "both bad"), ("s", "skip"), ("u", "undo"))


def topbar_html(view: dict[str, Any], *, role: str, logout: bool) -> str:
    done, assigned = view["progress"]["done"], view["progress"]["assigned"]
    pool = ""  # absent while gold items are mixed in (annotate/queue_status.py says why)
    if "pool_done" in view["progress"]:
        pool = (
            '<span class="pool-progress" id="pool-progress" title="pairs with all the votes they need">'
            f"pool {view['progress']['pool_done']} / {view['progress']['pool_total']} complete</span>"
        )
    width = 100 * done / assigned if assigned else 0
    keys = " ".join(f"<kbd>{k}</kbd> {w}" for k, w in KEYS)
    logout_link = '<a href="/logout">log out</a>' if logout else ""
    return (
        f'<div id="topbar"><span class="brand">preflab</span>'
        f'<span class="who">{escape(view["user"])} · {escape(role)}</span>'
        f'<span class="progress-box">done <b id="progress">{done} / {assigned}</b>'
        f'<span class="progress-bar"><span style="width:{width:.1f}%"></span></span></span>'
        f'{pool}<span class="spacer"></span><span class="keys">{keys}</span>{logout_link}</div>'
    )


CUT_NOTE = (
    '<div class="cut-note" data-cut="true">Cut off at the length limit: this answer did not end '
    "on its own, so it may stop mid-sentence.</div>"
)


# The cue at the foot of an answer that scrolls: shown only while text is hidden below the
# card's edge (the page's script sets data-more, annotate/web/assets.py); a tap shows the
# whole answer. Screen readers skip it: the answer's text is all in the page for them.
MORE_CUE = '<button type="button" class="more-cue" aria-hidden="true" tabindex="-1">more below ↓</button>'


def answer_html(label: str, text: str, cut: bool) -> str:
    """One answer card; an answer the token limit stopped says so under its text. The
    card scrolls on its own (tabindex: with the arrow keys too) and says when it does."""
    return (
        f'<div class="card answer" tabindex="0" role="region" aria-label="Answer {label}">'
        f"<h4>Answer {label}</h4>{render_markdown(text)}{CUT_NOTE if cut else ''}{MORE_CUE}</div>"
    )


def status_html(view: dict[str, Any]) -> str:
    """The line under the buttons: what just happened, and after a vote, who wrote what."""
    ack = view.get("ack")
    cls = "status" if view.get("ok", True) else "status error"
    if ack:
        if ack["left_model"] == ack["right_model"]:
            models = f"Both answers were by <b>{escape(ack['left_model'])}</b>."
        else:
            models = f"A was <b>{escape(ack['left_model'])}</b>, B was <b>{escape(ack['right_model'])}</b>."
        return (
            f'<div class="{cls}" id="status">Saved: {escape(CHOICE_WORDS[ack["choice"]])} '
            f"({ack['decision_ms'] / 1000:.1f}s). {models}</div>"
            + gold_feedback_html(ack.get("gold"))
            + suggestion_html(ack.get("suggestion"))
        )
    return f'<div class="{cls}" id="status">{escape(view.get("message", ""))}</div>'


GOLD_WORDS = {"left": "A is better", "right": "B is better", "tie": "Tie"}


def suggestion_html(suggestion: dict[str, Any] | None) -> str:
    """serve --suggest: after a vote (never before), the judge's choice on that pair."""
    if not suggestion:
        return ""
    agrees = "you agree" if suggestion["agrees"] else "you chose otherwise"
    return (
        f'<div class="status judge-suggestion" id="judge-suggestion" data-agrees="{str(suggestion["agrees"]).lower()}">'
        f"The model judge <b>{escape(suggestion['judge'])}</b> chose: "
        f"{escape(CHOICE_WORDS[suggestion['choice']])}; {agrees}.</div>"
    )


def gold_feedback_html(feedback: dict[str, Any] | None) -> str:
    """serve --gold-feedback: after a vote on a gold item, whether it matched and why."""
    if not feedback:
        return ""
    verdict = (
        "You matched the expected answer" if feedback["matched"] else "The expected answer was different"
    )
    explanation = f"<div>{render_markdown(feedback['explanation'])}</div>" if feedback["explanation"] else ""
    return (
        f'<div class="status gold-feedback" id="gold-feedback" data-matched="{str(feedback["matched"]).lower()}">'
        f"<b>That was a check item.</b> {verdict}: {escape(GOLD_WORDS[feedback['expected']])}.{explanation}</div>"
    )


def waiting_html(waiting: dict[str, Any] | None) -> str:
    if not waiting:
        return ""
    if waiting["state"] == "done":
        return f'<div class="waiting" id="waiting">{escape(waiting["message"])}</div>'
    if waiting["state"] == "failed":
        return f'<div class="waiting status error" id="waiting">{escape(waiting["message"])}</div>'
    if waiting["state"] == "held":
        return f'<div class="waiting" id="waiting"><span class="spinner"></span>{escape(waiting["message"])}</div>'
    return (
        f'<div class="waiting" id="waiting"><span class="spinner"></span>'
        f"Preparing pairs: {escape(waiting['message'])} ({waiting['seconds']}s). "
        f"The first pair appears here as soon as it is ready.</div>"
    )


def build_app(ctx) -> tuple[Any, dict[str, Any]]:
    """The gradio Blocks: the page and the JSON API. Returns (blocks, launch_kwargs)."""
    import gradio as gr

    from annotate.web.chat_tab import build_chat_tab
    from annotate.web.dashboard_tab import build_dashboard_tab
    from annotate.web.leaderboard_tab import build_leaderboard_tab
    from annotate.web.loop_api import register_loop_api
    from annotate.web.review_tab import build_review_tab
    from annotate.web.train_tab import build_train_tab
    from annotate.web.users_tab import build_users_tab

    guard = Guard(ctx.service.identify)
    with gr.Blocks(title=ctx.title) as demo:
        topbar = gr.HTML(elem_id="topbar-box", js_on_load=None)
        with gr.Tabs():
            build_chat_tab(demo, ctx, guard)  # serve --chat only; then the first tab
            annotate = _build_annotate_tab(ctx, guard) if has_pairs(ctx) else None
            with gr.Tab("Guidelines", id="guidelines"):
                gr.Markdown(ctx.guidelines or "No guidelines were given.")
            build_dashboard_tab(demo, ctx, guard)  # and the /export API
            # The admin tabs that close the loop; each has its own load event (admins only).
            build_leaderboard_tab(demo, ctx, guard)  # and the /leaderboard API
            build_review_tab(demo, ctx, guard)
            build_train_tab(demo, ctx, guard)
            build_users_tab(demo, ctx, guard)  # with --auth only
        if annotate is not None:
            timer = gr.Timer(1.0, active=False)
            _wire_annotate_tab(demo, ctx, guard, annotate, topbar, timer)
        else:  # chat only: the top bar has no pair progress to show
            _wire_chat_topbar(demo, ctx, guard, topbar)
        _register_api(ctx, guard)
        register_loop_api(ctx, guard)
        if ctx.chat is not None:  # serve --chat: /chat, /chat_vote, /chat_take_back
            from annotate.web.chat_api import register_chat_api

            register_chat_api(ctx, guard)

    # gradio's queue recomputes a pandas summary of up to 10,000 past events after every
    # event, for its monitoring dashboard, even with enable_monitoring=False
    # (queueing.Queue.compute_analytics_summary): 5-20 ms of GIL-held work per vote, more
    # the longer the server runs; at 512 annotators it was the largest cost of a vote
    # (bench/ui_load.py, issue #12). The dashboard is off: keep one record, never recompute.
    # The queue reads these when demo.queue() creates it; a value set by the user wins.
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**62))
    demo.queue(default_concurrency_limit=None)
    launch_kwargs = dict(
        css=CSS,
        head=HEAD_HTML,
        theme=gr.themes.Default(
            primary_hue="indigo",
            font=["ui-sans-serif", "system-ui", "sans-serif"],
            font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
        ),
        ssr_mode=False,
        run_history=False,
        enable_monitoring=False,
        footer_links=["api"],
        max_threads=64,
        # Nothing on this page uploads files; gradio's upload route still exists, so cap it.
        max_file_size=MAX_UPLOAD_BYTES,
    )
    return demo, launch_kwargs


def has_pairs(ctx) -> bool:
    """Whether the Annotate tab has pairs to hand out. Without --chat it always has a
    source (--pairs or --model); with --chat only when pairs were loaded or a generator
    makes them, else the Chat tab stands alone."""
    if ctx.chat is None:
        return True
    return ctx.generator is not None or bool(ctx.queue.pool())


def chat_topbar_html(user: str, role: str, *, logout: bool) -> str:
    """The top bar of a chat-only page: who, and the keys of the Chat tab."""
    keys = " ".join(f"<kbd>{k}</kbd> {w}" for k, w in CHAT_KEYS)
    logout_link = '<a href="/logout">log out</a>' if logout else ""
    return (
        f'<div id="topbar"><span class="brand">preflab</span>'
        f'<span class="who" id="topbar-who">{escape(user)} · {escape(role)}</span>'
        f'<span class="spacer"></span><span class="keys">{keys}</span>{logout_link}</div>'
    )


CHAT_KEYS = (("Enter", "send"), ("1", "A"), ("2", "B"), ("3", "tie"), ("4", "both bad"))


def _wire_chat_topbar(demo, ctx, guard: Guard, topbar) -> None:
    import gradio as gr

    logout = ctx.service.accounts is not None

    def on_load(request: gr.Request):
        user, role = guard.user(request)
        return chat_topbar_html(user, role, logout=logout)

    demo.load(on_load, None, topbar, show_progress="hidden", api_visibility="private", concurrency_limit=None)


def _build_annotate_tab(ctx, guard) -> dict[str, Any]:
    """The Annotate tab's components, by name (wired by `_wire_annotate_tab`)."""
    import gradio as gr

    c: dict[str, Any] = {}
    with gr.Tab("Annotate", id="annotate"):
        c["waiting"] = gr.HTML(js_on_load=None, visible=False)
        with gr.Column(visible=False) as c["pair_box"]:
            c["prompt"] = gr.HTML(elem_id="prompt", js_on_load=None)
            # Side by side; on a narrow screen A above B (the CSS of annotate/web/assets.py),
            # and the vote bar stays on screen at the bottom while the page scrolls.
            with gr.Row(equal_height=True, elem_id="answers-row"):
                c["left"] = gr.HTML(elem_id="answer-left", js_on_load=None)
                c["right"] = gr.HTML(elem_id="answer-right", js_on_load=None)
            c["rubric"] = RubricPanel(
                getattr(ctx.service, "rubric", None)
            )  # serve --rubric: criteria, then the vote
            with gr.Row(elem_id="vote-row"):
                c["b_left"] = gr.Button("A is better  [1]", elem_id="vote-left", variant="primary")
                c["b_right"] = gr.Button("B is better  [2]", elem_id="vote-right", variant="primary")
                c["b_tie"] = gr.Button("Tie  [3]", elem_id="vote-tie")
                c["b_bad"] = gr.Button("Both bad  [4]", elem_id="vote-both-bad")
            with gr.Row(elem_id="vote-details"):
                c["strength"] = gr.Radio(
                    ["slightly", "clearly"],
                    value=None,
                    scale=1,
                    label="How much better? (optional, with A or B)",
                )
                c["rationale"] = gr.Textbox(
                    label="Rationale (optional; Esc leaves the box)",
                    scale=3,
                    lines=1,
                    max_lines=4,
                    max_length=MAX_RATIONALE_CHARS,  # the service refuses more, whoever sends it
                    elem_id="rationale",
                    placeholder="The deciding reason, in one sentence",
                )
        with gr.Row():
            c["status"] = gr.HTML(js_on_load=None)
            c["b_skip"] = gr.Button("Skip  [s]", elem_id="skip", size="sm", scale=0, min_width=110)
            c["b_undo"] = gr.Button("Undo  [u]", elem_id="undo", size="sm", scale=0, min_width=110)
    return c


def _wire_annotate_tab(demo, ctx, guard: Guard, c: dict[str, Any], topbar, timer) -> None:
    """One render for every action of the Annotate tab: load, vote, skip, undo, tick."""
    import gradio as gr

    service = ctx.service
    logout = service.accounts is not None
    panel = c["rubric"]
    shown = gr.State(None)  # pair_id on screen: a vote names it, so a stale tab cannot vote blind
    ui_outputs = [
        shown,
        topbar,
        c["waiting"],
        c["pair_box"],
        c["prompt"],
        c["left"],
        c["right"],
        c["status"],
        c["strength"],
        c["rationale"],
        timer,
        c["b_skip"],
        *panel.components,
    ]

    def render(
        view: dict[str, Any],
        role: str,
        *,
        keep_inputs: bool = False,
        strength_value=None,
        rationale_value="",
        criteria_value=None,
    ):
        pair = view["pair"]
        if keep_inputs:
            inputs, judged = (gr.skip(), gr.skip()), [gr.skip()] * len(panel.components)
        else:
            inputs, judged = (strength_value, rationale_value), panel.values(criteria_value)
        return (
            pair["pair_id"] if pair else None,
            topbar_html(view, role=role, logout=logout),
            gr.HTML(waiting_html(view["waiting"]), visible=pair is None),
            gr.Column(visible=pair is not None),
            (
                f'<div class="card prompt-card" data-pair-id="{escape(pair["pair_id"])}"><h4>Prompt</h4>'
                f"{render_prompt(pair['prompt'])}</div>"
            )
            if pair
            else "",
            answer_html("A", pair["left"], pair.get("left_cut", False)) if pair else "",
            answer_html("B", pair["right"], pair.get("right_cut", False)) if pair else "",
            status_html(view),
            *inputs,
            # poll once a second while there is nothing to show but more may come
            gr.Timer(active=pair is None and view["waiting"]["state"] not in ("done", "failed")),
            gr.Button(visible=pair is not None),
            *judged,
        )

    def on_load(request: gr.Request):
        user, role = guard.user(request)
        with guard.errors():
            return render(service.next(user), role)

    def on_vote(choice):
        def handler(values: dict, request: gr.Request):
            user, role = guard.user(request)
            pair_id = values[shown]
            with guard.errors():  # bad input from an API caller is the caller's error
                if not pair_id:
                    return render(service.next(user), role, keep_inputs=True)
                view = service.vote(
                    user,
                    pair_id,
                    choice,
                    values[c["strength"]] or "",
                    values[c["rationale"]] or "",
                    criteria=panel.judgments(values),
                )
            # a stale vote keeps what was typed, so nothing is lost
            return render(view, role, keep_inputs=not view["ok"])

        handler.__name__ = f"vote_{choice}"
        return handler

    def on_skip(pair_id, request: gr.Request):
        user, role = guard.user(request)
        with guard.errors():
            return render(service.skip(user, pair_id or ""), role)

    def on_undo(request: gr.Request):
        user, role = guard.user(request)
        with guard.errors():
            view = service.undo(user)
        undone = view.get("undone")
        if undone:  # the pair comes back with the strength, rationale and judgments it had
            return render(
                view,
                role,
                strength_value=undone["strength"],
                rationale_value=undone["rationale"],
                criteria_value=undone.get("criteria"),
            )
        return render(view, role, keep_inputs=True)

    def on_tick(pair_id, request: gr.Request):
        user, role = guard.user(request)
        with guard.errors():
            return render(service.next(user), role, keep_inputs=True)

    ui = dict(
        outputs=ui_outputs,
        show_progress="hidden",
        api_visibility="private",
        concurrency_limit=None,
        trigger_mode="once",
    )
    demo.load(
        on_load, None, ui_outputs, show_progress="hidden", api_visibility="private", concurrency_limit=None
    )
    for button, choice in (("b_left", "left"), ("b_right", "right"), ("b_tie", "tie"), ("b_bad", "both_bad")):
        c[button].click(on_vote(choice), {shown, c["strength"], c["rationale"], *panel.components}, **ui)
    c["b_skip"].click(on_skip, [shown], **ui)
    c["b_undo"].click(on_undo, None, **ui)
    timer.tick(on_tick, [shown], **ui)


def _register_api(ctx, guard: Guard) -> None:
    """The JSON API: the same Service calls as the page, through the same guard."""
    import gradio as gr

    service = ctx.service

    def next_pair(request: gr.Request) -> dict:
        """Your current pair (or a new one), with your progress and the rubric (None
        without serve --rubric): which criteria and flags a vote must or may carry."""
        user, _ = guard.user(request)
        with guard.errors():
            return service.next(user)

    def vote(
        pair_id: str,
        choice: str,
        strength: str = "",
        rationale: str = "",
        criteria: dict | None = None,
        request: gr.Request = None,
    ) -> dict:
        """Vote on the pair you hold: choice is left, right, tie or both_bad (as shown);
        strength slightly, clearly or empty; criteria the rubric's judgments (serve --rubric),
        as shown: {criterion: left|right|tie, scale: {"left": 1-5, "right": 1-5},
        "flags": {"left": [...], "right": [...]}}. Returns the acknowledgement and your next pair."""
        user, _ = guard.user(request)
        with guard.errors():
            return service.vote(user, pair_id, choice, strength, rationale, criteria=criteria or None)

    def skip(pair_id: str, request: gr.Request = None) -> dict:
        """Give the pair back; returns your next pair."""
        user, _ = guard.user(request)
        with guard.errors():
            return service.skip(user, pair_id)

    def undo(request: gr.Request = None) -> dict:
        """Take back your latest vote; that pair becomes your current pair again."""
        user, _ = guard.user(request)
        with guard.errors():
            return service.undo(user)

    def dashboard(request: gr.Request = None) -> dict:
        """All dashboard numbers (admins only)."""
        name = guard.admin(request)
        with guard.errors():
            return service.dashboard(name)

    api = dict(concurrency_limit=None)
    gr.api(next_pair, api_name="next", **api)
    gr.api(vote, api_name="vote", **api)
    gr.api(skip, api_name="skip", **api)
    gr.api(undo, api_name="undo", **api)
    gr.api(dashboard, api_name="dashboard", concurrency_limit=2, concurrency_id="admin")
