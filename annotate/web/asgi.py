"""Answers of the ASGI middlewares (host_check, request_limits, session_guard), sent
before gradio sees a request.

    await send_answer(send, 403, b"refused\n")
    await send_answer(send, 302, headers=[(b"location", b"login")])
"""

from __future__ import annotations


async def send_answer(send, status: int, body: bytes = b"", headers=None) -> None:
    """A whole HTTP answer: plain text unless `headers` name a content type."""
    headers = list(headers or [])
    if not any(key == b"content-type" for key, _ in headers):
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    if not any(key == b"content-length" for key, _ in headers):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
