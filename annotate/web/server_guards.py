"""What `demo.launch` gets besides the page: the checks every request passes before
gradio (annotate/serve.py calls these two while it composes the server).

    auth, app_kwargs, logins = request_guards(args, accounts, local_user)
    app_kwargs |= private_files(ctx, opened)       # gradio's cache and the exports, 0700

Which proxies may name the client (`--trusted-proxy`, uvicorn's X-Forwarded-For
handling) is set here too: the login throttle counts per client address.

The middlewares, outermost first: the Host check (without --auth), the Origin check,
the body ceiling, the session guard, the /config cache, the page-load gate; the export download is a
route inside them all.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from trainer.errors import PreflabError

log = logging.getLogger("preflab.serve")

LOGIN_MESSAGE = "Log in with the account your admin gave you."


def trusted_proxies(given: list[str] | None) -> str | None:
    """uvicorn's FORWARDED_ALLOW_IPS for --trusted-proxy (None: uvicorn's loopback default)."""
    import ipaddress

    if not given:
        return None
    if [g.strip().lower() for g in given] == ["none"]:
        return ""  # matches no client: X-Forwarded-For is never read
    for value in given:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise PreflabError(
                f"--trusted-proxy {value!r} is not an IP address or network (e.g. 10.0.0.7, 10.0.0.0/24, or none)"
            ) from None
    # uvicorn parses each entry strictly: 10.0.0.7/24 would match nothing, so the network
    # as ipaddress normalises it (10.0.0.0/24) is what it gets.
    return ",".join(str(ipaddress.ip_network(v.strip(), strict=False)) for v in given)


def request_guards(args: argparse.Namespace, accounts, local_user: str):
    """(auth, app_kwargs, logins) for demo.launch: the checks every request passes
    before gradio, outermost first. Without accounts the local user is an admin, so
    only requests that name this machine get through (DNS rebinding)."""
    from starlette.middleware import Middleware

    from annotate.logins import Logins
    from annotate.sessions import Sessions
    from annotate.web.config_cache import ConfigCache
    from annotate.web.host_check import LoopbackHostOnly, SameOriginOnly
    from annotate.web.page_load_gate import PageLoadGate
    from annotate.web.request_limits import BodyLimit
    from annotate.web.session_guard import SessionGuard, login_check

    allow = trusted_proxies(args.trusted_proxy)
    if allow is not None:  # read by the uvicorn.Config that gradio's launch makes
        os.environ["FORWARDED_ALLOW_IPS"] = allow
    # Said once at start: whose X-Forwarded-For names the client (the login throttle's address).
    trusted = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
    log.info("X-Forwarded-For is read from %s", trusted or "no one (--trusted-proxy none)")
    middleware = [] if accounts is not None else [Middleware(LoopbackHostOnly)]
    middleware += [Middleware(SameOriginOnly), Middleware(BodyLimit)]
    # Page loads in single file, inside the session guard (whose redirects and login page
    # are cheap): a crowd arriving at once does not stall the votes (page_load_gate.py).
    gate = Middleware(PageLoadGate, at_once=max(1, (os.cpu_count() or 2) // 2))
    # /config from memory after the first (config_cache.py), before the gate: no waiting.
    config = Middleware(ConfigCache, accounts=accounts is not None)
    if accounts is None:
        middleware += [Middleware(SessionGuard, sessions=None, local_user=local_user), config, gate]
        return None, {"middleware": middleware}, None
    logins = Logins(accounts)
    sessions = Sessions(accounts, idle_s=args.session_idle * 60)
    middleware += [
        Middleware(SessionGuard, sessions=sessions, local_user=None, login_message=LOGIN_MESSAGE),
        config,
        gate,
    ]
    return login_check(logins), {"middleware": middleware}, logins


def private_files(ctx, opened) -> dict:
    """This server's own temporary folder (tempfile.mkdtemp: 0700, a fresh name no other
    user can have made first), removed when the server stops: gradio's cache
    (GRADIO_TEMP_DIR, set before gradio builds anything) and the exports go there, so
    nothing this server writes lies in a shared /tmp. Sets `ctx.exports`; returns the
    app_kwargs of the admins' download route (annotate/web/downloads.py).

    The download is a route of the app's own router, passed to FastAPI as `routes`:
    those come before every route gradio adds, and a route runs inside every middleware
    of app_kwargs (the host check, the login sessions), so it sees who is asking the
    way gradio's handlers do. A middleware serving the prefix itself would have to be
    placed after those in the list to see the same."""
    import tempfile

    from annotate.accounts import role_of
    from annotate.web.downloads import Exports

    opened.private_dir = Path(tempfile.mkdtemp(prefix="preflab-serve-"))
    for sub in ("gradio", "exports"):
        (opened.private_dir / sub).mkdir(mode=0o700)
    os.environ["GRADIO_TEMP_DIR"] = str(opened.private_dir / "gradio")
    log.info("gradio's cache and the exports go to %s (0700, removed at stop)", opened.private_dir)
    service = ctx.service
    ctx.exports = Exports(
        opened.private_dir / "exports", lambda name: role_of(name, service.accounts, service.local_user)
    )
    return {"routes": [ctx.exports.route()]}
