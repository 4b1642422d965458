"""The simulated annotators of bench/ui_load.py: one worker process runs its share of
them as threads, each one browser tab (raw HTTP, `HttpSession`) or one gradio_client
(`GradioClientSession`), and sends their latencies and acknowledged vote ids back.

    from ui_load_clients import worker     # bench/ui_load.py starts it in a process

Why raw HTTP and why processes: see bench/ui_load.py's docstring.
"""

import http.client
import json
import random
import resource
import socket
import threading
import time
import urllib.parse
import uuid


class CallFailed(Exception):
    """The server answered, but not with a result (an error message, a non-200 status)."""


class LoginRefused(CallFailed):
    """A login answered 503 (the server's password checks are all taken) or 429 (too many
    failures), with the seconds its Retry-After asks a client to wait."""

    def __init__(self, status: int, retry_after_s: float, text: str):
        super().__init__(f"login: {status} {text}")
        self.status, self.retry_after_s = status, retry_after_s


def is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError | socket.timeout) or "Timeout" in type(e).__name__


class HttpSession:
    """One browser tab in raw HTTP: the requests the page makes, nothing else."""

    def __init__(self, url: str, timeout: float):
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.conn: http.client.HTTPConnection | None = None
        self.last_used = 0.0
        self.cookie = ""
        self.prefix = "/gradio_api"
        self.fn: dict[str, int] = {}
        self.session_hash = ""

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # uvicorn closes a keep-alive connection after 5 s idle; a browser then opens a new one
    IDLE_S = 4.0

    def _request(self, method: str, path: str, body: str | None = None, ctype: str | None = None):
        if self.conn is not None and time.monotonic() - self.last_used > self.IDLE_S:
            self.close()
        headers = {"Cookie": self.cookie} if self.cookie else {}
        if ctype:
            headers["Content-Type"] = ctype
        for attempt in (1, 2):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                self.last_used = time.monotonic()
                return response
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.close()  # the server closed a reused connection first: once more, on a new one
                if not reused or attempt == 2:
                    raise
            except BaseException:
                self.close()  # a connection in an unknown state is not reused
                raise
        raise AssertionError("unreachable")

    def _read(self, response) -> bytes:
        try:
            return response.read()
        except BaseException:
            self.close()
            raise

    def login(self, name: str, password: str) -> None:
        form = urllib.parse.urlencode({"username": name, "password": password})
        r = self._request("POST", "/login", form, "application/x-www-form-urlencoded")
        body = self._read(r)
        if r.status in (429, 503):
            raise LoginRefused(r.status, float(r.getheader("Retry-After") or 5), repr(body[:200]))
        if r.status != 200:
            raise CallFailed(f"login: {r.status} {body[:200]!r}")
        self.cookie = "; ".join(v.split(";", 1)[0] for k, v in r.getheaders() if k.lower() == "set-cookie")
        r = self._request("GET", "/config")
        body = self._read(r)
        if r.status != 200:
            raise CallFailed(f"config: {r.status} {body[:200]!r}")
        config = json.loads(body)
        self.prefix = config.get("api_prefix", self.prefix)
        self.fn = {
            d["api_name"]: d["id"] for d in config["dependencies"] if isinstance(d.get("api_name"), str)
        }
        self.session_hash = uuid.uuid4().hex  # one page load, one session

    def call(self, api_name: str, *data):
        payload = {
            "data": list(data),
            "fn_index": self.fn[api_name.lstrip("/")],
            "session_hash": self.session_hash,
        }
        r = self._request("POST", f"{self.prefix}/queue/join", json.dumps(payload), "application/json")
        body = self._read(r)
        if r.status != 200:
            raise CallFailed(f"queue/join: {r.status} {body[:200]!r}")
        event_id = json.loads(body)["event_id"]
        r = self._request("GET", f"{self.prefix}/queue/data?session_hash={self.session_hash}")
        if r.status != 200:
            raise CallFailed(f"queue/data: {r.status} {self._read(r)[:200]!r}")
        result = None
        try:
            while True:
                line = r.readline()
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue
                msg = json.loads(line[5:])
                kind = msg.get("msg")
                if kind == "process_completed" and msg.get("event_id") == event_id:
                    if not msg.get("success"):
                        raise CallFailed(f"{api_name}: {msg.get('output')}")
                    result = msg["output"]["data"][0]
                elif kind == "unexpected_error":
                    raise CallFailed(f"{api_name}: {msg.get('message')}")
                elif kind == "close_stream":
                    break
            r.read()  # the end of the chunked body, so the connection can be reused
            self.last_used = time.monotonic()
        except BaseException:
            self.close()
            raise
        if result is None:
            raise CallFailed(f"{api_name}: the event stream ended without a result")
        return result


class GradioClientSession:
    """The same calls through gradio_client (--client gradio_client), for comparison."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout, self.client = url, timeout, None

    def login(self, name: str, password: str) -> None:
        from gradio_client import Client

        # http on loopback: ssl_verify=False only spares loading a CA bundle per request
        self.client = Client(self.url, auth=(name, password), verbose=False, ssl_verify=False)

    def call(self, api_name: str, *data):
        return self.client.predict(*data, api_name=api_name)

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None


class Annotator(threading.Thread):
    """One simulated annotator, for one phase (one server life)."""

    def __init__(self, name: str, opts: dict, stop: threading.Event, shared: dict, seed: int):
        super().__init__(daemon=True)
        self.name_, self.opts, self.stop, self.shared = name, opts, stop, shared
        self.rng = random.Random(seed)
        self.vote_ms: list[float] = []
        self.vote_at: list[float] = []  # when each vote was answered (time.perf_counter)
        self.next_ms: list[float] = []
        self.acked: list[str] = []
        self.login_ms: float | None = None
        self.errors = 0
        self.timeouts = 0
        self.problems: list[str] = []  # what went wrong, for the summary on stderr
        self.refused: dict[str, int] = {}  # logins answered 503 (busy) or 429 (throttled), by status
        self.session = None

    def _new_session(self):
        kind = GradioClientSession if self.opts["client"] == "gradio_client" else HttpSession
        return kind(self.opts["url"], self.opts["timeout"])

    def _count(self, e: BaseException) -> None:
        if is_timeout(e):
            self.timeouts += 1
        else:
            self.errors += 1
        self.problems.append(f"{type(e).__name__}: {e}"[:200])

    def _log_in(self, t_arrival: float) -> dict | None:
        """Log in and fetch the first pair, retrying (as a person would) until it works
        or the phase ends; None if it never did."""
        while not self.stop.is_set():
            self.session = self._new_session()
            try:
                self.session.login(self.name_, f"{self.name_}-pw")
                view = self.session.call("/next")  # the page's load event
                self.login_ms = (time.perf_counter() - t_arrival) * 1000
                with self.shared["logged_in"].get_lock():
                    self.shared["logged_in"].value += 1
                return view
            except LoginRefused as e:
                # The page says "try again in a few seconds"; people do, not all at once.
                self.refused[str(e.status)] = self.refused.get(str(e.status), 0) + 1
                self.session.close()
                self.stop.wait(e.retry_after_s * self.rng.uniform(1.0, 1.5))
            except Exception as e:
                self._count(e)
                self.session.close()
                self.stop.wait(1.0)
        return None

    def _timed(self, into: list[float], *args, api_name: str) -> dict:
        in_flight = self.shared["in_flight"]
        with in_flight.get_lock():
            in_flight.value += 1
        try:
            t0 = time.perf_counter()
            view = self.session.call(api_name, *args)
            t1 = time.perf_counter()
            into.append((t1 - t0) * 1000)
            if into is self.vote_ms:
                self.vote_at.append(t1)  # CLOCK_MONOTONIC: the parent's clock too
            return view
        finally:
            with in_flight.get_lock():
                in_flight.value -= 1
                self.shared["calls"].value += 1  # under the same lock: answered or failed

    def run(self) -> None:
        self.shared["start"].wait()
        view = self._log_in(time.perf_counter())
        think_ms, skip_rate, reload_rate = self.opts["think_ms"], 0.05, 0.05
        try:
            while view is not None and not self.stop.is_set():
                if think_ms:
                    self.stop.wait(think_ms / 1000 * self.rng.uniform(0.5, 1.5))
                if self.stop.is_set():
                    break
                pair = view["pair"]
                r = self.rng.random()
                try:
                    if pair is None or r < reload_rate:
                        view = self._timed(self.next_ms, api_name="/next")
                    elif r < reload_rate + skip_rate:
                        view = self._timed(self.next_ms, pair["pair_id"], api_name="/skip")
                    else:
                        choice = self.rng.choice(("left", "right", "left", "right", "tie", "both_bad"))
                        strength = self.rng.choice(("", "slightly", "clearly"))
                        view = self._timed(
                            self.vote_ms, pair["pair_id"], choice, strength, "", None, api_name="/vote"
                        )
                        if view["ack"]:
                            self.acked.append(view["ack"]["event_id"])
                except Exception as e:
                    if self.stop.is_set():
                        raise  # the server was killed under us (expected once)
                    self._count(e)  # a timeout or an error: reload the page, as a person would
                    view = {"pair": None}
        except Exception as e:
            self._count(e)
        finally:
            if self.session is not None:
                self.session.close()

    def result(self) -> dict:
        return {
            "vote_ms": self.vote_ms,
            "vote_at": self.vote_at,
            "next_ms": self.next_ms,
            "acked": self.acked,
            "login_ms": self.login_ms,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "problems": self.problems,
            "refused": self.refused,
        }


def worker(names: list[str], opts: dict, seed: int, shared: dict, conn) -> None:
    """One worker process: its annotators as threads, their results back over `conn`."""
    stop = threading.Event()
    annotators = [Annotator(name, opts, stop, shared, seed + i) for i, name in enumerate(names)]
    [a.start() for a in annotators]
    conn.send("ready")
    shared["stop"].wait()
    stop.set()
    for a in annotators:
        a.join(opts["timeout"] + 30)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    conn.send({"annotators": [a.result() for a in annotators], "cpu_s": usage.ru_utime + usage.ru_stime})
    conn.close()
