"""Is this pid (still) a run's trainer? Read from /proc, so that a cancel never signals
another program that happens to have the pid now (pids are reused), and a run whose
trainer died without a final status is shown as failed.

    launch["process"] = process_record(proc.pid)    # at launch, into launch.json
    refusal = cancel_refusal(launch, Path("runs/reward-1"), "reward")   # None: may signal
    trainer_identity(pid, Path("runs/reward-1"), since=status["updated_at"], launch=launch)
    # 'trainer' | 'dead' | 'unknown' (alive, but no /proc to tell): what the page shows

A process is the one the launcher started when its start time (the exact clock ticks
after boot of /proc/PID/stat field 22, which a reused pid cannot repeat) and its whole
command line are what the launcher read at launch, and that command line is this run's
trainer. launch.json sits in the run directory, which others may write: a forged record
must still describe a live trainer of this very run, so it can only point at the run's
own trainer. Runs launched before the record existed are cancelled only when the
process's command line is a trainer's that names the run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# The trainers the launcher starts, by name: each `python -m trainer.<name>`, and the kind
# of run it writes (train-dpo's is a policy: it ends in one that serve can take). Nothing
# outside this table is ever started, whatever a run directory's files say.
TRAINER_KINDS = {"reward": "reward", "policy": "policy", "dpo": "policy"}

# Words in a trainer's command line (python -m trainer.x, preflab train-x, a script path).
TRAINER_WORDS = tuple(
    word for name in TRAINER_KINDS for word in (f"trainer.{name}", f"train-{name}", f"trainer/{name}.py")
)


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (/proc/PID/stat field 22);
    None if unknown. Exact, unlike a time: the record a cancel compares."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The command name (field 2) is in parentheses and may hold spaces and ")".
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, counted from field 3
    except (OSError, ValueError, IndexError):
        return None


def _proc_start_time(pid: int) -> float | None:
    """When the process started (seconds since the epoch), from /proc; None if unknown."""
    try:
        ticks = start_ticks(pid)
        if ticks is None:
            return None
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
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
    # As Python spells its own argv (surrogateescape), so a recorded one compares equal.
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def process_record(pid: int, argv: list[str]) -> dict:
    """What the launcher writes into launch.json right after starting `argv` as `pid`:
    the pid, its start ticks and its command line as /proc shows it (an interpreter a
    script names with #! comes first there), `argv` where there is no /proc."""
    # Popen returns once the exec has begun, but /proc may show the new command line a
    # moment later (empty, or the parent's, until the kernel has set it up): wait until it
    # ends in our arguments, which only the new program has.
    cmdline, deadline = None, time.monotonic() + 2.0
    while time.monotonic() < deadline:
        cmdline = _proc_cmdline(pid)
        if cmdline is None or (cmdline and cmdline[len(cmdline) - len(argv) + 1 :] == list(argv[1:])):
            break
        time.sleep(0.005)
    return {"pid": pid, "pid_start": start_ticks(pid), "cmdline": cmdline or list(argv)}


def _is_runs_trainer(argv: list[str], run_path: Path, kind: str | None) -> bool:
    """A trainer command line as the launcher writes it, for this run: `python -m
    trainer.<name> ... --run-dir <this run's directory>`, a trainer of TRAINER_KINDS that
    writes runs of this kind (a #! interpreter may come first)."""
    if "-m" not in argv[:3] or argv.count("--run-dir") != 1 or argv[-1] == "--run-dir":
        return False
    modules = [f"trainer.{name}" for name, of in TRAINER_KINDS.items() if kind in (of, None, "unknown")]
    module = argv.index("-m") + 1
    if module >= len(argv) or argv[module] not in modules:
        return False
    run_dir = argv[argv.index("--run-dir") + 1]
    try:
        return Path(run_dir).resolve() == run_path.resolve()
    except (OSError, RuntimeError):
        return False


def _exited(pid: int) -> bool:
    """No such process, or a zombie: nothing left to signal."""
    state = _proc_state(pid)
    return state is None or state in ("Z", "X")


def cancel_refusal(launch: dict, run_path: Path, kind: str | None, pid: int | None = None) -> str | None:
    """Why the process of this run's launch.json may not be signalled (words, for the
    page), None when it may: its start ticks and whole command line must be what the
    launcher recorded, and that a trainer command of this run. `pid`: the run's pid as
    the run reader found it, for a launch.json from before the record."""
    if "pid_start" not in launch:  # launched by an older version: the command line must name the run
        if not isinstance(pid, int):
            return "no process id recorded yet; try again in a moment"
        if _exited(pid):
            return f"process {pid} has exited"
        argv = _proc_cmdline(pid)
        if argv is None:
            return f"process {pid} cannot be checked (no /proc here)"
        if not (any(w in arg for arg in argv for w in TRAINER_WORDS) and _names_run(argv, run_path)):
            return (
                f"process {pid} is not a trainer of this run (its command line does not name {run_path.name})"
            )
        return None
    pid, ticks, recorded = launch.get("pid"), launch.get("pid_start"), launch.get("cmdline")
    if not isinstance(pid, int) or not isinstance(ticks, int) or not isinstance(recorded, list):
        return "launch.json does not record the process it started (pid, start, command line)"
    if not _is_runs_trainer([str(a) for a in recorded], run_path, kind):
        return "launch.json does not record this run's trainer command"
    if _exited(pid):
        return f"process {pid} has exited"
    now = start_ticks(pid)
    if now is None:
        return f"process {pid} cannot be checked (no /proc here)"
    if now != ticks:
        return (
            f"process {pid} is another program: it started at a different time than the trainer "
            "launched for this run (the pid was reused)"
        )
    if _proc_cmdline(pid) != recorded:
        return f"process {pid} runs a different command line than the trainer launched for this run"
    return None


def _names_run(argv: list[str], run_path: Path) -> bool:
    """Whether a command line names this run: its directory (any spelling ending in the
    run id) or its id as an argument."""
    run_id = run_path.name
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value == run_id or Path(value.rstrip("/")).name == run_id and "/" in value:
            return True
    return False


def trainer_identity(pid: int, run_path: Path, since: float | None, launch: dict | None = None) -> str:
    """'trainer': pid is this run's trainer (a trainer command line that names the run,
    or one that started before the run's last status update); 'dead': no such process,
    a zombie, or another program under a reused pid (one whose start ticks are not those
    `launch`, the run's launch.json, recorded for it); 'unknown': alive, cannot tell.
    What the page shows; a cancel asks cancel_refusal, which is stricter."""
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return "dead"
    if launch and launch.get("pid") == pid and isinstance(launch.get("pid_start"), int):
        ticks = start_ticks(pid)
        if ticks is not None:
            return "trainer" if ticks == launch["pid_start"] else "dead"
    argv = _proc_cmdline(pid)
    if argv is None:
        return "unknown"  # no /proc: the pid exists, which is all we can say
    if not any(w in arg for arg in argv for w in TRAINER_WORDS):
        return "dead"  # the pid was reused by another program
    if _names_run(argv, run_path):
        return "trainer"
    started = _proc_start_time(pid)
    if since is not None and started is not None and started <= since + 1.0:
        return "trainer"  # a trainer that was already running when this run last reported
    return "dead"
