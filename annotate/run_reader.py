"""The runs directory as the Train tab shows it: every run read back from its files, as a
RunInfo (kind, state, progress, message), with its metrics and the tail of its log.

    runs = RunReader("runs")
    runs.runs(); runs.info("reward-20250101-120000-ab12"); runs.reward_models()
    runs.metrics(run_id).series("train", "loss"); runs.log_tail(run_id)

Everything is read from the run directory (docs/design.md, "Run directories";
trainer.runs.RunDir), so a reloaded page, a restarted server and a run started with the
CLI all look the same:

    launch.json          written by the launcher: kind, command line, process (pid, start
                         ticks, cmdline), when (not by the CLI)
    launch-config.json   written by the launcher: the settings the form gave, checked
    status.json          written by the trainer (pre-created by the launcher as `queued`)
    config.json          written by the trainer; says reward or policy for CLI runs
    metrics.jsonl        read incrementally (annotate.run_metrics.MetricsReader)
    log.txt              the trainer's stdout and stderr

A run whose process is gone while its status still says queued or running is shown as
failed ("process exited without a final status"), after checking the pid with
annotate.processes. Starting, cancelling and resuming runs is annotate/launcher.py's
Launcher, a RunReader that also owns the processes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotate.processes import trainer_identity
from annotate.run_metrics import MetricsReader
from trainer.runs import (
    ACTIVE_STATES,
    LAUNCH_FILE,
    LOG_FILE,
    METRICS_FILE,
    POLICY_DIR,
    RunDir,
    is_model_dir,
)

DEAD_MESSAGE = f"process exited without a final status; see {LOG_FILE}"


@dataclass
class RunInfo:
    """One run as the Train tab shows it (a row of its table, and what its buttons may do)."""

    run_id: str
    path: Path
    kind: str  # reward | policy | unknown
    state: str  # queued | running | done | failed | cancelled
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
        return self.state in ACTIVE_STATES

    @property
    def servable(self) -> bool:
        """A finished policy the arena can load."""
        return self.kind == "policy" and self.state == "done" and is_model_dir(self.path / POLICY_DIR)

    @property
    def trained_reward(self) -> bool:
        """A finished reward model a policy can be trained against."""
        return self.kind == "reward" and RunDir(self.path).reward_model() is not None

    @property
    def resumable(self) -> bool:
        """A stopped run started from the page: `Launcher.resume` can start it again."""
        return self.state in ("cancelled", "failed") and (self.path / LAUNCH_FILE).is_file()

    def row(self) -> list[Any]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created_at))
        return [self.run_id, self.kind, self.state, f"{100 * self.progress:.0f}%", self.message, created]


ROW_HEADERS = ["run", "kind", "state", "progress", "message", "created"]


class RunReader:
    """Lists and reads the runs of one runs directory."""

    def __init__(self, runs_dir: str | os.PathLike):
        self.runs_dir = Path(runs_dir).resolve()
        self._lock = threading.Lock()  # the metrics readers; a Launcher's processes too
        self._readers: dict[str, MetricsReader] = {}

    def info(self, run_id: str) -> RunInfo | None:
        path = self.runs_dir / run_id
        if not run_id or "/" in run_id or run_id.startswith(".") or not path.is_dir():
            return None
        run = RunDir(path)
        status, launch, config = run.status(), run.launch(), run.config_record()
        if not (status or launch or config):
            return None  # some other directory
        try:
            created = float(launch.get("created_at") or config.get("created_at") or path.stat().st_mtime)
        except (TypeError, ValueError):
            created = path.stat().st_mtime
        state = status.get("state") or "queued"
        message = str(status.get("message") or "")
        pid = status.get("pid") or launch.get("pid")
        updated = status.get("updated_at")
        if state in ACTIVE_STATES and isinstance(pid, int):
            self._reap()
            if trainer_identity(pid, path, updated, launch) == "dead":
                state, message = "failed", DEAD_MESSAGE
        settings = config.get("config") or launch.get("settings") or {}
        try:
            progress = min(max(float(status.get("progress") or 0.0), 0.0), 1.0)
        except (TypeError, ValueError):
            progress = 0.0
        return RunInfo(
            run_id=run_id,
            path=path,
            kind=run.kind(),
            state=state,
            progress=progress,
            message=message,
            created_at=created,
            updated_at=updated,
            pid=pid if isinstance(pid, int) else None,
            step=status.get("step"),
            total_steps=status.get("total_steps"),
            base_model=settings.get("model"),
            config=config,
        )

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
                reader = self._readers[run_id] = MetricsReader(self.runs_dir / run_id / METRICS_FILE)
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

    def _reap(self) -> None:
        """Called before a live-looking run's pid is checked: a Launcher reaps its children
        that ended, so they read as gone; a plain reader owns no processes."""
