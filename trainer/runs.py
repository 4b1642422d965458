"""Run directories (docs/design.md): the contract between the trainers and the UI.

    runs/<run_id>/config.json    {"kind": reward|policy, "config": the settings, ...}; a resume keeps them
    runs/<run_id>/status.json    {"state": queued|running|done|failed|cancelled, "progress", "message"}
    runs/<run_id>/metrics.jsonl  one JSON object a step
    runs/<run_id>/checkpoint/    the last good checkpoint (a Hugging Face model directory);
                                 for a reward run also the finished model, with preflab_reward.json
    runs/<run_id>/policy/        a policy run's finished policy (a Hugging Face model directory)
    runs/<run_id>/eval.json      a policy run's evaluation against its reference
    runs/<run_id>/heldout.jsonl  a policy run's held-out prompts (that evaluation's)
    runs/<run_id>/data.parquet   a reward or DPO run's pairs and their train/val split
    runs/<run_id>/reference_logps.pt  a DPO run's reference log-probs, computed once up front
    runs/<run_id>/launch.json    how the page started it (only runs started from the Train tab)
    runs/<run_id>/log.txt        their stdout and stderr

This module owns those names: nobody else spells them. `RunDir` is the read side
(what a run is, whether it finished, where its model is); `Run` the write side a
trainer uses; `supervise` the life of a run around a trainer's loop, shared by the
reward and the policy trainer: one writer among several processes, SIGTERM turns into
a clean stop, bad input into state `failed` with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.errors import PreflabError

CONFIG_FILE = "config.json"  # also the marker of a Hugging Face model directory
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT = "checkpoint"
POLICY_DIR = "policy"
EVAL_FILE = "eval.json"
HELDOUT_FILE = "heldout.jsonl"  # a policy run's held-out prompts, for its evaluation
LAUNCH_FILE = "launch.json"
LOG_FILE = "log.txt"
LAUNCH_CONFIG_FILE = "launch-config.json"  # written by the Train tab: the settings it checked (--config)
STATE_FILE = "training_state.pt"  # inside checkpoint/: what a resume needs besides the weights
REWARD_META_FILE = "preflab_reward.json"  # inside a reward model: normalisation, max_length, provenance
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a LoRA checkpoint holds this instead of config.json
REVIEW_SCORES_FILE = "review_scores.parquet"  # in a reward run: the Review tab's cache of pair scores
SNAPSHOT_FILE = "data.parquet"  # a reward or DPO run's exact pairs and split (a resume reads this)
REFERENCE_FILE = "reference_logps.pt"  # a DPO run's cached reference log-probs and KL samples
POLICY_META_FILE = "preflab_policy.json"  # inside a policy model: provenance (base, reward model, algo, step)
VALUE_HEAD_FILE = "value_head.pt"  # inside a PPO run's checkpoint/

KINDS = ("reward", "policy")
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")


class RunDirError(PreflabError):
    """A run directory that cannot be used for what was asked (missing, not finished,
    the wrong kind); the message names the directory and says what to pass instead."""


def write_json(path: Path, obj: Any) -> None:
    """Write-then-rename: a reader (the UI polling status.json) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """A JSON object file, or {} where it is missing, unreadable, torn or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory (full weights or a LoRA adapter)."""
    return (path / CONFIG_FILE).is_file() or (path / ADAPTER_CONFIG_FILE).is_file()


class RunDir:
    """The read side of one run directory: cheap, never raises for a missing file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    def status(self) -> dict:
        return read_json(self.path / STATUS_FILE)

    def config_record(self) -> dict:
        """config.json as the trainer wrote it: {"kind", "config": settings, ...}."""
        return read_json(self.path / CONFIG_FILE)

    def launch(self) -> dict:
        return read_json(self.path / LAUNCH_FILE)

    @property
    def state(self) -> str:
        return self.status().get("state") or "unknown"

    def kind(self) -> str:
        """reward | policy | unknown: what the trainer wrote, else told by the settings
        (runs from before the trainers wrote their kind)."""
        config, launch = self.config_record(), self.launch()
        for source in (launch, config):
            if source.get("kind") in KINDS:
                return source["kind"]
        settings = config.get("config") or {}
        if "reward" in settings or "algo" in settings or "reward_model" in config:
            return "policy"
        if "ties" in settings or "data" in config:
            return "reward"
        return "unknown"

    def checkpoint(self) -> Path | None:
        """The last good checkpoint: `checkpoint/`, or `checkpoint.old/` when a save was
        interrupted between its two renames."""
        for name in (CHECKPOINT, CHECKPOINT + ".old"):
            if is_model_dir(self.path / name):
                return self.path / name
        return None

    def reward_model(self) -> Path | None:
        """The finished reward model of a done reward run, else None."""
        model = self.path / CHECKPOINT
        if self.state == "done" and (model / REWARD_META_FILE).is_file() and is_model_dir(model):
            return model
        return None

    def policy_model(self) -> Path | None:
        """The finished policy of a done policy run, else None."""
        model = self.path / POLICY_DIR
        return model if self.state == "done" and is_model_dir(model) else None

    def eval(self) -> dict:
        return read_json(self.path / EVAL_FILE)


def reward_model_path(path: str | os.PathLike, *, finished: bool = True) -> Path:
    """The one answer to "is this a finished reward run": its reward model directory, or
    RunDirError saying why not. Accepts the run directory or the model directory itself
    (a checkpoint copied elsewhere: a model directory with preflab_reward.json).

    `finished=False` (the policy trainer, eval-policy) also takes the last checkpoint of a
    reward run that is not done (cancelled, failed after a save, still running): training
    against it is the user's call, and it has always been allowed."""
    path = Path(path)
    if is_model_dir(path) and (path / REWARD_META_FILE).is_file():
        return path
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory")
    run = RunDir(path)
    latest = path / CHECKPOINT
    if not finished and is_model_dir(latest) and (latest / REWARD_META_FILE).is_file():
        return latest
    if not (path / STATUS_FILE).is_file():
        raise RunDirError(f"{path}: not a run directory (no {STATUS_FILE})")
    status = run.status()
    state = status.get("state", "unknown")
    if state != "done":
        note = f" ({status['message']})" if status.get("message") else ""
        raise RunDirError(
            f"{path}: the reward run is {state}, not done{note}; "
            "wait until it is done, or pick a finished run"
        )
    model = run.reward_model()
    if model is None:
        raise RunDirError(
            f"{path}: not a reward model run (no {CHECKPOINT}/{REWARD_META_FILE}; "
            "a policy run cannot score pairs); pass the run directory of a "
            "finished `preflab train-reward`"
        )
    return model


def policy_model_path(path: str | os.PathLike) -> Path | None:
    """A run directory given where a model is expected (`serve --model runs/<id>`): the
    finished policy in it (`policy/`, a policy or DPO run); None where `path` is not a run
    directory (no status.json, or a config.json that is a model's), so the caller treats
    it as a model. RunDirError where it is a run without a finished policy, saying which
    directory to pass instead, where there is one."""
    path = Path(path)
    if not (path / STATUS_FILE).is_file() or read_json(path / CONFIG_FILE).get("model_type"):
        return None
    run = RunDir(path)
    model = run.policy_model()
    if model is not None:
        return model
    if run.kind() == "reward" or (path / CHECKPOINT / REWARD_META_FILE).is_file():
        raise RunDirError(
            f"{path}: a reward model run, not a policy: it scores answers but cannot write "
            "them; pass a policy run (train-policy, train-dpo) or a model directory"
        )
    status = run.status()
    state = status.get("state", "unknown")
    note = f" ({status['message']})" if status.get("message") else ""
    # What could be served instead: a complete policy/ (a run still evaluating it, or one
    # that failed after writing it), else a checkpoint that is a whole model (not LoRA adapters).
    instead = path / POLICY_DIR if (path / POLICY_DIR / CONFIG_FILE).is_file() else None
    checkpoint = run.checkpoint()
    if instead is None and checkpoint is not None and (checkpoint / CONFIG_FILE).is_file():
        instead = checkpoint
    hint = f"pass {instead} to serve it as it stands" if instead else "it has nothing servable yet"
    raise RunDirError(
        f"{path}: a run that is {state}{note}, without a finished {POLICY_DIR}/; wait until it "
        f"is done, or {hint}"
    )


def reward_runs(runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished reward runs under runs_dir, newest first: {"id", "path", "message", "finished"}."""
    runs_dir = Path(runs_dir)
    found = []
    if not runs_dir.is_dir():
        return found
    for path in runs_dir.iterdir():
        run = RunDir(path)
        if run.reward_model() is None:
            continue
        status = run.status()
        finished = status.get("updated_at") or (path / STATUS_FILE).stat().st_mtime
        found.append(
            {
                "id": path.name,
                "path": str(path),
                "message": status.get("message", ""),
                "finished": float(finished),
            }
        )
    return sorted(found, key=lambda r: (-r["finished"], r["id"]))


class Run:
    """The files of one run directory. Only the main process writes."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = path, main
        self.last_status = 0.0

    def status(self, state: str, progress: float, message: str, *, throttle: bool = False, **extra):
        if not self.main or (throttle and time.time() - self.last_status < 2.0):
            return
        self.last_status = time.time()
        write_json(
            self.path / STATUS_FILE,
            {
                "state": state,
                "progress": round(min(max(progress, 0.0), 1.0), 4),
                "message": message,
                "updated_at": time.time(),
                "pid": os.getpid(),
                **extra,
            },
        )

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.path / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Forget metrics of steps after the checkpoint: a crash may have logged steps
        whose weights were never saved, and the resumed run will redo them."""
        path = self.path / METRICS_FILE
        if not self.main or not path.exists():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in kept))

    def checkpoint(self) -> Path | None:
        return RunDir(self.path).checkpoint()


def peak_memory_mb(device) -> float:
    """What a run's summary reports as its peak memory: allocated on the GPU, or this
    process's peak resident set on the CPU (Linux reports it in KiB)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def supervise(
    run_path: Path,
    device: str,
    check: Callable[[], None],
    body: Callable[[Run, Any, dict], int],
    input_errors: tuple[type[Exception], ...],
    keep_failed: bool = True,
) -> int:
    """Run `body(run, accelerator, stop)` as one run of `run_path`. Returns the exit code:
    0 done (or already done), 1 failed, 2 bad input, 128 + signal when cancelled (the
    body returns that after it saw `stop["signal"]` and saved).

    Bad input in a run directory this call created, with `keep_failed` False (the caller
    did not name it: `runs/reward-<time>`), removes that directory again: a command that
    failed before doing anything leaves nothing behind. A named or existing run dir keeps
    the failure in its status.json (the Train tab shows it from there)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device == "cpu")
    # The trainers choose their own precision (--dtype; bf16 autocast on CUDA, fp32 on a CPU).
    # accelerate's mixed precision comes from ACCELERATE_MIXED_PRECISION, or from whichever
    # Accelerator came first in this process (its state is shared: a TRL / transformers
    # Trainer sets bf16), and prepare_model would wrap the forward in its own autocast, bf16
    # on a CPU too: 4-5x slower there, and not the numbers the run says it computes.
    accelerator.native_amp = False
    main = accelerator.is_main_process
    if main and accelerator.mixed_precision != "no":
        print(
            f"note: accelerate's mixed precision ({accelerator.mixed_precision}) is not used: "
            "preflab's trainers set their own (--dtype; bf16 autocast on CUDA)",
            file=sys.stderr,
        )
    run = Run(run_path, main)
    created = main and not run_path.exists()
    first_new = run_path  # the outermost directory this call creates (runs/, then the run)
    while not first_new.parent.exists():
        first_new = first_new.parent
    if main:
        run_path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    prior = read_json(run_path / STATUS_FILE)
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
        if created and not keep_failed:
            import shutil

            shutil.rmtree(run_path, ignore_errors=True)
            for empty in [run_path, *run_path.parents]:  # runs/ too, if this call made it (and it is empty)
                if empty == first_new.parent:
                    break
                with contextlib.suppress(OSError):
                    empty.rmdir()
        else:
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
