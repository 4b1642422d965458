"""Is this pid (still) a run's trainer? Read from /proc, so that a cancel never signals
another program that happens to have the pid now (pids are reused), and a run whose
trainer died without a final status is shown as failed.

    trainer_identity(pid, Path("runs/reward-1"), since=status["updated_at"])
    # 'trainer' | 'dead' | 'unknown' (alive, but no /proc to tell)
"""

from __future__ import annotations

import os
from pathlib import Path

# Words in a trainer's command line (python -m trainer.x, preflab train-x, a script path).
TRAINER_WORDS = (
    "trainer.reward",
    "trainer.policy",
    "train-reward",
    "train-policy",
    "trainer/reward.py",
    "trainer/policy.py",
)


def _proc_start_time(pid: int) -> float | None:
    """When the process started (seconds since the epoch), from /proc; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[19])  # field 22, counted from field 3 (the state)
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
        return "unknown"  # no /proc: the pid exists, which is all we can say
    if not any(w in arg for arg in argv for w in TRAINER_WORDS):
        return "dead"  # the pid was reused by another program
    if _names_run(argv, run_path):
        return "trainer"
    started = _proc_start_time(pid)
    if since is not None and started is not None and started <= since + 1.0:
        return "trainer"  # a trainer that was already running when this run last reported
    return "dead"
