"""Requests must name this machine: the single-user mode's defence against DNS rebinding.

Without --auth the one local user is an admin and the server listens on loopback only.
A web page elsewhere can still reach it through a name it controls that resolves to
127.0.0.1 (DNS rebinding): the browser then sends `Host: evil.example.com`. This ASGI
middleware answers such requests (and websockets) with 400 before gradio sees them.

    app_kwargs={"middleware": [Middleware(LoopbackHostOnly)]}   # annotate/serve.py, no --auth
"""

from __future__ import annotations

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def host_name(header: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:7860" -> "127.0.0.1",
    "[::1]:7860" -> "::1", "LocalHost" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal, maybe with a port after the bracket
        name, bracket, rest = header[1:].partition("]")
        return name if bracket and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else header
    name, colon, port = header.partition(":")
    if colon and port.isdigit():
        return name
    return header  # a bare IPv6 address, or something odd: compared as it is


class LoopbackHostOnly:
    def __init__(self, app, allowed: tuple[str, ...] = LOOPBACK_NAMES):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = (
                    b"This preflab server answers only requests addressed to this machine "
                    b"(127.0.0.1, localhost or [::1]); it runs without accounts.\n"
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
