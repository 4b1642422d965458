"""Accounts: password hashing, the users file, and `preflab user add | remove | list`."""

from __future__ import annotations

import argparse
import base64
import os
import stat
import tomllib
from pathlib import Path

import pytest
from helpers import preflab

from annotate import users as accounts
from annotate.users import AccountError, User

# ---- hashes --------------------------------------------------------------------------


def test_hash_round_trip_and_wrong_password():
    stored = accounts.hash_password("correct horse")
    assert accounts.check_password("correct horse", stored)
    assert not accounts.check_password("correct horse ", stored)
    assert not accounts.check_password("Correct horse", stored)
    assert not accounts.check_password("", stored)


def test_hash_format_carries_its_parameters_and_a_fresh_salt():
    first, second = accounts.hash_password("pw"), accounts.hash_password("pw")
    assert first != second  # a new salt each time
    kind, n, r, p, salt, digest = first.split("$")
    assert (kind, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32


def test_a_hash_with_other_parameters_still_verifies():
    # Raising the cost later must not lock out accounts hashed before.
    import hashlib

    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=2**10, r=4, p=2, dklen=24)
    stored = f"scrypt$1024$4$2${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert accounts.check_password("pw", stored)
    assert not accounts.check_password("pw2", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain-text-password",
        "scrypt$16384$8$1$c2FsdA==",
        "scrypt$1000$8$1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA==",  # n not a power of 2
        "scrypt$1048576$8$1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA==",  # 1 GiB of memory
        "scrypt$16384$8$1$!!!$aGFzaGhhc2hoYXNoaGFzaA==",
    ],
)
def test_a_malformed_hash_matches_nothing(stored):
    assert not accounts.check_password("anything", stored)


# ---- the users file ------------------------------------------------------------------


def test_add_load_verify(tmp_path):
    path = tmp_path / "users.toml"
    accounts.add_user(path, "alice", "admin", "s3cret")
    accounts.add_user(path, "bob.smith", "annotator", "hunter2")
    users = accounts.load_users(path)
    assert list(users) == ["alice", "bob.smith"]
    assert users["alice"].role == "admin" and users["bob.smith"].role == "annotator"

    assert accounts.verify(users, "alice", "s3cret") == users["alice"]
    assert accounts.verify(users, "alice", "hunter2") is None  # bob's password
    assert accounts.verify(users, "bob.smith", "hunter2") == users["bob.smith"]
    assert accounts.verify(users, "carol", "s3cret") is None
    assert accounts.is_admin(users, "alice")
    assert not accounts.is_admin(users, "bob.smith")
    assert not accounts.is_admin(users, "carol")


def test_verify_hashes_even_for_an_unknown_user(monkeypatch):
    users = {"alice": User("alice", "annotator", accounts.hash_password("pw"))}
    calls = []
    real = accounts._scrypt
    monkeypatch.setattr(accounts, "_scrypt", lambda *a: calls.append(a) or real(*a))
    assert accounts.verify(users, "nobody", "pw") is None
    assert accounts.verify(users, "alice", "wrong") is None
    # Both failures cost one scrypt each: their timing does not tell them apart.
    assert len(calls) == 2
    assert calls[0][2:] == calls[1][2:]  # same n, r, p, length


def test_file_is_written_with_mode_0600_and_no_temporary_left(tmp_path):
    path = tmp_path / "users.toml"
    accounts.add_user(path, "alice", "admin", "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A file someone made world-readable becomes private again on the next write.
    path.chmod(0o644)
    accounts.add_user(path, "bob", "annotator", "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    accounts.remove_user(path, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The lock file of the edits stays (it holds nothing); no temporary file does.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml", "users.toml.lock"]
    assert stat.S_IMODE((tmp_path / "users.toml.lock").stat().st_mode) == 0o600


def test_file_is_plain_toml_with_the_documented_layout(tmp_path):
    path = tmp_path / "users.toml"
    user = accounts.add_user(path, "a.b-c_1", "annotator", "pw")
    document = tomllib.loads(path.read_text())
    assert document == {"users": {"a.b-c_1": {"role": "annotator", "password": user.password_hash}}}


@pytest.mark.parametrize(
    "text", ['say "hi"', "back\\slash", "new\nline", "tab\tand\x01ctl\x7f", "ünï©ødé", "'single'", "$dollar$"]
)
def test_toml_strings_round_trip_through_tomllib(text):
    assert tomllib.loads(f"x = {accounts._toml_string(text)}")["x"] == text


def test_existing_name_refused_unless_replace(tmp_path):
    path = tmp_path / "users.toml"
    accounts.add_user(path, "alice", "annotator", "old")
    with pytest.raises(AccountError, match="'alice' already exists"):
        accounts.add_user(path, "alice", "admin", "new")
    users = accounts.load_users(path)
    assert users["alice"].role == "annotator" and accounts.verify(users, "alice", "old")

    accounts.add_user(path, "alice", "admin", "new", replace=True)
    users = accounts.load_users(path)
    assert users["alice"].role == "admin"
    assert accounts.verify(users, "alice", "new") and not accounts.verify(users, "alice", "old")


def test_remove_user(tmp_path):
    path = tmp_path / "users.toml"
    accounts.add_user(path, "alice", "admin", "pw")
    accounts.add_user(path, "bob", "annotator", "pw")
    accounts.remove_user(path, "alice")
    assert list(accounts.load_users(path)) == ["bob"]
    with pytest.raises(AccountError, match=r"users\.toml: no user 'alice'"):
        accounts.remove_user(path, "alice")


@pytest.mark.parametrize("name", ["alice", "Bob.Smith", "a-b_c.9", "7", "x" * 64])
def test_valid_names(name):
    assert accounts.check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "bad name", "import:hh", "judge:gpt", "x" * 65, ".hidden", "-flag", "ünï", "a/b", "a\nb"]
)
def test_invalid_names_are_refused_with_the_rule(tmp_path, name):
    with pytest.raises(AccountError, match="letters, digits"):
        accounts.add_user(tmp_path / "users.toml", name, "annotator", "pw")
    assert not (tmp_path / "users.toml").exists()


def test_unknown_role_and_empty_password_are_refused(tmp_path):
    path = tmp_path / "users.toml"
    with pytest.raises(AccountError, match="unknown role 'owner'"):
        accounts.add_user(path, "alice", "owner", "pw")
    with pytest.raises(AccountError, match="empty password"):
        accounts.add_user(path, "alice", "admin", "")
    assert not path.exists()


GOOD_HASH = accounts.hash_password("pw")


@pytest.mark.parametrize(
    "content, message",
    [
        ("[users.alice\nrole = 'admin'", r"not valid TOML"),
        (f'[users.alice]\nrole = "owner"\npassword = "{GOOD_HASH}"\n', r"user 'alice': unknown role 'owner'"),
        ('[users.alice]\nrole = "admin"\n', r"user 'alice': missing 'password'"),
        (
            '[users.alice]\nrole = "admin"\npassword = "hunter2"\n',
            r"user 'alice': password is not a scrypt hash",
        ),
        (
            f'[users.alice]\nrole = "admin"\npassword = "{GOOD_HASH}"\nemail = "a@b"\n',
            r"user 'alice': unknown key 'email'",
        ),
        (f'[users."bad name"]\nrole = "admin"\npassword = "{GOOD_HASH}"\n', r"user 'bad name': invalid name"),
        ('users = "alice"\n', r"'users' must be a table"),
        ("[server]\nport = 1\n", r"unexpected top-level key 'server'"),
        ('[users]\nalice = "admin"\n', r"user 'alice': must be a table"),
    ],
)
def test_malformed_files_name_the_file_and_the_user(tmp_path, content, message):
    path = tmp_path / "auth.toml"
    path.write_text(content)
    with pytest.raises(AccountError, match=r"auth\.toml: .*" + message):
        accounts.load_users(path)
    # Adding to a broken file refuses, and leaves the file as it was for a human to fix.
    with pytest.raises(AccountError, match=r"auth\.toml"):
        accounts.add_user(path, "zed", "annotator", "pw")
    assert path.read_text() == content


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AccountError, match=r"nope\.toml: no such users file"):
        accounts.load_users(tmp_path / "nope.toml")


def test_an_empty_file_has_no_users(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text("# nobody yet\n")
    assert accounts.load_users(path) == {}


# ---- command line --------------------------------------------------------------------


def test_cli_add_list_remove(tmp_path):
    auth = str(tmp_path / "users.toml")
    done = preflab(
        "user",
        "add",
        "alice",
        "--role",
        "admin",
        "--auth",
        auth,
        "--password-stdin",
        stdin="pass with spaces \n",
    )
    assert done.returncode == 0, done.stderr
    assert "added admin 'alice'" in done.stdout
    done = preflab(
        "user",
        "add",
        "bob",
        "--role",
        "annotator",
        "--auth",
        auth,
        "--password-stdin",
        stdin="hunter2-hunter2\n",
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(auth).st_mode) == 0o600

    users = accounts.load_users(auth)
    # Only the line end is stripped: the trailing space belongs to the password.
    assert accounts.verify(users, "alice", "pass with spaces ")
    assert not accounts.verify(users, "alice", "pass with spaces")
    assert accounts.verify(users, "bob", "hunter2-hunter2")

    listed = preflab("user", "list", "--auth", auth)
    assert listed.returncode == 0
    assert listed.stdout.split("\n")[:2] == ["alice  admin", "bob    annotator"]
    assert "scrypt" not in listed.stdout + listed.stderr

    removed = preflab("user", "remove", "alice", "--auth", auth)
    assert removed.returncode == 0, removed.stderr
    assert "no admin left" in removed.stderr
    assert list(accounts.load_users(auth)) == ["bob"]


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["add", "bob", "--role", "annotator", "--password-stdin"], "x\n", "'bob' already exists"),
        (["add", "carol", "--role", "admin", "--password-stdin"], "\n", "empty password"),
        (["add", "bad name", "--role", "admin", "--password-stdin"], "x\n", "invalid user name"),
        (["add", "carol", "--role", "admin", "--password-stdin"], "short\n", "use at least 8"),
        (
            ["add", "carol", "--role", "admin", "--password-stdin"],
            "i-am-carol-ok\n",
            "contains the account name",
        ),
        (["remove", "nobody"], "", "no user 'nobody'"),
    ],
)
def test_cli_errors_are_one_line_and_non_zero(tmp_path, args, stdin, message):
    auth = str(tmp_path / "users.toml")
    accounts.add_user(auth, "bob", "annotator", "pw")
    before = Path(auth).read_text()
    done = preflab("user", *args, "--auth", auth, stdin=stdin)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert Path(auth).read_text() == before


def test_cli_list_of_a_missing_file_fails_cleanly(tmp_path):
    done = preflab("user", "list", "--auth", str(tmp_path / "none.toml"))
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "none.toml: no such users file" in done.stderr
    assert "Traceback" not in done.stderr


# The interactive prompt, in process (getpass replaced; a real one needs a terminal).


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    accounts.add_arguments(parser)
    return parser.parse_args(argv)


def test_prompt_asks_twice_and_refuses_a_mismatch(tmp_path, monkeypatch, capsys):
    auth = str(tmp_path / "users.toml")
    answers = iter(["one", "two"])
    monkeypatch.setattr(accounts.getpass, "getpass", lambda prompt="": next(answers))
    assert accounts.run(parse("add", "alice", "--role", "admin", "--auth", auth)) == 1
    assert "differ" in capsys.readouterr().err
    assert not Path(auth).exists()

    answers = iter(["same-same", "same-same"])
    assert accounts.run(parse("add", "alice", "--role", "admin", "--auth", auth)) == 0
    assert accounts.verify(accounts.load_users(auth), "alice", "same-same")


def test_prompt_refuses_an_empty_password(tmp_path, monkeypatch, capsys):
    auth = str(tmp_path / "users.toml")
    monkeypatch.setattr(accounts.getpass, "getpass", lambda prompt="": "")
    assert accounts.run(parse("add", "alice", "--role", "admin", "--auth", auth)) == 1
    assert "empty password" in capsys.readouterr().err
    assert not Path(auth).exists()
