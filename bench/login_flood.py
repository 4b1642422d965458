"""Do wrong-password floods slow the annotators down? Vote latency with and without one.

    python bench/login_flood.py --annotators 8 --flooders 8 --seconds 20

A real `preflab serve --auth` runs on a free port. `--annotators` gradio_client
annotators vote (thinking ~--think-ms between votes) for --seconds with no flood, then
for --seconds more while `--flooders` threads post wrong passwords to /login as fast as
the server answers. Each flooder sends from its own rotating loopback addresses
(127.0.0.2 ... 127.0.0.254) and invents a new name per try, so neither the per-address
nor the per-account throttle engages: every try costs the server one scrypt. That is
the worst case for the event loop; a flood from one address is cut off by the throttle
after 20 tries and costs nothing after that (reported as `throttled_429`).

Before the fix (scrypt inside gradio's async /login), 8 flooders raised the median vote
latency of working annotators from 73 ms to 919 ms. Last line: one JSON object with
vote_p50/p99 for both phases, login tries per second and the answers' status counts.
"""

import argparse
import collections
import json
import os
import random
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

from bench.ui_load import free_port, write_pairs  # noqa: E402


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def annotate(
    url: str, name: str, think_ms: float, stop: threading.Event, phase: list[str], out: dict
) -> None:
    from gradio_client import Client

    rng = random.Random(name)
    c = Client(url, auth=(name, f"{name}-pw"), verbose=False, ssl_verify=False)
    view = c.predict(api_name="/next")
    while not stop.is_set():
        time.sleep(think_ms / 1000 * rng.uniform(0.5, 1.5))
        pair = view["pair"]
        t0 = time.perf_counter()
        if pair is None:
            view = c.predict(api_name="/next")
            continue
        view = c.predict(pair["pair_id"], rng.choice(("left", "right")), "", "", api_name="/vote")
        out[phase[0]].append((time.perf_counter() - t0) * 1000)
    c.close()


def flood(
    url: str, index: int, stop: threading.Event, statuses: collections.Counter, one_address: bool
) -> None:
    import httpx

    rng = random.Random(index)
    tries = 0
    while not stop.is_set():
        address = "127.0.0.1" if one_address else f"127.0.0.{2 + (index * 31 + tries) % 253}"
        with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30) as http:
            for _ in range(5):  # a few tries per connection, as a script would
                if stop.is_set():
                    break
                name = f"guess{index}-{rng.randrange(10**9)}"
                try:
                    r = http.post(url + "login", data={"username": name, "password": "wrong"})
                    statuses[r.status_code] += 1
                except httpx.HTTPError:
                    statuses["error"] += 1
                tries += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotators", type=int, default=8, help="simulated annotators voting throughout")
    p.add_argument("--flooders", type=int, default=8, help="threads posting wrong passwords in phase two")
    p.add_argument("--seconds", type=float, default=20, help="length of each phase")
    p.add_argument("--think-ms", type=float, default=200, help="mean pause between an annotator's votes")
    p.add_argument(
        "--one-address", action="store_true", help="flood from 127.0.0.1 only (the throttle engages)"
    )
    args = p.parse_args()

    from annotate.users import add_user

    tmp = Path(tempfile.mkdtemp(prefix="preflab-login-flood-"))
    names = [f"ann{i}" for i in range(args.annotators)]
    for name in names:
        add_user(tmp / "users.toml", name, "annotator", f"{name}-pw")
    write_pairs(tmp / "pairs.jsonl", 4000)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    serve = [
        "--pairs",
        str(tmp / "pairs.jsonl"),
        "--data",
        str(tmp / "store"),
        "--auth",
        str(tmp / "users.toml"),
    ]
    log = open(tmp / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "annotate.cli", "serve", *serve, "--port", str(port)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.2)

        latencies: dict[str, list[float]] = {"quiet": [], "flood": []}
        phase = ["quiet"]
        stop = threading.Event()
        workers = [
            threading.Thread(
                target=annotate, args=(url, n, args.think_ms, stop, phase, latencies), daemon=True
            )
            for n in names
        ]
        [w.start() for w in workers]
        time.sleep(args.seconds)
        phase[0] = "flood"
        statuses: collections.Counter = collections.Counter()
        stop_flood = threading.Event()
        flooders = [
            threading.Thread(target=flood, args=(url, i, stop_flood, statuses, args.one_address), daemon=True)
            for i in range(args.flooders)
        ]
        t0 = time.perf_counter()
        [f.start() for f in flooders]
        time.sleep(args.seconds)
        stop_flood.set()
        stop.set()
        elapsed = time.perf_counter() - t0
        [t.join(30) for t in flooders + workers]
    finally:
        proc.terminate()
        proc.wait(30)
    quiet, flooded = latencies["quiet"], latencies["flood"]
    result = {
        "annotators": args.annotators,
        "flooders": args.flooders,
        "one_address": args.one_address,
        "votes_quiet": len(quiet),
        "votes_flood": len(flooded),
        "vote_p50_quiet_ms": quantile(quiet, 0.5),
        "vote_p99_quiet_ms": quantile(quiet, 0.99),
        "vote_p50_flood_ms": quantile(flooded, 0.5),
        "vote_p99_flood_ms": quantile(flooded, 0.99),
        "vote_mean_flood_ms": round(statistics.fmean(flooded), 1) if flooded else None,
        "login_tries_per_s": round(sum(statuses.values()) / elapsed, 1),
        "wrong_password_400": statuses.get(400, 0),
        "throttled_429": statuses.get(429, 0),
        "busy_503": statuses.get(503, 0),
        "errors": statuses.get("error", 0),
        "cores": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
