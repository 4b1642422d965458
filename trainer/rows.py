"""Row files (JSONL, JSON, CSV, Parquet) read one row at a time, each with where it came
from, so that every problem can be reported as `file:line: reason` and skipped.

Prompt pools, pairs files, preference imports and reward-training files are all read
through `iter_rows`; each caller turns a row into its own thing and raises `BadRow` for
a row it cannot use. A file that cannot be read at all raises `RowFileError`.

Where a row came from is a string: `"12"` (line 12 of a JSONL or CSV file, as an editor
shows it), `"item 3"` (of a JSON array) or `"row 7"` (of a Parquet file, which has rows
but no lines), so `f"{path}:{where}: {reason}"` reads naturally for each.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.errors import PreflabError

ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class BadRow(PreflabError, ValueError):
    """One row that cannot be used; the message is the reason shown to the user."""


class RowFileError(PreflabError, ValueError):
    """A file that cannot be read as rows at all. The message names the file."""


def line_or_row(where: str) -> str:
    """`"12"` -> `"line 12"`; `"row 7"` and `"item 3"` stay as they are."""
    return f"line {where}" if where.isdigit() else where


# --------------------------------------------------------------------------------------
# Values inside a row
# --------------------------------------------------------------------------------------


def check_utf8(text: str, what: str) -> str:
    # Text files are decoded with surrogateescape, so one undecodable byte costs one row,
    # not the file; such text (lone surrogates) could never be written to Parquet.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(f"{what} is not valid UTF-8 text") from None
    return text


def parse_messages(
    value: Any, what: str = "'messages'", *, roles: tuple[str, ...] | None = ROLES
) -> list[dict[str, str]]:
    """A chat (a list of {"role", "content"}, or its JSON spelling, as a CSV cell holds
    it) -> a clean list of messages with only those two keys. `roles=None` takes any."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(f"{what} is not valid JSON ({e.msg})") from None
    if not isinstance(value, (list, tuple)):
        raise BadRow(f"{what} must be a list of chat messages, got {type(value).__name__}")
    if not value:
        raise BadRow(f"{what} is an empty list")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f"{what} message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or (roles is not None and role not in roles):
            expected = ", ".join(roles) if roles else "a string"
            raise BadRow(f"{what} message {i} has role {role!r}; expected {expected}")
        if not isinstance(content, str):
            raise BadRow(f"{what} message {i} content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": check_utf8(content, f"{what} message {i}")})
    return messages


# --------------------------------------------------------------------------------------
# Files -> rows
# --------------------------------------------------------------------------------------


def iter_rows(
    path: str | os.PathLike, *, needs_any: tuple[str, ...] = ()
) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
    """Yield (where, row) for each row, or (where, BadRow) for one that cannot be parsed.

    `needs_any`: column names of which a CSV or Parquet file must have at least one
    (checked once, up front, since a missing column would make every row bad).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise RowFileError(
            f"{path}: unknown file type {suffix or '(no extension)'!r}; use {', '.join(SUFFIXES)}"
        )
    if not path.exists():
        raise RowFileError(f"{path}: no such file")
    if path.is_dir():
        raise RowFileError(f"{path}: is a directory, not a file")
    try:
        if suffix == ".parquet":
            yield from _parquet_rows(path, needs_any)
        elif suffix == ".csv":
            yield from _csv_rows(path, needs_any)
        else:
            yield from _json_rows(path)
    except OSError as e:
        raise RowFileError(f"{path}: cannot read ({e.strerror or e})") from None


def _object(row: Any) -> dict[str, Any] | BadRow:
    return row if isinstance(row, dict) else BadRow(f"expected a JSON object, got {type(row).__name__}")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM, as some editors on Windows write
        data = data[3:]
    if path.suffix.lower() == ".json" and data.lstrip().startswith(b"["):
        try:
            items = json.loads(data.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            raise RowFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        for i, item in enumerate(items, start=1):
            yield f"item {i}", _object(item)
        return
    # JSON lines. Split on \n only: a JSON string cannot hold a raw newline, so every \n
    # ends a physical line, and the numbers match what an editor shows.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.decode("utf-8", errors="surrogateescape").strip()
        if not line:
            continue
        try:
            yield str(lineno), _object(json.loads(line))
        except json.JSONDecodeError as e:
            yield str(lineno), BadRow(f"invalid JSON ({e.msg}, column {e.colno})")


def _csv_rows(path: Path, needs_any: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        # strict: a stray quote (`a,"b"c`) or a quote left open at the end of the file
        # is an error for that row, instead of text silently glued into the next field.
        reader = csv.reader(f, strict=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return
        except csv.Error as e:
            raise RowFileError(f"{path}: cannot read the CSV header ({e})") from None
        if needs_any and not set(needs_any) & set(header):
            raise RowFileError(
                f"{path}: the CSV header has no {' or '.join(repr(c) for c in needs_any)} "
                f"column (found: {', '.join(header) or 'nothing'})"
            )
        # reader.line_num is the physical line reached after a whole record; a quoted
        # field can span lines, so a record starts on the line after the previous one
        # ended, not at line_num.
        end = reader.line_num
        while True:
            start = end + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                end = reader.line_num
                yield str(start), BadRow(f"unreadable CSV ({e})")
                continue
            end = reader.line_num
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                yield (
                    str(start),
                    BadRow(
                        f"expected {len(header)} fields, got {len(cells)} "
                        "(an unquoted comma or a missing quote?)"
                    ),
                )
                continue
            # Every CSV cell is text; an empty one means the column is not used here.
            yield str(start), {h: (c if c != "" else None) for h, c in zip(header, cells)}


def _parquet_rows(path: Path, needs_any: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise RowFileError(f"{path}: not a readable Parquet file ({e})") from None
    names = parquet.schema_arrow.names
    if needs_any and not set(needs_any) & set(names):
        raise RowFileError(
            f"{path}: no {' or '.join(repr(c) for c in needs_any)} column "
            f"(found: {', '.join(names) or 'nothing'})"
        )
    n = 0
    try:
        for batch in parquet.iter_batches(batch_size=10_000):
            for row in batch.to_pylist():
                n += 1  # rows are numbered from 1, like lines
                yield f"row {n}", row
    except OSError:
        raise
    except Exception as e:
        raise RowFileError(f"{path}: damaged Parquet data after row {n} ({e})") from None
