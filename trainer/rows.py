"""Row files (JSONL, JSON, CSV, Parquet) read one row at a time, each with where it came
from, so that every problem can be reported as `file:line: reason` and skipped.

Prompt pools, pairs files, preference imports and reward-training files are all read
through `iter_rows`; each caller turns a row into its own thing and raises `BadRow` for
a row it cannot use. A file that cannot be read at all raises `RowFileError`.

Where a row came from is a string: `"12"` (line 12 of a JSONL or CSV file, as an editor
shows it), `"item 3"` (of a JSON array) or `"row 7"` (of a Parquet file, which has rows
but no lines), so `f"{path}:{where}: {reason}"` reads naturally for each.

Every row `iter_rows` yields has been checked, whatever its format: each string in it
(keys and values, however deep in nested objects and lists) is text the store can hold
(no lone surrogate, which is what an undecodable byte or a `"\\ud800"` escape turns
into; no NUL character, which PostgreSQL refuses), and it nests at most MAX_DEPTH levels. A row that
fails is a BadRow `FIELD: reason` (`model_a: not valid text (a lone surrogate \\ud800 at
character 5)`), so a bad value is reported where it was loaded, never by every vote on it
later. `load_json` is the JSON parse behind it, for a JSON string inside a row.
"""

from __future__ import annotations

import csv
import json
import os
import re
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


MAX_DEPTH = 64  # objects and lists inside one another, in one row; real data needs a few


def storable_text(text: str) -> str:
    """Model text as a store can hold it: no NUL (PostgreSQL refuses one), no lone
    surrogate (UTF-8 cannot encode one). For what a model wrote; a person's text is
    refused instead (text_problem), so that they can fix it."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def text_problem(text: str) -> str | None:
    """Why `text` is not valid text, None when it is: a lone surrogate (what surrogateescape
    makes of an undecodable byte, or what a JSON "\\ud800" escape gives), which UTF-8
    cannot encode, so no store can hold it; or a NUL character, which PostgreSQL's text
    refuses (a store copied there would fail on it). Characters count from 1."""
    nul = text.find("\x00")  # memchr: about free next to reading the file
    if nul >= 0:
        return f"not valid text (a NUL character \\x00 at character {nul + 1})"
    if text.isascii():  # O(1) in CPython: the common case costs nothing
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char, at = text[e.start], e.start + 1
        if 0xDC80 <= ord(char) <= 0xDCFF:  # surrogateescape's spelling of a raw byte
            return (
                f"not valid text (a lone surrogate {ascii(char)[1:-1]}, or the invalid UTF-8 byte "
                f"0x{ord(char) - 0xDC00:02x}, at character {at})"
            )
        return f"not valid text (a lone surrogate {ascii(char)[1:-1]} at character {at})"
    return None


def check_utf8(text: str, what: str) -> str:
    """`text`, or BadRow `WHAT: not valid text (...)`."""
    problem = text_problem(text)
    if problem:
        raise BadRow(f"{what}: {problem}")
    return text


def _label(key: Any) -> str:
    """A key as a field name in a message: printable, and short."""
    text = key if isinstance(key, str) else repr(key)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 40 else text[:39] + "…"


def check_values(value: Any, field: str = "") -> None:
    """BadRow `FIELD: reason` for the first string in `value` (a row: dict keys and values,
    list items, recursively, in document order) that is not storable text, or for objects
    and lists nested deeper than MAX_DEPTH. `field` names `value` itself; the fields
    inside are named `gen_params.a.seed`, `prompt[0].content`."""
    stack = [(value, field, field, 1)]  # (value, its name, its top-level field, depth)
    while stack:
        v, name, top, depth = stack.pop()
        if isinstance(v, str):
            problem = text_problem(v)
            if problem:
                raise BadRow(f"{name or 'the row'}: {problem}")
            continue
        if isinstance(v, dict):
            items = []
            for k, item in v.items():
                key = _label(k)
                if isinstance(k, str) and (problem := text_problem(k)):
                    raise BadRow(f"{f'{name}: a key' if name else 'a field name'} is {problem}")
                items.append((item, f"{name}.{key}" if name else key))
        elif isinstance(v, (list, tuple)):
            items = [(item, f"{name}[{i}]") for i, item in enumerate(v)]
        else:
            continue
        if depth > MAX_DEPTH:
            raise BadRow(f"{top or 'the row'}: nested deeper than {MAX_DEPTH} levels")
        for item, item_name in reversed(items):
            stack.append((item, item_name, top or item_name, depth + 1))


def load_json(text: str | bytes) -> Any:
    """json.loads, with every way it can fail as BadRow: not JSON, nested too deeply for
    the parser (RecursionError) or deeper than MAX_DEPTH, a number too long to convert.
    The value's text is not checked here (check_values does)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow(f"invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise BadRow(f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError as e:  # bytes given, and not UTF-8
        raise BadRow(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})") from None
    except ValueError:  # an integer of more than 4300 digits, which Python will not convert
        raise BadRow("invalid JSON (a number too long to read)") from None
    return value


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
    if suffix == ".parquet":
        rows = _parquet_rows(path, needs_any)
    elif suffix == ".csv":
        rows = _csv_rows(path, needs_any)
    else:
        rows = _json_rows(path)
    try:
        for where, row in rows:
            if isinstance(row, _Checked):
                row = row.row
            elif not isinstance(row, BadRow):
                try:
                    check_values(row)
                except BadRow as e:
                    row = e
            yield where, row
    except OSError as e:
        raise RowFileError(f"{path}: cannot read ({e.strerror or e})") from None


class _Checked:
    """A row whose line shows it needs no check_values (see _plain)."""

    __slots__ = ("row",)

    def __init__(self, row: Any):
        self.row = row


# A \uD800-\uDFFF escape in JSON text: half a surrogate pair, maybe a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _plain(raw: bytes) -> bool:
    """Whether a JSON line that decoded as strict UTF-8 cannot hold invalid text or deep
    nesting: no surrogate escape, and fewer brackets than MAX_DEPTH. Nearly every line
    is plain, and this costs a fraction of walking the parsed row; one that is not (a
    bracket in a string, a real surrogate pair) is walked, so nothing is missed."""
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        return False
    return b"\\u" not in raw or not _SURROGATE_ESCAPE.search(raw)


def _object(row: Any) -> dict[str, Any] | BadRow:
    return row if isinstance(row, dict) else BadRow(f"expected a JSON object, got {type(row).__name__}")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM, as some editors on Windows write
        data = data[3:]
    if path.suffix.lower() == ".json" and data.lstrip().startswith(b"["):
        text = data.decode("utf-8", errors="surrogateescape")
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RowFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except RecursionError:  # deeper than the parser goes: say where it got that deep
            raise RowFileError(
                f"{path}:{_too_deep_at(text)}: nested deeper than {MAX_DEPTH} levels"
            ) from None
        except ValueError:  # an integer of more than 4300 digits, which Python will not convert
            raise RowFileError(f"{path}: not valid JSON (a number too long to read)") from None
        for i, item in enumerate(items, start=1):
            yield f"item {i}", _object(item)
        return
    # JSON lines. Split on \n only: a JSON string cannot hold a raw newline, so every \n
    # ends a physical line, and the numbers match what an editor shows.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line, strict = raw.decode("utf-8").strip(), True
        except UnicodeDecodeError:  # kept as surrogates, which check_values reports
            line, strict = raw.decode("utf-8", errors="surrogateescape").strip(), False
        if not line:
            continue
        try:
            row = _object(load_json(line))
        except BadRow as e:
            row = e
        yield str(lineno), _Checked(row) if strict and isinstance(row, dict) and _plain(raw) else row


def _too_deep_at(text: str) -> int:
    """The line on which the brackets of a JSON text first nest deeper than MAX_DEPTH
    (strings skipped). Only run on a text the parser gave up on, so speed does not matter."""
    depth, line, in_string, escaped = 0, 1, False, False
    for char in text:
        if char == "\n":
            line += 1
        elif in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line
        elif char in "]}":
            depth -= 1
    return line


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
