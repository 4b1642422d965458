"""A throwaway PostgreSQL server for tests and benchmarks (never for real data).

    from trainer.store.pg_testserver import ThrowawayPostgres
    with ThrowawayPostgres() as server:          # initdb + pg_ctl start, on a free port
        url = server.create_database("votes")    # postgresql://postgres@127.0.0.1:PORT/votes
        ...
        server.stop(); server.start()            # a restart, for reconnect tests
    # stopped and its directory removed

It uses the server binaries of Debian's `postgresql` package
(/usr/lib/postgresql/<version>/bin; `make test` installs them through
scripts/system-packages.sh). PostgreSQL refuses to run as root, so when we are root
`initdb` and `pg_ctl` run as the `postgres` user and the temporary directory is given
to it. The server listens on 127.0.0.1 only, trusts local connections (no passwords
to manage), and keeps fsync on, so a durability test means what it says.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class PostgresMissing(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_bin_dir() -> Path:
    """The bin directory of the newest installed PostgreSQL server."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        raise PostgresMissing(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): run "
            "`make test`, which installs them (scripts/system-packages.sh)"
        )
    newest = max(found, key=lambda p: int(Path(p).parent.parent.name.split(".")[0]))
    return Path(newest).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayPostgres:
    """One PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:port."""

    def __init__(self, port: int | None = None, *, settings: dict[str, str] | None = None):
        self.bin = find_bin_dir()
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="preflab-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"  # the unix socket, kept out of /var/run
        self.log = self.root / "server.log"
        self.sockets.mkdir()
        # fsync stays on (the default): tests that kill things must mean something.
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.sockets),
            "max_connections": "200",
            "fsync": "on",
            **(settings or {}),
        }
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        )
        self.running = False

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def url(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} {options}",
            "start",
        )
        self.running = True
        atexit.register(self.close)  # a test run that dies of an exception leaves no server behind

    def stop(self, mode: str = "fast") -> None:
        """mode "immediate" is a crash: no checkpoint, WAL replay on the next start."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def execute(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE DATABASE needs that)."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def require_password(self, role: str) -> None:
        """Make `role` log in with a password over TCP (everyone else stays trusted),
        for tests of refused credentials."""
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        self._run("pg_ctl", "-D", str(self.data), "reload")

    def close(self) -> None:
        atexit.unregister(self.close)
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
