"""Prompt pools: the files of prompts that candidate answers are generated for.

A pool is one file, read by its extension:

    .jsonl / .json   one JSON object a line
    .csv             a header row, then one prompt a row (quoted fields may span lines)
    .parquet         one prompt a row

Each row gives either `prompt` (a string: one user message) or `messages` (a chat list
of {"role", "content"}; in CSV a JSON string), and may give `id` (otherwise a hash of
the messages, `trainer.store.prompt_id_for`) and `tags` (a list of strings, or
one comma-separated string). Other columns are ignored, so a pool can carry notes.

Loading is forgiving, because pools are written by hand and by scripts: a row that
cannot be used is reported as `file:line: reason` and skipped, and only a file with
nothing usable in it is an error. The annotation app and the policy trainer both read
pools through `load_prompt_pool`, which is why this lives in `trainer` (the trainer
may not import `annotate`). `load_prompts` is what a policy trains on (and is evaluated
on): a pool's prompts, or the distinct prompts of a comparison store. It imports nothing
heavy: `preflab prompts` must answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data import PROMPTS
from trainer.errors import PreflabError
from trainer.rows import BadRow, RowFileError, check_utf8, iter_rows, line_or_row, parse_messages
from trainer.store import messages_to_json, prompt_id_for

log = logging.getLogger("preflab.prompts")

# The pool shipped with preflab: the default of `serve --model` and of train-policy.
DEFAULT_PROMPTS = PROMPTS  # the shipped pool (trainer/data: package data)

DEFAULT_MAX_CHARS = 32_000
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class PromptPoolError(PreflabError, ValueError):
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
    bad: int = 0  # unusable rows: broken JSON, wrong types, malformed chat
    empty: int = 0  # nothing to answer (blank prompt or blank last user turn)
    oversize: int = 0  # more than max_chars characters in all messages together
    duplicate: int = 0  # same messages as an earlier row
    duplicate_id: int = 0  # same id as an earlier row, different messages
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


# --------------------------------------------------------------------------------------
# One row -> one Prompt
# --------------------------------------------------------------------------------------


def _parse_messages(value: Any) -> list[dict[str, str]]:
    # Extra keys (name, tool calls...) are dropped: the record holds role and content.
    messages = parse_messages(value)
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            # Chat templates put the system prompt first; elsewhere it is a mistake.
            raise BadRow(f"message {i} is a system message; only the first may be")
    if messages[-1]["role"] != "user":
        raise BadRow(f"the last message must be from the user, not {messages[-1]['role']!r}")
    return messages


def _parse_tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    elif not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise BadRow("'tags' must be a list of strings or a comma-separated string")
    tags = []
    for t in value:
        check_utf8(t, "'tags'")
        t = t.strip()
        if t and t not in tags:
            tags.append(t)
    return tags


def _parse_row(row: Any) -> Prompt:
    """A row (already a dict of Python values; None = absent) -> Prompt, or BadRow."""
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is None and messages is None and "prompt" in row:
        prompt = ""  # a blank CSV cell: an empty prompt, counted as such, not a bad row
    if prompt is not None and messages is not None:
        raise BadRow("has both 'prompt' and 'messages'; give one")
    if prompt is None and messages is None:
        raise BadRow("needs a 'prompt' string or a 'messages' list")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise BadRow(f"'prompt' must be a string, got {type(prompt).__name__}")
        check_utf8(prompt, "'prompt'")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _parse_messages(messages)

    pid = row.get("id")
    if pid is None:
        pid = prompt_id_for(messages)
    elif not isinstance(pid, str):
        raise BadRow(f"'id' must be a string, got {type(pid).__name__}")
    elif not pid.strip():
        raise BadRow("'id' is blank")
    else:
        check_utf8(pid, "'id'")
    return Prompt(id=pid, messages=messages, tags=_parse_tags(row.get("tags")))


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
    if path.suffix.lower() not in FORMATS:
        raise PromptPoolError(
            f"{name}: unknown prompt pool format {path.suffix or '(no extension)'!r}; "
            f"use {', '.join(FORMATS)}"
        )
    if not path.exists():
        raise PromptPoolError(f"{name}: no such prompt pool file")
    report = PoolReport(path=name)
    prompts: list[Prompt] = []
    seen_messages: dict[str, str] = {}  # canonical messages JSON -> where first seen
    seen_ids: dict[str, str] = {}

    def skip(where: str, counter: str, reason: str) -> None:
        setattr(report, counter, getattr(report, counter) + 1)
        # `file:12: reason` for a text file (the line an editor shows), `file:row 12:`
        # for Parquet, which has rows but no lines.
        problem = f"{name}:{where}: {reason}"
        report.problems.append(problem)
        log.warning("%s", problem)

    try:
        for where, row in iter_rows(path, needs_any=("prompt", "messages")):
            try:
                if isinstance(row, BadRow):
                    raise row
                prompt = _parse_row(row)
            except BadRow as e:
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
                skip(where, "duplicate", f"duplicate of {line_or_row(seen_messages[key])} (same messages)")
                continue
            if prompt.id in seen_ids:
                skip(
                    where,
                    "duplicate_id",
                    f"id {prompt.id!r} already used on {line_or_row(seen_ids[prompt.id])} for a different prompt",
                )
                continue
            seen_messages[key] = where
            seen_ids[prompt.id] = where
            prompts.append(prompt)
    except RowFileError as e:
        raise PromptPoolError(str(e)) from None

    report.loaded = len(prompts)
    if not prompts:
        raise PromptPoolError(f"{name}: no usable prompts ({report.summary()})", report)
    return PromptPool(prompts=prompts, report=report)


def load_prompts(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Chat message lists for training a policy (and evaluating it): from a prompt pool file
    or from the prompts of a comparison store, a directory or a postgresql:// URL (its
    `prompt` column, each distinct prompt once). A store that cannot be read raises
    trainer.store.StoreError; anything else unusable, PolicyInputError."""
    from trainer.errors import PolicyInputError
    from trainer.reward_data import as_messages
    from trainer.store import StoreError, describe, is_database

    database = is_database(path)
    if not database:
        path = Path(path)  # never a URL: Path would fold its "//"
    if database or path.is_dir():
        from trainer.store import read_comparisons

        try:
            table = read_comparisons(path, columns=["prompt"])
        except StoreError:  # names the store and what to do; the run's error as it is
            raise
        except Exception as e:  # not a store: say which
            raise PolicyInputError(f"{describe(path)}: cannot read it as a comparison store ({e})") from None
        distinct = list(dict.fromkeys(table.column("prompt").to_pylist())) if table.num_rows else []
        if not distinct:
            raise PolicyInputError(f"{describe(path)}: the comparison store holds no votes, so no prompts")
        return [as_messages(p) for p in distinct]
    try:
        return [p.messages for p in load_prompt_pool(path).prompts]
    except PromptPoolError as e:
        raise PolicyInputError(str(e)) from None


# --------------------------------------------------------------------------------------
# `preflab prompts FILE`
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="prompt pool: .jsonl, .json (lines), .csv or .parquet")
    p.add_argument("--show", type=int, default=5, metavar="N", help="print the first N prompts")
    p.add_argument(
        "--max-chars",
        type=int,
        default=DEFAULT_MAX_CHARS,
        help="drop prompts longer than this many characters in all",
    )


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
