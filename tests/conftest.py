"""Shared fixtures and helpers of the test suite.

Server helpers: `Server` runs `preflab serve` as a real process on a free port;
`write_pairs`, `add_users` and `client` set up what it serves and talk to it.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


# Nothing in the tests may wait on a network that is not there.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
XSS_LEFT = ("<script>window.__pwned = 1; document.title = 'pwned'</script> "
            "<img src=x onerror=\"window.__pwned = 2; document.title = 'pwned'\">")
XSS_RIGHT = "Click [here](javascript:window.__pwned=3) or <a href=\"javascript:window.__pwned=4\">here</a>."


from trainer.store.pg_testserver import free_port  # noqa: E402,F401  (one helper for free ports)


def write_pairs(path: Path, n: int, *, xss: bool = False) -> Path:
    """n plain pairs (answers say which side and model they are), XSS payloads first."""
    rows = []
    if xss:
        rows.append({"prompt": "Show me something dangerous.", "response_a": XSS_LEFT,
                     "response_b": XSS_RIGHT, "model_a": "evil-a", "model_b": "evil-b"})
    for i in range(n):
        rows.append({"prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
                     "response_a": f"alpha answer {i}", "response_b": f"beta answer {i}",
                     "model_a": "alpha", "model_b": "beta"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def add_users(path: Path, **roles: str) -> dict[str, str]:
    """Accounts name -> role; every password is '<name>-pw'. Returns name -> password."""
    from annotate.users import add_user
    for name, role in roles.items():
        add_user(path, name, role, f"{name}-pw")
    return {name: f"{name}-pw" for name in roles}


class Server:
    """`python -m annotate.cli serve ...` as a real process on a free port."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.args = [*args, "--port", str(self.port), "--host", "127.0.0.1"]
        self.log_path = tmp / f"server-{self.port}.log"
        self.proc = None

    def start(self, timeout: float = 120) -> "Server":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "annotate.cli", "serve", *self.args],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def client(url: str, user: str | None = None):
    from gradio_client import Client
    return Client(url, auth=(user, f"{user}-pw") if user else None, verbose=False)




# ---- a real, throwaway PostgreSQL for the store's tests --------------------------------

import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL cluster for the session (initdb + pg_ctl from Debian's package, on
    a free port of 127.0.0.1, fsync on), stopped at the end. `.url(dbname)`, `.stop()`
    and `.start()` (restart tests: start it again before you finish)."""
    from trainer.store.pg_testserver import PostgresMissing, ThrowawayPostgres
    try:
        server = ThrowawayPostgres()
    except PostgresMissing as e:
        pytest.fail(str(e), pytrace=False)   # never a silent skip: `make test` installs it
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres_server):
    """A fresh empty database on the session's server, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    if not postgres_server.running:   # a restart test that failed half-way
        postgres_server.start()
    url = postgres_server.create_database(name)
    yield url
    if postgres_server.running:
        postgres_server.drop_database(name)
