"""Trainings started from the page (the Train tab), and the arena's added models.

A run is a subprocess, `python -m trainer.reward ...` or `python -m trainer.policy ...`,
in its own session: the page never waits for it, and stopping or restarting the server
does not stop it. Everything the page shows is read back from the run directory
(DESIGN.md, "Run directories"), so a reloaded page, a restarted server and a run started
with the CLI all look the same:

    runs/<id>/launch.json    written here: kind, command line, pid, when (not by the CLI)
    runs/<id>/status.json    written by the trainer (pre-created here as `queued`)
    runs/<id>/config.json    written by the trainer; says reward or policy for CLI runs
    runs/<id>/metrics.jsonl  read incrementally (MetricsReader)
    runs/<id>/log.txt        the trainer's stdout and stderr

A run whose process is gone while its status still says queued or running is shown as
failed ("process exited without a final status"). Cancel sends SIGTERM, after checking
that the pid is still that run's trainer; the trainer saves and stops as `cancelled`.

The arena: `add_to_arena` puts a finished policy (runs/<id>/policy) into the running
Generator under the name <id>, and records it in <state>/arena.json so that a restarted
server with the same --data serves it again (`restore_arena`). <state> is the server's
local state directory (`service.state_dir`): the store directory itself for a directory
store; for a PostgreSQL store, a local directory of the server's (arena.json is not a vote).

Nothing heavy is imported here: the server stays light, the trainers load torch.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.runs import read_json, write_json

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO / "data" / "prompts.jsonl"

KINDS = ("reward", "policy")
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
LAUNCH_FILE = "launch.json"
LOG_FILE = "log.txt"
ARENA_FILE = "arena.json"
POLICY_DIR = "policy"             # trainer.policy: the finished policy, a HF model directory
REWARD_CHECKPOINT = "checkpoint"  # trainer.reward: the finished reward model
DEAD_MESSAGE = "process exited without a final status; see log.txt"
# Words in a trainer's command line (python -m trainer.x, preflab train-x, a script path).
TRAINER_WORDS = ("trainer.reward", "trainer.policy", "train-reward", "train-policy",
                 "trainer/reward.py", "trainer/policy.py")
MODEL_NAMES = ("smollm2", "smollm2-135m-instruct", "default", "tiny")
ALGOS = ("ppo", "rloo")
TIES = ("exclude", "include")

# What the Train tab plots, per kind: (title, [(record kind, key, series label), ...]).
PLOTS = {
    "reward": [("Loss", [("train", "loss", "train"), ("eval", "val_loss", "validation")]),
               ("Accuracy", [("train", "acc", "train"), ("eval", "val_acc", "validation")])],
    "policy": [("Reward", [("train", "reward_mean", "reward (mean)"), ("train", "objective", "reward - beta KL")]),
               ("KL to the reference", [("train", "kl", "KL per answer")])],
}


class LaunchError(ValueError):
    """A form value or a request that cannot start (or stop) a run. The message names the field."""


# --------------------------------------------------------------------------------------
# Reading metrics.jsonl while it grows
# --------------------------------------------------------------------------------------

class MetricsReader:
    """metrics.jsonl read incrementally: each update() reads only the bytes added since
    the last one. A half-written last line waits for its newline; a line that is not
    JSON is counted in `bad` and skipped. A resumed run rewrites the file (the trainer
    forgets steps after its checkpoint): that is noticed and the file read again, and a
    {"kind": "resume"} record drops the points after its step.

    Points are kept per (record kind, key): numbers only, by step."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.last_line = b""     # the last complete line read: seen again at offset, or the file was rewritten
        self.records = 0
        self.bad = 0
        self.points: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def update(self) -> int:
        """Read what was appended; returns how many records were new."""
        with self._lock:
            try:
                f = open(self.path, "rb")
            except FileNotFoundError:
                if self.offset:
                    self._reset()
                return 0
            with f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset or not self._same_prefix(f):
                    self._reset()
                f.seek(self.offset)
                data = f.read()
            end = data.rfind(b"\n")
            if end < 0:
                return 0        # nothing complete yet (or only a half-written line)
            lines = data[:end].split(b"\n")
            new = 0
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.bad += 1
                    continue
                if isinstance(record, dict):
                    self._add(record)
                    new += 1
            self.offset += end + 1
            self.last_line = lines[-1] + b"\n"
            self.records += new
            return new

    def _same_prefix(self, f) -> bool:
        if not self.offset:
            return True
        n = len(self.last_line)
        f.seek(self.offset - n)
        return f.read(n) == self.last_line

    def _add(self, record: dict) -> None:
        kind, step = record.get("kind", "train"), record.get("step")
        if kind == "resume" and isinstance(step, (int, float)):
            for key, pts in self.points.items():
                self.points[key] = [p for p in pts if p[0] <= step]
            return
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            return
        for key, value in record.items():
            if key in ("kind", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            self.points.setdefault((kind, key), []).append((float(step), float(value)))

    def series(self, kind: str, key: str) -> list[tuple[float, float]]:
        with self._lock:
            return list(self.points.get((kind, key), ()))

    def rows(self, specs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """Long-format rows {"step", "value", "series"} for a plot of several series."""
        out = []
        for kind, key, label in specs:
            out.extend({"step": s, "value": v, "series": label} for s, v in self.series(kind, key))
        return out


# --------------------------------------------------------------------------------------
# Processes: is this pid (still) that run's trainer?
# --------------------------------------------------------------------------------------

def _proc_start_time(pid: int) -> float | None:
    """When the process started (seconds since the epoch), from /proc; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = int(fields[19])    # field 22, counted from field 3 (the state)
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _proc_state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...); None when there is no such process.
    Without /proc: "?" if the pid exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"
    return "?"


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _names_run(argv: list[str], run_path: Path) -> bool:
    """Whether a command line names this run: its directory (any spelling ending in the
    run id) or its id as an argument."""
    run_id = run_path.name
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value == run_id or Path(value.rstrip("/")).name == run_id and "/" in value:
            return True
    return False


def trainer_identity(pid: int, run_path: Path, since: float | None) -> str:
    """'trainer': pid is this run's trainer (a trainer command line that names the run,
    or one that started before the run's last status update); 'dead': no such process,
    a zombie, or another program under a reused pid; 'unknown': alive, cannot tell."""
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return "dead"
    argv = _proc_cmdline(pid)
    if argv is None:
        return "unknown"    # no /proc: the pid exists, which is all we can say
    if not any(w in arg for arg in argv for w in TRAINER_WORDS):
        return "dead"       # the pid was reused by another program
    if _names_run(argv, run_path):
        return "trainer"
    started = _proc_start_time(pid)
    if since is not None and started is not None and started <= since + 1.0:
        return "trainer"    # a trainer that was already running when this run last reported
    return "dead"


# --------------------------------------------------------------------------------------
# One run, as the page shows it
# --------------------------------------------------------------------------------------

@dataclass
class RunInfo:
    run_id: str
    path: Path
    kind: str                  # reward | policy | unknown
    state: str                 # queued | running | done | failed | cancelled
    progress: float
    message: str
    created_at: float
    updated_at: float | None = None
    pid: int | None = None
    step: int | None = None
    total_steps: int | None = None
    base_model: str | None = None
    config: dict = field(default_factory=dict, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def servable(self) -> bool:
        """A finished policy the arena can load."""
        return self.kind == "policy" and self.state == "done" and (self.path / POLICY_DIR / "config.json").is_file()

    @property
    def trained_reward(self) -> bool:
        """A finished reward model a policy can be trained against."""
        return (self.kind == "reward" and self.state == "done"
                and (self.path / REWARD_CHECKPOINT / "config.json").is_file())

    @property
    def resumable(self) -> bool:
        """A stopped run started from the page: `Launcher.resume` can start it again."""
        return self.state in ("cancelled", "failed") and (self.path / LAUNCH_FILE).is_file()

    def row(self) -> list[Any]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created_at))
        return [self.run_id, self.kind, self.state, f"{100 * self.progress:.0f}%", self.message, created]


ROW_HEADERS = ["run", "kind", "state", "progress", "message", "created"]


def _kind_of(launch: dict, config: dict) -> str:
    for source in (launch, config):  # the trainers write their kind into config.json
        if source.get("kind") in KINDS:
            return source["kind"]
    # runs from before the trainers wrote it: tell by their settings
    settings = config.get("config") or {}
    if "reward" in settings or "algo" in settings or "reward_model" in config:
        return "policy"
    if "ties" in settings or "data" in config:
        return "reward"
    return "unknown"


# --------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------

class Launcher:
    """Starts, lists and cancels the trainings of one runs directory."""

    def __init__(self, runs_dir: str | os.PathLike, *, python: str = sys.executable,
                 env: dict[str, str] | None = None, store: str | os.PathLike | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.python = python
        self.env = env
        # Database passwords by the URL without them: trainers get the URL on their
        # command line and in launch.json / config.json, the password only in their
        # environment. `store` (the server's --data) is known from the start, so a
        # Resume after a server restart has it too.
        self._passwords: dict[str, str] = {}
        if store is not None:
            self._remember_password(store)
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}      # runs started by this process
        self._waiters: dict[str, threading.Thread] = {}    # their reapers
        self._cancelled: set[str] = set()
        self._readers: dict[str, MetricsReader] = {}

    # ---- reading runs ----------------------------------------------------------------

    def info(self, run_id: str) -> RunInfo | None:
        path = self.runs_dir / run_id
        if not run_id or "/" in run_id or run_id.startswith(".") or not path.is_dir():
            return None
        status = read_json(path / "status.json")
        launch = read_json(path / LAUNCH_FILE)
        config = read_json(path / "config.json")
        if not (status or launch or config):
            return None     # some other directory
        try:
            created = float(launch.get("created_at") or config.get("created_at") or path.stat().st_mtime)
        except (TypeError, ValueError):
            created = path.stat().st_mtime
        state = status.get("state") or "queued"
        message = str(status.get("message") or "")
        pid = status.get("pid") or launch.get("pid")
        updated = status.get("updated_at")
        if state in ACTIVE and isinstance(pid, int):
            self._reap()
            if trainer_identity(pid, path, updated) == "dead":
                state, message = "failed", DEAD_MESSAGE
        settings = config.get("config") or launch.get("settings") or {}
        try:
            progress = min(max(float(status.get("progress") or 0.0), 0.0), 1.0)
        except (TypeError, ValueError):
            progress = 0.0
        return RunInfo(run_id=run_id, path=path, kind=_kind_of(launch, config), state=state,
                       progress=progress, message=message, created_at=created, updated_at=updated,
                       pid=pid if isinstance(pid, int) else None, step=status.get("step"),
                       total_steps=status.get("total_steps"), base_model=settings.get("model"), config=config)

    def runs(self) -> list[RunInfo]:
        """Every run in the runs directory, newest first."""
        if not self.runs_dir.is_dir():
            return []
        out = []
        for entry in self.runs_dir.iterdir():
            if entry.is_dir():
                info = self.info(entry.name)
                if info is not None:
                    out.append(info)
        out.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return out

    def reward_models(self) -> list[str]:
        """Finished reward runs (newest first): what a policy can train against."""
        return [r.run_id for r in self.runs() if r.trained_reward]

    def metrics(self, run_id: str) -> MetricsReader:
        with self._lock:
            reader = self._readers.get(run_id)
            if reader is None:
                reader = self._readers[run_id] = MetricsReader(self.runs_dir / run_id / "metrics.jsonl")
        reader.update()
        return reader

    def log_tail(self, run_id: str, lines: int = 25, max_bytes: int = 16384) -> str:
        path = self.runs_dir / run_id / LOG_FILE
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
                data = f.read()
        except OSError:
            return ""
        # tqdm-style carriage returns: keep what a terminal would show
        text = data.decode(errors="replace").replace("\r\n", "\n")
        shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
        return "\n".join(shown[-lines:]).strip("\n")

    # ---- starting runs ---------------------------------------------------------------

    def start_reward(self, data: str | os.PathLike, *, model: Any = "smollm2", epochs: Any = 1,
                     lr: Any = 2e-5, ties: Any = "exclude", both_bad: Any = "exclude", lora_r: Any = 0,
                     batch_size: Any = 8, max_length: Any = 1024, run_id: str | None = None,
                     extra: list[str] | None = None) -> RunInfo:
        """Validate the form and start `python -m trainer.reward` on the store `data`
        (a directory, made absolute for the trainer, or a postgresql:// URL, passed on
        unchanged). Raises LaunchError (naming the field) and starts nothing when a value
        is bad."""
        from trainer.store import describe, is_database, store_exists

        if not data:
            raise LaunchError("Data: no comparison store given; there are no votes to train on yet")
        if is_database(data):
            target = self._remember_password(data)   # reachability is the trainer's to report, in its log
        else:
            target = str(Path(data).resolve())
            if not store_exists(target):
                raise LaunchError(f"Data: {data} does not exist; there are no votes to train on yet")
        settings = {
            "model": check_model_field(model, "Base model"),
            "epochs": int_field(epochs, "Epochs", minimum=1),
            "lr": float_field(lr, "Learning rate", positive=True),
            "ties": choice_field(ties, "Ties", TIES),
            "both_bad": choice_field(both_bad, "Both-bad votes", TIES),
            "lora_r": int_field(lora_r, "LoRA rank", minimum=0),
            "batch_size": int_field(batch_size, "Batch size", minimum=1),
            "max_length": int_field(max_length, "Max length", minimum=8),
        }
        argv = ["--data", target, "--model", settings["model"], "--epochs", str(settings["epochs"]),
                "--lr", repr(settings["lr"]), "--ties", settings["ties"], "--both-bad", settings["both_bad"],
                "--lora-r", str(settings["lora_r"]), "--batch-size", str(settings["batch_size"]),
                "--max-length", str(settings["max_length"]), *(extra or [])]
        return self._start("reward", argv, {**settings, "data": describe(target)}, run_id)

    def start_policy(self, reward_run: Any, *, algo: Any = "ppo", steps: Any = 100, lr: Any = 3e-6,
                     kl_coef: Any = 0.05, prompts: Any = "data/prompts.jsonl", model: Any = None,
                     batch_size: Any = 16, max_new_tokens: Any = 64, run_id: str | None = None,
                     extra: list[str] | None = None) -> RunInfo:
        """Validate the form and start `python -m trainer.policy` against a finished
        reward run; `model` (the starting policy) blank: the reward model's base model.
        Raises LaunchError (naming the field) and starts nothing when a value is bad."""
        reward_id = str(reward_run or "").strip()
        if not reward_id:
            raise LaunchError("Reward model: choose a finished reward run (train one first)")
        reward = self.info(reward_id)
        if reward is None:
            raise LaunchError(f"Reward model: there is no run {reward_id!r} in {self.runs_dir}")
        if not reward.trained_reward:
            raise LaunchError(f"Reward model: {reward_id} is not a finished reward run "
                              f"(kind {reward.kind}, state {reward.state})")
        settings = {
            "reward": str(reward.path),
            "algo": choice_field(algo, "Algorithm", ALGOS),
            "steps": int_field(steps, "Steps", minimum=1),
            "lr": float_field(lr, "Learning rate", positive=True),
            "kl_coef": float_field(kl_coef, "KL coefficient", minimum=0.0),
            "prompts": str(path_field(prompts, "Prompts file")),
            "model": check_model_field((reward.base_model or "smollm2") if _blank(model) else model, "Base model"),
            "batch_size": int_field(batch_size, "Batch size", minimum=1),
            "max_new_tokens": int_field(max_new_tokens, "Max new tokens", minimum=1),
        }
        argv = ["--reward", settings["reward"], "--algo", settings["algo"], "--steps", str(settings["steps"]),
                "--lr", repr(settings["lr"]), "--kl-coef", repr(settings["kl_coef"]), "--prompts", settings["prompts"],
                "--model", settings["model"], "--batch-size", str(settings["batch_size"]),
                "--max-new-tokens", str(settings["max_new_tokens"]), *(extra or [])]
        return self._start("policy", argv, settings, run_id)

    def _remember_password(self, target: str | os.PathLike) -> str:
        """The target without its password; the password kept for the trainers' env."""
        from trainer.store import without_password
        clean, password = without_password(target)
        if password is not None:
            self._passwords[clean] = password
        return clean

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"

    def _start(self, kind: str, args: list[str], settings: dict, run_id: str | None) -> RunInfo:
        run_id = run_id or self._new_id(kind)
        if "/" in run_id or run_id.startswith(".") or not run_id.strip():
            raise LaunchError(f"Run id: {run_id!r} is not a plain directory name")
        path = self.runs_dir / run_id
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise LaunchError(f"Run id: {path} already exists") from None
        argv = [self.python, "-m", f"trainer.{kind}", "--run-dir", str(path), "--no-progress", *args]
        launch = {"kind": kind, "argv": argv, "settings": settings, "created_at": time.time(),
                  "started_by": f"preflab serve (pid {os.getpid()})"}
        return self._spawn(run_id, path, argv, launch, "starting the trainer", 0.0)

    def resume(self, run_id: str, extra: list[str] | None = None) -> RunInfo:
        """Start a cancelled or failed run again with the command that launched it: the
        trainer resumes from its last checkpoint (or starts over if it saved none)."""
        info = self.info(run_id or "")
        if info is None:
            raise LaunchError(f"Run: there is no run {run_id!r}")
        if not info.resumable:
            raise LaunchError(f"{run_id} is {info.state}; only a cancelled or failed run started from "
                              f"this page can be resumed" + (" (this one was not)" if info.state in
                                                            ("cancelled", "failed") else ""))
        launch = read_json(info.path / LAUNCH_FILE)
        argv = list(launch.get("argv") or [])
        # Only ever a trainer on this very run directory, whatever launch.json says.
        if (argv[1:3] != ["-m", f"trainer.{info.kind}"] or "--run-dir" not in argv
                or argv[argv.index("--run-dir") + 1:][:1] != [str(info.path)]):
            raise LaunchError(f"{run_id}: {LAUNCH_FILE} does not hold this run's trainer command; "
                              f"resume it with the command that started it")
        with self._lock:
            self._cancelled.discard(run_id)
        return self._spawn(run_id, info.path, [self.python, *argv[1:], *(extra or [])],
                           {**launch, "resumed_at": time.time()}, "resuming from the last checkpoint",
                           info.progress)

    def _spawn(self, run_id: str, path: Path, argv: list[str], launch: dict, message: str,
               progress: float) -> RunInfo:
        # Shown at once, before the trainer has even imported torch.
        write_json(path / LAUNCH_FILE, launch)
        write_json(path / "status.json", {"state": "queued", "progress": progress,
                                          "message": message, "updated_at": time.time()})
        env = {**(self.env if self.env is not None else os.environ), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        data = argv[argv.index("--data") + 1] if "--data" in argv[:-1] else None
        if data in self._passwords:   # libpq reads it; it never touches the run directory
            env["PGPASSWORD"] = self._passwords[data]
        try:
            with open(path / LOG_FILE, "ab") as log:
                # A store URL's password stays out of the log (describe masks it).
                from trainer.store import describe
                log.write(("$ " + " ".join(map(describe, argv)) + "\n").encode())
                log.flush()
                # Its own session: Ctrl-C or SIGTERM to the server never reaches the run.
                proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            write_json(path / "status.json", {"state": "failed", "progress": 0.0, "updated_at": time.time(),
                                              "message": f"could not start the trainer: {e}"})
            raise LaunchError(f"could not start the trainer: {e}") from None
        write_json(path / LAUNCH_FILE, {**launch, "pid": proc.pid})
        waiter = threading.Thread(target=self._wait, args=(run_id, proc), name=f"preflab-run-{run_id}",
                                  daemon=True)
        with self._lock:
            self._procs[run_id] = proc
            self._waiters[run_id] = waiter
        waiter.start()
        return self.info(run_id)

    def _wait(self, run_id: str, proc: subprocess.Popen) -> None:
        """Reap the child (no zombie) and, if it left no final status, write one."""
        code = proc.wait()
        try:
            self._final_status(run_id, code)
        finally:
            self._forget(run_id)

    def _final_status(self, run_id: str, code: int) -> None:
        with self._lock:
            cancelled = run_id in self._cancelled
        path = self.runs_dir / run_id
        status = read_json(path / "status.json")
        if status.get("state") in FINAL:
            return
        if cancelled and code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            state, message = "cancelled", "cancelled before training started"
        else:
            state, message = "failed", f"process exited with code {code} without a final status; see log.txt"
            last = [line for line in self.log_tail(run_id, lines=5).splitlines() if line.strip()]
            if last:
                message += f" (last line: {last[-1][:300]})"
        write_json(path / "status.json", {**status, "state": state, "message": message,
                                          "exit_code": code, "updated_at": time.time()})

    def _forget(self, run_id: str) -> None:
        with self._lock:
            self._procs.pop(run_id, None)
            self._waiters.pop(run_id, None)

    def _reap(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            proc.poll()     # the waiter thread reaps too; this just makes it prompt

    # ---- cancelling ------------------------------------------------------------------

    def cancel(self, run_id: str) -> str:
        """SIGTERM to the run's trainer, which saves and stops as `cancelled`. Checks first
        that the pid is that run's trainer. Returns what happened, in words."""
        info = self.info(run_id or "")
        if info is None:
            raise LaunchError(f"Run: there is no run {run_id!r}")
        if not info.active:
            return f"{run_id} is already {info.state}; nothing to cancel"
        if info.pid is None:
            raise LaunchError(f"{run_id}: no process id recorded yet; try again in a moment")
        who = trainer_identity(info.pid, info.path, info.updated_at)
        if who != "trainer":
            raise LaunchError(f"{run_id}: process {info.pid} is not this run's trainer; nothing was signalled")
        with self._lock:
            self._cancelled.add(run_id)
        try:
            os.kill(info.pid, signal.SIGTERM)
        except ProcessLookupError:
            return f"{run_id}: the trainer had already exited"
        return f"{run_id}: cancel requested; the trainer saves its checkpoint and stops"

    def wait(self, run_id: str, timeout: float = 60.0) -> RunInfo | None:
        """Wait for a run started here to end (tests, scripts); returns its final info."""
        with self._lock:
            waiter = self._waiters.get(run_id)
        deadline = time.time() + timeout
        if waiter is not None:
            waiter.join(timeout)   # the process reaped and its final status written
        while time.time() < deadline:
            info = self.info(run_id)
            if info is None or not info.active:
                return info
            time.sleep(0.1)
        return self.info(run_id)


# --------------------------------------------------------------------------------------
# Form values
# --------------------------------------------------------------------------------------

def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def int_field(value: Any, name: str, *, minimum: int | None = None) -> int:
    if _blank(value):
        raise LaunchError(f"{name}: give a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise LaunchError(f"{name}: {value!r} is not a whole number")
    number = int(number)
    if minimum is not None and number < minimum:
        raise LaunchError(f"{name}: must be at least {minimum}, got {number}")
    return number


def float_field(value: Any, name: str, *, positive: bool = False, minimum: float | None = None) -> float:
    if _blank(value):
        raise LaunchError(f"{name}: give a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise LaunchError(f"{name}: {value!r} is not a finite number")
    if positive and number <= 0:
        raise LaunchError(f"{name}: must be positive, got {number:g}")
    if minimum is not None and number < minimum:
        raise LaunchError(f"{name}: must be at least {minimum:g}, got {number:g}")
    return number


def choice_field(value: Any, name: str, choices: tuple[str, ...]) -> str:
    text = str(value or "").strip().lower()
    if text not in choices:
        raise LaunchError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    return text


def path_field(value: Any, name: str) -> Path:
    """An existing file, relative to the working directory or else to the repository."""
    if _blank(value):
        raise LaunchError(f"{name}: give a file")
    path = Path(str(value).strip()).expanduser()
    for candidate in (path, REPO / path) if not path.is_absolute() else (path,):
        if candidate.exists():
            return candidate.resolve()
    raise LaunchError(f"{name}: {value} does not exist")


def check_model_field(value: Any, name: str) -> str:
    """smollm2 / tiny, a model directory (made absolute), or an org/name Hugging Face id
    (which the trainer looks up in the local cache: nothing is downloaded)."""
    text = str(value or "").strip()
    if not text:
        raise LaunchError(f"{name}: give a model: smollm2 (the default), tiny, a model directory "
                          f"or a Hugging Face id")
    if text.lower() in MODEL_NAMES or text.lower() == "huggingfacetb/smollm2-135m-instruct":
        return text
    path = Path(text).expanduser()
    for candidate in (path, REPO / path) if not path.is_absolute() else (path,):
        if candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise LaunchError(f"{name}: {text} is a directory but not a model (no config.json)")
            return str(candidate.resolve())
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text     # an org/name id; the trainer says clearly if it is not cached
    raise LaunchError(f"{name}: {text!r} is not smollm2, tiny, a model directory or a Hugging Face id")


# --------------------------------------------------------------------------------------
# The arena: finished policies served next to the models the server started with
# --------------------------------------------------------------------------------------

def arena_file(state_dir: str | os.PathLike) -> Path:
    """<state_dir>/arena.json. state_dir is the server's local state directory
    (`service.state_dir`), never a store URL: arena.json is a file, not a vote."""
    from trainer.store import is_database
    if is_database(state_dir):
        raise ValueError("the arena is kept in a local state directory, not in a database URL")
    return Path(state_dir) / ARENA_FILE


def read_arena(state_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The models added to the arena of this server: [{"model_id", "path", "added_at"}]."""
    models = read_json(arena_file(state_dir)).get("models")
    return [m for m in models if isinstance(m, dict) and m.get("model_id") and m.get("path")] \
        if isinstance(models, list) else []


def add_to_arena(generator, state_dir: str | os.PathLike, launcher: Launcher, run_id: str) -> str:
    """Put the finished policy of run `run_id` into the arena (votes on it carry the
    model id `run_id`) and remember it in <state_dir>/arena.json. Returns a message; raises
    LaunchError when it cannot be done."""
    info = launcher.info(run_id or "")
    if info is None:
        raise LaunchError(f"Run: there is no run {run_id!r}")
    if not info.servable:
        raise LaunchError(f"{run_id} is not a finished policy run (kind {info.kind}, state {info.state}); "
                          f"only a done policy run has a model to serve")
    if generator is None:
        raise LaunchError(
            f"This server shows pairs from a file (serve --pairs): no model generates answers here, so the "
            f"arena cannot take a model. To compare this policy, restart with "
            f"`preflab serve --model smollm2 --model {info.path / POLICY_DIR}` "
            f"(or generate a pairs file with `preflab generate`).")
    path = info.path / POLICY_DIR
    try:
        added = generator.add_model(path, run_id)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if not added:
        return f"{run_id} is already in the arena"
    file = arena_file(state_dir)
    models = [m for m in read_arena(state_dir) if m["model_id"] != run_id]
    models.append({"model_id": run_id, "path": str(path), "added_at": time.time()})
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, {"models": models})
    names = ", ".join(generator.model_names)
    return f"{run_id} joined the arena ({len(generator.model_names)} models: {names}); its pairs are being generated"


def restore_arena(generator, state_dir: str | os.PathLike) -> list[str]:
    """At startup: put the models of <state_dir>/arena.json back into the arena. Returns notes
    (one per model, and one per model that could not be restored)."""
    notes = []
    for m in read_arena(state_dir):
        try:
            if generator.add_model(m["path"], m["model_id"]):
                notes.append(f"arena: {m['model_id']} ({m['path']}) from {arena_file(state_dir)}")
        except ValueError as e:
            notes.append(f"arena: {m['model_id']} left out: {e}")
    return notes


def in_arena(generator, run_id: str) -> bool:
    return generator is not None and run_id in getattr(generator, "model_names", ())
