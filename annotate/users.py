"""Accounts for `preflab serve --auth users.toml`: who may vote, and who may administer.

The file is TOML, one table per account, and is only ever written by this module:

    [users."alice"]
    role = "admin"
    password = "scrypt$16384$8$1$<salt, base64>$<hash, base64>"

* Passwords are stored as scrypt hashes (hashlib.scrypt, RFC 7914) with a random
  16-byte salt per password. The cost parameters travel inside each hash, so they can
  be raised later without invalidating existing accounts.
* Roles are "annotator" (votes) and "admin" (votes and sees the dashboard).
* Names are 1-64 letters, digits, "-", "_" and ".", starting with a letter or digit.
  A colon is not allowed, so no account can pose as an imported data source, whose
  votes carry the annotator `import:<source>`.
* The file is rewritten whole, atomically (a temporary file renamed over it) and with
  mode 0600, so a crash never leaves half a file and other local users cannot read
  the hashes. Comments in it are not preserved. Every change holds an exclusive lock
  (flock on "users.toml.lock" beside it) from reading the file to the rename, so two
  `preflab user` commands run at the same moment both take effect.
* A running server notices every change at the next request: a new password, a new
  role or a removal ends that account's sessions at once (annotate/sessions.py).

    preflab user add NAME --role annotator|admin [--auth users.toml] [--password-stdin]
    preflab user remove NAME [--auth users.toml]
    preflab user list [--auth users.toml]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import fcntl
import getpass
import hashlib
import hmac
import os
import re
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import PreflabError
from trainer.store.directory_writer import fsync_dir

ROLES = ("annotator", "admin")
DEFAULT_PATH = "users.toml"

# scrypt cost: N = 2**14, r = 8, p = 1 is the RFC 7914 / OWASP interactive-login
# setting: about 16 MiB and a few tens of milliseconds per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
# A hash whose parameters would need more memory than this is refused when the file
# is loaded: a hand-edited file must not make every login allocate gigabytes.
MAX_SCRYPT_MEMORY = 256 * 2**20
# Longer "passwords" are refused without hashing: a login form should not be a way
# to make the server hash megabytes.
MAX_PASSWORD_LENGTH = 1024

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
USER_KEYS = ("role", "password")


class AccountError(PreflabError, ValueError):
    """A problem with an account or the users file; the message names the file and,
    where there is one, the user."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# --------------------------------------------------------------------------------------
# Password hashes
# --------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL needs 128*r*(n + p + 2) bytes; its default ceiling (32 MiB) would make
    # stronger parameters than ours fail, so the ceiling is set from the parameters.
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=128 * r * (n + p + 2) + 2**20, dklen=length
    )


def hash_password(password: str) -> str:
    """A new "scrypt$n$r$p$salt$hash" string for `password`, with a fresh salt."""
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, digest) of a stored hash; ValueError saying what is wrong."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not of the form scrypt$n$r$p$salt$hash")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("n, r, p must be integers and salt, hash base64") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        raise ValueError("n must be a power of two above 1, r and p positive")
    if 128 * r * (n + p + 2) > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt parameters would need more than {MAX_SCRYPT_MEMORY >> 20} MiB")
    if not salt or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return n, r, p, salt, digest


def check_password(password: str, stored: str) -> bool:
    """Whether `password` matches the stored hash (False for a malformed hash)."""
    try:
        n, r, p, salt, digest = _parse_hash(stored)
    except ValueError:
        return False
    # compare_digest takes the same time wherever the first differing byte is.
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


# Checked against when a login names an unknown user, so that the answer takes as long
# as for a known user and does not reveal which names exist. No password matches it:
# its "hash" is random bytes, not the hash of anything.
_DUMMY_HASH = (
    f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(os.urandom(SALT_BYTES))}${_b64(os.urandom(HASH_BYTES))}"
)


# --------------------------------------------------------------------------------------
# The users file
# --------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """`name` if it is a valid account name, else AccountError saying the rule."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AccountError(f"invalid user name {name!r}: use {NAME_RULE}")
    return name


def _check_role(role: object) -> str:
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r} (expected one of: {', '.join(ROLES)})")
    return role  # type: ignore[return-value]


def load_users(path: str | os.PathLike) -> dict[str, User]:
    """Every account in the users file, by name, in file order.

    AccountError, naming the file (and the user), for a missing or unreadable file,
    invalid TOML, an invalid name, an unknown role or key, or a password that is not
    a hash this module wrote. Loading is strict because a typo in an auth file
    should stop the server, not lock someone out silently.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise AccountError(
            f"{path}: no such users file (create it with `preflab user add NAME --role admin --auth {path}`)"
        ) from None
    except UnicodeDecodeError:
        raise AccountError(f"{path}: not a users file (not UTF-8 text)") from None
    except OSError as e:
        raise AccountError(f"{path}: cannot read ({e.strerror})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AccountError(f"{path}: not valid TOML ({e})") from None

    extra = sorted(set(document) - {"users"})
    if extra:
        raise AccountError(
            f"{path}: unexpected top-level key {extra[0]!r} (only [users.NAME] tables belong here)"
        )
    table = document.get("users", {})
    if not isinstance(table, dict):
        raise AccountError(f"{path}: 'users' must be a table of [users.NAME] entries")

    users: dict[str, User] = {}
    for name, entry in table.items():
        where = f"{path}: user {name!r}"
        if not NAME_RE.fullmatch(name):
            raise AccountError(f"{where}: invalid name: use {NAME_RULE}")
        if not isinstance(entry, dict):
            raise AccountError(f"{where}: must be a table with role and password")
        unknown = sorted(set(entry) - set(USER_KEYS))
        if unknown:
            raise AccountError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(USER_KEYS)})")
        for key in USER_KEYS:
            if key not in entry:
                raise AccountError(f"{where}: missing {key!r}")
        try:
            role = _check_role(entry["role"])
        except AccountError as e:
            raise AccountError(f"{where}: {e}") from None
        password = entry["password"]
        if not isinstance(password, str):
            raise AccountError(f"{where}: password must be a string")
        try:
            _parse_hash(password)
        except ValueError as e:
            raise AccountError(
                f"{where}: password is not a scrypt hash written by `preflab user add` ({e})"
            ) from None
        users[name] = User(name, role, password)
    return users


def _toml_string(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for ch in value:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _render(users: dict[str, User]) -> str:
    lines = [
        "# preflab accounts, written by `preflab user add | remove`.",
        "# The passwords are scrypt hashes; never put a plain password here.",
        "",
    ]
    for user in users.values():
        # Quoted keys: a bare TOML key may not contain ".", which names may.
        lines += [
            f"[users.{_toml_string(user.name)}]",
            f"role = {_toml_string(user.role)}",
            f"password = {_toml_string(user.password_hash)}",
            "",
        ]
    return "\n".join(lines)


def _write_users(path: Path, users: dict[str, User]) -> None:
    """Replace the file atomically: readers see the old or the new file, never half."""
    directory = path.parent
    # mkstemp creates the file with mode 0600, so the hashes are never readable by
    # others, not even for the moment before the rename.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_render(users))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)  # make the rename itself durable


def _check_password_text(password: str) -> None:
    if not password:
        raise AccountError("empty password refused")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"password longer than {MAX_PASSWORD_LENGTH} characters refused")


MIN_PASSWORD_LENGTH = 8


def check_new_password(name: str, password: str) -> None:
    """The rule for a password a person chooses (`preflab user add`): at least
    MIN_PASSWORD_LENGTH characters, and not the account name inside it."""
    _check_password_text(password)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(
            f"password of {len(password)} characters refused: use at least {MIN_PASSWORD_LENGTH} "
            "(a few words are easier to remember than symbols)"
        )
    if name.lower() in password.lower():
        raise AccountError(f"password refused: it contains the account name {name!r}")


@contextlib.contextmanager
def _locked(path: Path):
    """Hold the users file's lock: edits one after the other, none lost. The lock is a
    file of its own because the users file itself is replaced by each edit."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def add_user(path: str | os.PathLike, name: str, role: str, password: str, replace: bool = False) -> User:
    """Add an account (creating the file if missing) and return it.

    An existing name is refused unless `replace` (to reset a password or change a
    role). AccountError for an invalid name or role, an empty password, or a
    malformed file (which is then left untouched)."""
    path = Path(path)
    check_name(name)
    _check_role(role)
    _check_password_text(password)
    user = User(name, role, hash_password(password))  # the slow part, outside the lock
    with _locked(path):
        users = load_users(path) if path.exists() else {}
        if name in users and not replace:
            raise AccountError(
                f"{path}: user {name!r} already exists (replace it with --replace to change the password or role)"
            )
        users[name] = user
        _write_users(path, users)
    return user


class LastAdmin(AccountError):
    """An edit that would leave the server without an admin (refused where asked to)."""


def _keep_an_admin(users: dict[str, User], name: str, doing: str) -> None:
    # Decided on the file as read under the lock, so two admins demoting each other at
    # the same instant cannot both pass: the second one reads the first one's edit.
    if [u.name for u in users.values() if u.role == "admin"] == [name]:
        raise LastAdmin(f"cannot {doing} {name!r}: they are the last admin; make someone else admin first")


def set_role(path: str | os.PathLike, name: str, role: str, *, keep_an_admin: bool = False) -> User:
    """Change an account's role, keeping its password; AccountError if there is no such
    user, LastAdmin (with `keep_an_admin`) if they are the only admin and would stop being one."""
    path = Path(path)
    _check_role(role)
    with _locked(path):
        users = load_users(path)
        if name not in users:
            raise AccountError(f"{path}: no user {name!r}")
        if keep_an_admin and role != "admin":
            _keep_an_admin(users, name, "take the admin role from")
        users[name] = User(name, role, users[name].password_hash)
        _write_users(path, users)
    return users[name]


def remove_user(path: str | os.PathLike, name: str, *, keep_an_admin: bool = False) -> None:
    """Remove an account; AccountError if the file has no such user, LastAdmin (with
    `keep_an_admin`) if they are the only admin."""
    path = Path(path)
    with _locked(path):
        users = load_users(path)
        if name not in users:
            raise AccountError(f"{path}: no user {name!r}")
        if keep_an_admin:
            _keep_an_admin(users, name, "remove")
        del users[name]
        _write_users(path, users)


def verify(users: dict[str, User], name: str, password: str) -> User | None:
    """The user if `password` is theirs, else None.

    An unknown name costs one scrypt too (against a hash nothing matches), so the
    time of a failed login does not reveal whether the name exists."""
    if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
        return None
    user = users.get(name) if isinstance(name, str) else None
    matches = check_password(password, user.password_hash if user else _DUMMY_HASH)
    return user if (user is not None and matches) else None


def is_admin(users: dict[str, User], name: str) -> bool:
    user = users.get(name)
    return user is not None and user.is_admin


# --------------------------------------------------------------------------------------
# Command line: preflab user add | remove | list
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="user_action", metavar="ACTION", required=True)

    def action(name: str, doc: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=doc, description=doc)
        sub.add_argument(
            "--auth",
            default=DEFAULT_PATH,
            metavar="FILE",
            help=f"the users file that `preflab serve --auth` reads (default: {DEFAULT_PATH})",
        )
        return sub

    add = action("add", "add an account (asks for its password twice)")
    add.add_argument("name", metavar="NAME", help=NAME_RULE)
    add.add_argument(
        "--role", required=True, choices=ROLES, help="annotators vote; admins also see the dashboard"
    )
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of prompting",
    )
    add.add_argument(
        "--replace",
        action="store_true",
        help="overwrite an existing account (to reset its password or change its role)",
    )

    remove = action("remove", "remove an account")
    remove.add_argument("name", metavar="NAME", help="the account to remove (its votes stay in the store)")

    action("list", "list accounts and roles (never the hashes)")


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        # Only the line end is taken off: spaces may be part of a password.
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        try:
            password = getpass.getpass(f"password for {args.name}: ")
            again = getpass.getpass("repeat it: ")
        except EOFError:
            raise AccountError("no password given (pipe one with --password-stdin)") from None
        if password != again:
            raise AccountError("the two passwords differ; nothing changed")
    _check_password_text(password)
    return password


def _run_add(args: argparse.Namespace) -> None:
    path = Path(args.auth)
    check_name(args.name)
    # Refuse an existing name (or a broken file) before asking for a password.
    existing = load_users(path) if path.exists() else {}
    if args.name in existing and not args.replace:
        raise AccountError(
            f"{path}: user {args.name!r} already exists (use --replace to change the password or role)"
        )
    password = _read_password(args)
    check_new_password(args.name, password)
    user = add_user(path, args.name, args.role, password, replace=args.replace)
    done = "replaced {} {!r} in {}" if args.name in existing else "added {} {!r} to {}"
    print(done.format(user.role, user.name, path))


def _run_remove(args: argparse.Namespace) -> None:
    path = Path(args.auth)
    remove_user(path, args.name)
    print(f"removed {args.name!r} from {path}")
    users = load_users(path)
    if not any(u.is_admin for u in users.values()):
        print(
            f"warning: {path} has no admin left; add one with "
            f"`preflab user add NAME --role admin --auth {path}`",
            file=sys.stderr,
        )


def _run_list(args: argparse.Namespace) -> None:
    users = load_users(args.auth)
    if not users:
        print(f"{args.auth}: no users", file=sys.stderr)
        return
    width = max(len(name) for name in users)
    for user in sorted(users.values(), key=lambda u: u.name):
        print(f"{user.name:<{width}}  {user.role}")


def run(args: argparse.Namespace) -> int:
    handlers = {"add": _run_add, "remove": _run_remove, "list": _run_list}
    try:
        handlers[args.user_action](args)
    except AccountError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the directory of the file is not writable
        print(f"error: {args.auth}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
