"""Load test of the annotation app: N simulated annotators arrive together, log in and vote.

    python bench/ui_load.py --n 512 --think-ms 10000 --duration 60
    python bench/ui_load.py --n 32 --client gradio_client     # the old client, to compare

A real `preflab serve --pairs ... --auth ...` process runs on a free port. The annotators
are spread over --procs worker processes (default min(8, n/32)), each running its share
as threads; all of them start at one signal, as at the start of an annotation session.
Each logs in, fetches a pair, thinks for a while (uniform in [0.5, 1.5] x --think-ms),
votes, and now and then skips a pair or reloads it (a /next call). Half way through, the
server is killed with SIGKILL while votes are in flight, then started again on the same
store; everyone logs in again (arriving together once more) and carries on. Each worker
sends its annotators' latencies and acknowledged vote ids back to this process over a
pipe; the summary is computed here.

Why several processes: the annotators of one process share one GIL, so past some N the
client's own parsing delays every other client's timer and the latencies grow on the
client side alone. Spread over processes, and with client_cpu_s reported beside
server_cpu_s, a run shows which side spent the time (in issue #12's runs the clients
used under a tenth of the server's CPU: the server was the limit).

Why raw HTTP by default (--client http): a browser tab logs in (POST /login), reads
/config once, and for each click POSTs /gradio_api/queue/join and reads the result from
the /gradio_api/queue/data event stream. `http` does exactly that with one keep-alive
connection per annotator (http.client, stdlib), calling the same queued /vote, /next and
/skip functions as gradio_client. gradio_client is not what a page does: each Client also
fetches /gradio_api/info (the whole API schema, which a page never asks for), starts
three thread pools and a heartbeat thread, and gives its start-up requests httpx's 5 s
timeout, so a slow login shows up as a failed client rather than as a long wait (at
--n 256 every Client timed out while the server checked passwords on its event loop).
It stays available as --client gradio_client. A login answered 503 (all password checks
taken) or 429 (throttled) is retried after its Retry-After, as a person would.

Reported (the last line is one JSON object):

    votes_per_s     acknowledged votes per second of run time (from the arrival of all
                    annotators to the end of each half; the restart itself not counted)
    vote_p50/p99    latency of one vote call: store the vote durably, return the ack
                    AND the next pair (one round trip: queue/join + its event stream)
    next_p50/p99    latency of the calls that only fetch a pair: /next and /skip
    logins_ok       annotators logged in, out of n, summed over both halves (2n at best)
    login_p50/p99   from the common arrival to logged in (POST /login, GET /config, the
                    first pair): what a person waits for after pressing "Login"
    timeouts        requests that got no answer within --timeout seconds (the annotator
                    reloads and carries on)
    logins_busy / logins_throttled   logins answered 503 / 429 (then retried)
    vote_p99_during_logins_ms / vote_p99_after_logins_ms   votes answered while others
                    were still logging in, and after everyone was in
    steady_cpu_ms_per_call   server CPU per call once everyone is in (idle work included)
    lost            votes acknowledged to a client but not in the store (must be 0),
                    counted after the kill and again at the end
    restart_s       from starting the killed server again to its first answer
    server_cpu_s / client_cpu_s   CPU seconds of the server and of all workers while
                    voting: on a shared machine, who is spending the cores

Clients and server share this machine's cores; load_avg_1m says what else ran.
"""

import argparse
import collections
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ui_load_clients import worker  # noqa: E402 (run as a script or imported as bench.ui_load)

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


def run_phase(
    names: list[str],
    opts: dict,
    procs: int,
    seconds: float,
    seed: int,
    proc: subprocess.Popen,
    kill_at_end: bool,
) -> dict:
    """One server life: everyone arrives at once, logs in, votes for `seconds` after the
    last login (or --login-wait), then the server is killed (kill_at_end) or left up."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    shared = {
        "start": ctx.Event(),
        "stop": ctx.Event(),
        "logged_in": ctx.Value("i", 0),
        "in_flight": ctx.Value("i", 0),
        "calls": ctx.Value("i", 0, lock=False),  # counted under in_flight's lock
    }
    pipes, workers = [], []
    for i in range(procs):
        reader, writer = ctx.Pipe(duplex=False)
        w = ctx.Process(
            target=worker, args=(names[i::procs], opts, seed + i * len(names), shared, writer), daemon=True
        )
        w.start()
        writer.close()
        pipes.append(reader)
        workers.append(w)
    for reader in pipes:
        reader.recv()  # "ready": every annotator is a thread waiting for the start
    cpu0 = cpu_seconds(proc.pid)
    t0 = time.perf_counter()
    shared["start"].set()
    deadline = t0 + opts["login_wait"]
    while shared["logged_in"].value < len(names) and time.perf_counter() < deadline:
        time.sleep(0.05)
    t_all_in = time.perf_counter()
    login_s = t_all_in - t0
    cpu_in, calls_in = cpu_seconds(proc.pid), shared["calls"].value
    time.sleep(seconds)
    cpu1 = cpu_seconds(proc.pid)  # before a kill; the few calls after it are not counted
    calls = shared["calls"].value - calls_in
    if kill_at_end:
        deadline = time.perf_counter() + 2
        while shared["in_flight"].value == 0 and time.perf_counter() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)  # mid-run: calls are in flight right now
        proc.wait()
    shared["stop"].set()
    elapsed = time.perf_counter() - t0
    results = []
    for reader, w in zip(pipes, workers, strict=True):
        results.append(reader.recv())
        w.join(30)
    annotators = [a for r in results for a in r["annotators"]]
    for a in annotators:  # votes answered while others were still logging in, and after
        a["vote_ms_storm"] = [ms for ms, at in zip(a["vote_ms"], a["vote_at"], strict=True) if at <= t_all_in]
        a["vote_ms_after"] = [ms for ms, at in zip(a["vote_ms"], a["vote_at"], strict=True) if at > t_all_in]
    return {
        "annotators": annotators,
        "client_cpu_s": sum(r["cpu_s"] for r in results),
        "server_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
        "elapsed": elapsed,
        "login_s": login_s,
        # once everyone is in: the server's CPU per vote, skip or reload, logins excluded
        "steady_cpu_ms_per_call": 1000 * (cpu1 - cpu_in) / calls if calls and cpu1 is not None else None,
    }


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
    p.add_argument(
        "--duration", type=float, default=30, help="seconds of voting in all (two halves), after the logins"
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=1000,
        help="mean pause between an annotator's actions (people take 5-30 s)",
    )
    p.add_argument(
        "--procs", type=int, default=None, help="worker processes; default min(8, n/32), at least 1"
    )
    p.add_argument(
        "--client",
        choices=("http", "gradio_client"),
        default="http",
        help="http: the page's own requests; gradio_client: one gradio_client.Client per annotator",
    )
    p.add_argument(
        "--timeout", type=float, default=30, help="seconds a request may take before it counts as a timeout"
    )
    p.add_argument(
        "--login-wait", type=float, default=120, help="longest wait for everyone to log in, per half"
    )
    p.add_argument("--pairs", type=int, default=5000, help="pairs in the generated pairs file")
    p.add_argument("--overlap", type=int, default=1)
    p.add_argument("--no-kill", action="store_true", help="do not kill -9 the server half way")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    procs = max(1, min(args.n, args.procs if args.procs else min(8, args.n // 32)))

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
    opts = {
        "url": url,
        "client": args.client,
        "think_ms": args.think_ms,
        "timeout": args.timeout,
        "login_wait": args.login_wait,
    }

    phases = []
    proc, _ = start_server(server_args, url, log)
    print(f"server pid {proc.pid} at {url}", file=sys.stderr, flush=True)  # for py-spy, top
    try:
        first = run_phase(names, opts, procs, args.duration / 2, 0, proc, kill_at_end=not args.no_kill)
        phases.append(first)
        acked = {e for a in first["annotators"] for e in a["acked"]}
        lost_after_kill = len(acked - stored_event_ids(store))
        restart_s = None
        if not args.no_kill:
            proc, restart_s = start_server(server_args, url, log)
            print(f"server pid {proc.pid} (restarted)", file=sys.stderr, flush=True)
        phases.append(run_phase(names, opts, procs, args.duration / 2, 10**6, proc, kill_at_end=False))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    everyone = [a for phase in phases for a in phase["annotators"]]
    acked = {e for a in everyone for e in a["acked"]}
    lost = len(acked - stored_event_ids(store))
    problems = collections.Counter(p for a in everyone for p in a["problems"])
    for problem, count in problems.most_common(10):
        print(f"{count:6d} x {problem}", file=sys.stderr)
    vote_ms = [x for a in everyone for x in a["vote_ms"]]
    next_ms = [x for a in everyone for x in a["next_ms"]]
    login_ms = [a["login_ms"] for a in everyone if a["login_ms"] is not None]
    seconds = sum(phase["elapsed"] for phase in phases)
    server_cpu = [phase["server_cpu_s"] for phase in phases]
    server_cpu_s = sum(server_cpu) if None not in server_cpu else None
    result = {
        "bench": "ui_load",
        "n": args.n,
        "procs": procs,
        "client": args.client,
        "think_ms": args.think_ms,
        "duration_s": round(seconds, 1),
        "votes": len(acked),
        "votes_per_s": round(len(acked) / seconds, 1),
        "vote_p50_ms": round(pct(vote_ms, 0.5), 1),
        "vote_p99_ms": round(pct(vote_ms, 0.99), 1),
        # the same votes, split: answered before everyone was in (during the login storm), and after
        "vote_p99_during_logins_ms": round(pct([x for a in everyone for x in a["vote_ms_storm"]], 0.99), 1),
        "votes_during_logins": sum(len(a["vote_ms_storm"]) for a in everyone),
        "vote_p99_after_logins_ms": round(pct([x for a in everyone for x in a["vote_ms_after"]], 0.99), 1),
        "next_p50_ms": round(pct(next_ms, 0.5), 1),
        "next_p99_ms": round(pct(next_ms, 0.99), 1),
        "next_calls": len(next_ms),
        "logins_ok": len(login_ms),
        "logins_wanted": 2 * args.n,
        "login_p50_ms": round(pct(login_ms, 0.5), 1),
        "login_p99_ms": round(pct(login_ms, 0.99), 1),
        "login_all_s": [round(phase["login_s"], 1) for phase in phases],
        "timeouts": sum(a["timeouts"] for a in everyone),
        # logins answered "busy, retry after N s" (503) or "throttled" (429), each retried as asked
        "logins_busy": sum(a["refused"].get("503", 0) for a in everyone),
        "logins_throttled": sum(a["refused"].get("429", 0) for a in everyone),
        "lost_after_kill": lost_after_kill,
        "lost": lost,
        "killed": not args.no_kill,
        "restart_s": round(restart_s, 2) if restart_s is not None else None,
        "client_errors": sum(a["errors"] for a in everyone),
        # server process CPU while voting, per acknowledged vote (logins, skips and reloads included)
        "server_cpu_ms_per_vote": round(1000 * server_cpu_s / len(acked), 2)
        if acked and server_cpu_s
        else None,
        "server_cpu_s": round(server_cpu_s, 1) if server_cpu_s is not None else None,
        "steady_cpu_ms_per_call": [
            round(phase["steady_cpu_ms_per_call"], 2) if phase["steady_cpu_ms_per_call"] else None
            for phase in phases
        ],
        "client_cpu_s": round(sum(phase["client_cpu_s"] for phase in phases), 1),
        "vote_mean_ms": round(statistics.fmean(vote_ms), 1) if vote_ms else None,
        "cpus": os.cpu_count(),
        # the machine's load at the end: other work on a shared machine skews every number here
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(
        f"{args.n} annotators in {procs} processes ({args.client}), {seconds:.0f}s, think {args.think_ms:.0f} ms: "
        f"{result['logins_ok']}/{2 * args.n} logins (p50/p99 {result['login_p50_ms']}/{result['login_p99_ms']} ms), "
        f"{len(acked)} votes acknowledged, {lost} lost; vote p50/p99 {result['vote_p50_ms']}/"
        f"{result['vote_p99_ms']} ms, next pair p50/p99 {result['next_p50_ms']}/{result['next_p99_ms']} ms, "
        f"{result['timeouts']} timeouts"
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
