"""The annotation app's pairs: `Pair`, the one shape every source of pairs gives, and
the pairs file.

    pairs, problems = load_pairs("pairs.jsonl")   # preflab serve --pairs FILE (annotate/serve.py)
    pair = pair_from_row({"prompt": "Hi", "response_a": "Hello", "response_b": "Hey"})
    row = pair_to_row(pair)                       # the same row shape, to write back

A pairs file (`preflab serve --pairs FILE`) holds candidates generated beforehand,
e.g. by `preflab generate`, or brought from elsewhere. JSON Lines or Parquet, one pair
a row: `prompt` (a string, taken as one user message, or a list of chat messages),
`response_a`, `response_b`, and optionally `model_a`, `model_b`, `pair_id`,
`prompt_id`, `gen_params`. A row that cannot be used is reported as `file:line:
reason` and skipped; only a file with nothing usable in it is an error.

The other source, pairs sampled from models while the server runs (`preflab serve
--model M`), is `Generator` in annotate/pair_generator.py; it caches its pairs in
this row shape and reads them back with `pair_from_row`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import PreflabError
from trainer.prompts import DEFAULT_MAX_CHARS
from trainer.rows import BadRow, RowFileError, check_utf8, check_values, iter_rows, load_json, parse_messages
from trainer.store import messages_to_json, pair_id_for, prompt_id_for

# What one row of a pairs file may hold, so that one row cannot fill the page or the
# store: the prompt as much as a prompt pool's, an answer twice that, names and ids as
# much as a vote may name (annotate/service.py refuses a longer pair id).
MAX_PROMPT_CHARS = DEFAULT_MAX_CHARS
MAX_RESPONSE_CHARS = 2 * DEFAULT_MAX_CHARS
MAX_NAME_CHARS = 200
MAX_GEN_PARAMS_CHARS = 16_000


def _check_size(text: str, field: str, limit: int) -> str:
    if len(text) > limit:
        raise BadRow(f"{field}: {len(text):,} characters, more than the {limit:,} a pair may hold")
    return text


UNKNOWN_MODEL = "unknown"


@dataclass(frozen=True)
class Pair:
    """Two candidate answers to one prompt, in canonical order (a, b)."""

    pair_id: str
    prompt_id: str
    prompt: str  # canonical JSON of the chat messages (the record field)
    messages: tuple  # the same messages, parsed: ({"role", "content"}, ...)
    response_a: str
    response_b: str
    model_a: str = UNKNOWN_MODEL
    model_b: str = UNKNOWN_MODEL
    gen_params: str | None = None

    def record_fields(self) -> dict[str, Any]:
        """The fields a vote on this pair carries into the comparison store."""
        return {
            "pair_id": self.pair_id,
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "response_a": self.response_a,
            "response_b": self.response_b,
            "model_a": self.model_a,
            "model_b": self.model_b,
            "gen_params": self.gen_params,
        }

    def response(self, side: str) -> str:
        return self.response_a if side == "a" else self.response_b

    def model(self, side: str) -> str:
        return self.model_a if side == "a" else self.model_b

    def cut(self, side: str) -> bool:
        """The answer on `side` was stopped by the token limit (gen_params[side]["cut"]),
        so it may end mid-sentence."""
        try:
            params = json.loads(self.gen_params or "{}").get(side)
        except (ValueError, AttributeError):
            return False
        return isinstance(params, dict) and params.get("cut") is True


# --------------------------------------------------------------------------------------
# One row -> one Pair
# --------------------------------------------------------------------------------------


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):  # a plain prompt: one user message
        if not value.strip():
            raise BadRow("'prompt' is empty")
        return [{"role": "user", "content": check_utf8(value, "prompt")}]
    return parse_messages(value, "'prompt'")


def _optional_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRow(f"'{key}' must be a string, got {type(value).__name__}")
    return _check_size(check_utf8(value, key), key, MAX_NAME_CHARS).strip() or None


def pair_from_row(row: Any) -> Pair:
    """A pairs-file row (a dict of Python values) -> Pair, or BadRow saying why not."""
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    if "prompt" not in row or row["prompt"] is None:
        raise BadRow("needs 'prompt'")
    messages = _messages(row["prompt"])
    responses = []
    for key in ("response_a", "response_b"):
        if row.get(key) is None:
            raise BadRow(f"missing '{key}'")
        if not isinstance(row[key], str):
            raise BadRow(f"'{key}' must be a string, got {type(row[key]).__name__}")
        responses.append(_check_size(check_utf8(row[key], key), key, MAX_RESPONSE_CHARS))
    _check_size("".join(m["content"] for m in messages), "prompt", MAX_PROMPT_CHARS)
    prompt_json = messages_to_json(messages)
    gen_params = row.get("gen_params")
    if isinstance(gen_params, dict):
        check_values(gen_params, "gen_params")
        gen_params = json.dumps(gen_params, sort_keys=True)
    elif gen_params is not None:
        if not isinstance(gen_params, str):
            raise BadRow("'gen_params' must be an object or a JSON string")
        # A JSON string holds escapes ("\\ud800") and nesting the row's own check cannot see.
        try:
            parsed = load_json(gen_params)
        except BadRow as e:
            raise BadRow(f"gen_params: {e}") from None
        check_values(parsed, "gen_params")
    if gen_params is not None:
        _check_size(gen_params, "gen_params", MAX_GEN_PARAMS_CHARS)
    return Pair(
        pair_id=_optional_text(row, "pair_id") or pair_id_for(prompt_json, *responses),
        prompt_id=_optional_text(row, "prompt_id") or prompt_id_for(messages),
        prompt=prompt_json,
        messages=tuple(messages),
        response_a=responses[0],
        response_b=responses[1],
        model_a=_optional_text(row, "model_a") or UNKNOWN_MODEL,
        model_b=_optional_text(row, "model_b") or UNKNOWN_MODEL,
        gen_params=gen_params,
    )


# --------------------------------------------------------------------------------------
# A pairs file -> Pairs
# --------------------------------------------------------------------------------------


# What a stored vote holds of its pair (trainer/store/record.py's fields), for pair_from_vote.
_VOTE_PAIR_KEYS = ("pair_id", "prompt_id", "response_a", "response_b", "model_a", "model_b", "gen_params")


def pair_from_vote(record: dict[str, Any]) -> Pair:
    """The pair a stored vote record was cast on (its prompt is canonical JSON there);
    BadRow where a pairs file could not hold it (e.g. an answer over the size limit)."""
    return pair_from_row(
        {"prompt": json.loads(record["prompt"]), **{k: record.get(k) for k in _VOTE_PAIR_KEYS}}
    )


class PairsFileError(PreflabError, ValueError):
    """A pairs file that cannot be used at all. The message names the file."""


def load_pairs(path: str | os.PathLike) -> tuple[list[Pair], list[str]]:
    """Read a pairs file. Returns (pairs, problems); each problem is `file:line: reason`
    for one skipped row. Raises PairsFileError when nothing usable is in the file."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise PairsFileError(
            f"{path}: unknown pairs file type {path.suffix or '(no extension)'!r}; use .jsonl or .parquet"
        )
    if not path.is_file():
        raise PairsFileError(f"{path}: no such pairs file")
    pairs: list[Pair] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    try:
        rows = list(iter_rows(path))
    except RowFileError as e:
        raise PairsFileError(str(e)) from None
    for where, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            pair = pair_from_row(row)
            if pair.pair_id in seen:
                raise BadRow(f"duplicate pair_id {pair.pair_id!r} (first on {seen[pair.pair_id]})")
        except BadRow as e:
            problems.append(f"{path}:{where}: {e}")
            continue
        seen[pair.pair_id] = where
        pairs.append(pair)
    if not pairs:
        detail = f"; first problem: {problems[0]}" if problems else ""
        raise PairsFileError(f"{path}: no usable pairs ({len(problems)} rows skipped{detail})")
    return pairs, problems


def pair_to_row(pair: Pair) -> dict[str, Any]:
    """The pairs-file row of a Pair (what `preflab generate` writes too)."""
    return {
        "prompt": list(pair.messages),
        "response_a": pair.response_a,
        "response_b": pair.response_b,
        "model_a": pair.model_a,
        "model_b": pair.model_b,
        "pair_id": pair.pair_id,
        "prompt_id": pair.prompt_id,
        "gen_params": pair.gen_params,
    }
