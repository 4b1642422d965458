"""Export files for download: admins only, through a route of ours, from this server's
private folder.

    exports = Exports(folder, role)       # annotate/serve.py; folder 0700, role(name) -> role or None
    links = exports.publish(paths)        # [{"name", "url"}], url relative to the app's address
    app_kwargs["routes"] = [exports.route()]

Why not a gr.File: gradio copies a returned file into its cache and serves it at
/gradio_api/file=... to anyone logged in who has the URL, annotators included. Here
the file stays where the export wrote it, and

    GET preflab/exports/<token>/<name>

answers 401 to a caller who is not logged in, 403 to one who is not an admin, 404 to
anything that is not a current export, and otherwise the file, as an attachment. The
file is found by looking `<token>` and `<name>` up in a map this server keeps: nothing
of the URL is ever joined to a path, so `../` and made-up names find nothing. Exports
are forgotten, and their files deleted, an hour after they were made.

The caller of a raw request is `request.state.preflab_user`, which the session
middleware (annotate/web/session_guard.py) sets on every request it lets through: the
account of a live session, None for nobody (never logged in, or a session that ended),
and without accounts the local user. The role is asked of the accounts then, so a
role changed a moment ago counts.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from annotate.accounts import ADMIN

log = logging.getLogger("preflab.exports")

PREFIX = "preflab/exports"
KEEP_S = 3600.0  # long enough to click the link and to retry a broken download


class Exports:
    """The current exports of this server: token -> {file name: path}."""

    def __init__(self, folder: Path, role: Callable[[str | None], str | None]):
        self.folder = Path(folder)
        self._role = role  # annotate.accounts.role_of for this server
        self._lock = threading.Lock()
        self._current: dict[str, tuple[float, dict[str, Path]]] = {}

    def publish(self, paths: list[str]) -> list[dict[str, str]]:
        """Make the files of one export downloadable; returns one {"name", "url"} per file,
        the url relative to the app's address (the page's links; an API client joins it
        to the server's URL and sends its login cookies)."""
        token = secrets.token_urlsafe(18)
        files = {Path(p).name: Path(p) for p in paths}
        with self._lock:
            self._forget_old()
            self._current[token] = (time.monotonic(), files)
        return [{"name": name, "url": f"{PREFIX}/{token}/{quote(name)}"} for name in files]

    def find(self, token: str, name: str) -> Path | None:
        """The file of a current export, or None."""
        with self._lock:
            self._forget_old()
            entry = self._current.get(token)
        return entry[1].get(name) if entry is not None else None

    def _forget_old(self) -> None:
        now = time.monotonic()
        for token, (made, files) in list(self._current.items()):
            if now - made > KEEP_S:
                del self._current[token]
                for path in files.values():
                    path.unlink(missing_ok=True)

    async def download(self, request: Any):
        from starlette.responses import FileResponse, PlainTextResponse

        # Set by the session middleware; missing (no such middleware) is nobody.
        name = getattr(request.state, "preflab_user", None)
        role = self._role(name) if name is not None else None
        # Who asks is decided before what is asked for: a non-admin learns nothing about
        # which exports exist.
        if role is None:
            return PlainTextResponse("please log in\n", status_code=401)
        if role != ADMIN:
            log.warning("export download refused to %s (%s)", name, role)
            return PlainTextResponse("exports are for admins\n", status_code=403)
        path = self.find(request.path_params["token"], request.path_params["name"])
        if path is None or not path.is_file():
            return PlainTextResponse("no such export (they are kept for an hour)\n", status_code=404)
        return FileResponse(
            path,
            filename=path.name,  # Content-Disposition: attachment
            media_type="application/octet-stream",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    def route(self):
        """The download route, for the app's own router (annotate/serve.py)."""
        from starlette.routing import Route

        return Route(f"/{PREFIX}/{{token}}/{{name}}", self.download, methods=["GET"])
