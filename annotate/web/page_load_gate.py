"""Page loads in single file, so that a crowd logging in at once does not stall votes.

    app_kwargs={"middleware": [..., Middleware(PageLoadGate, at_once=2)]}

A page load costs gradio two big pieces of Python, tens of milliseconds each:

* the page's whole config (every block of every tab), built in `def` handlers for
  GET /, /config and /gradio_api/info, in gradio's thread pool;
* the session: the first event a new page sends (POST .../queue/join with a new
  `session_hash`) makes gradio build a `SessionState`, a config entry for every block
  (31 ms for preflab's 172 blocks on this project's 2-core machine), and it does so
  inside the async `queue_join`, on the event loop, where every vote waits for it.

When 512 annotators arrive together, dozens of config threads fight the event loop
for the GIL and hundreds of session builds block it outright, and the votes of the
people already working wait behind them (bench/ui_load.py: vote p99 above a second
during the storm). Here at most `at_once` of those pieces run at a time; the others
wait on an asyncio semaphore, which costs no CPU and holds no GIL. A new session is
built first in a worker thread (the event loop gets the GIL back every switch
interval instead of waiting out the whole build), as a copy of a pattern session
(`SessionMaker`: 0.7 ms instead of 31), and put in gradio's table on the loop, only if
gradio has not made one meanwhile, so no session is ever replaced.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import pickle

log = logging.getLogger("preflab.web")

HEAVY_GETS = ("/", "/config", "/gradio_api/info")
QUEUE_JOIN = "/gradio_api/queue/join"


class PageLoadGate:
    def __init__(self, app, at_once: int = 2):
        self.app = app
        self.at_once = at_once
        self._gate: asyncio.Semaphore | None = None  # made on the server's own loop
        self.sessions_built = 0  # sessions this gate built ahead of gradio
        self._maker: SessionMaker | None | bool = None  # made at the first new session; False: failed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").rstrip("/") or "/"
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.at_once)
        if scope.get("method") == "GET" and path in HEAVY_GETS:
            async with self._gate:
                await self.app(scope, receive, send)
        elif scope.get("method") == "POST" and path == QUEUE_JOIN:
            await self._join(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _join(self, scope, receive, send):
        """An event: when its session is new, build the session before gradio would."""
        messages, body = [], b""
        while True:  # the body is bounded by request_limits.BodyLimit, outside this gate
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        holder = _state_holder(scope)
        session = _session_hash(body)
        if holder is not None and session and session not in holder.session_data:
            async with self._gate:
                if session not in holder.session_data:
                    state = await asyncio.to_thread(_new_session, self, holder)
                    if state is not None and session not in holder.session_data:
                        holder.session_data[session] = state  # gradio's own lookup does the rest
                        self.sessions_built += 1

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _state_holder(scope):
    """gradio's table of sessions (`App.state_holder`), or None where this gradio has
    none by that name: then gradio builds its sessions itself, as before."""
    holder = getattr(scope.get("app"), "state_holder", None)
    return holder if isinstance(getattr(holder, "session_data", None), dict) else None


def _session_hash(body: bytes) -> str | None:
    try:
        value = json.loads(body).get("session_hash")
    except (ValueError, AttributeError):
        return None  # not ours to judge: gradio answers a bad body itself
    return value if isinstance(value, str) and value else None


# What gradio 6's SessionState holds; a gradio whose sessions hold anything else gets
# its sessions built the slow way, by its own constructor (SessionMaker checks).
SESSION_FIELDS = {
    "STATE_TTL_WHEN_CLOSED",
    "_state_ttl",
    "blocks_config",
    "config_values",
    "is_closed",
    "state_data",
}


class SessionMaker:
    """New gradio sessions for one Blocks, made from a first one built by gradio itself.

    gradio's constructor computes a config entry for every block (`config_values`, the
    block's current props, for deep links and later updates): 31 ms for preflab's 172
    blocks, always the same result until a session changes its own copy. So the first
    session is built by gradio, kept unused as the pattern, and each new one gets a
    private copy of the pattern's entries (a pickle round trip of plain dicts, 0.7 ms),
    an empty state and its own shallow copy of the blocks' config, exactly what the
    constructor does. If the pattern holds fields this was not written for (another
    gradio), or anything fails, every session is built by gradio's constructor."""

    def __init__(self, blocks):
        from gradio.state_holder import SessionState

        self.blocks = blocks
        self._build = SessionState
        self._pattern = SessionState(blocks)
        self._pattern_values = pickle.dumps(self._pattern.config_values, protocol=pickle.HIGHEST_PROTOCOL)
        self.copying = set(vars(self._pattern)) == SESSION_FIELDS
        if not self.copying:
            fields = sorted(vars(self._pattern))
            log.warning("gradio's sessions hold %s; building each with gradio's constructor", fields)

    def new(self):
        if not self.copying:
            return self._build(self.blocks)
        state = object.__new__(self._build)
        state.blocks_config = copy.copy(self.blocks.default_config)  # as the constructor does
        state.config_values = pickle.loads(self._pattern_values)  # a private copy
        state.state_data = {}
        state._state_ttl = {}
        state.is_closed = False
        state.STATE_TTL_WHEN_CLOSED = self._pattern.STATE_TTL_WHEN_CLOSED
        return state


def _new_session(gate, holder):
    if gate._maker is False:  # failed once: gradio builds its sessions itself from now on
        return None
    try:
        if gate._maker is None or gate._maker.blocks is not holder.blocks:
            gate._maker = SessionMaker(holder.blocks)
        return gate._maker.new()
    except Exception:  # a gradio whose sessions are built differently: leave it to gradio
        log.exception("building a session ahead of gradio failed; gradio builds them itself from now on")
        gate._maker = False
        return None
