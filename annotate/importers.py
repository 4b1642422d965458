"""Import preference data from elsewhere as votes in a comparison store.

    preflab import prefs.jsonl --data comparisons --source ultrafeedback

Reads Parquet (.parquet) or JSON (.jsonl, or .json holding JSON Lines or one JSON
array of rows) in any of four styles, detected from the first row (`--style` forces one):

    standard        TRL, explicit prompt: prompt / chosen / rejected strings.
                    A prompt written as an HH transcript ("\\n\\nHuman: ...\\n\\nAssistant:",
                    how `preflab export` writes multi-message prompts) is parsed back
                    into messages, and one leading space is taken off each answer.
    conversational  TRL: prompt = list of messages; chosen / rejected = lists holding
                    one assistant message (a plain string is accepted too).
    implicit        TRL, implicit prompt: no prompt column; chosen / rejected are full
                    conversations (the prompt is their common leading messages, and
                    each must end in one assistant message), or full texts, split the
                    way TRL's `extract_prompt` splits them (longest common prefix,
                    a space at the boundary goes with the answers).
    hh              Anthropic-HH transcripts: chosen / rejected share everything up to
                    the last "\\n\\nAssistant:" of their common prefix; that prefix is
                    parsed into messages (Human -> user, Assistant -> assistant,
                    System -> system) and the rest is the answer (minus one space).

Each row becomes one vote: annotator and both models `import:<source>`, left "a", the
two answers in canonical order (sorted by text) with `choice` pointing at the chosen
one. Strength: a `strength` column holding 1 or 2 is kept; otherwise a `margin`
column holding exactly 1 or 2 (what `preflab export --margin` writes) becomes that
strength; anything else leaves it null (a plain preference of unknown strength).

A row that cannot be read is reported as `file:N: reason` (N is the line of a JSON
Lines file, the item of a JSON array, the row of a Parquet file, counting from 1) and
skipped. Votes are written with the store's `append_many` in chunks, each chunk one
durable part file (a directory store) or one transaction (PostgreSQL); a file with no
importable row is an error and writes nothing.
Importing the same file twice imports its votes twice.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotate.transcript import ASSISTANT_CUE, ROLE_LABELS
from trainer.rows import BadRow, iter_rows, parse_messages, text_problem
from trainer.store import DATA_HELP, describe, is_database, messages_to_json, pair_id_for, prompt_id_for

STYLES = ("standard", "conversational", "implicit", "hh")
CHUNK_ROWS = 50_000
SHOW_BAD = 20  # bad rows printed one by one; the rest are counted

LABEL_ROLES = {label: role for role, label in ROLE_LABELS.items()}
TURN = re.compile(r"\n\n(" + "|".join(LABEL_ROLES) + "):")


# --------------------------------------------------------------------------------------
# One row -> (messages, chosen, rejected)
# --------------------------------------------------------------------------------------


def detect_style(row: dict[str, Any]) -> str:
    if "chosen" not in row or "rejected" not in row:
        raise BadRow("needs 'chosen' and 'rejected' columns")
    if "prompt" in row and row["prompt"] is not None:
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    chosen = row["chosen"]
    if isinstance(chosen, str) and (chosen.startswith("\n\nHuman:") or chosen.startswith("Human:")):
        return "hh"
    return "implicit"


def _string(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key not in row:
        raise BadRow(f"'{key}' is missing")
    if not isinstance(value, str):
        raise BadRow(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    # Any role is taken: preference data in the wild has tool and function turns too.
    return parse_messages(value, f"'{key}'", roles=None)


def _reply(value: Any, key: str) -> str:
    """A conversational answer: one assistant message (or, leniently, a plain string)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRow(f"'{key}' must be one assistant message, got roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on C-level slice comparisons
    (a character loop in Python would dominate a long-transcript import)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _drop_space(text: str) -> str:
    """The answer after "Assistant:" loses the one space that separates them."""
    return text[1:] if text.startswith(" ") else text


def parse_transcript(text: str) -> list[dict[str, str]]:
    """ "\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: bye" -> chat messages."""
    if text.startswith(tuple(f"{label}:" for label in LABEL_ROLES)):
        text = "\n\n" + text
    parts = TURN.split(text)
    if parts[0].strip():
        raise BadRow("transcript has text before its first 'Human:' turn")
    messages = [
        {"role": LABEL_ROLES[label], "content": _drop_space(content)}
        for label, content in zip(parts[1::2], parts[2::2])
    ]
    if not messages:
        raise BadRow("transcript has no 'Human:' / 'Assistant:' turns")
    return messages


def _is_transcript_prompt(text: str) -> bool:
    return text.endswith(ASSISTANT_CUE) and text.startswith(("\n\nHuman:", "\n\nSystem:"))


def from_standard(row):
    prompt, chosen, rejected = _string(row, "prompt"), _string(row, "chosen"), _string(row, "rejected")
    if _is_transcript_prompt(prompt):
        return (parse_transcript(prompt[: -len(ASSISTANT_CUE)]), _drop_space(chosen), _drop_space(rejected))
    return [{"role": "user", "content": prompt}], chosen, rejected


def from_conversational(row):
    return (
        _messages(row.get("prompt"), "prompt"),
        _reply(row.get("chosen"), "chosen"),
        _reply(row.get("rejected"), "rejected"),
    )


def from_implicit(row):
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        # TRL's extract_prompt: the common prefix is the prompt, and a space right
        # before the point where they differ belongs to the answers.
        cut = _common_prefix_len(chosen, rejected)
        if cut < min(len(chosen), len(rejected)) and cut and chosen[cut - 1] == " ":
            cut -= 1
        if cut == 0:
            raise BadRow("chosen and rejected share no prompt text")
        return [{"role": "user", "content": chosen[:cut]}], chosen[cut:], rejected[cut:]
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    cut = 0
    while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
        cut += 1
    if cut == 0:
        raise BadRow("chosen and rejected share no prompt messages")
    return chosen[:cut], _reply(chosen[cut:], "chosen"), _reply(rejected[cut:], "rejected")


def from_hh(row):
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    common = _common_prefix_len(chosen, rejected)
    cue = chosen.rfind(ASSISTANT_CUE, 0, common)
    if cue < 0:
        raise BadRow("chosen and rejected share no '\\n\\nAssistant:' turn")
    answers = [_drop_space(text[cue + len(ASSISTANT_CUE) :]) for text in (chosen, rejected)]
    if any(TURN.search(a) for a in answers):
        raise BadRow("chosen and rejected differ before their last assistant turn")
    return parse_transcript(chosen[:cue]), answers[0], answers[1]


PARSERS = {
    "standard": from_standard,
    "conversational": from_conversational,
    "implicit": from_implicit,
    "hh": from_hh,
}


def strength_of(row: dict[str, Any]) -> int | None:
    """1 or 2 from a `strength` column, else from a `margin` of exactly 1 or 2."""
    for key in ("strength", "margin"):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (1, 2):
            return int(value)
    return None


def make_vote(messages, chosen: str, rejected: str, strength: int | None, source: str) -> dict[str, Any]:
    """The vote record for one preference (the store fills event_id and created_at)."""
    if chosen == rejected:
        raise BadRow("chosen and rejected are the same answer")
    prompt = messages_to_json(messages)
    try:  # JSON may spell a lone surrogate, which no UTF-8 file can hold
        (prompt + chosen + rejected).encode()
    except UnicodeEncodeError:
        raise BadRow("text is not valid Unicode (a lone surrogate)") from None
    a, b = sorted((chosen, rejected))
    who = f"import:{source}"
    return {
        "kind": "vote",
        "pair_id": pair_id_for(prompt, a, b),
        "prompt_id": prompt_id_for(messages),
        "prompt": prompt,
        "response_a": a,
        "response_b": b,
        "model_a": who,
        "model_b": who,
        "left": "a",
        "choice": "a" if chosen == a else "b",
        "strength": strength,
        "annotator": who,
    }


# --------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    path: str
    style: str | None = None
    rows: int = 0  # rows read (good and bad)
    imported: int = 0
    parts: int = 0  # chunks written (part files / transactions)
    bad: list[str] = field(default_factory=list)  # "file:N: reason", the first SHOW_BAD
    bad_count: int = 0


def import_file(
    path: str | os.PathLike,
    target: str | os.PathLike,
    source: str,
    *,
    style: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportReport:
    """Import one file into the store `target` (a directory, or a postgresql:// URL)
    as votes by `import:<source>`.

    Raises ValueError when the file cannot be read at all or holds no importable row
    (nothing is written then; the store is not even created). Store problems raise
    trainer.store.StoreError.
    """
    from trainer.store import open_store

    path = Path(path)
    if not source or not source.strip():
        raise ValueError("--source must name where the data comes from")
    if problem := text_problem(source):  # it becomes every vote's annotator
        raise ValueError(f"--source: {problem}")
    if style is not None and style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    report = ImportReport(path=str(path), style=style)
    store = None
    chunk: list[dict[str, Any]] = []

    def flush():
        nonlocal store
        if store is None:  # opened at the first good chunk: a failed import leaves no store
            store = open_store(target)
        store.append_many(chunk, where=str(path))
        report.imported += len(chunk)
        report.parts += 1
        chunk.clear()

    try:
        for position, row in iter_rows(path, needs_any=("chosen",)):
            report.rows += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                if report.style is None:
                    report.style = detect_style(row)
                messages, chosen, rejected = PARSERS[report.style](row)
                chunk.append(make_vote(messages, chosen, rejected, strength_of(row), source))
            except BadRow as e:
                report.bad_count += 1
                if len(report.bad) < SHOW_BAD:
                    report.bad.append(f"{path}:{position}: {e}")
                continue
            if len(chunk) >= chunk_rows:
                flush()
        if chunk:
            flush()
    finally:
        if store is not None:
            store.close()
    if report.imported == 0:
        why = f"; first problem: {report.bad[0]}" if report.bad else ""
        raise ValueError(f"{path}: no importable rows ({report.rows} read){why}; nothing written")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a .parquet, .jsonl or .json file of preferences")
    p.add_argument("--data", required=True, metavar="STORE", help=DATA_HELP)
    p.add_argument(
        "--source",
        required=True,
        metavar="NAME",
        help="where the data comes from; votes are by annotator import:NAME",
    )
    p.add_argument(
        "--style",
        choices=STYLES,
        default=None,
        help="force the row style instead of detecting it from the first row",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=CHUNK_ROWS,
        metavar="N",
        help="votes per durable part file (per transaction with PostgreSQL)",
    )


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        report = import_file(args.file, args.data, args.source, style=args.style, chunk_rows=args.chunk_rows)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in report.bad:
        print(line, file=sys.stderr)
    if report.bad_count > len(report.bad):
        print(f"... and {report.bad_count - len(report.bad)} more bad rows", file=sys.stderr)
    print(f"read      {report.rows} rows from {report.path} (style {report.style})")
    unit = ("transaction" if is_database(args.data) else "part file") + ("" if report.parts == 1 else "s")
    print(
        f"imported  {report.imported} votes by import:{args.source} into {describe(args.data)} "
        f"({report.parts} {unit})"
    )
    print(f"skipped   {report.bad_count} bad rows")
    print(f"done      in {time.perf_counter() - t0:.2f}s")
    return 0
