"""Test support for the trainers' run directories: a real subprocess, a real SIGTERM."""

import json
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sigterm_mid_run(cmd, env, run_dir: Path, ready, timeout: float = 120) -> tuple[int, str, dict]:
    """Start a trainer, wait until `ready(lines of metrics.jsonl)` holds, send SIGTERM.

    Returns (exit code, combined output, status.json). Fails if the trainer ends on its
    own before it was ready: then the signal would test nothing.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and ready(metrics.read_text().splitlines()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    return proc.returncode, out, json.loads((run_dir / "status.json").read_text())
