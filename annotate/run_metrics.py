"""metrics.jsonl read while a trainer appends to it: what the Train tab plots.

    reader = MetricsReader("runs/reward-1/metrics.jsonl")
    reader.update()                                    # reads only what was appended
    reader.series("train", "loss")                     # [(step, value), ...]
    reader.rows([("train", "loss", "train"), ("eval", "val_loss", "validation")])   # for a plot

`Launcher.metrics(run_id)` keeps one reader per run, so a poll costs the new bytes only.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any


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
        self.last_line = b""  # the last complete line read: seen again at offset, or the file was rewritten
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
                return 0  # nothing complete yet (or only a half-written line)
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
