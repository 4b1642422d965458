"""How soon the CPU demo shows its first pair, and whether one annotator ever waits.

    python bench/demo_first_pair.py                        # make demo's server, 3 minutes of votes, 3 runs
    python bench/demo_first_pair.py --repeat 1 --duration 60
    python bench/demo_first_pair.py -- --pregenerated none --max-new-tokens 256   # as before #17

Starts the serve command of `make demo` (read from the Makefile, plus any flags after
`--`) with a fresh store in a temporary folder, on a free port of 127.0.0.1, offline
(HF_HUB_OFFLINE=1, GRADIO_ANALYTICS_ENABLED=False), and measures

    start_to_url_s        process start -> the "open URL" line on stdout
    url_to_first_pair_s   that line -> the first /next answer with a pair (gradio_client,
                          asking every 0.2 s; the client's own connect counts)

then one simulated annotator takes 10 s (--every) over each pair and votes, for
--duration seconds after the first pair; when a vote's answer has no next pair it asks
/next once a second until one comes. `waits` counts /next and /vote answers without a
pair, `longest_wait_s` the longest stretch without one. `head_start` is the server's own
line about the pregenerated pairs it took, `generated` how many pairs its generator made
meanwhile (a head start of H pairs lasts about H / (votes - generated) times the run).
With --repeat N the figures are medians over N runs (each run's are under "runs"). The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def demo_command() -> list[str]:
    """`make demo`'s serve flags, from the Makefile (so the bench follows the target)."""
    (line,) = [x for x in (REPO / "Makefile").read_text().splitlines() if "preflab serve" in x]
    argv = shlex.split(line)
    return argv[argv.index("serve") + 1 :]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without(argv: list[str], flag: str) -> list[str]:
    """argv less `flag VALUE` (the bench gives its own --data, --port, --host)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def one_run(extra: list[str], duration: float, every: float) -> dict:
    from gradio_client import Client

    tmp = Path(tempfile.mkdtemp(prefix="preflab-bench-demo-"))
    argv = demo_command()
    for flag in ("--data", "--port", "--host", "--runs"):
        argv = without(argv, flag)
    port = free_port()
    argv += ["--data", str(tmp / "store"), "--runs", str(tmp / "runs"), "--user", "bench"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log_path = tmp / "server.log"
    load = os.getloadavg()[0]  # other work on the machine skews the figures
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "annotate.cli", "serve", *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    url_at = threading.Event()
    t_url = [None]

    def read_stdout() -> None:
        for line in proc.stdout:
            if line.startswith("open http") and t_url[0] is None:
                t_url[0] = time.perf_counter()
                url_at.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        if not url_at.wait(600):
            raise RuntimeError(f"no URL within 600 s:\n{log_path.read_text()[-3000:]}")
        url = f"http://127.0.0.1:{port}/"
        client = Client(url, verbose=False)
        view = client.predict(api_name="/next")
        while view["pair"] is None:
            time.sleep(0.2)
            view = client.predict(api_name="/next")
        t_first = time.perf_counter()
        # One annotator: every pair is looked at for `every` seconds, then voted on.
        votes, waits, longest, shown_at = 0, 0, 0.0, time.perf_counter()
        end = t_first + duration
        while time.perf_counter() < end:
            time.sleep(max(0.0, shown_at + every - time.perf_counter()))
            view = client.predict(view["pair"]["pair_id"], "left", "", "", api_name="/vote")
            votes += 1
            wait_from, waited = time.perf_counter(), False
            while view["pair"] is None:
                waits, waited = waits + 1, True
                time.sleep(1.0)
                view = client.predict(api_name="/next")
            shown_at = time.perf_counter()
            if waited:
                longest = max(longest, shown_at - wait_from)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    log_text = log_path.read_text(errors="replace")
    shutil.rmtree(tmp, ignore_errors=True)  # the run's store and log: nothing left in /tmp
    head = [line.split(" INFO ", 1)[-1] for line in log_text.splitlines() if "pregenerated pairs" in line]
    made = [re.search(r"preflab\.pairs INFO generated (\d+) pairs", line) for line in log_text.splitlines()]
    return {
        "start_to_url_s": round(t_url[0] - t0, 2),
        "url_to_first_pair_s": round(t_first - t_url[0], 2),
        "votes": votes,
        "waits": waits,
        "longest_wait_s": round(longest, 1),
        "head_start": head[0] if head else None,
        # pairs the server's generator made during the run (beside the head start): with the
        # votes, how long a head start lasts for an annotator faster than the model
        "generated": sum(int(m.group(1)) for m in made if m),
        "load_average_1m": round(load, 2),
        "command": ["preflab", "serve", *argv],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="runs; the figures are their medians")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of voting after the first pair")
    p.add_argument("--every", type=float, default=10.0, help="seconds the annotator takes per pair")
    p.add_argument("extra", nargs="*", help="more serve flags, after --")
    args = p.parse_args()
    runs = []
    for k in range(args.repeat):
        runs.append(one_run(args.extra, args.duration, args.every))
        print(f"run {k + 1}/{args.repeat}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    summary = {
        "bench": "demo_first_pair",
        "cpus": os.cpu_count(),
        "every_s": args.every,
        "duration_s": args.duration,
        "repeat": args.repeat,
    }
    summary["command"] = runs[-1]["command"]  # make demo's, with the bench's store, port and user
    for key in ("start_to_url_s", "url_to_first_pair_s", "votes", "waits", "longest_wait_s", "generated"):
        summary[key] = statistics.median(r[key] for r in runs)
    summary["head_start"] = runs[-1]["head_start"]
    summary["runs"] = runs
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
