"""Login sessions that end: bound to the account's credentials at login, idle-limited,
and ended server-side at logout.

    sessions = Sessions(accounts, idle_s=7200)
    sessions.start(token, name, credentials)   # credentials: accounts.credentials(name) when verified
    sessions.user(token)                       # the name, or None once the session has ended
    sessions.end(token); sessions.end_all(name)

gradio keeps its own token -> name map for ever: a password reset, a role change or
the removal of the account changed nothing for a cookie already given out. Here every
session remembers the account's `credentials` fingerprint as it was when the password
was checked (annotate/accounts.py: a digest of the stored hash and the role), and a
request is the account's only while the fingerprint is still the account's. A new
password has a new salt, so re-adding a removed name does not revive old cookies.
The web layer (annotate/web/session_guard.py) asks `user(token)` on every request and
drops the cookie of a session that has ended. No gradio here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

DEFAULT_IDLE_S = 2 * 60 * 60  # an annotator's long break; the next request logs in again


@dataclass
class _Session:
    name: str
    credentials: str
    last_seen: float


class Sessions:
    def __init__(self, accounts, idle_s: float = DEFAULT_IDLE_S, clock=time.monotonic):
        self.accounts = accounts
        self.idle_s = idle_s
        self.clock = clock
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def start(self, token: str, name: str, credentials: str | None) -> None:
        """A session for `token`, valid while the account's credentials stay `credentials`."""
        if not credentials:
            return  # the account went away between the check and now
        with self._lock:
            self._expire_idle()
            self._sessions[token] = _Session(name, credentials, self.clock())

    def user(self, token: str | None) -> str | None:
        """The account of a live session (and its idle clock restarted); None for an
        unknown token, an idle one, or one whose account changed or went away."""
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            now = self.clock()
            if now - session.last_seen > self.idle_s:
                del self._sessions[token]
                return None
            if self.accounts.credentials(session.name) != session.credentials:
                del self._sessions[token]
                return None
            session.last_seen = now
            return session.name

    def end(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token, None)

    def end_all(self, name: str) -> int:
        """End every session of `name`; how many there were."""
        with self._lock:
            ended = [t for t, s in self._sessions.items() if s.name == name]
            for token in ended:
                del self._sessions[token]
            return len(ended)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire_idle(self) -> None:
        now = self.clock()
        for token in [t for t, s in self._sessions.items() if now - s.last_seen > self.idle_s]:
            del self._sessions[token]
