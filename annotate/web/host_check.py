"""Requests must be addressed to us: the Host check of the single-user mode (DNS
rebinding) and the Origin check of every mode (cross-site requests).

Without --auth the one local user is an admin and the server listens on loopback only.
A web page elsewhere can still reach it through a name it controls that resolves to
127.0.0.1 (DNS rebinding): the browser then sends `Host: evil.example.com`. This ASGI
middleware answers such requests (and websockets) with 400 before gradio sees them.

    app_kwargs={"middleware": [Middleware(LoopbackHostOnly)]}   # annotate/serve.py, no --auth

A page on another site can also make the browser send a POST here (a vote, an export,
a training launch) with the user's cookies or, without --auth, as the local admin.
Browsers name the page that sent a request in its Origin header, so `SameOriginOnly`
refuses (403) any state-changing request (not GET/HEAD/OPTIONS) and any websocket whose
Origin is present and is not this server as the request's Host names it. Requests
without an Origin (gradio_client, curl, scripts) are not browsers acting for someone
and pass. Behind a reverse proxy, it must keep the Host header (nginx:
`proxy_set_header Host $host`).
"""

from __future__ import annotations

from annotate.web.asgi import send_answer

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
                text = (
                    b"This preflab server answers only requests addressed to this machine "
                    b"(127.0.0.1, localhost or [::1]); it runs without accounts.\n"
                )
                await send_answer(send, 400, text)
                return
        await self.app(scope, receive, send)


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _without_default_port(netloc: str, scheme: str) -> str:
    netloc = netloc.strip().lower()
    host, colon, port = netloc.rpartition(":")
    if colon and port.isdigit() and port == _DEFAULT_PORTS.get(scheme):
        return host
    return netloc


def origin_host(origin: str) -> str | None:
    """ "https://Example.org:443" -> "example.org"; "http://127.0.0.1:7860" ->
    "127.0.0.1:7860"; None for "null" or anything that is not scheme://host[:port]."""
    scheme, sep, netloc = origin.strip().lower().partition("://")
    if not sep or not netloc or "/" in netloc:
        return None
    return _without_default_port(netloc, scheme)


class SameOriginOnly:
    SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "websocket" or (kind == "http" and scope.get("method") not in self.SAFE_METHODS):
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin")
            if origin is not None:
                scheme = scope.get("scheme", "http")
                host = _without_default_port(headers.get(b"host", b"").decode("latin-1"), scheme)
                if origin_host(origin.decode("latin-1")) != host:
                    if kind == "websocket":
                        await send({"type": "websocket.close", "code": 1008})
                        return
                    await send_answer(
                        send, 403, b"This preflab server refuses requests sent from another site's page.\n"
                    )
                    return
        await self.app(scope, receive, send)
