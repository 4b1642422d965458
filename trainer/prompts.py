"""Prompt pools: the files of prompts that candidate answers are generated for.

A pool is one file, read by its extension:

    .jsonl / .json   one JSON object a line
    .csv             a header row, then one prompt a row (quoted fields may span lines)
    .parquet         one prompt a row

Each row gives either `prompt` (a string: one user message) or `messages` (a chat list
of {"role", "content"}; in CSV a JSON string), and may give `id` (otherwise a hash of
the messages, `trainer.comparisons.prompt_id_for`) and `tags` (a list of strings, or
one comma-separated string). Other columns are ignored, so a pool can carry notes.

Loading is forgiving, because pools are written by hand and by scripts: a row that
cannot be used is reported as `file:line: reason` and skipped, and only a file with
nothing usable in it is an error. The annotation app and the policy trainer both read
pools through `load_prompt_pool`, which is why this lives in `trainer` (the trainer
may not import `annotate`). It imports nothing heavy: `preflab prompts` must answer
at once.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trainer.comparisons import messages_to_json, prompt_id_for

log = logging.getLogger("preflab.prompts")

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_CHARS = 32_000
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class PromptPoolError(ValueError):
    """A pool that cannot be used at all. The message names the file.

    `report` holds what was found when the file could be read but had no usable
    prompt in it (so a caller can still show the per-line problems); else None.
    """

    def __init__(self, message: str, report: PoolReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class Prompt:
    id: str
    messages: list[dict[str, str]]
    tags: list[str] = field(default_factory=list)


@dataclass
class PoolReport:
    """What loading a pool kept and what it skipped, and why.

    `problems` has one `file:line: reason` string for every skipped row, whatever the
    reason, so that each one can be found and fixed in the file.
    """

    path: str
    loaded: int = 0
    bad: int = 0            # unusable rows: broken JSON, wrong types, malformed chat
    empty: int = 0          # nothing to answer (blank prompt or blank last user turn)
    oversize: int = 0       # more than max_chars characters in all messages together
    duplicate: int = 0      # same messages as an earlier row
    duplicate_id: int = 0   # same id as an earlier row, different messages
    problems: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.bad + self.empty + self.oversize + self.duplicate + self.duplicate_id

    def summary(self) -> str:
        def n(count: int, word: str, plural: str | None = None) -> str:
            return f"{count} {word if count == 1 else (plural or word + 's')}"

        parts = [n(self.bad, "bad line"), n(self.duplicate, "duplicate")]
        # An id clash is a different mistake from a repeated prompt (two prompts were
        # given one name), so it gets its own count, shown only when it happened.
        if self.duplicate_id:
            parts.append(n(self.duplicate_id, "id clash", "id clashes"))
        parts += [f"{self.empty} empty", f"{self.oversize} oversize"]
        return f"{self.path}: {n(self.loaded, 'prompt')} loaded; skipped " + ", ".join(parts)


@dataclass
class PromptPool:
    prompts: list[Prompt]
    report: PoolReport

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)


class _BadRow(Exception):
    """One row that cannot be used; the message is the reason shown to the user."""


# --------------------------------------------------------------------------------------
# One row -> one Prompt
# --------------------------------------------------------------------------------------

def _check_text(value: str, what: str) -> None:
    # Bytes that are not UTF-8 arrive as lone surrogates (the files are decoded with
    # surrogateescape, so one bad byte costs one row, not the file); they could never
    # be written to the comparison store.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadRow(f"{what} is not valid UTF-8 text") from None


def _parse_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        # CSV cells are text, and a chat may be stored as its JSON spelling anywhere.
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _BadRow(f"'messages' is not valid JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise _BadRow(f"'messages' must be a list of chat messages, got {type(value).__name__}")
    if not value:
        raise _BadRow("'messages' is an empty list")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _BadRow(f"message {i} must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _BadRow(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            # Chat templates put the system prompt first; elsewhere it is a mistake.
            raise _BadRow(f"message {i} is a system message; only the first may be")
        if not isinstance(content, str):
            raise _BadRow(f"message {i} content must be a string, got {type(content).__name__}")
        _check_text(content, f"message {i} content")
        # Extra keys (name, tool calls...) are dropped: the record holds role and content.
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise _BadRow(f"the last message must be from the user, not {messages[-1]['role']!r}")
    return messages


def _parse_tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    elif not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _BadRow("'tags' must be a list of strings or a comma-separated string")
    tags = []
    for t in value:
        _check_text(t, "'tags'")
        t = t.strip()
        if t and t not in tags:
            tags.append(t)
    return tags


def _parse_row(row: Any) -> Prompt:
    """A row (already a dict of Python values; None = absent) -> Prompt, or _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is not None and messages is not None:
        raise _BadRow("has both 'prompt' and 'messages'; give one")
    if prompt is None and messages is None:
        raise _BadRow("needs a 'prompt' string or a 'messages' list")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _BadRow(f"'prompt' must be a string, got {type(prompt).__name__}")
        _check_text(prompt, "'prompt'")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _parse_messages(messages)

    pid = row.get("id")
    if pid is None:
        pid = prompt_id_for(messages)
    elif not isinstance(pid, str):
        raise _BadRow(f"'id' must be a string, got {type(pid).__name__}")
    elif not pid.strip():
        raise _BadRow("'id' is blank")
    else:
        _check_text(pid, "'id'")
    return Prompt(id=pid, messages=messages, tags=_parse_tags(row.get("tags")))


# --------------------------------------------------------------------------------------
# Files -> rows. Each reader yields (line or row number, row dict or _BadRow).
# --------------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM, as some editors on Windows write
        data = data[3:]
    # Split on \n only: a JSON string cannot hold a raw newline, so every \n ends a
    # physical line, and the numbers match what an editor shows.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.decode("utf-8", errors="surrogateescape").strip()
        if not line:
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, _BadRow(f"invalid JSON ({e.msg}, column {e.colno})")


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        # strict: a stray quote (`a,"b"c`) or a quote left open at the end of the file
        # is an error for that row, instead of text silently glued into a prompt.
        reader = csv.reader(f, strict=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return
        except csv.Error as e:
            raise PromptPoolError(f"{path}: cannot read the CSV header ({e})") from None
        if "prompt" not in header and "messages" not in header:
            raise PromptPoolError(f"{path}: the CSV header has no 'prompt' or 'messages' "
                                  f"column (found: {', '.join(header) or 'nothing'})")
        # reader.line_num is the physical line the reader has reached, after a whole
        # record; a quoted field can span lines, so a record starts on the line after
        # the previous record ended, not at line_num.
        end = reader.line_num
        while True:
            start = end + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                end = reader.line_num
                yield start, _BadRow(f"unreadable CSV ({e})")
                continue
            end = reader.line_num
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                yield start, _BadRow(f"expected {len(header)} fields, got {len(cells)} "
                                     "(an unquoted comma or a missing quote?)")
                continue
            # Every CSV cell is text; an empty one means the column is not used here.
            row: dict[str, Any] = {h: (c if c != "" else None) for h, c in zip(header, cells)}
            if row.get("messages") is None and row.get("prompt") is None and "prompt" in row:
                row["prompt"] = ""  # a blank prompt cell is an empty prompt, counted as such
            yield start, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise PromptPoolError(f"{path}: not a readable Parquet file ({e})") from None
    if "prompt" not in table.column_names and "messages" not in table.column_names:
        raise PromptPoolError(f"{path}: no 'prompt' or 'messages' column "
                              f"(found: {', '.join(table.column_names) or 'nothing'})")
    # Rows are numbered from 1, like lines, so `row 1` is the first prompt.
    for n, row in enumerate(table.to_pylist(), start=1):
        yield n, row


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def load_prompt_pool(path: str | os.PathLike, *, max_chars: int = DEFAULT_MAX_CHARS) -> PromptPool:
    """Read a prompt pool, skipping (and reporting) every row that cannot be used.

    Raises PromptPoolError, naming the file, when the file is missing, has an unknown
    extension, cannot be read as its format at all, or holds no usable prompt.
    """
    path = Path(path)
    name = str(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PromptPoolError(f"{name}: unknown prompt pool format {path.suffix or '(no extension)'!r}; "
                              f"use {', '.join(FORMATS)}")
    if not path.exists():
        raise PromptPoolError(f"{name}: no such prompt pool file")
    if path.is_dir():
        raise PromptPoolError(f"{name}: is a directory, not a prompt pool file")

    unit = "row" if fmt == "parquet" else "line"
    rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt](path)
    report = PoolReport(path=name)
    prompts: list[Prompt] = []
    seen_messages: dict[str, int] = {}  # canonical messages JSON -> where first seen
    seen_ids: dict[str, int] = {}

    def skip(where: int, counter: str, reason: str) -> None:
        setattr(report, counter, getattr(report, counter) + 1)
        # `file:12: reason` for a text file (the line an editor shows), `file:row 12:`
        # for Parquet, which has rows but no lines.
        problem = f"{name}:{'row ' if unit == 'row' else ''}{where}: {reason}"
        report.problems.append(problem)
        log.warning("%s", problem)

    try:
        for where, row in rows:
            try:
                if isinstance(row, _BadRow):
                    raise row
                prompt = _parse_row(row)
            except _BadRow as e:
                skip(where, "bad", str(e))
                continue
            last_user = prompt.messages[-1]["content"]
            if not last_user.strip():
                skip(where, "empty", "empty prompt")
                continue
            size = sum(len(m["content"]) for m in prompt.messages)
            if size > max_chars:
                skip(where, "oversize", f"prompt has {size} characters, more than max_chars={max_chars}")
                continue
            key = messages_to_json(prompt.messages)
            if key in seen_messages:
                skip(where, "duplicate", f"duplicate of {unit} {seen_messages[key]} (same messages)")
                continue
            if prompt.id in seen_ids:
                skip(where, "duplicate_id",
                     f"id {prompt.id!r} already used on {unit} {seen_ids[prompt.id]} for a different prompt")
                continue
            seen_messages[key] = where
            seen_ids[prompt.id] = where
            prompts.append(prompt)
    except OSError as e:
        raise PromptPoolError(f"{name}: cannot read ({e.strerror or e})") from None

    report.loaded = len(prompts)
    if not prompts:
        raise PromptPoolError(f"{name}: no usable prompts ({report.summary()})", report)
    return PromptPool(prompts=prompts, report=report)


# --------------------------------------------------------------------------------------
# `preflab prompts FILE`
# --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="prompt pool: .jsonl, .json (lines), .csv or .parquet")
    p.add_argument("--show", type=int, default=5, metavar="N", help="print the first N prompts")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help="drop prompts longer than this many characters in all")


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run(args: argparse.Namespace) -> int:
    # The problems are printed below; the logger would print each one a second time
    # on stderr (Python's last-resort handler), so it is quiet while the CLI loads.
    was_disabled, log.disabled = log.disabled, True
    try:
        pool = load_prompt_pool(args.file, max_chars=args.max_chars)
    except PromptPoolError as e:
        if e.report is not None:
            for problem in e.report.problems:
                print(problem)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        log.disabled = was_disabled

    report = pool.report
    print(report.summary())
    for problem in report.problems:
        print(f"  {problem}")

    tag_counts = Counter(t for p in pool.prompts for t in p.tags)
    untagged = sum(1 for p in pool.prompts if not p.tags)
    if tag_counts:
        print("tags:")
        width = max(len(t) for t in tag_counts)
        for tag, count in sorted(tag_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {tag:<{width}}  {count}")
    if untagged:
        print(f"untagged: {untagged}")

    shown = pool.prompts[: max(args.show, 0)]
    if shown:
        print(f"first {len(shown)} of {len(pool.prompts)}:")
    for p in shown:
        turns = f" ({len(p.messages)} messages)" if len(p.messages) > 1 else ""
        tags = f" [{', '.join(p.tags)}]" if p.tags else ""
        print(f"  {p.id}{tags}{turns}: {_one_line(p.messages[-1]['content'], 100)}")
    return 0
