"""Logins: who may try a password now, and the password check kept off the event loop.

    logins = Logins(accounts)
    credentials = await logins.check(name, password, address)   # None: wrong password
                                                   # TooManyAttempts, LoginsBusy: not checked

A login costs one scrypt (tens of milliseconds of CPU, by design). Run inside gradio's
async /login handler it would stop every other request for that long, so a few threads
posting wrong passwords stalled the votes of everyone else. Here the check runs in a
small thread pool (hashlib.scrypt releases the GIL), and at most MAX_PENDING checks may
wait for it: beyond that a login is answered "busy" at once instead of queueing CPU work
that an attacker asked for.

Guessing is slowed by failures counted per account name and per client address:

* the first FREE_FAILURES failures cost nothing (typos happen);
* after that each further try must wait 2**(failures - free) seconds since the last
  failure (1 s, 2 s, 4 s, ...), up to LOCKOUT_S (15 minutes): a temporary lockout;
* a locked-out try is refused before any hashing, even with the right password, so
  guessing through the lockout is not possible; a successful login clears the name's
  and the address's counts; counts are forgotten FORGET_S after the last failure.

An address gets more free failures than a name, since a lab's annotators may share one
(NAT). Addresses are the TCP peer's: behind a reverse proxy every login shares the
proxy's address, and the per-name limit still holds. No gradio here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from trainer.errors import PreflabError

log = logging.getLogger("preflab.logins")

FREE_FAILURES = 5  # per account name
FREE_FAILURES_PER_ADDRESS = 20
LOCKOUT_S = 15 * 60  # the longest wait, reached after about ten more failures
FORGET_S = 60 * 60  # a quiet hour since the last failure and the count starts again
MAX_TRACKED = 50_000  # names and addresses remembered (oldest forgotten first)
# Password checks waiting for the pool before "busy". A waiting check costs a coroutine,
# not CPU (the pool caps that), so a class of 512 arriving at once may all wait in line;
# beyond it, the answer says how long the line is (Retry-After from the measured check
# time), so clients come back when there is room instead of every second.
MAX_PENDING = 1024


class TooManyAttempts(PreflabError):
    """Too many failed logins for this name or address; `retry_after_s` says when."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LoginsBusy(PreflabError):
    """More password checks are waiting than the server takes on; `retry_after_s`: about
    when the line will have room."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Failures:
    count: int
    last: float


class Throttle:
    """Failure counts per key ("name:bob", "address:10.0.0.7") and the wait they impose.
    `clock` is injectable so that the rule can be tested without sleeping."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def wait_after(failures: int, free: int) -> float:
        """Seconds a try must wait after the last of `failures` failures."""
        if failures < free:
            return 0.0
        return float(min(2 ** (failures - free), LOCKOUT_S))

    def retry_after(self, key: str, free: int) -> float:
        """Seconds until `key` may try again (0: now)."""
        with self._lock:
            entry = self._current(key)
            if entry is None:
                return 0.0
            return max(0.0, entry.last + self.wait_after(entry.count, free) - self.clock())

    def failed(self, key: str) -> int:
        """Count a failure; returns the count."""
        with self._lock:
            entry = self._current(key) or _Failures(0, 0.0)
            entry.count += 1
            entry.last = self.clock()
            self._failures[key] = entry
            self._failures.move_to_end(key)
            while len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)
            return entry.count

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _current(self, key: str) -> _Failures | None:
        entry = self._failures.get(key)
        if entry is not None and self.clock() - entry.last > FORGET_S:
            del self._failures[key]
            return None
        return entry


LOGIN_NICE = 10  # CPU weight about a tenth of the vote-serving threads' when both want it


def _lower_cpu_priority() -> None:
    """Run this pool thread at nice LOGIN_NICE: when the CPU is short, the threads
    serving votes come first and logins wait, but still progress (at nice 19 a machine
    busy with anything else starved them for minutes). Linux schedules threads one by
    one; elsewhere the pool keeps the server's priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOGIN_NICE)
    except (AttributeError, OSError):
        pass


def _in_words(seconds: float) -> str:
    seconds = max(1, round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} minutes"


class Logins:
    """The login check of `preflab serve --auth`: throttle first, then scrypt in a pool."""

    def __init__(self, accounts, workers: int | None = None, clock=time.monotonic):
        self.accounts = accounts
        self.throttle = Throttle(clock)
        # Half the cores at most: logins must never take the CPU the votes need.
        self.workers = workers or max(1, (os.cpu_count() or 2) // 2)
        self._pool = ThreadPoolExecutor(
            self.workers, thread_name_prefix="preflab-login", initializer=_lower_cpu_priority
        )
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.check_s = 0.05  # a running mean of one check's time, for Retry-After

    def _refuse_if_throttled(self, name: str, address: str | None) -> None:
        waits = [(self.throttle.retry_after(f"name:{name}", FREE_FAILURES), f"account {name!r}")]
        if address:
            waits.append(
                (self.throttle.retry_after(f"address:{address}", FREE_FAILURES_PER_ADDRESS), address)
            )
        wait, who = max(waits)
        if wait > 0:
            log.warning("login refused for %r from %s: throttled for %.0f s more", name, address, wait)
            raise TooManyAttempts(
                f"too many failed logins for {who}; try again in {_in_words(wait)}",
                retry_after_s=max(1, round(wait)),
            )

    async def check(self, name: str, password: str, address: str | None = None) -> str | None:
        """The account's credentials fingerprint if `password` is `name`'s, else None.
        TooManyAttempts while the name or the address must wait; LoginsBusy when too
        many checks are already waiting."""
        self._refuse_if_throttled(name, address)
        with self._pending_lock:
            if self._pending >= MAX_PENDING:
                wait = max(1, math.ceil(self._pending * self.check_s / self.workers))
                raise LoginsBusy(
                    f"the server is checking {self._pending} other logins; try again in {_in_words(wait)}",
                    retry_after_s=wait,
                )
            self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            credentials = await loop.run_in_executor(self._pool, self._timed_check, name, password)
        finally:
            with self._pending_lock:
                self._pending -= 1
        keys = [f"name:{name}"] + ([f"address:{address}"] if address else [])
        if credentials:
            for key in keys:
                self.throttle.succeeded(key)
            log.info("login: %r from %s", name, address)
        else:
            counts = [self.throttle.failed(key) for key in keys]
            log.warning("failed login for %r from %s (%d failures for the name)", name, address, counts[0])
        return credentials

    def _timed_check(self, name: str, password: str) -> str | None:
        started = time.monotonic()
        try:
            return self.accounts.check(name, password)
        finally:
            self.check_s = 0.9 * self.check_s + 0.1 * (time.monotonic() - started)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
