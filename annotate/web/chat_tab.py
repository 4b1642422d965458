"""The Chat tab of `preflab serve --chat`: the annotator writes a message (or takes a
random prompt from the pool), two anonymous models answer side by side as they stream,
follow-up turns go to both, and a vote at any turn closes the conversation and shows
who was who.

    from annotate.web.chat_tab import build_chat_tab
    with gr.Tabs():
        build_chat_tab(demo, ctx, guard)    # ctx.chat: annotate.chat.ChatService

The conversation and its rules are the ChatService's; here are the page and its
wiring. Each side's panel shows that side's own history (its earlier answers are its
own; the user's turns are the same on both), with time to first token and tokens per
second under it. Send (or Enter in the message box; Shift+Enter for a new line),
Regenerate and the stream they start are gradio generator handlers: one render per view
the service yields. Stop asks the service to stop both sides; the stream then ends.
After the vote, "Take back vote" retracts it (a mis-click); the conversation stays closed.
The vote keys 1-4 are the Annotate tab's (annotate/web/assets.py: a key typed in the
message box is text). (No `from __future__ import annotations`: gradio reads the
handlers' `request: gr.Request` annotations as objects.)
"""

from typing import Any

from annotate.chat_state import empty_view
from annotate.service import MAX_RATIONALE_CHARS
from annotate.web import stream_relay
from annotate.web.html import CHOICE_WORDS, escape, render_markdown

# The streams wait for their views in threads of their own: annotate/web/stream_relay.py.

VOTE_BUTTONS = (
    ("left", "A is better  [1]", "chat-vote-left", "primary"),
    ("right", "B is better  [2]", "chat-vote-right", "primary"),
    ("tie", "Tie  [3]", "chat-vote-tie", "secondary"),
    ("both_bad", "Both bad  [4]", "chat-vote-both-bad", "secondary"),
)
EMPTY_VIEW = empty_view(
    "Write a message (or take a random prompt): two anonymous models answer side by side."
)


def _streaming(view: dict[str, Any]) -> bool:
    return view["left"]["streaming"] or view["right"]["streaming"]


def stats_html(side: dict[str, Any]) -> str:
    """The line under a panel: time to first token, tokens per second, and whether the
    answer is still coming. data-* carry the numbers for scripts and tests."""
    parts = []
    if side["ttft_ms"] is not None:
        parts.append(f"first token {side['ttft_ms']} ms")
    elif side["streaming"]:
        parts.append("waiting for the first token…")
    if side["tokens_per_s"] is not None:
        parts.append(f"{side['tokens_per_s']:.1f} tokens/s")
    if side["streaming"] and side["ttft_ms"] is not None:
        parts.append("streaming…")
    if side["cut"]:
        parts.append("cut off: the length limit or Stop ended it")
    ttft = "" if side["ttft_ms"] is None else str(side["ttft_ms"])
    rate = "" if side["tokens_per_s"] is None else f"{side['tokens_per_s']:.3f}"
    return (
        f'<div class="chat-stats" data-ttft-ms="{ttft}" data-tokens-per-s="{rate}">'
        f"{escape(' · '.join(parts))}</div>"
    )


def panel_html(label: str, side: dict[str, Any], model: str | None) -> str:
    """One side's conversation as the annotator sees it: their messages and this side's
    answers, the model's name only once the vote revealed it, then the stats line."""
    messages = side["messages"]
    if messages and messages[-1]["role"] == "user" and not side["streaming"] and not side["error"]:
        # stopped before its first token: the service lists no answer, a vote stores ""
        messages = [*messages, {"role": "assistant", "content": ""}]
    turns = []
    for n, m in enumerate(messages, start=1):
        role = m["role"] if m["role"] in ("system", "user", "assistant") else "other"
        who = {"user": "You", "assistant": f"Model {label}", "system": "System"}.get(role, m["role"])
        coming = side["streaming"] and n == len(messages) and not m["content"].strip()
        text = "" if coming else render_markdown(m["content"])  # not "(empty answer)" before it began
        turns.append(
            f'<div class="turn turn-{role}"><div class="role">{escape(who)}</div>'
            f'<div class="text">{text}</div></div>'
        )
    if not turns:
        turns.append('<p class="empty">The answers appear here.</p>')
    error = f'<div class="chat-error">{escape(side["error"])}</div>' if side["error"] else ""
    name = f' <span class="chat-model">· {escape(model)}</span>' if model else ""
    streaming = "true" if side["streaming"] else "false"
    return (
        f'<div class="card chat-panel" role="region" aria-label="Answers of model {label}" '
        f'aria-busy="{streaming}" data-streaming="{streaming}" data-error="{"true" if side["error"] else "false"}">'
        f'<h4>Model {label}{name}</h4><div class="chat">{"".join(turns)}</div>{error}</div>'
        f"{stats_html(side)}"
    )


def status_html(view: dict[str, Any]) -> str:
    """The line over the message box: what just happened; after the vote, who was who."""
    ack = view.get("ack")
    if ack:
        names = f"A was <b>{escape(ack['left_model'])}</b>, B was <b>{escape(ack['right_model'])}</b>."
        if view.get("ok") is False:  # a take-back the store could not write: the vote stands
            return (
                f'<div class="status error" id="chat-status" data-voted="true">'
                f"{escape(view.get('message', ''))} {names}</div>"
            )
        if view.get("taken_back"):
            return (
                '<div class="status" id="chat-status" data-voted="true" data-taken-back="true">'
                f"Vote taken back: it no longer counts. {names} Start a new conversation to go on.</div>"
            )
        return (
            f'<div class="status" id="chat-status" data-voted="true">Saved: '
            f"{escape(CHOICE_WORDS[ack['choice']])}. {names} Start a new conversation to go on.</div>"
        )
    cls = "status" if view.get("ok", True) else "status error"
    return f'<div class="{cls}" id="chat-status">{escape(view.get("message", ""))}</div>'


def build_chat_tab(demo, ctx, guard) -> None:
    """The Chat tab and its handlers; nothing without `serve --chat` (ctx.chat None)."""
    import gradio as gr

    chat = ctx.chat  # annotate.chat.ChatService
    if chat is None:
        return
    with gr.Tab("Chat", id="chat"):
        with gr.Row(equal_height=False, elem_id="chat-answers-row"):
            left = gr.HTML(panel_html("A", EMPTY_VIEW["left"], None), elem_id="chat-left", js_on_load=None)
            right = gr.HTML(panel_html("B", EMPTY_VIEW["right"], None), elem_id="chat-right", js_on_load=None)
        with gr.Column(visible=False, elem_id="chat-vote-box") as vote_box:
            with gr.Row(elem_id="chat-vote-row"):
                votes = {
                    choice: gr.Button(text, elem_id=elem_id, variant=variant)
                    for choice, text, elem_id, variant in VOTE_BUTTONS
                }
            with gr.Row(elem_id="chat-vote-details"):
                strength = gr.Radio(
                    ["slightly", "clearly"],
                    value=None,
                    scale=1,
                    label="How much better? (optional, with A or B)",
                )
                rationale = gr.Textbox(
                    label="Rationale (optional; Esc leaves the box)",
                    scale=3,
                    lines=1,
                    max_lines=4,
                    max_length=MAX_RATIONALE_CHARS,  # the service refuses more, whoever sends it
                    elem_id="chat-rationale",
                    placeholder="The deciding reason, in one sentence",
                )
        status = gr.HTML(status_html(EMPTY_VIEW), js_on_load=None)
        with gr.Row(elem_id="chat-input-row"):
            # lines=1: Enter sends (gradio submits a one-line box on Enter); Shift+Enter
            # still breaks the line, and the box grows to max_lines.
            message = gr.Textbox(
                show_label=False,
                lines=1,
                max_lines=8,
                max_length=chat.filter.max_chars,  # serve --chat-max-chars: the service refuses more
                scale=5,
                elem_id="chat-message",
                placeholder="Your message (Enter sends, Shift+Enter a new line, Esc leaves the box)",
            )
            send = gr.Button("Send", variant="primary", scale=0, min_width=90, elem_id="chat-send")
            stop = gr.Button(
                "Stop", variant="stop", scale=0, min_width=90, visible=False, elem_id="chat-stop"
            )
        with gr.Row(elem_id="chat-actions"):
            random_prompt = gr.Button(
                "Random prompt", size="sm", scale=0, min_width=140, elem_id="chat-random"
            )
            regenerate = gr.Button(
                "Regenerate", size="sm", scale=0, min_width=120, interactive=False, elem_id="chat-regenerate"
            )
            new = gr.Button("New conversation", size="sm", scale=0, min_width=160, elem_id="chat-new")
            take_back = gr.Button(
                "Take back vote", size="sm", scale=0, min_width=140, visible=False, elem_id="chat-take-back"
            )
    conversation = gr.State("")  # the conversation on screen; "" before one starts or after the vote
    voted = gr.State("")  # the conversation just voted on, while its vote can be taken back
    offered = gr.State("")  # the last random prompt: sent unchanged, it is a pool prompt

    def render(view: dict[str, Any], more: dict | None = None) -> dict:
        streaming = _streaming(view)
        ack = view.get("ack") or {}
        open_id = "" if view["voted"] else view["conversation_id"]
        can_take_back = view["voted"] and not view.get("taken_back")
        return {
            conversation: open_id,
            voted: view["conversation_id"] if can_take_back else "",
            take_back: gr.Button(visible=can_take_back),
            left: panel_html("A", view["left"], ack.get("left_model")),
            right: panel_html("B", view["right"], ack.get("right_model")),
            status: status_html(view),
            vote_box: gr.Column(visible=view["can_vote"] and not streaming),
            send: gr.Button(visible=not streaming),
            stop: gr.Button(visible=streaming),
            regenerate: gr.Button(interactive=bool(open_id) and not streaming),
            # While a stream renders into the panels nothing else may (Stop first), so
            # no late view of it can land over what another button showed.
            new: gr.Button(variant="primary" if view["voted"] else "secondary", interactive=not streaming),
            random_prompt: gr.Button(interactive=not streaming),
            **(more or {}),
        }

    async def relay(views, first: dict):
        """Render each view of a service generator as it comes (annotate/web/stream_relay.py
        says in which threads); `first` joins the first render."""
        stream = stream_relay.relay(views)
        try:
            while True:
                with guard.errors():  # BadRequest from the service: the box keeps the message
                    try:
                        view = await anext(stream)
                    except StopAsyncIteration:
                        return
                yield render(view, first)
                first = {}
        finally:
            await stream.aclose()  # the tab closed early: the service stops generating

    async def on_send(text, conversation_id, offered_text, request: gr.Request):
        user, _ = guard.user(request)
        text = text or ""
        from_pool = bool(offered_text) and text == offered_text
        with guard.errors():
            views = chat.send(user, conversation_id or "", text, from_pool=from_pool)
        async for update in relay(views, {message: "", offered: ""}):
            yield update

    async def on_regenerate(conversation_id, request: gr.Request):
        user, _ = guard.user(request)
        with guard.errors():
            views = chat.regenerate(user, conversation_id or "")
        async for update in relay(views, {}):
            yield update

    def on_stop(conversation_id, request: gr.Request):
        # The service stops both sides at their next token and the running stream ends
        # with its last view (both sides done, cut). That stream is the one writer of the
        # panels: cancelling it here instead would race its last render against this one.
        user, _ = guard.user(request)
        if not conversation_id:  # before the first view named the conversation
            return gr.skip()
        with guard.errors():
            chat.stop(user, conversation_id)
        return '<div class="status" id="chat-status">Stopping both answers…</div>'

    def on_vote(choice):
        def handler(conversation_id, strength_value, rationale_value, request: gr.Request):
            user, _ = guard.user(request)
            with guard.errors():
                view = chat.vote(
                    user, conversation_id or "", choice, strength_value or "", rationale_value or ""
                )
            return render(view, {strength: None, rationale: ""})

        handler.__name__ = f"chat_vote_{choice}"
        return handler

    def on_take_back(voted_id, request: gr.Request):
        user, _ = guard.user(request)
        if not voted_id:
            return gr.skip()
        with guard.errors():
            view = chat.take_back(user, voted_id)
        return render(view)

    def on_new(request: gr.Request):
        user, _ = guard.user(request)
        with guard.errors():
            view = chat.new(user)
        return render(view, {strength: None, rationale: "", message: "", offered: ""})

    def on_random(request: gr.Request):
        user, _ = guard.user(request)
        with guard.errors():
            text = chat.random_prompt(user)
        return text, text

    outputs = [conversation, voted, left, right, status, vote_box]
    outputs += [send, stop, regenerate, new, random_prompt, take_back]
    ui = dict(show_progress="hidden", api_visibility="private", concurrency_limit=None)
    gr.on(
        [send.click, message.submit],
        on_send,
        [message, conversation, offered],
        [*outputs, message, offered],
        trigger_mode="once",
        **ui,
    )
    regenerate.click(on_regenerate, [conversation], outputs, trigger_mode="once", **ui)
    stop.click(on_stop, [conversation], [status], **ui)
    for choice, button in votes.items():
        button.click(
            on_vote(choice),
            [conversation, strength, rationale],
            [*outputs, strength, rationale],
            trigger_mode="once",
            **ui,
        )
    take_back.click(on_take_back, [voted], outputs, trigger_mode="once", **ui)
    new.click(on_new, None, [*outputs, strength, rationale, message, offered], **ui)
    random_prompt.click(on_random, None, [message, offered], **ui)
