"""Trainings started from the page (the Train tab): start, list, cancel and resume them.

    launcher = Launcher("runs", store="comparisons/")
    info = launcher.start_reward("comparisons/", model="tiny", epochs="2")   # a form's values
    launcher.runs(); launcher.cancel(info.run_id); launcher.resume(info.run_id)

A run is a subprocess, `python -m trainer.reward ...`, `python -m trainer.policy ...` or
`python -m trainer.dpo ...` (annotate.processes.TRAINER_KINDS), in its own session: the
page never waits for it, and stopping or restarting the server does not stop it. The
form's values become the trainer's config dataclass, checked by the config's own check
(a bad value: LaunchError naming the field, nothing started), written to
runs/<id>/launch-config.json and handed to the trainer as `--config FILE`; the command
line and the process (pid, start ticks, command line as /proc shows it) go to
launch.json, and status.json is pre-created as `queued`.
Everything the page shows is read back from the run directory: Launcher is a RunReader
(annotate/run_reader.py, which lists the files), so a reloaded page, a restarted server
and a run started with the CLI all look the same. Cancel sends SIGTERM to the trainer this
launcher started (its own Popen), or, for a run started before a restart, to the process
launch.json recorded, after checking its start ticks and command line (annotate.processes);
the trainer saves and stops as `cancelled`.

Nothing heavy is imported here: the server stays light, the trainers load torch.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from annotate.processes import TRAINER_KINDS, cancel_refusal, process_record
from annotate.run_reader import RunInfo, RunReader
from trainer.errors import PreflabError
from trainer.runs import (
    FINAL_STATES,
    LAUNCH_CONFIG_FILE,
    LAUNCH_FILE,
    LOG_FILE,
    STATUS_FILE,
    RunDir,
    read_json,
    write_json,
)

REPO = Path(__file__).resolve().parent.parent


class LaunchError(PreflabError, ValueError):
    """A form value or a request that cannot start (or stop) a run. The message names the field."""


# --------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------


class Launcher(RunReader):
    """Starts, lists and cancels the trainings of one runs directory."""

    def __init__(
        self,
        runs_dir: str | os.PathLike,
        *,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        store: str | os.PathLike | None = None,
    ):
        super().__init__(runs_dir)
        self.python = python
        self.env = env
        # Database passwords by the URL without them: trainers get the URL on their
        # command line and in launch.json / config.json, the password only in their
        # environment. `store` (the server's --data) is known from the start, so a
        # Resume after a server restart has it too.
        self._passwords: dict[str, str] = {}
        if store is not None:
            self._remember_password(store)
        self._procs: dict[str, subprocess.Popen] = {}  # runs started by this process
        self._waiters: dict[str, threading.Thread] = {}  # their reapers
        self._cancelled: set[str] = set()

    # ---- starting runs ---------------------------------------------------------------

    def start_reward(
        self,
        data: str | os.PathLike,
        *,
        run_id: str | None = None,
        extra: list[str] | None = None,
        **form: Any,
    ) -> RunInfo:
        """Start `python -m trainer.reward` on the store `data` (a directory, made absolute
        for the trainer, or a postgresql:// URL, passed on unchanged). `form`: RewardConfig
        fields as a form gives them (text or numbers; a missing one is the dataclass's
        default). Raises LaunchError (naming the field) and starts nothing when a value is bad."""
        from trainer.reward_config import RewardConfig

        return self._start_on_votes("reward", RewardConfig, data, form, run_id, extra)

    def start_dpo(
        self,
        data: str | os.PathLike,
        *,
        run_id: str | None = None,
        extra: list[str] | None = None,
        **form: Any,
    ) -> RunInfo:
        """Start `python -m trainer.dpo` on the store `data` (as start_reward takes it): a
        policy trained straight from the votes, no reward model. `form`: DPOConfig fields
        as a form gives them. Raises LaunchError (naming the field) and starts nothing
        when a value is bad."""
        from trainer.dpo_config import DPOConfig

        return self._start_on_votes("dpo", DPOConfig, data, form, run_id, extra)

    def _start_on_votes(self, trainer: str, config_class, data, form: dict, run_id, extra) -> RunInfo:
        """A trainer that reads the votes of the store `data`: its form checked as
        config_class, the store on the command line (the server's, not a form value)."""
        from trainer.store import describe

        target = self._votes(data)
        values = {**form, "data": target}
        if "model" in form:
            values["model"] = _absolute(form["model"], model=True)
        config = _checked(config_class, values)
        return self._start(
            trainer, config, form, {"data": describe(target)}, run_id, ["--data", target, *(extra or [])]
        )

    def _votes(self, data: str | os.PathLike) -> str:
        """The store a trainer reads the votes from: a directory made absolute, or a
        database URL without its password (kept for the trainer's environment)."""
        from trainer.store import is_database, store_exists

        if not data:
            raise LaunchError("Data: no comparison store given; there are no votes to train on yet")
        if is_database(data):
            return self._remember_password(data)  # reachability is the trainer's to report, in its log
        target = str(Path(data).resolve())
        if not store_exists(target):
            raise LaunchError(f"Data: {data} does not exist; there are no votes to train on yet")
        return target

    def start_policy(
        self, reward_run: Any, *, run_id: str | None = None, extra: list[str] | None = None, **form: Any
    ) -> RunInfo:
        """Start `python -m trainer.policy` against a finished reward run. `form`:
        PolicyConfig fields as a form gives them; `model` (the starting policy) blank or
        missing: the reward model's base model; `prompts` blank or missing: the trainer's
        default pool. Raises LaunchError (naming the field) and starts nothing when a
        value is bad."""
        from trainer.policy_config import DEFAULT_PROMPTS, PolicyConfig
        from trainer.store import is_database

        reward_id = str(reward_run or "").strip()
        if not reward_id:
            raise LaunchError("Reward model: choose a finished reward run (train one first)")
        reward = self.info(reward_id)
        if reward is None:
            raise LaunchError(f"Reward model: there is no run {reward_id!r} in {self.runs_dir}")
        if not reward.trained_reward:
            raise LaunchError(
                f"Reward model: {reward_id} is not a finished reward run "
                f"(kind {reward.kind}, state {reward.state})"
            )
        model, prompts = form.get("model"), form.get("prompts")
        # Prompts from a database: its password goes to the trainer's environment, never
        # into launch-config.json, launch.json or the trainer's config.json.
        prompts_store = None
        if not _blank(prompts) and is_database(str(prompts).strip()):
            prompts = prompts_store = self._remember_password(str(prompts).strip())
        values = {
            **form,
            "reward": str(reward.path),
            "model": _absolute(
                reward.base_model or PolicyConfig().model if _blank(model) else model, model=True
            ),
            "prompts": str(DEFAULT_PROMPTS) if _blank(prompts) else prompts_store or _absolute(prompts),
        }
        config = _checked(PolicyConfig, values)
        return self._start("policy", config, values, {}, run_id, extra, stores=[prompts_store])

    def _remember_password(self, target: str | os.PathLike) -> str:
        """The target without its password; the password kept for the trainers' env."""
        from trainer.store import without_password

        clean, password = without_password(target)
        if password is not None:
            self._passwords[clean] = password
        return clean

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"

    def _start(
        self,
        trainer: str,
        config,
        values: dict,
        shown: dict,
        run_id: str | None,
        extra: list[str] | None,
        stores: list[str | None] = (),
    ) -> RunInfo:
        """The checked config into runs/<id>/launch-config.json (the fields `values` the
        form gave), and the trainer started on it; `extra` flags override the file.
        `stores`: database URLs (without passwords) the trainer reads besides --data."""
        kind = TRAINER_KINDS[trainer]
        run_id = run_id or self._new_id(trainer)
        if "/" in run_id or run_id.startswith(".") or not run_id.strip():
            raise LaunchError(f"Run id: {run_id!r} is not a plain directory name")
        path = self.runs_dir / run_id
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise LaunchError(f"Run id: {path} already exists") from None
        from trainer.config import write_config_file

        config_file = write_config_file(config, path / LAUNCH_CONFIG_FILE, values)
        settings = {**read_json(config_file), **shown}
        argv = [
            self.python,
            "-m",
            f"trainer.{trainer}",
            "--run-dir",
            str(path),
            "--no-progress",
            "--config",
            str(config_file),
            *(extra or []),
        ]
        launch = {
            "kind": kind,
            "trainer": trainer,
            "argv": argv,
            "stores": [s for s in stores if s],
            "settings": settings,
            "created_at": time.time(),
            "started_by": f"preflab serve (pid {os.getpid()})",
        }
        return self._spawn(run_id, path, argv, launch, "starting the trainer", 0.0)

    def resume(self, run_id: str, extra: list[str] | None = None) -> RunInfo:
        """Start a cancelled or failed run again with the command that launched it: the
        trainer resumes from its last checkpoint (or starts over if it saved none)."""
        info = self.info(run_id or "")
        if info is None:
            raise LaunchError(f"Run: there is no run {run_id!r}")
        if not info.resumable:
            raise LaunchError(
                f"{run_id} is {info.state}; only a cancelled or failed run started from "
                f"this page can be resumed"
                + (" (this one was not)" if info.state in ("cancelled", "failed") else "")
            )
        launch = read_json(info.path / LAUNCH_FILE)
        saved = list(launch.get("argv") or [])
        # launch.json is a file in the run directory, which anyone who can write there can
        # edit: the command is rebuilt from what this launcher itself passes (the trainer on
        # this very run directory, its checked launch-config.json), and only the store's
        # name is taken from the file, as a value, never as flags.
        # The trainer, one of TRAINER_KINDS for this run's kind (launch.json from before
        # "trainer" was written: the kind's own).
        trainer = str(launch.get("trainer", info.kind))
        if (
            TRAINER_KINDS.get(trainer) != info.kind
            or saved[1:3] != ["-m", f"trainer.{trainer}"]
            or saved.count("--run-dir") != 1
        ):
            raise LaunchError(
                f"{run_id}: {LAUNCH_FILE} does not hold this run's trainer command; "
                f"resume it with the command that started it"
            )
        argv = [self.python, "-m", f"trainer.{trainer}", "--run-dir", str(info.path), "--no-progress"]
        if (info.path / LAUNCH_CONFIG_FILE).is_file():
            argv += ["--config", str(info.path / LAUNCH_CONFIG_FILE)]
        if "--data" in saved[:-1]:
            data = saved[saved.index("--data") + 1]
            if data.startswith("-"):
                raise LaunchError(f"{run_id}: {LAUNCH_FILE} names no store, but {data!r}")
            argv += ["--data", data]
        # The stores the resumed trainer will open come from the run's own settings, which
        # win over the command line on a resume: the password goes only where they all point.
        from trainer.store import is_database

        settings = [
            RunDir(info.path).config_record().get("config") or {},
            read_json(info.path / LAUNCH_CONFIG_FILE),
        ]
        stores = sorted(
            {str(s[k]) for s in settings for k in ("data", "prompts") if s.get(k) and is_database(str(s[k]))}
        )
        with self._lock:
            self._cancelled.discard(run_id)
        return self._spawn(
            run_id,
            info.path,
            [*argv, *(extra or [])],
            {**launch, "argv": argv, "stores": stores, "resumed_at": time.time()},
            "resuming from the last checkpoint",
            info.progress,
        )

    def _spawn(
        self, run_id: str, path: Path, argv: list[str], launch: dict, message: str, progress: float
    ) -> RunInfo:
        # Shown at once, before the trainer has even imported torch; an earlier process's
        # record (a resume) is not this one's.
        launch = {k: v for k, v in launch.items() if k not in ("pid", "pid_start", "cmdline")}
        write_json(path / LAUNCH_FILE, launch)
        write_json(
            path / STATUS_FILE,
            {"state": "queued", "progress": progress, "message": message, "updated_at": time.time()},
        )
        env = {
            **(self.env if self.env is not None else os.environ),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        # libpq reads PGPASSWORD; it never touches the run directory. It is given only when
        # every database the trainer may open is one store whose password this server has.
        from trainer.store import is_database

        data = argv[argv.index("--data") + 1] if "--data" in argv[:-1] else None
        targets = {t for t in (data, *(launch.get("stores") or [])) if t and is_database(t)}
        if len(targets) == 1 and (target := next(iter(targets))) in self._passwords:
            env["PGPASSWORD"] = self._passwords[target]
        try:
            with open(path / LOG_FILE, "ab") as log:
                # A store URL's password stays out of the log (describe masks it).
                from trainer.store import describe

                log.write(("$ " + " ".join(map(describe, argv)) + "\n").encode())
                log.flush()
                # Its own session: Ctrl-C or SIGTERM to the server never reaches the run.
                proc = subprocess.Popen(
                    argv,
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as e:
            write_json(
                path / STATUS_FILE,
                {
                    "state": "failed",
                    "progress": 0.0,
                    "updated_at": time.time(),
                    "message": f"could not start the trainer: {e}",
                },
            )
            raise LaunchError(f"could not start the trainer: {e}") from None
        # Which process this is, for a Cancel after a server restart: pid, start ticks and
        # command line (annotate/processes.py); this server trusts its own `proc` first.
        write_json(path / LAUNCH_FILE, {**launch, **process_record(proc.pid, argv)})
        waiter = threading.Thread(
            target=self._wait, args=(run_id, proc), name=f"preflab-run-{run_id}", daemon=True
        )
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
        status = read_json(path / STATUS_FILE)
        if status.get("state") in FINAL_STATES:
            return
        if cancelled and code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            state, message = "cancelled", "cancelled before training started"
        else:
            state, message = (
                "failed",
                f"process exited with code {code} without a final status; see {LOG_FILE}",
            )
            last = [line for line in self.log_tail(run_id, lines=5).splitlines() if line.strip()]
            if last:
                message += f" (last line: {last[-1][:300]})"
        write_json(
            path / STATUS_FILE,
            {**status, "state": state, "message": message, "exit_code": code, "updated_at": time.time()},
        )

    def _forget(self, run_id: str) -> None:
        with self._lock:
            self._procs.pop(run_id, None)
            self._waiters.pop(run_id, None)

    def _reap(self) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            proc.poll()  # the waiter thread reaps too; this just makes it prompt

    # ---- cancelling ------------------------------------------------------------------

    def cancel(self, run_id: str) -> str:
        """SIGTERM to the run's trainer, which saves and stops as `cancelled`. A trainer this
        launcher started is signalled through its own Popen, whatever the run directory
        says; any other only when it is the process launch.json recorded (start ticks and
        command line, annotate.processes.cancel_refusal). Returns what happened, in words."""
        info = self.info(run_id or "")
        if info is None:
            raise LaunchError(f"Run: there is no run {run_id!r}")
        if not info.active:
            return f"{run_id} is already {info.state}; nothing to cancel"
        with self._lock:
            proc = self._procs.get(run_id)
        if proc is not None:
            if proc.poll() is not None:
                return f"{run_id}: the trainer had already exited"
            with self._lock:
                self._cancelled.add(run_id)
            proc.send_signal(signal.SIGTERM)  # a no-op once Popen has reaped it
            return f"{run_id}: cancel requested; the trainer saves its checkpoint and stops"
        launch = read_json(info.path / LAUNCH_FILE)
        refusal = cancel_refusal(launch, info.path, info.kind, info.pid)
        if refusal is not None:
            raise LaunchError(f"{run_id}: {refusal}; nothing was signalled")
        pid = launch["pid"] if "pid_start" in launch else info.pid
        with self._lock:
            self._cancelled.add(run_id)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return f"{run_id}: the trainer had already exited"
        return f"{run_id}: cancel requested; the trainer saves its checkpoint and stops"

    def wait(self, run_id: str, timeout: float = 60.0) -> RunInfo | None:
        """Wait for a run started here to end (tests, scripts); returns its final info."""
        with self._lock:
            waiter = self._waiters.get(run_id)
        deadline = time.time() + timeout
        if waiter is not None:
            waiter.join(timeout)  # the process reaped and its final status written
        while time.time() < deadline:
            info = self.info(run_id)
            if info is None or not info.active:
                return info
            time.sleep(0.1)
        return self.info(run_id)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _absolute(value: Any, model: bool = False) -> Any:
    """A relative path that exists here or in the repository, made absolute: the trainer
    runs in the repository, the server maybe elsewhere. Anything else is left for the
    config's check to judge (a model name stays a name)."""
    if _blank(value) or not isinstance(value, (str, os.PathLike)):
        return value
    text = str(value).strip()
    if model:
        from trainer.models import DEFAULT_ALIASES, TINY_MODEL

        if text.lower() in DEFAULT_ALIASES or text.lower() == TINY_MODEL:
            return text
    path = Path(text).expanduser()
    for candidate in (path, REPO / path) if not path.is_absolute() else (path,):
        if candidate.is_dir() if model else candidate.exists():
            return str(candidate.resolve())
    return text


def _checked(config_class, values: dict):
    """The form's values as the trainer's config, through the config's own check; its
    error in the words of the form ("Epochs: must be at least 1")."""
    from trainer.config import ConfigError, config_from_values

    try:
        return config_from_values(config_class, values)
    except ConfigError as e:
        raise LaunchError(e.labelled()) from None
