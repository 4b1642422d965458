"""Every request's session, decided in one place before gradio sees the request.

    app_kwargs={"middleware": [Middleware(SessionGuard, sessions=sessions, local_user=None)]}
    demo.launch(auth=login_check(logins), ...)

gradio logs people in (POST /login sets an `access-token-<id>` cookie) and never
forgets a token. This ASGI middleware puts annotate/sessions.py in charge instead:

* POST /login: the password check is `login_check(logins)` (annotate/logins.py:
  throttled, scrypt off the event loop); the token in the answer's Set-Cookie becomes
  a session bound to the credentials that were checked.
* every request: an `access-token-*` cookie that is not a live session (ended, idle,
  its account's password or role changed, the account gone, another server's) is
  taken out of the request, so gradio sees nobody logged in; the token is also
  dropped from gradio's own table. `scope["state"]["preflab_user"]` is the account
  name or None (without --auth: the local user) for routes of ours to read.
* GET /logout ends the session (with gradio's default `all_session`, every session
  of the account) before gradio clears the cookies.
* GET /login is our login page (annotate/web/login_page.py) and GET / without a
  session is sent there.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from urllib.parse import parse_qs

from annotate.logins import LoginsBusy, TooManyAttempts
from annotate.web.asgi import send_answer
from annotate.web.login_page import login_page

log = logging.getLogger("preflab.sessions")

TOKEN_COOKIE = "access-token-"  # gradio's cookie names: access-token[-unsecure]-<app id>


@dataclass
class _LoginAttempt:
    address: str | None
    name: str | None = None
    credentials: str | None = None


# Set by the middleware for a POST /login, filled by the auth function inside gradio's
# handler. A mutable holder, so that the answer reaches the middleware even if the
# handler runs in a copied context.
_attempt: contextvars.ContextVar[_LoginAttempt | None] = contextvars.ContextVar("preflab_login", default=None)


def login_check(logins):
    """The `auth=` function for demo.launch: async, so gradio awaits it on the event loop
    while the scrypt runs in the login pool. Throttled logins get 429, a full pool 503,
    with the reason in words (the login page shows it)."""
    from fastapi import HTTPException

    async def check(name: str, password: str) -> bool:
        attempt = _attempt.get()
        try:
            credentials = await logins.check(name, password, attempt.address if attempt else None)
        except TooManyAttempts as e:
            raise HTTPException(429, detail=str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
        except LoginsBusy as e:
            raise HTTPException(503, detail=str(e), headers={"Retry-After": str(e.retry_after_s)}) from None
        if credentials and attempt is not None:
            attempt.name, attempt.credentials = name, credentials
        return credentials is not None

    return check


def _cookies(headers) -> list[tuple[str, str]]:
    pairs = []
    for key, value in headers:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, val = part.strip().partition("=")
                if name:
                    pairs.append((name, val))
    return pairs


def _without_cookies(headers, drop: set[str]) -> list:
    """The headers with the named cookies taken out of every Cookie header."""
    out = []
    for key, value in headers:
        if key == b"cookie":
            kept = [
                part.strip()
                for part in value.decode("latin-1").split(";")
                if part.strip() and part.strip().partition("=")[0] not in drop
            ]
            if kept:
                out.append((b"cookie", "; ".join(kept).encode("latin-1")))
        else:
            out.append((key, value))
    return out


def _token_set(headers) -> str | None:
    """The token of a Set-Cookie for gradio's access-token cookie in an answer's headers."""
    for key, value in headers:
        if key.lower() == b"set-cookie":
            cookie = value.decode("latin-1").split(";", 1)[0]
            name, _, token = cookie.partition("=")
            if name.strip().startswith(TOKEN_COOKIE) and token:
                return token.strip()
    return None


class SessionGuard:
    def __init__(self, app, sessions, local_user: str | None, login_message: str = ""):
        self.app = app
        self.sessions = sessions  # None without --auth: the local user is everyone
        self.local_user = local_user
        self.login_message = login_message

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.sessions is None:
            state["preflab_user"] = self.local_user
            await self.app(scope, receive, send)
            return

        user, token, scope = self._resolve(scope)
        scope["state"]["preflab_user"] = user
        path, method = scope["path"].rstrip("/") or "/", scope.get("method", "")
        if scope["type"] == "http" and method in ("GET", "HEAD"):
            if path == "/login":
                await self._send_login_page(send)
                return
            if path == "/" and user is None:
                await send_answer(
                    send, 302, headers=[(b"location", b"login"), (b"cache-control", b"no-store")]
                )
                return
            if path == "/logout" and user is not None:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                if query.get("all_session", ["true"])[0].lower() == "false":
                    self.sessions.end(token)
                else:
                    self.sessions.end_all(user)
                log.info("logout: %r", user)
        if scope["type"] == "http" and method == "POST" and path == "/login":
            await self._login(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _resolve(self, scope):
        """(user, token, scope): the live session's account and token, and the scope
        with every other access-token cookie taken out."""
        user = token = None
        dead = set()
        for name, value in _cookies(scope.get("headers") or []):
            if not name.startswith(TOKEN_COOKIE) or (token is not None and value == token):
                continue  # not gradio's, or the same token in its second cookie
            found = self.sessions.user(value)
            if found is not None and user is None:
                user, token = found, value
                continue
            dead.add(name)
            gradio_tokens = getattr(scope.get("app"), "tokens", None)
            if found is None and isinstance(gradio_tokens, dict):
                gradio_tokens.pop(value, None)  # gradio would never forget it otherwise
        if dead:
            scope = dict(scope, headers=_without_cookies(scope["headers"], dead))
        return user, token, scope

    async def _login(self, scope, receive, send):
        client = scope.get("client")
        attempt = _LoginAttempt(address=client[0] if client else None)
        reset = _attempt.set(attempt)

        async def send_and_record(message):
            if message["type"] == "http.response.start" and message.get("status") == 200:
                token = _token_set(message.get("headers") or [])
                if token and attempt.credentials:
                    self.sessions.start(token, attempt.name, attempt.credentials)
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            _attempt.reset(reset)

    async def _send_login_page(self, send):
        body, headers = login_page(self.login_message)
        await send_answer(send, 200, body, headers)
