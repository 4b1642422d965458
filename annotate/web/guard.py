"""The one gate every handler of the page and the API goes through.

    guard = Guard(service.identify)         # annotate.accounts.identify for this server
    def on_export(fmt, request: gr.Request):
        guard.admin(request)                 # gr.Error unless the caller is an admin
        with guard.errors():                 # PreflabError -> gr.Error, same message
            return service.export(fmt)

Role checks happen here, on the server, from `gr.Request.username`: hiding a tab is
cosmetic. Errors the user can act on (`PreflabError`, bad input from an API caller
included: `annotate.service.BadRequest`) become `gr.Error` with the same one-line
message; anything else is a bug, logged with its traceback by gradio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from annotate.accounts import Forbidden, require_admin
from trainer.errors import PreflabError


class Guard:
    """`identify(request) -> (name, role)` raises `Forbidden` for an unknown caller."""

    def __init__(self, identify: Callable[[Any], tuple[str, str]]):
        self._identify = identify

    def user(self, request) -> tuple[str, str]:
        """(name, role) of a logged-in caller; gr.Error otherwise."""
        with self.errors():
            return self._identify(request)

    def admin(self, request) -> str:
        """The caller's name if an admin; gr.Error otherwise."""
        name, role = self.user(request)
        with self.errors():  # the decision is annotate.accounts', the message too
            return require_admin(name, role)

    def is_admin(self, request) -> bool:
        """For showing the admin tabs (cosmetic: every admin handler checks again)."""
        try:
            return self._identify(request)[1] == "admin"
        except Forbidden:
            return False

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn the project's user-facing errors into gr.Error, message unchanged."""
        try:
            yield
        except PreflabError as e:
            import gradio as gr

            raise gr.Error(str(e)) from None
