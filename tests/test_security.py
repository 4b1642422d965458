"""Attacks on `preflab serve`, run as an attacker would: raw HTTP where the page would
stop you, real servers, real users files, real `preflab user` processes.

Threats covered here (SECURITY.md has the whole model):
- password guessing against one account: backoff, then a temporary lockout that
  refuses even the right password;
- password guessing across many names from one address, and spreading guesses over
  made-up X-Forwarded-For addresses (only a --trusted-proxy names the client);
- login floods stalling everyone: the scrypt check runs in a bounded pool, off the
  event loop;
- sessions outliving their credentials: a password reset, a role change, a removal
  or a deleted users file ends them at once; re-adding a name revives nothing;
- sessions that never end: idle expiry, and logout ending the session server-side
  (the old cookie replayed afterwards is nobody's);
- cross-site requests (CSRF) from another site's page, with or without accounts;
- oversized requests (a 2 MiB body) refused before gradio reads them;
- two `preflab user` edits at once losing one (the users file is locked).
Elsewhere: the Host check (DNS rebinding) in tests/test_app_api.py, checkpoint
pickles in tests/test_policy.py and tests/test_reward.py, export access and file
modes in tests/test_security_exports.py, bad input in tests/test_security_inputs.py.
"""

import asyncio
import threading
import time

import httpx
import pytest
from helpers import Server, add_users, client, preflab, write_pairs

from annotate import logins as logins_module
from annotate.accounts import Accounts
from annotate.logins import FREE_FAILURES, FREE_FAILURES_PER_ADDRESS, LOCKOUT_S, Logins, Throttle


def http_login(url: str, name: str, password: str) -> httpx.Response:
    return httpx.post(url + "login", data={"username": name, "password": password}, timeout=30)


def session_cookies(response: httpx.Response) -> dict[str, str]:
    cookies = {k: v for k, v in response.cookies.items() if k.startswith("access-token-")}
    assert cookies, f"no session cookie in {response.status_code} {response.text}"
    return cookies


def set_account(users, name: str, role: str, password: str, *flags: str) -> None:
    """`preflab user add` as an admin runs it on the server's users file."""
    r = preflab(
        "user",
        "add",
        name,
        "--role",
        role,
        *flags,
        "--password-stdin",
        "--auth",
        users,
        stdin=password + "\n",
    )
    assert r.returncode == 0, r.stderr


def whoami(url: str, cookies: dict[str, str]) -> str | None:
    """The account gradio serves this cookie as (None: not logged in)."""
    r = httpx.get(url + "config", cookies=cookies, timeout=30)
    if r.status_code == 401:
        return None
    config = r.json()
    assert config.get("auth_required") or config.get("username"), config
    return None if config.get("auth_required") else config["username"]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    add_users(
        tmp / "users.toml", ann="annotator", ben="annotator", cat="annotator", dan="annotator", boss="admin"
    )
    pairs = write_pairs(tmp / "pairs.jsonl", 6)
    args = ("--pairs", pairs, "--data", tmp / "store", "--auth", tmp / "users.toml")
    with Server(tmp, *map(str, args)) as server:
        yield server, tmp / "users.toml"


# ---- logins -------------------------------------------------------------------------------


def test_throttle_backs_off_exponentially_then_locks_out_and_forgets():
    now = [1000.0]
    throttle = Throttle(clock=lambda: now[0])
    for _ in range(FREE_FAILURES):
        assert throttle.retry_after("name:bob", FREE_FAILURES) == 0  # typos are free
        throttle.failed("name:bob")
    waits = []
    for _ in range(12):
        waits.append(throttle.retry_after("name:bob", FREE_FAILURES))
        throttle.failed("name:bob")
    assert waits[:4] == [1, 2, 4, 8]  # each failure doubles the wait
    assert max(waits) == LOCKOUT_S  # and the wait stops at the lockout
    assert throttle.retry_after("name:alice", FREE_FAILURES) == 0  # others unaffected
    now[0] += LOCKOUT_S + 1
    assert throttle.retry_after("name:bob", FREE_FAILURES) == 0  # the lockout is temporary
    throttle.failed("name:bob")  # ... but the count goes on until a quiet hour passes
    assert throttle.retry_after("name:bob", FREE_FAILURES) == LOCKOUT_S
    throttle.succeeded("name:bob")
    assert throttle.retry_after("name:bob", FREE_FAILURES) == 0
    for _ in range(FREE_FAILURES + 3):
        throttle.failed("name:carol")
    now[0] += logins_module.FORGET_S + 1
    assert throttle.retry_after("name:carol", FREE_FAILURES) == 0


def test_password_checks_run_in_the_login_pool_not_on_the_event_loop(tmp_path):
    add_users(tmp_path / "users.toml", ann="annotator")
    checked_on = []

    class Recording(Accounts):
        def check(self, name, password):
            checked_on.append(threading.current_thread().name)
            return super().check(name, password)

    logins = Logins(Recording(tmp_path / "users.toml"), workers=1)

    async def attempt():
        loop_thread = threading.current_thread().name
        results = await asyncio.gather(logins.check("ann", "ann-pw"), logins.check("ann", "nope"))
        return loop_thread, results

    loop_thread, (good, bad) = asyncio.run(attempt())
    logins.close()
    assert good and bad is None
    assert checked_on and all(t.startswith("preflab-login") and t != loop_thread for t in checked_on)


def test_a_full_login_line_answers_busy_with_how_long_to_wait(tmp_path, monkeypatch):
    add_users(tmp_path / "users.toml", ann="annotator")
    release = threading.Event()

    class Slow(Accounts):
        def check(self, name, password):
            release.wait(30)  # a check still running when the next login arrives
            return super().check(name, password)

    monkeypatch.setattr(logins_module, "MAX_PENDING", 2)
    logins = Logins(Slow(tmp_path / "users.toml"), workers=1)
    logins.check_s = 0.4  # as measured on a slow machine

    async def storm():
        waiting = [asyncio.ensure_future(logins.check("ann", "ann-pw")) for _ in range(2)]
        await asyncio.sleep(0.2)
        with pytest.raises(logins_module.LoginsBusy) as busy:
            await logins.check("ann", "ann-pw")
        release.set()
        return busy.value, await asyncio.gather(*waiting)

    busy, results = asyncio.run(storm())
    logins.close()
    assert busy.retry_after_s == 1 and "checking 2 other logins" in str(busy)  # ceil(2 x 0.4 s / 1)
    assert all(results)  # the ones in line got in


def test_wrong_passwords_lock_the_account_even_against_the_right_one(team):
    server, _ = team
    for _ in range(FREE_FAILURES):
        r = http_login(server.url, "ben", "guess")
        assert r.status_code == 400 and r.json()["detail"] == "Incorrect credentials."
    r = http_login(server.url, "ben", "ben-pw")  # the right password, during the backoff
    assert r.status_code == 429
    assert "too many failed logins for account 'ben'" in r.json()["detail"]
    wait = int(r.headers["retry-after"])
    assert wait >= 1 and "access-token" not in r.headers.get("set-cookie", "")
    assert http_login(server.url, "cat", "cat-pw").status_code == 200  # other accounts log in
    time.sleep(wait + 0.2)
    r = http_login(server.url, "ben", "ben-pw")
    assert r.status_code == 200 and whoami(server.url, session_cookies(r)) == "ben"
    assert "failed login for 'ben'" in server.output()  # the attempts are logged


def test_one_address_guessing_many_names_is_throttled(tmp_path):
    add_users(tmp_path / "users.toml", ann="annotator")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = ("--pairs", pairs, "--data", tmp_path / "store", "--auth", tmp_path / "users.toml")
    with Server(tmp_path, *map(str, args)) as server:
        for i in range(FREE_FAILURES_PER_ADDRESS):
            assert http_login(server.url, f"name{i}", "guess").status_code == 400
        r = http_login(server.url, "ann", "ann-pw")  # a fresh name, from the same address
        assert r.status_code == 429 and "for 127.0.0.1" in r.json()["detail"]


def test_only_a_trusted_proxy_names_the_client_the_throttle_counts(tmp_path):
    """X-Forwarded-For names the client only when it comes from a --trusted-proxy: from
    anyone else it is ignored, so a guesser cannot spread failures over made-up
    addresses; behind a trusted proxy each real client has its own count."""
    add_users(tmp_path / "users.toml", ann="annotator")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = ("--pairs", pairs, "--data", tmp_path / "store", "--auth", tmp_path / "users.toml")

    def guess(url, i, forwarded):
        r = httpx.post(
            url + "login",
            data={"username": f"name{i}", "password": "guess"},
            headers={"X-Forwarded-For": forwarded},
            timeout=30,
        )
        return r

    with Server(tmp_path, *map(str, args), "--trusted-proxy", "none") as server:
        for i in range(FREE_FAILURES_PER_ADDRESS):
            assert guess(server.url, i, f"10.0.{i}.1").status_code == 400  # each "from" elsewhere
        r = guess(server.url, 99, "10.9.9.9")
        assert r.status_code == 429 and "for 127.0.0.1" in r.json()["detail"]  # all counted as one
    # A network written with host bits (127.0.0.1/8) means 127.0.0.0/8, as ipaddress reads it.
    with Server(tmp_path, *map(str, args), "--trusted-proxy", "127.0.0.1/8") as server:
        for i in range(FREE_FAILURES_PER_ADDRESS):
            assert guess(server.url, i, "10.0.0.1").status_code == 400
        assert guess(server.url, 98, "10.0.0.2").status_code == 400  # another client: not throttled
        r = guess(server.url, 99, "10.0.0.1")
        assert r.status_code == 429 and "for 10.0.0.1" in r.json()["detail"]
    refused = preflab("serve", *args, "--trusted-proxy", "proxy.example")
    assert (
        refused.returncode == 2 and "--trusted-proxy 'proxy.example' is not an IP address" in refused.stderr
    )


# ---- sessions -----------------------------------------------------------------------------


def test_password_reset_role_change_and_removal_end_sessions(team):
    server, users = team
    old = session_cookies(http_login(server.url, "dan", "dan-pw"))
    assert whoami(server.url, old) == "dan"
    api = client(server.url, "dan")
    assert api.predict(api_name="/next")["pair"] is not None

    new_password = "correct horse battery"
    set_account(users, "dan", "annotator", new_password, "--replace")
    assert whoami(server.url, old) is None  # the reset ended the old session at once
    with pytest.raises(Exception):  # noqa: B017 - gradio_client's error types vary by route
        api.predict(api_name="/next")
    assert httpx.get(server.url + "gradio_api/info", cookies=old, timeout=30).status_code == 401

    fresh = session_cookies(http_login(server.url, "dan", new_password))
    assert whoami(server.url, fresh) == "dan"
    set_account(users, "dan", "admin", new_password, "--replace")
    assert whoami(server.url, fresh) is None  # a role change too

    admin = session_cookies(http_login(server.url, "dan", new_password))
    assert preflab("user", "remove", "dan", "--auth", users).returncode == 0
    assert whoami(server.url, admin) is None  # and a removal
    set_account(users, "dan", "admin", new_password)
    assert whoami(server.url, admin) is None  # the same name again revives nothing
    assert whoami(server.url, old) is None


def test_logout_ends_the_session_on_the_server(team):
    server, _ = team
    cookies = session_cookies(http_login(server.url, "cat", "cat-pw"))
    other_device = session_cookies(http_login(server.url, "cat", "cat-pw"))
    assert whoami(server.url, cookies) == "cat" and whoami(server.url, other_device) == "cat"
    r = httpx.get(server.url + "logout", cookies=cookies, timeout=30)
    assert r.status_code in (302, 307)
    # The cookie kept by an attacker (or a shared browser) and replayed is nobody's now,
    # and gradio's default logout ends the account's other sessions as well.
    assert whoami(server.url, cookies) is None
    assert whoami(server.url, other_device) is None


def test_deleting_the_users_file_ends_every_session_and_every_login(tmp_path):
    add_users(tmp_path / "users.toml", ann="annotator", boss="admin")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = ("--pairs", pairs, "--data", tmp_path / "store", "--auth", tmp_path / "users.toml")
    with Server(tmp_path, *map(str, args)) as server:
        cookies = session_cookies(http_login(server.url, "boss", "boss-pw"))
        assert whoami(server.url, cookies) == "boss"
        (tmp_path / "users.toml").unlink()
        assert whoami(server.url, cookies) is None
        assert http_login(server.url, "ann", "ann-pw").status_code == 400


def test_idle_sessions_end(tmp_path):
    add_users(tmp_path / "users.toml", ann="annotator")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    args = ("--pairs", pairs, "--data", tmp_path / "store", "--auth", tmp_path / "users.toml")
    with Server(tmp_path, *map(str, args), "--session-idle", "0.03") as server:  # 1.8 s
        cookies = session_cookies(http_login(server.url, "ann", "ann-pw"))
        assert whoami(server.url, cookies) == "ann"
        time.sleep(2.5)
        assert whoami(server.url, cookies) is None
        assert whoami(server.url, session_cookies(http_login(server.url, "ann", "ann-pw"))) == "ann"


def test_an_unknown_or_another_servers_token_is_nobody(team):
    server, _ = team
    forged = {"access-token-unsecure-whatever": "made-up-token", "access-token-x": "another"}
    assert whoami(server.url, forged) is None
    front = httpx.get(server.url, cookies=forged, timeout=30, follow_redirects=False)
    assert front.status_code == 302 and front.headers["location"] == "login"  # to the login page


# ---- requests -----------------------------------------------------------------------------


def _join(url: str, origin: str | None, cookies=None) -> int:
    headers = {"Origin": origin} if origin else {}
    body = {"data": [], "fn_index": 0, "session_hash": "x1"}
    return httpx.post(
        url + "gradio_api/queue/join", json=body, headers=headers, cookies=cookies, timeout=30
    ).status_code


def test_cross_site_requests_are_refused_with_and_without_accounts(team, tmp_path):
    server, _ = team
    cookies = session_cookies(http_login(server.url, "ann", "ann-pw"))
    assert _join(server.url, "http://evil.example.com", cookies) == 403
    assert _join(server.url, "null", cookies) == 403  # a sandboxed frame or a file:// page
    assert _join(server.url, f"http://127.0.0.1:{server.port}", cookies) != 403  # the page itself
    assert _join(server.url, None, cookies) != 403  # scripts send no Origin
    evil = {"Origin": "http://evil.example.com"}
    r = httpx.post(
        server.url + "login", data={"username": "ann", "password": "ann-pw"}, headers=evil, timeout=30
    )
    assert r.status_code == 403  # no logging a victim into the attacker's account either

    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    with Server(tmp_path, "--pairs", str(pairs), "--data", str(tmp_path / "store")) as local:
        # Without --auth the local user is an admin; the page elsewhere is not.
        assert _join(local.url, "http://evil.example.com") == 403
        assert _join(local.url, f"http://localhost:{local.port}") == 403  # another origin than Host
        assert _join(local.url, f"http://127.0.0.1:{local.port}") != 403


def test_oversized_requests_are_refused_before_gradio_reads_them(team):
    server, _ = team
    cookies = session_cookies(http_login(server.url, "ann", "ann-pw"))
    huge = {"data": ["x" * (2 << 20)], "fn_index": 0, "session_hash": "x2"}
    r = httpx.post(server.url + "gradio_api/queue/join", json=huge, cookies=cookies, timeout=30)
    assert r.status_code == 413 and "over the limit" in r.text
    upload = httpx.post(
        server.url + "gradio_api/upload",
        files={"files": ("big.bin", b"x" * (2 << 20))},
        cookies=cookies,
        timeout=30,
    )
    assert upload.status_code == 413  # the 20 MB upload of the report, at a tenth of that size

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65536

    try:
        r = httpx.post(server.url + "gradio_api/queue/join", content=chunks(), cookies=cookies, timeout=30)
        assert r.status_code >= 400
    except httpx.HTTPError:
        pass  # the server hung up on it: refused as well
    assert client(server.url, "ann").predict(api_name="/next")["pair"] is not None  # still serving


# ---- the users file -----------------------------------------------------------------------


def test_simultaneous_user_edits_all_take_effect(tmp_path):
    import subprocess
    import sys

    from helpers import REPO, child_env

    users = tmp_path / "users.toml"
    names = [f"person{i}" for i in range(8)]
    add = [sys.executable, "-m", "annotate.cli", "user", "add", "--role", "annotator", "--password-stdin"]
    procs = [
        subprocess.Popen([*add, "--auth", str(users), name], stdin=subprocess.PIPE, cwd=REPO, env=child_env())
        for name in names
    ]
    for proc in procs:
        proc.stdin.write(b"a long shared secret\n")
        proc.stdin.close()
    assert [proc.wait(120) for proc in procs] == [0] * len(names)
    listed = preflab("user", "list", "--auth", users).stdout.split()
    assert sorted(n for n in listed if n.startswith("person")) == names
