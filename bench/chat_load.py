"""Load test of chat mode: N simulated annotators chat with two models at once and vote.

    python bench/chat_load.py --n 8
    python bench/chat_load.py --n 32 --conversations 4 --turns 3 --server-concurrency 8

Started here: a real OpenAI-compatible server (`preflab serve-model tiny`, the server the
tests use) and `preflab serve --chat` on a free port whose two models ("bench-a" and
"bench-b", one --endpoints file) are that server. Each annotator is a thread with its own
gradio_client.Client logged in with its own account; all start at one signal. Each has
--conversations conversations of --turns messages, pausing about --think-ms between
actions, and votes after the last turn of each (A / B / tie / both bad at random).

How the times are taken, on the client:

    ttft            time to first token: from submitting a message to /chat (gradio_client's
                    streaming job API, Client.submit) to the first streamed view in which
                    either side shows text. It includes gradio's queue join and event
                    stream and the service's coalescing (at most every 50 ms), as a page sees it.
    answer          from submitting to the last view (both answers complete).
    vote            one /chat_vote call: the vote durable in the store, then the ack.
    lost            votes acknowledged to a client but not in the store, counted after the
                    server was stopped (must be 0).

Clients and both servers share this machine's cores; load_avg_1m says what else ran.
The last line is one JSON object: n, ttft_p50_ms, ttft_p99_ms, answer_p50_ms,
answer_p99_ms, vote_p50_ms, vote_p99_ms, votes, lost, errors, and the settings.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench.login_flood import quantile as pct  # noqa: E402  (None for no values, 0.1 ms)
from bench.ui_load import free_port  # noqa: E402

TOPICS = ["plants", "running", "cooking", "python", "budget", "sleep", "travel", "music"]
CHOICES = ("left", "right", "tie", "both_bad")
LOGINS = threading.Semaphore(1)
LOGIN_TRIES = 5
LOGGED_IN: list = []  # who has logged in (None: gave up), for the common start


def start(cmd: list[str], ready_url: str, log_path: Path, *, ok_codes=(200,)) -> subprocess.Popen:
    """A preflab command as a process, once `ready_url` answers (an HTTP error counts as up
    when its code is in ok_codes)."""
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "annotate.cli", *cmd], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                return proc
        except urllib.error.HTTPError as e:
            if e.code in ok_codes:
                return proc
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not answer within 300 s:\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def has_text(view: dict) -> bool:
    for key in ("left", "right"):
        messages = view[key]["messages"]
        if messages and messages[-1]["role"] == "assistant" and messages[-1]["content"]:
            return True
    return False


def annotator(name: str, url: str, args, go: threading.Event, out: dict) -> None:
    """One annotator's session; its times and acknowledged event ids go into `out`."""
    from gradio_client import Client

    rng = random.Random(name)
    out.update(ttft=[], answer=[], vote=[], acked=[], errors=[])
    client = None
    for attempt in range(LOGIN_TRIES):
        # One login at a time (scrypt, and gradio_client's 5 s start-up timeout), retried:
        # logging in is not what is measured, and all start together afterwards.
        with LOGINS:
            try:
                client = Client(url, auth=(name, f"{name}-pw"), verbose=False)
                LOGGED_IN.append(name)
                break
            except Exception as e:
                if attempt == LOGIN_TRIES - 1:
                    out["errors"].append(f"login: {type(e).__name__}: {e}"[:300])
                    LOGGED_IN.append(None)
                    return
        time.sleep(1.0)
    go.wait()
    for c in range(args.conversations):
        cid = ""
        try:
            for t in range(args.turns):
                time.sleep(rng.uniform(0.5, 1.5) * args.think_ms / 1000)
                topic = rng.choice(TOPICS)
                message = f"Tell me about {topic}." if t == 0 else f"And more about {topic}, turn {t + 1}?"
                t0 = time.perf_counter()
                first, view = None, None
                for view in client.submit(cid, message, api_name="/chat"):
                    if first is None and has_text(view):
                        first = time.perf_counter()
                end = time.perf_counter()
                if view is None:
                    raise RuntimeError("no view came back")
                if first is not None:
                    out["ttft"].append(1000 * (first - t0))
                out["answer"].append(1000 * (end - t0))
                cid = view["conversation_id"]
            time.sleep(rng.uniform(0.5, 1.5) * args.think_ms / 1000)
            t0 = time.perf_counter()
            voted = client.predict(cid, rng.choice(CHOICES), "", "", api_name="/chat_vote")
            out["vote"].append(1000 * (time.perf_counter() - t0))
            if voted.get("ack"):
                out["acked"].append(voted["ack"]["event_id"])
            else:
                out["errors"].append(f"conversation {c}: not saved: {voted.get('message')}"[:300])
        except Exception as e:  # a refused turn or vote: counted, the annotator goes on
            out["errors"].append(f"conversation {c}: {type(e).__name__}: {e}"[:300])
    client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="simulated annotators chatting at once")
    p.add_argument(
        "--conversations", type=int, default=3, help="conversations per annotator, each ending in a vote"
    )
    p.add_argument("--turns", type=int, default=2, help="messages per conversation (the vote is on the last)")
    p.add_argument(
        "--think-ms",
        type=float,
        default=500,
        help="mean pause before each message and each vote (people take seconds)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens")
    p.add_argument(
        "--server-concurrency",
        type=int,
        default=4,
        help="sequences the model server writes at once (serve-model --concurrency); each of the two "
        "endpoints may use half",
    )
    p.add_argument("--device", default="cpu", help="where the model server runs the tiny model (cpu, cuda)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, store)")
    args = p.parse_args()

    from annotate.users import add_user
    from trainer.store import read_events

    tmp = Path(tempfile.mkdtemp(prefix="preflab-chat-load-"))
    names = [f"ann{i:02d}" for i in range(args.n)]
    for name in names:
        add_user(tmp / "users.toml", name, "annotator", f"{name}-pw")
    model_port, port = free_port(), free_port()
    base = f"http://127.0.0.1:{model_port}/v1"
    per_endpoint = max(1, args.server_concurrency // 2)
    entry = {
        "model_name": "tiny",
        "api_type": "openai",
        "api_base": base,
        "api_key": "-",
        "concurrency": per_endpoint,
    }
    (tmp / "endpoints.json").write_text(json.dumps({"bench-a": entry, "bench-b": entry}))
    os.chmod(tmp / "endpoints.json", 0o600)
    store = tmp / "store"
    url = f"http://127.0.0.1:{port}/"
    model_cmd = ["serve-model", "tiny", "--port", str(model_port), "--device", args.device]
    model_cmd += ["--max-new-tokens", str(args.max_new_tokens), "--concurrency", str(args.server_concurrency)]
    serve_cmd = ["serve", "--chat", "--model", "bench-a", "--model", "bench-b"]
    serve_cmd += [
        "--endpoints",
        str(tmp / "endpoints.json"),
        "--data",
        str(store),
        "--auth",
        str(tmp / "users.toml"),
    ]
    serve_cmd += ["--max-new-tokens", str(args.max_new_tokens), "--port", str(port), "--host", "127.0.0.1"]

    model_server = start(model_cmd, base + "/models", tmp / "serve-model.log")
    server = None
    try:
        server = start(serve_cmd, url, tmp / "serve.log")
        print(
            f"serve --chat pid {server.pid} at {url}; serve-model pid {model_server.pid}",
            file=sys.stderr,
            flush=True,
        )
        go = threading.Event()
        results = [{} for _ in names]
        threads = [
            threading.Thread(target=annotator, args=(name, url, args, go, out), daemon=True)
            for name, out in zip(names, results)
        ]
        for t in threads:
            t.start()
        while len(LOGGED_IN) < len(names) and any(t.is_alive() for t in threads):
            time.sleep(0.2)  # everyone logged in (or given up) before the common start
        t0 = time.perf_counter()
        go.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        stop(server)  # every acknowledged vote must now be in the store
        server = None
        stored = set(read_events(store)["event_id"].to_pylist()) if store.exists() else set()
    finally:
        if server is not None:
            stop(server)
        stop(model_server)
    acked = [e for r in results for e in r.get("acked", [])]
    errors = [e for r in results for e in r.get("errors", [])]
    for e in errors[:10]:
        print("error:", e, file=sys.stderr)
    ttft = [x for r in results for x in r.get("ttft", [])]
    answer = [x for r in results for x in r.get("answer", [])]
    vote = [x for r in results for x in r.get("vote", [])]
    summary = {
        "n": args.n,
        "conversations": args.conversations,
        "turns": args.turns,
        "max_new_tokens": args.max_new_tokens,
        "server_concurrency": args.server_concurrency,
        "ttft_p50_ms": pct(ttft, 0.50),
        "ttft_p99_ms": pct(ttft, 0.99),
        "answer_p50_ms": pct(answer, 0.50),
        "answer_p99_ms": pct(answer, 0.99),
        "vote_p50_ms": pct(vote, 0.50),
        "vote_p99_ms": pct(vote, 0.99),
        "turns_answered": len(answer),
        "votes": len(acked),
        "lost": len(set(acked) - stored),
        "errors": len(errors),
        "elapsed_s": round(elapsed, 1),
        "load_avg_1m": os.getloadavg()[0],
    }
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
