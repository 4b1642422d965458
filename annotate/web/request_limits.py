"""A ceiling on what one request may send, before gradio reads it.

    app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=MAX_REQUEST_BYTES)]}

gradio parses a whole JSON body before any handler of ours can look at it, so a 30 MB
"rationale" was read, stored and acknowledged. The service refuses long fields with a
clear message (annotate/service.py); this refuses the request itself when it is far
beyond anything the page sends: 413 at once when Content-Length says so, and for a body
without a length (chunked) the app is told the client went away as soon as the count
passes the ceiling, so no more of it is read. Uploads are also held to gradio's own
`max_file_size` (annotate/web/page.py passes MAX_UPLOAD_BYTES), which answers in gradio's
terms.
"""

from __future__ import annotations

from annotate.web.asgi import send_answer

# A vote with the longest rationale is a few kilobytes; the Train tab's settings less.
MAX_REQUEST_BYTES = 1 << 20
# preflab's page has no upload field, but gradio's upload route exists: at most this.
MAX_UPLOAD_BYTES = 1 << 20


class BodyLimit:
    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_long = int(length) > self.max_bytes
            except ValueError:
                too_long = True  # a malformed length is refused rather than trusted
            if too_long:
                text = f"request body over the limit of {self.max_bytes} bytes\n".encode()
                await send_answer(send, 413, text)
                return

        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted_receive, send)
