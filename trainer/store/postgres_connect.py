"""Connections to a PostgreSQL store: one, a pool that retries broken ones, and one line
that says why a connection failed.

    from trainer.store.postgres_connect import RetryingPool, connect
    with connect(url, connect_timeout=5.0) as conn:     # StoreUnavailable, in one line
        ...
    pool = RetryingPool(url, min_size=1, max_size=8, connect_timeout=5.0, retry_s=15.0)
    pool.run(lambda conn: conn.execute(...), "vote e1")  # again on a fresh connection
    pool.close()

Every connection is autocommit and READ COMMITTED whatever the database's default.
The writes and reads built on these (trainer/store/postgres.py) are idempotent, which
is what makes running the work again on a fresh connection safe.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from trainer.errors import missing_extra
from trainer.store.errors import StoreUnavailable, StoreWriteError
from trainer.store.targets import describe

try:  # the optional extra `preflab[postgres]`
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool
except ImportError:  # pragma: no cover - reported when a database is first opened
    psycopg = None

# The store's logger: the retry warnings are the PostgreSQL store's own.
log = logging.getLogger("preflab.store.postgres")


def _require_driver(target: str) -> None:
    if psycopg is None:
        # The wording every missing extra has (trainer/errors.py), as a StoreError: the
        # commands and the trainers report a store that cannot be opened as bad input.
        why = missing_extra("psycopg", "postgres") or missing_extra("psycopg_pool", "postgres")
        raise StoreUnavailable(f"{describe(target)}: the PostgreSQL store {why}")


def explain(error: Exception, target: str) -> str:
    """One line saying why a connection failed, from psycopg's several-line message."""
    text = str(error)
    for known in (
        r'password authentication failed for user "[^"]*"',
        r'database "[^"]*" does not exist',
        r'role "[^"]*" does not exist',
        r"no pg_hba\.conf entry[^\n]*",
        r"the database system is (starting up|shutting down|in recovery mode)",
        r"terminating connection due to administrator command",
    ):
        found = re.search(known, text)
        if found:
            return found.group(0)
    try:
        info = conninfo_to_dict(target)
    except Exception:
        info = {}
    where = f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}"
    if "Connection refused" in text or "No such file or directory" in text:
        return f"connection refused: is PostgreSQL running on {where}?"
    if "timeout expired" in text:
        return f"no answer from {where} within the connect timeout"
    if "could not translate host name" in text:
        return f"unknown host {info.get('host')!r}"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return re.sub(r"^(connection failed: )?(connection to server .*? failed: )?(FATAL:\s+)?", "", first)


def connect(target: str, connect_timeout: float) -> psycopg.Connection:
    """One autocommit connection, or StoreUnavailable naming the target and the cause."""
    _require_driver(target)
    try:
        return psycopg.connect(target, autocommit=True, **_connect_options(connect_timeout))
    except psycopg.OperationalError as e:
        raise StoreUnavailable(f"{describe(target)}: cannot connect: {explain(e, target)}") from None


def _connect_options(connect_timeout: float) -> dict[str, Any]:
    # libpq counts the timeout in whole seconds and treats anything under 2 as 2.
    # READ COMMITTED whatever the database's default: preflab_claim / preflab_vote read
    # a pair's state after taking its row lock, and only a fresh snapshot per statement
    # sees what the lock's previous holder committed (under REPEATABLE READ two servers
    # would both see room in the last slot).
    return {
        "connect_timeout": max(2, math.ceil(connect_timeout)),
        "application_name": "preflab",
        "client_encoding": "utf8",
        "options": "-c default_transaction_isolation=read\\ committed",
    }


class RetryingPool:
    """A pool of autocommit connections to `url`, open once every connection is up
    (StoreUnavailable if not within connect_timeout). Thread-safe.

    retry_s: how long work whose connection broke is run again before giving up."""

    def __init__(self, url: str, *, min_size: int, max_size: int, connect_timeout: float, retry_s: float):
        _require_driver(url)
        self.target = url
        self.retry_s = retry_s
        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=connect_timeout,
            name="preflab",
            kwargs={"autocommit": True, **_connect_options(connect_timeout)},
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg.OperationalError as e:
            self._pool.close()
            raise StoreUnavailable(f"{describe(url)}: cannot connect: {explain(e, url)}") from None

    def run(self, work: Callable[[Any], Any], what: str, *, reading: bool = False) -> Any:
        """work(conn) on a pooled autocommit connection (one statement is one
        transaction; work opens `conn.transaction()` for several). On a broken
        connection, again on a fresh one, for up to retry_s seconds: safe, because
        every write run here is idempotent (events by event_id, leases and skips by key).
        Then StoreUnavailable when `reading`, else StoreWriteError "... not saved, try again"."""
        deadline = time.monotonic() + self.retry_s
        pause = 0.05
        while True:
            try:
                with self._pool.connection(timeout=max(0.5, deadline - time.monotonic())) as conn:
                    return work(conn)
            except psycopg.OperationalError as e:
                # Lost connection, server restarting, deadlock or serialization abort:
                # nothing happened, or it committed and we did not hear. Both retry.
                if time.monotonic() + pause >= deadline:
                    reason = explain(e, self.target)
                    if reading:
                        raise StoreUnavailable(f"{describe(self.target)}: {what} failed: {reason}") from None
                    raise StoreWriteError(
                        f"{describe(self.target)}: {what} not saved, try again ({reason})"
                    ) from None
                log.warning("%s: %s: %s; retrying", describe(self.target), what, explain(e, self.target))
                time.sleep(pause)
                pause = min(2 * pause, 1.0)

    def close(self) -> None:
        self._pool.close()
