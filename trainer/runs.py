"""Run directories (DESIGN.md): the contract between the trainers and the UI.

    runs/<run_id>/config.json    the settings (a resumed run keeps them)
    runs/<run_id>/status.json    {"state": queued|running|done|failed|cancelled, "progress", "message"}
    runs/<run_id>/metrics.jsonl  one JSON object a step
    runs/<run_id>/checkpoint/    the last good checkpoint (a Hugging Face model directory)

`supervise` is the life of a run around a trainer's loop, shared by the reward and the
policy trainer: one writer among several processes, SIGTERM turns into a clean stop,
bad input into state `failed` with exit code 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

CHECKPOINT = "checkpoint"


def write_json(path: Path, obj: Any) -> None:
    """Write-then-rename: a reader (the UI polling status.json) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class Run:
    """The files of one run directory. Only the main process writes."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = path, main
        self.last_status = 0.0

    def status(self, state: str, progress: float, message: str, *, throttle: bool = False, **extra):
        if not self.main or (throttle and time.time() - self.last_status < 2.0):
            return
        self.last_status = time.time()
        write_json(self.path / "status.json", {"state": state, "progress": round(min(max(progress, 0.0), 1.0), 4),
                                              "message": message, "updated_at": time.time(),
                                              "pid": os.getpid(), **extra})

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Forget metrics of steps after the checkpoint: a crash may have logged steps
        whose weights were never saved, and the resumed run will redo them."""
        path = self.path / "metrics.jsonl"
        if not self.main or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))

    def checkpoint(self) -> Path | None:
        """The last good checkpoint: `checkpoint/`, or `checkpoint.old/` when a save was
        interrupted between its two renames."""
        for name in (CHECKPOINT, CHECKPOINT + ".old"):
            if (self.path / name / "config.json").exists() or (self.path / name / "adapter_config.json").exists():
                return self.path / name
        return None


def config_from_args(config_class, args) -> tuple[Any, set[str]]:
    """A trainer's config dataclass from its parsed arguments, and which settings were
    given (differ from the defaults): on a resume only those may override the run's own."""
    import dataclasses
    default = config_class()
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    explicit = {k for k, v in values.items() if v != getattr(default, k)}
    return config_class(**values), explicit


def supervise(run_path: Path, device: str, check: Callable[[], None],
              body: Callable[["Run", Any, dict], int], input_errors: tuple[type[Exception], ...]) -> int:
    """Run `body(run, accelerator, stop)` as one run of `run_path`. Returns the exit code:
    0 done (or already done), 1 failed, 2 bad input, 128 + signal when cancelled (the
    body returns that after it saw `stop["signal"]` and saved)."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=device == "cpu")
    main = accelerator.is_main_process
    run = Run(run_path, main)
    if main:
        run_path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    prior = read_json(run_path / "status.json")
    if prior.get("state") == "done":
        if main:
            print(f"{run_path}: already done ({prior.get('message', '')})", file=sys.stderr)
        return 0

    # SIGTERM / Ctrl-C: finish the current optimizer step, save, and stop as `cancelled`.
    stop: dict[str, int] = {}

    def request_stop(signum, frame):
        stop.setdefault("signal", signum)
        signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would tear through ours
    try:
        check()
        return body(run, accelerator, stop)
    except input_errors as e:
        run.status("failed", 0.0, str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        run.status("failed", 0.0, f"{type(e).__name__}: {e}")
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if bars:
            hf_logging.enable_progress_bar()
