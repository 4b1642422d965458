"""The Users tab's rules (annotate/user_admin.py) on a real users file: admins only, the
password rule of `preflab user add`, no locking the team out, and changes that the
running server's Accounts see at once (so sessions end: tests/test_security.py)."""

import fcntl
import os
import threading
import time

import pytest
from helpers import add_users

from annotate.accounts import Accounts, Forbidden
from annotate.user_admin import UserAdmin, UserAdminError
from annotate.users import AccountError, LastAdmin, load_users


@pytest.fixture
def admin(tmp_path):
    add_users(tmp_path / "users.toml", boss="admin", ann="annotator")
    accounts = Accounts(tmp_path / "users.toml")
    return UserAdmin(accounts), accounts


def test_only_admins_manage_accounts(admin):
    users, _ = admin
    for call in (
        lambda: users.list("ann"),
        lambda: users.add("ann", "eve", "admin", "a long password"),
        lambda: users.remove("ann", "boss"),
        lambda: users.list("nobody"),
    ):
        with pytest.raises(Forbidden):
            call()
    with pytest.raises(Forbidden, match="without accounts"):
        UserAdmin(None).list("boss")


def test_add_reset_change_role_and_remove(admin, tmp_path):
    users, accounts = admin
    assert users.list("boss") == [{"name": "ann", "role": "annotator"}, {"name": "boss", "role": "admin"}]
    assert "added annotator 'carol'" in users.add("boss", " carol ", "annotator", "tea at five o'clock")
    assert accounts.verify("carol", "tea at five o'clock")
    before = accounts.credentials("carol")

    assert "their sessions have ended" in users.reset_password("boss", "carol", "coffee at nine")
    assert accounts.verify("carol", "coffee at nine") and not accounts.verify("carol", "tea at five o'clock")
    assert accounts.credentials("carol") != before  # what ends her sessions

    users.set_role("boss", "carol", "admin")
    assert accounts.role("carol") == "admin" and accounts.verify("carol", "coffee at nine")  # password kept
    assert "nothing changed" in users.set_role("boss", "carol", "admin")

    assert "their votes stay" in users.remove("boss", "carol")
    assert accounts.role("carol") is None
    assert set(load_users(tmp_path / "users.toml")) == {"ann", "boss"}


def test_weak_passwords_bad_names_and_duplicates_are_refused(admin, tmp_path):
    users, _ = admin
    with pytest.raises(AccountError, match="at least 8"):
        users.add("boss", "dave", "annotator", "short")
    with pytest.raises(AccountError, match="contains the account name"):
        users.add("boss", "dave", "annotator", "i-am-dave-really")
    with pytest.raises(AccountError, match="invalid user name"):
        users.add("boss", "import:x", "annotator", "a long password")
    with pytest.raises(AccountError, match="already exists"):
        users.add("boss", "ann", "admin", "a long password")
    with pytest.raises(AccountError, match="at least 8"):
        users.reset_password("boss", "ann", "x")
    with pytest.raises(UserAdminError, match="no user 'zoe'"):
        users.remove("boss", "zoe")
    assert set(load_users(tmp_path / "users.toml")) == {"ann", "boss"}  # nothing changed


def test_the_team_cannot_lock_itself_out(admin):
    users, accounts = admin
    with pytest.raises(UserAdminError, match="your own account"):
        users.remove("boss", "boss")
    with pytest.raises(LastAdmin, match="last admin"):
        users.set_role("boss", "boss", "annotator")
    users.set_role("boss", "ann", "admin")
    users.set_role("boss", "boss", "annotator")  # another admin now exists
    assert accounts.role("boss") == "annotator"
    with pytest.raises(LastAdmin, match="last admin"):
        users.set_role("ann", "ann", "annotator")


def test_two_admins_demoting_each_other_at_once_leave_one_admin(tmp_path):
    """The last-admin rule is decided under the users file's lock: while the lock is
    held, both demotions start (each has already checked its caller is an admin); when
    it is released one goes through and the other finds it would leave no admin."""
    path = tmp_path / "users.toml"
    add_users(path, ann="admin", boss="admin")
    admin = UserAdmin(Accounts(path))
    outcomes = []

    def demote(caller, name):
        try:
            outcomes.append(admin.set_role(caller, name, "annotator"))
        except LastAdmin as e:
            outcomes.append(e)

    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as if a third edit were in progress
    threads = [threading.Thread(target=demote, args=pair) for pair in (("ann", "boss"), ("boss", "ann"))]
    for t in threads:
        t.start()
    # Release only once both demotions wait on the lock: the kernel lists a blocked flock
    # in /proc/locks as "->" against the lock file's inode.
    inode = f":{os.fstat(fd).st_ino} "
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open("/proc/locks") as locks:
            if sum("->" in line and inode in line for line in locks) >= 2:
                break
        time.sleep(0.01)
    else:
        pytest.fail("the two demotions never both waited on the users file's lock")
    os.close(fd)
    for t in threads:
        t.join(10)
    assert sum(isinstance(o, LastAdmin) for o in outcomes) == 1, outcomes
    assert [u.role for u in load_users(path).values()].count("admin") == 1
