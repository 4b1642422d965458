"""Chat mode as a JSON API (`serve --chat`), for scripts and load tests: the same
annotate.chat.ChatService calls as the Chat tab, through the same guard.

    from gradio_client import Client
    c = Client("http://127.0.0.1:7860/", auth=("ann", "..."))
    view = c.predict("", "Tell me about plants.", api_name="/chat")    # "" = a new conversation
    view = c.predict(view["conversation_id"], "And trees?", api_name="/chat")   # a follow-up
    c.predict(view["conversation_id"], "left", "clearly", "why", api_name="/chat_vote")  # -> view["ack"]
    c.predict(view["conversation_id"], api_name="/chat_take_back")   # a mis-click: retracted
    for view in c.submit("", "Hi", api_name="/chat"): ...            # the views as both sides stream

/chat streams: predict() returns its last view (both answers complete), a job from
submit() yields every view on the way (annotate/chat.py says what a view holds; no
model is named in one before the vote). Every call goes through `guard.user`; a
conversation is its annotator's alone. (No `from __future__ import annotations` here:
gradio reads `request: gr.Request`.)
"""

from collections.abc import AsyncIterator

from annotate.web.stream_relay import relay


def register_chat_api(ctx, guard) -> None:
    """/chat, /chat_vote and /chat_take_back; call inside the page's gr.Blocks when ctx.chat is set."""
    import gradio as gr

    chat = ctx.chat

    async def chat_turn(
        conversation_id: str = "", message: str = "", request: gr.Request = None
    ) -> AsyncIterator[dict]:
        """Send a message to both models: conversation_id "" starts a new conversation, else
        it is a follow-up in yours. Streams views; the last one has both answers complete."""
        user, _ = guard.user(request)
        with guard.errors():  # a refused message (too long, blocked, ...) is the caller's error
            views = chat.send(user, conversation_id or "", message)
        stream = relay(views)  # in the stream pool, not gradio's (annotate/web/stream_relay.py)
        try:
            while True:
                with guard.errors():
                    try:
                        view = await anext(stream)
                    except StopAsyncIteration:
                        return
                yield view
        finally:
            await stream.aclose()

    def chat_vote(
        conversation_id: str,
        choice: str,
        strength: str = "",
        rationale: str = "",
        request: gr.Request = None,
    ) -> dict:
        """Vote on your conversation's last turn: choice left, right, tie or both_bad (as
        shown); strength slightly, clearly or empty. Returns the view with `ack`: the
        event id and both models' names."""
        user, _ = guard.user(request)
        with guard.errors():
            return chat.vote(user, conversation_id or "", choice, strength or "", rationale or "")

    def chat_take_back(conversation_id: str, request: gr.Request = None) -> dict:
        """Take back your vote on that conversation (a mis-click): it no longer counts.
        The conversation stays closed (both names were shown)."""
        user, _ = guard.user(request)
        with guard.errors():
            return chat.take_back(user, conversation_id or "")

    api = dict(concurrency_limit=None)
    gr.api(chat_turn, api_name="chat", **api)
    gr.api(chat_vote, api_name="chat_vote", **api)
    gr.api(chat_take_back, api_name="chat_take_back", **api)
