"""Accounts managed from the page (the Users tab, admins): add, reset a password,
change a role, remove. No gradio here.

    admin = UserAdmin(accounts)            # the Accounts of `serve --auth users.toml`
    admin.add("boss", "carol", "annotator", "a long password")
    admin.reset_password("boss", "carol", "another long one")

Every call checks that the caller is an admin (the web layer's gate checks too) and
goes through annotate/users.py, the users file's one writer: edits locked and atomic,
the password rule of `preflab user add`. A change reaches the running server at the
next request, and a new password, a new role or a removal ends that account's
sessions (annotate/sessions.py). No admin may remove their own account or take away
the last admin's role: the team would be locked out of its own server.
"""

from __future__ import annotations

from annotate import users
from annotate.accounts import ADMIN, Accounts, Forbidden, require_admin
from trainer.errors import PreflabError


class UserAdminError(PreflabError):
    """A change the Users tab refuses; the message says why."""


class UserAdmin:
    def __init__(self, accounts: Accounts | None):
        self.accounts = accounts

    def _check(self, caller: str) -> Accounts:
        if self.accounts is None:
            raise Forbidden("this server runs without accounts (no --auth): there are no users to manage")
        require_admin(caller, self.accounts.role(caller))
        return self.accounts

    def list(self, caller: str) -> list[dict[str, str]]:
        """Every account, by name: {"name", "role"} (never a hash)."""
        accounts = self._check(caller)
        listed = users.load_users(accounts.path)
        return [{"name": u.name, "role": u.role} for u in sorted(listed.values(), key=lambda u: u.name)]

    def add(self, caller: str, name: str, role: str, password: str) -> str:
        accounts = self._check(caller)
        name = users.check_name((name or "").strip())
        users.check_new_password(name, password or "")
        users.add_user(accounts.path, name, role, password)
        return f"added {role} {name!r}; give them their password in person"

    def reset_password(self, caller: str, name: str, password: str) -> str:
        accounts = self._check(caller)
        user = _existing(users.load_users(accounts.path), name)
        users.check_new_password(user.name, password or "")
        users.add_user(accounts.path, user.name, user.role, password, replace=True)
        after = "log in again with it" if user.name == caller else "their sessions have ended"
        return f"new password for {user.name!r}; {after}"

    def set_role(self, caller: str, name: str, role: str) -> str:
        accounts = self._check(caller)
        listed = users.load_users(accounts.path)
        user = _existing(listed, name)
        if user.role == role:
            return f"{user.name!r} is already an {role}; nothing changed"
        users.set_role(accounts.path, user.name, role, keep_an_admin=True)
        return f"{user.name!r} is now {'an admin' if role == ADMIN else 'an annotator'}; their sessions have ended"

    def remove(self, caller: str, name: str) -> str:
        accounts = self._check(caller)
        listed = users.load_users(accounts.path)
        user = _existing(listed, name)
        if user.name == caller:
            raise UserAdminError("you cannot remove your own account; ask another admin")
        users.remove_user(accounts.path, user.name, keep_an_admin=True)
        return f"removed {user.name!r}; their sessions have ended (their votes stay in the store)"


def _existing(listed: dict[str, users.User], name: str) -> users.User:
    user = listed.get((name or "").strip())
    if user is None:
        raise UserAdminError(f"no user {name!r}")
    return user
