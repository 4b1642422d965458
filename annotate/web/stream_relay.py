"""Blocking generators streamed from async gradio handlers, in threads of their own.

    async for view in relay(chat.send(user, "", text)):   # ChatService's views
        yield render(view)

ChatService.send / regenerate are plain generators that block on the models' tokens.
Gradio's own thread pool (serve's max_threads, annotate/web/page.py) also runs every
click of every annotator: streams that waited in it would hold its threads for the
length of an answer, and the 65th annotator chatting at once would freeze everyone's
votes. So every chat stream, the Chat tab's and the /chat API's, waits for its next view
in one pool of its own, as large as the number of annotators who may stream at once.
A stream that ends early (the tab closed, the API client went away) closes the
generator, so the service stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

STREAM_THREADS = 512

# One anyio.CapacityLimiter per event loop (a test process may run several servers, each
# in its own loop), made there on first use.
_limiters: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


async def relay(views: Iterator[Any]) -> AsyncIterator[Any]:
    """Each item of `views` as it comes, `next` run in the stream pool."""
    import anyio

    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(STREAM_THREADS)
    finished = False
    try:
        while True:
            view = await anyio.to_thread.run_sync(next, views, None, limiter=limiter)
            if view is None:
                finished = True
                return
            yield view
    finally:
        if not finished:
            views.close()
