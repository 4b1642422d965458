"""Load test of the annotation app: N simulated annotators vote through the gradio API.

    python bench/ui_load.py --n 32 --duration 30

A real `preflab serve --pairs ... --auth ...` process runs on a free port; N threads,
each a logged-in gradio_client.Client, act like annotators: fetch a pair, think for a
while (uniform in [0.5, 1.5] x --think-ms), vote, and now and then skip a pair or
reload the page (a /next call). Half way through, the server is killed with SIGKILL
while votes are in flight, then started again on the same store; the annotators log
in again and carry on.

Reported (the last line is one JSON object):

    votes_per_s     acknowledged votes per second of run time (restart not counted)
    vote_p50/p99    latency of one vote call: store the vote durably, return the ack
                    AND the next pair (one round trip)
    next_p50/p99    latency of the calls that only fetch a pair: /next and /skip
    lost            votes acknowledged to a client but not in the store (must be 0),
                    counted after the kill and again at the end
    restart_s       from starting the killed server again to its first answer

Latencies are as the client sees them, gradio_client included: that client polls its
event stream every 50 ms, which sets a floor of a few tens of milliseconds under every
number here. Clients and server share this machine's cores.
"""

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PARAGRAPH = (
    "The quick answer is that it depends on what you measure. **First**, check the "
    "units: a kilogram of bricks weighs what a kilogram of cotton weighs. Second, "
    "consider the `edge cases` and say what you assume. "
)


def write_pairs(path: Path, n: int) -> None:
    """n pairs with answers of a realistic size (0.5-2 KB of Markdown each)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            answers = [
                PARAGRAPH * rng.randint(2, 8) + f"\n\n- point {i}\n- point {i + 1}\n" for _ in range(2)
            ]
            f.write(
                json.dumps(
                    {
                        "prompt": f"Question {i}: explain the difference, briefly.",
                        "response_a": answers[0],
                        "response_b": answers[1] + " (b)",
                        "model_a": "model-x",
                        "model_b": "model-y",
                    }
                )
                + "\n"
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], url: str, log_path: Path) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "annotate.cli", "serve", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(0.1)


class Annotator(threading.Thread):
    """One simulated annotator, for one phase (one server life)."""

    def __init__(
        self,
        name: str,
        url: str,
        think_ms: float,
        stop: threading.Event,
        seed: int,
        skip_rate: float = 0.05,
        reload_rate: float = 0.05,
    ):
        super().__init__(daemon=True)
        self.name_, self.url, self.think_ms, self.stop = name, url, think_ms, stop
        self.rng = random.Random(seed)
        self.skip_rate, self.reload_rate = skip_rate, reload_rate
        self.vote_ms: list[float] = []
        self.next_ms: list[float] = []
        self.acked: list[str] = []
        self.errors = 0
        self.client = None

    def connect(self) -> None:
        from gradio_client import Client

        # http on loopback: ssl_verify=False only spares loading a CA bundle per request
        self.client = Client(self.url, auth=(self.name_, f"{self.name_}-pw"), verbose=False, ssl_verify=False)
        # A client's first call also opens its event stream and reads the API schema:
        # that is client start-up (a browser does it on page load), not a pair fetch.
        self.first_view = self.client.predict(api_name="/next")

    in_flight = 0  # calls under way, all annotators together (read by the killer)

    def _timed(self, into: list[float], *args, api_name: str) -> dict:
        Annotator.in_flight += 1
        try:
            t0 = time.perf_counter()
            view = self.client.predict(*args, api_name=api_name)
            into.append((time.perf_counter() - t0) * 1000)
            return view
        finally:
            Annotator.in_flight -= 1

    def run(self) -> None:
        try:
            view = self.first_view
            while not self.stop.is_set():
                if self.think_ms:
                    time.sleep(self.think_ms / 1000 * self.rng.uniform(0.5, 1.5))
                if self.stop.is_set():
                    break
                pair = view["pair"]
                r = self.rng.random()
                if pair is None or r < self.reload_rate:
                    view = self._timed(self.next_ms, api_name="/next")
                elif r < self.reload_rate + self.skip_rate:
                    view = self._timed(self.next_ms, pair["pair_id"], api_name="/skip")
                else:
                    choice = self.rng.choice(("left", "right", "left", "right", "tie", "both_bad"))
                    view = self._timed(
                        self.vote_ms,
                        pair["pair_id"],
                        choice,
                        self.rng.choice(("", "slightly", "clearly")),
                        "",
                        api_name="/vote",
                    )
                    if view["ack"]:
                        self.acked.append(view["ack"]["event_id"])
        except Exception:
            # The server was killed under us (expected once), or a real failure: counted.
            self.errors += 1
        finally:
            if self.client is not None:
                try:
                    self.client.close()
                except Exception:
                    pass


def run_phase(
    url: str,
    names: list[str],
    think_ms: float,
    seconds: float,
    seed: int,
    proc: subprocess.Popen,
    kill_at_end: bool,
) -> tuple[list[Annotator], float, float | None]:
    stop = threading.Event()
    annotators = [Annotator(name, url, think_ms, stop, seed + i) for i, name in enumerate(names)]
    connectors = [threading.Thread(target=a.connect) for a in annotators]
    [t.start() for t in connectors]
    [t.join() for t in connectors]
    cpu0 = cpu_seconds(proc.pid)
    t0 = time.perf_counter()
    [a.start() for a in annotators]
    time.sleep(seconds)
    cpu1 = cpu_seconds(proc.pid)  # before a kill; the few calls after it are not counted
    if kill_at_end:
        deadline = time.perf_counter() + 2
        while Annotator.in_flight == 0 and time.perf_counter() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)  # mid-run: calls are in flight right now
        proc.wait()
    stop.set()
    elapsed = time.perf_counter() - t0
    for a in annotators:
        a.join(60)
    cpu_used = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return annotators, elapsed, cpu_used


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), to tell server from client cost."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def stored_event_ids(store: Path) -> set[str]:
    from trainer.store import read_events

    return set(read_events(store)["event_id"].to_pylist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="simulated annotators")
    p.add_argument("--duration", type=float, default=30, help="seconds of voting in all (two halves)")
    p.add_argument(
        "--think-ms",
        type=float,
        default=1000,
        help="mean pause between an annotator's actions (people take 5-30 s)",
    )
    p.add_argument("--pairs", type=int, default=5000, help="pairs in the generated pairs file")
    p.add_argument("--overlap", type=int, default=1)
    p.add_argument("--no-kill", action="store_true", help="do not kill -9 the server half way")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()

    from annotate.users import add_user

    tmp = Path(tempfile.mkdtemp(prefix="preflab-ui-load-"))
    names = [f"ann{i:02d}" for i in range(args.n)]
    for name in names:
        add_user(tmp / "users.toml", name, "annotator", f"{name}-pw")
    write_pairs(tmp / "pairs.jsonl", args.pairs)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    store = tmp / "store"
    server_args = [
        "--pairs",
        str(tmp / "pairs.jsonl"),
        "--data",
        str(store),
        "--auth",
        str(tmp / "users.toml"),
        "--overlap",
        str(args.overlap),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    log = tmp / "server.log"

    phases = []
    proc, _ = start_server(server_args, url, log)
    try:
        first, t_first, cpu_first = run_phase(
            url, names, args.think_ms, args.duration / 2, 0, proc, kill_at_end=not args.no_kill
        )
        phases.append((first, t_first))
        acked = {e for a in first for e in a.acked}
        lost_after_kill = len(acked - stored_event_ids(store))
        restart_s = None
        if not args.no_kill:
            proc, restart_s = start_server(server_args, url, log)
        second, t_second, cpu_second = run_phase(
            url, names, args.think_ms, args.duration / 2, 1000, proc, kill_at_end=False
        )
        phases.append((second, t_second))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    everyone = [a for group, _ in phases for a in group]
    acked = {e for a in everyone for e in a.acked}
    lost = len(acked - stored_event_ids(store))
    vote_ms = [x for a in everyone for x in a.vote_ms]
    next_ms = [x for a in everyone for x in a.next_ms]
    seconds = sum(t for _, t in phases)
    result = {
        "bench": "ui_load",
        "n": args.n,
        "think_ms": args.think_ms,
        "duration_s": round(seconds, 1),
        "votes": len(acked),
        "votes_per_s": round(len(acked) / seconds, 1),
        "vote_p50_ms": round(pct(vote_ms, 0.5), 1),
        "vote_p99_ms": round(pct(vote_ms, 0.99), 1),
        "next_p50_ms": round(pct(next_ms, 0.5), 1),
        "next_p99_ms": round(pct(next_ms, 0.99), 1),
        "next_calls": len(next_ms),
        "lost_after_kill": lost_after_kill,
        "lost": lost,
        "killed": not args.no_kill,
        "restart_s": round(restart_s, 2) if restart_s is not None else None,
        "client_errors": sum(a.errors for a in everyone),
        # server process CPU while voting, per acknowledged vote (skips and reloads included)
        "server_cpu_ms_per_vote": (
            round(1000 * (cpu_first + cpu_second) / len(acked), 2)
            if acked and cpu_first is not None and cpu_second is not None
            else None
        ),
        "vote_mean_ms": round(statistics.fmean(vote_ms), 1) if vote_ms else None,
        "cpus": os.cpu_count(),
    }
    print(
        f"{args.n} annotators, {seconds:.0f}s, think {args.think_ms:.0f} ms: {len(acked)} votes acknowledged, "
        f"{lost} lost; vote p50/p99 {result['vote_p50_ms']}/{result['vote_p99_ms']} ms, next pair "
        f"p50/p99 {result['next_p50_ms']}/{result['next_p99_ms']} ms"
        + (f"; server killed with SIGKILL half way, back in {restart_s:.1f}s" if restart_s else "")
    )
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
