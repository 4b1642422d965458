"""Who is asking, and what they may do: the one place for authorization decisions on
the service side of `preflab serve`.

    accounts = Accounts("users.toml")        # re-read when the file changes
    name, role = identify(request, accounts, local_user="me")   # Forbidden if unknown
    require_admin(name, role)                 # Forbidden unless role == "admin"

Without `--auth` there are no accounts: one local user, an admin (the server only
listens on 127.0.0.1 then). The web layer (`annotate/web/guard.py`) turns `Forbidden`
into `gr.Error`; the service raises it itself where it decides (admin-only calls).
No gradio here: `request` is anything with a `username` attribute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from trainer.errors import PreflabError

log = logging.getLogger("preflab.accounts")

ADMIN = "admin"


class Forbidden(PreflabError):
    """The caller may not do this (not logged in, or not an admin)."""


class Accounts:
    """users.toml, re-read when the file changes (so `preflab user add` works on a
    running server)."""

    def __init__(self, path: str | os.PathLike):
        from annotate import users

        self.users = users
        self.path = Path(path)
        self._mtime = None
        self._loaded = False  # a broken file stops the server only at start
        self._accounts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._reload()
        if not self._accounts:
            raise ValueError(f"{self.path}: no accounts; add one with `preflab user add`")

    def _reload(self) -> None:
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                # The file was deleted: nobody may log in, and every session ends (the
                # users module replaces the file by a rename, so it is never missing
                # half-way through an edit).
                if self._accounts:
                    log.warning("%s is gone: no accounts, every session ends", self.path)
                self._accounts, self._mtime = {}, None
                return
            if mtime == self._mtime:
                return
            try:
                self._accounts = self.users.load_users(self.path)
            except ValueError as e:  # a half-edited file: keep the accounts we had
                if not self._loaded:
                    raise
                log.warning("%s; keeping the accounts loaded before", e)
            self._mtime = mtime
            self._loaded = True

    def verify(self, name: str, password: str) -> bool:
        return self.check(name, password) is not None

    def check(self, name: str, password: str) -> str | None:
        """The credentials fingerprint of `name` if `password` is theirs, else None:
        exactly the account that was checked, for the session to be bound to."""
        self._reload()
        account = self.users.verify(self._accounts, name, password)
        return _fingerprint(account) if account is not None else None

    def credentials(self, name: str) -> str | None:
        """A fingerprint of what `name` logs in with and may do (a digest of the stored
        password hash and the role); None for no such account. A session is the
        account's while this stays the same (annotate/sessions.py)."""
        self._reload()
        account = self._accounts.get(name)
        return _fingerprint(account) if account is not None else None

    def role(self, name: str) -> str | None:
        self._reload()
        account = self._accounts.get(name)
        return account.role if account is not None else None


def _fingerprint(account) -> str:
    # A new password has a new salt, so the digest changes even for the same password.
    return hashlib.sha256(f"{account.role}\0{account.password_hash}".encode()).hexdigest()


def role_of(name: str | None, accounts: Accounts | None, local_user: str) -> str | None:
    """The role of an account name; None for nobody we know. Without accounts the
    local user is the one admin."""
    if accounts is None:
        return ADMIN if name == local_user else None
    return accounts.role(name) if name else None


def identify(request: Any, accounts: Accounts | None, local_user: str) -> tuple[str, str]:
    """(name, role) of the caller of a request (its `username`, as the login set it).
    Without accounts every request is the local user's."""
    if accounts is None:
        return local_user, ADMIN
    name = getattr(request, "username", None)
    role = role_of(name, accounts, local_user)
    if role is None:
        raise Forbidden("please log in")
    return name, role


def require_admin(name: str, role: str | None) -> str:
    """`name` if `role` is admin; Forbidden otherwise."""
    if role != ADMIN:
        raise Forbidden(f"{name} is an annotator; the dashboard and export are for admins")
    return name
