"""Page loads in single file, so that a crowd logging in at once does not stall votes.

    app_kwargs={"middleware": [..., Middleware(PageLoadGate, at_once=2)]}

A page load makes gradio build the page's whole config (every block of every tab) in
`def` handlers: GET /, /config and /gradio_api/info, each tens of milliseconds of
Python, run in gradio's thread pool. When 512 annotators arrive together, dozens of
those threads fight the event loop for the GIL, and the votes of the people already
working wait behind them (bench/ui_load.py: vote p99 above a second during the
storm). Here at most `at_once` of those requests run at a time; the others wait on an
asyncio semaphore, which costs no CPU and holds no GIL, so votes get the interpreter
between them. The total work is the same; the page loads are spread out a little.
"""

from __future__ import annotations

import asyncio

HEAVY_GETS = ("/", "/config", "/gradio_api/info")


class PageLoadGate:
    def __init__(self, app, at_once: int = 2):
        self.app = app
        self.at_once = at_once
        self._gate: asyncio.Semaphore | None = None  # made on the server's own loop

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/") or "/"
        if scope["type"] != "http" or scope.get("method") != "GET" or path not in HEAVY_GETS:
            await self.app(scope, receive, send)
            return
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.at_once)
        async with self._gate:
            await self.app(scope, receive, send)
