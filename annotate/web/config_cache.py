"""gradio's GET /config, built once per address and then served from memory.

    app_kwargs={"middleware": [..., Middleware(ConfigCache, accounts=True), ...]}

/config is the page's whole config: every block of every tab, 150 KB of JSON. gradio
rebuilds it for every request: a deep copy of the app's config, then a walk of the copy
that rewrites file URLs for the request's root URL, about 15 ms of GIL-held Python for
preflab's page. When 512 annotators log in together, that was 45% of the server's Python
time (py-spy on bench/ui_load.py, after the sessions were made cheap: page_load_gate.py),
time the votes of the people already working wait behind.

Every answer is the same for everyone who reaches the server by the same address (the
root URL comes from the Host and X-Forwarded-* headers), except for its `username`. So
the first answer for an address is kept, parsed, and later requests get it with their
own username, serialized by orjson (1-2 ms). The username is the one gradio would put
there: the session's account name (annotate/web/session_guard.py resolves it before
this runs), None without accounts. What stays with gradio: a query string (deep links,
pages), a request without a live session when there are accounts (gradio answers 401),
any answer but a JSON 200, and a new config (the cache is keyed by the config object
gradio serves, which a relaunch replaces).
"""

from __future__ import annotations

import orjson

CONFIG_PATHS = ("/config", "/config/")
# The headers gradio's get_root_url reads, with the scheme and root path: the address.
ADDRESS_HEADERS = (b"host", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port")
# A server is reached by a few names; a logged-in user sending made-up Host headers must
# not grow this without bound (150 KB an entry): past this many, gradio answers as before.
MAX_ADDRESSES = 8


class ConfigCache:
    def __init__(self, app, accounts: bool):
        self.app = app
        self.accounts = accounts
        self._kept: dict[tuple, tuple[list, dict]] = {}  # address -> (headers, parsed config)
        self.served = 0  # answers given from memory

    async def __call__(self, scope, receive, send):
        if not (
            scope["type"] == "http"
            and scope.get("method") == "GET"
            and scope.get("path") in CONFIG_PATHS
            and not scope.get("query_string")
        ):
            await self.app(scope, receive, send)
            return
        user = (scope.get("state") or {}).get("preflab_user") if self.accounts else None
        config = _config_of(scope)
        if (self.accounts and user is None) or config is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key = (
            id(config),
            scope.get("scheme"),
            scope.get("root_path"),
            *(headers.get(h) for h in ADDRESS_HEADERS),
        )
        kept = self._kept.get(key)
        if kept is not None:
            response_headers, parsed = kept
            body = orjson.dumps({**parsed, "username": user})
            self.served += 1
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*response_headers, (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        start, chunks = {}, []

        async def keep(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, keep)
        # Only the content type is replayed: anything else an inner layer added could be
        # about this one request (the layers outside this one add theirs to every answer).
        response_headers = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"content-type"]
        is_json = any(v.startswith(b"application/json") for _, v in response_headers)
        if start.get("status") == 200 and is_json and len(self._kept) < MAX_ADDRESSES:
            try:
                parsed = orjson.loads(b"".join(chunks))
            except orjson.JSONDecodeError:
                return  # not what gradio's /config answers: nothing kept
            if isinstance(parsed, dict) and "username" in parsed:
                self._kept[key] = (response_headers, parsed)  # on the event loop: no lock needed


def _config_of(scope):
    """The config object gradio serves (`App.get_blocks().config`), or None where this
    gradio has none: then every /config is gradio's own."""
    app = scope.get("app")
    try:
        return app.get_blocks().config
    except Exception:
        return None
