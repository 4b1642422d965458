"""The comparison record: its schema, its validation, and what "standing votes" means.

This module owns the record (docs/design.md's table; the field names are binding). Both
backends (trainer/store/directory_*.py, trainer/store/postgres.py) validate every
event with `validate_record` before it touches disk or the database, and both readers
end in `standing()`, so retractions mean the same thing whatever holds the events.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trainer.errors import PreflabError

# Version 2 (additive): the flag events of annotator review (kinds FLAG_KINDS, fields
# `subject` and `detail`), and a vote's rubric judgments (field `criteria`). Version-1
# records stay valid as they are, on disk and in a database: a reader fills the new
# fields with null, and `validate_record` accepts both.
# Version 3 (additive): a chat vote's two whole conversations (`conversation_a`,
# `conversation_b`: each side's own history, ending with the answer voted on). Older
# records read with them null; `side_contexts` is what every scorer reads them through.
SCHEMA_VERSION = 3
VERSIONS = (1, 2, 3)

# The pair fields: what every vote and retract carries. A flag event is about a person,
# not a pair, so these are null on it; that is why they are nullable in the Arrow schema
# (version 1 had them NOT NULL, and its files read into this schema unchanged).
PAIR_FIELDS = ("pair_id", "prompt_id", "prompt", "response_a", "response_b", "model_a", "model_b", "left")

SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("retracts", pa.string()),
        pa.field("pair_id", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("response_a", pa.string()),
        pa.field("response_b", pa.string()),
        pa.field("model_a", pa.string()),
        pa.field("model_b", pa.string()),
        pa.field("left", pa.string()),
        pa.field("choice", pa.string()),
        pa.field("strength", pa.int8()),
        pa.field("rationale", pa.string()),
        pa.field("annotator", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("decision_ms", pa.int32()),
        pa.field("gen_params", pa.string()),
        # version 2
        pa.field("subject", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("criteria", pa.string()),
        # version 3
        pa.field("conversation_a", pa.string()),
        pa.field("conversation_b", pa.string()),
    ]
)
FIELDS = SCHEMA.names

# Annotator review (trainer/flags.py): the rule flagged `subject`; an admin confirmed the
# flag (their votes are left out downstream) or cleared it. `annotator` is who wrote it.
FLAG_KINDS = ("flag", "flag_confirm", "flag_clear")
KINDS = ("vote", "retract", *FLAG_KINDS)
CHOICES = ("a", "b", "tie", "both_bad")
SIDES = ("a", "b")


class RecordError(PreflabError, ValueError):
    """A record that breaks the schema. The message names the field."""

    def __init__(self, field_name: str, reason: str, where: str = ""):
        self.field, self.reason, self.where = field_name, reason, where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}field '{field_name}': {reason}")


def messages_to_json(messages: list[dict[str, str]]) -> str:
    """The one canonical JSON spelling of a chat prompt (what the `prompt` field holds)."""
    return json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def prompt_id_for(messages: list[dict[str, str]]) -> str:
    """Stable id of a prompt that came without one: a hash of its canonical JSON."""
    return "p-" + hashlib.sha256(messages_to_json(messages).encode()).hexdigest()[:16]


def pair_id_for(prompt_json: str, response_a: str, response_b: str) -> str:
    """Stable id of a pair given in canonical order (same pair -> same id)."""
    h = hashlib.sha256()
    for part in (prompt_json, response_a, response_b):
        h.update(part.encode())
        h.update(b"\0")
    return "pair-" + h.hexdigest()[:20]


# --------------------------------------------------------------------------------------
# Validation of one record (the write path calls this before anything touches disk)
# --------------------------------------------------------------------------------------

_STRING_FIELDS_REQUIRED = ("event_id", "annotator")
_PAIR_STRINGS = PAIR_FIELDS[:-1]  # `left` is checked on its own
_STRING_FIELDS_OPTIONAL = (
    "retracts",
    "rationale",
    "gen_params",
    "subject",
    "detail",
    "criteria",
    "conversation_a",
    "conversation_b",
)
# The fields version 2 added: a version-1 record carries none of them.
_V2_FIELDS = ("subject", "detail", "criteria")
# The fields version 3 added (a chat vote's conversations): versions 1 and 2 carry none.
CONVERSATION_FIELDS = ("conversation_a", "conversation_b")
# Required of every event whatever its kind (the pair fields only of votes and retracts).
_ALWAYS_REQUIRED = ("schema_version", "event_id", "kind", "annotator", "created_at")


def _json_field(field_name: str, text: str) -> Any:
    """The parsed JSON of a text field, or RecordError naming the field."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(field_name, f"not valid JSON ({e.msg})") from None


def _check_messages(value: str, field_name: str = "prompt") -> list[dict[str, Any]]:
    messages = _json_field(field_name, value)
    if not isinstance(messages, list) or not messages:
        raise RecordError(field_name, "must be a non-empty JSON list of chat messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RecordError(field_name, f"message {i} needs string 'role' and 'content'")
    return messages


def _check_conversations(r: dict[str, Any], prompt: list[dict[str, Any]]) -> None:
    """A chat vote's (or its retract's) two conversations: both or neither, version 3 on,
    each a message list that opens with `prompt` and ends with that side's answer."""
    given = [f for f in CONVERSATION_FIELDS if r[f] is not None]
    if not given:
        return
    if r["schema_version"] < 3:
        raise RecordError(
            given[0], f"is a schema version 3 field; a version-{r['schema_version']} record cannot carry it"
        )
    if len(given) == 1:
        missing = next(f for f in CONVERSATION_FIELDS if f not in given)
        raise RecordError(
            missing, f"missing: a chat vote carries both conversations or neither ({given[0]} is set)"
        )
    opening = _plain_messages(prompt)
    for side in SIDES:
        field_name = f"conversation_{side}"
        messages = _check_messages(r[field_name], field_name)
        if len(messages) <= len(opening) or _plain_messages(messages[: len(opening)]) != opening:
            raise RecordError(field_name, "must start with the messages in 'prompt' and go on past them")
        last = messages[-1]
        if last["role"] != "assistant" or last["content"] != r[f"response_{side}"]:
            raise RecordError(
                field_name, f"must end with the assistant message voted on (the text of 'response_{side}')"
            )


def to_micros(value: Any) -> int:
    """created_at as integer microseconds since the epoch (UTC)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1_000_000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return to_micros(datetime.fromisoformat(value.replace("Z", "+00:00")))
    raise RecordError("created_at", f"expected a datetime, got {type(value).__name__}")


def validate_record(record: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Return a normalised copy of `record` or raise RecordError naming the field.

    `created_at` comes back as integer microseconds (UTC); everything else keeps its
    Python type. Unknown fields are refused so that a typo never silently drops data.
    """
    unknown = set(record) - set(FIELDS)
    if unknown:
        raise RecordError(sorted(unknown)[0], "unknown field", where)
    pair_event = record.get("kind") in ("vote", "retract")
    required = _ALWAYS_REQUIRED + (PAIR_FIELDS if pair_event else ())
    missing = [f for f in FIELDS if f in required and record.get(f) is None]
    if missing:
        raise RecordError(missing[0], "missing", where)
    r = {f: record.get(f) for f in FIELDS}
    try:
        version = r["schema_version"]
        if isinstance(version, bool) or version not in VERSIONS:
            raise RecordError("schema_version", f"must be one of {VERSIONS}, got {version!r}")
        for f in _STRING_FIELDS_REQUIRED:
            if not isinstance(r[f], str) or not r[f]:
                raise RecordError(f, f"must be a non-empty string, got {r[f]!r:.60}")
        for f in _STRING_FIELDS_OPTIONAL:
            if r[f] is not None and not isinstance(r[f], str):
                raise RecordError(f, f"must be a string or null, got {type(r[f]).__name__}")
        if r["kind"] not in KINDS:
            raise RecordError("kind", f"must be one of {KINDS}, got {r['kind']!r}")
        if r["kind"] in FLAG_KINDS:
            _check_flag_event(r)
            r["created_at"] = to_micros(r["created_at"])
            return r
        if version == 1 and any(r[f] is not None for f in _V2_FIELDS):
            field_name = next(f for f in _V2_FIELDS if r[f] is not None)
            raise RecordError(field_name, "is a schema version 2 field; a version-1 record cannot carry it")
        for f in _PAIR_STRINGS:
            # An empty response is a legitimate (bad) model answer; empty ids are not.
            if not isinstance(r[f], str) or (not r[f] and f not in ("response_a", "response_b")):
                raise RecordError(f, f"must be a non-empty string, got {r[f]!r:.60}")
        if r["left"] not in SIDES:
            raise RecordError("left", f"must be 'a' or 'b', got {r['left']!r}")
        for f in (
            "subject",
            "detail",
        ):  # a vote's judgments are in `criteria`; PostgreSQL keeps no detail of one
            if r[f] is not None:
                raise RecordError(f, f"only a flag event carries one, not a {r['kind']}")
        _check_conversations(r, _check_messages(r["prompt"]))
        if r["kind"] == "retract":
            if not r["retracts"]:
                raise RecordError("retracts", "a retract event must name the event_id it cancels")
            if r["choice"] is not None:
                raise RecordError("choice", "must be null on a retract event")
            if r["criteria"] is not None:
                raise RecordError("criteria", "must be null on a retract event")
        else:
            if r["retracts"] is not None:
                raise RecordError("retracts", "only a retract event may name one")
            if r["choice"] not in CHOICES:
                raise RecordError("choice", f"must be one of {CHOICES}, got {r['choice']!r}")
            check_criteria(r["criteria"])
        s = r["strength"]
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, int) or s not in (1, 2):
                raise RecordError("strength", f"must be 1 (slightly) or 2 (clearly) or null, got {s!r}")
            if r["choice"] in ("tie", "both_bad", None):
                raise RecordError("strength", f"must be null when choice is {r['choice']!r}")
        d = r["decision_ms"]
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < 2**31):
            raise RecordError("decision_ms", f"must be a non-negative int32 or null, got {d!r}")
        if r["gen_params"] is not None:
            _json_field("gen_params", r["gen_params"])
        r["created_at"] = to_micros(r["created_at"])
    except RecordError as e:
        if where and not e.where:
            raise RecordError(e.field, e.reason, where) from None
        raise
    return r


def _check_flag_event(r: dict[str, Any]) -> None:
    """A flag event: about `subject` (an annotator), `detail` a JSON object, no pair, no
    choice. Version 2 only: version 1 had no such kind."""
    if r["schema_version"] < 2:
        raise RecordError("kind", f"{r['kind']!r} needs schema version 2, got {r['schema_version']}")
    if not isinstance(r["subject"], str) or not r["subject"]:
        raise RecordError("subject", f"a {r['kind']} event must name the annotator it is about")
    for f in (
        *PAIR_FIELDS,
        *CONVERSATION_FIELDS,
        "retracts",
        "choice",
        "strength",
        "decision_ms",
        "gen_params",
        "criteria",
    ):
        if r[f] is not None:
            raise RecordError(f, f"must be null on a {r['kind']} event (it is about a person, not a pair)")
    _check_detail(r)


def _check_detail(r: dict[str, Any]) -> None:
    if r["detail"] is not None:
        if not isinstance(_json_field("detail", r["detail"]), dict):
            raise RecordError("detail", "must be a JSON object")


# A vote's rubric judgments (`criteria`, version 2; the rubric itself is annotate/rubric.py's):
# a JSON object, in the record's canonical a/b terms, of criterion name -> "a" | "b" |
# "tie" (a pairwise criterion) or {"a": 1-5, "b": 1-5} (a scale, either side may be
# absent), and under the reserved key "flags" {"a": [flag names], "b": [...]}. The store
# knows no rubric: it checks the shape, the server checks the names and what is required.
CRITERION_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
FLAGS_KEY = "flags"
PAIRWISE_VALUES = ("a", "b", "tie")
SCALE_VALUES = range(1, 6)


def check_criteria(text: str | None) -> dict[str, Any] | None:
    """The parsed `criteria` field (None for null), or RecordError naming what is wrong."""
    if text is None:
        return None
    value = _json_field("criteria", text)
    if not isinstance(value, dict) or not value:
        raise RecordError("criteria", "must be a non-empty JSON object (null when there are no judgments)")
    for name, judgment in value.items():
        if not CRITERION_NAME.fullmatch(name):
            raise RecordError(
                "criteria", f"{name[:40]!r} is not a criterion name ([a-z][a-z0-9_]*, 32 at most)"
            )
        if name == FLAGS_KEY:
            _check_flags(judgment)
        elif isinstance(judgment, str):
            if judgment not in PAIRWISE_VALUES:
                raise RecordError("criteria", f"{name}: must be 'a', 'b' or 'tie', got {judgment[:20]!r}")
        elif isinstance(judgment, dict) and judgment and set(judgment) <= set(SIDES):
            for side, score in judgment.items():
                if isinstance(score, bool) or not isinstance(score, int) or score not in SCALE_VALUES:
                    raise RecordError(
                        "criteria", f"{name}.{side}: a scale judgment is an integer 1-5, got {score!r:.20}"
                    )
        else:
            raise RecordError("criteria", f"{name}: must be 'a' | 'b' | 'tie' or {{\"a\": 1-5, \"b\": 1-5}}")
    return value


def _check_flags(flags: Any) -> None:
    if not isinstance(flags, dict) or not set(flags) <= set(SIDES):
        raise RecordError("criteria", 'flags: must be an object {"a": [names], "b": [names]}')
    for side, names in flags.items():
        if not isinstance(names, list) or len(set(map(str, names))) != len(names):
            raise RecordError("criteria", f"flags.{side}: must be a list of distinct flag names")
        for n in names:
            if not isinstance(n, str) or not CRITERION_NAME.fullmatch(n):
                raise RecordError("criteria", f"flags.{side}: {str(n)[:40]!r} is not a flag name")


def is_chat_vote(row: dict[str, Any]) -> bool:
    """A chat vote (schema version 3, annotate/chat.py): its answers follow two histories
    of their own, so it is no pool pair. What cannot show those histories (the pair queue's
    undo, the Review tab's relabel queue, a judge) leaves it out by this one test."""
    return row.get("conversation_a") is not None


def side_contexts(row: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """What each side's answer was written to: (messages before response_a, before
    response_b). For a chat vote that is each side's own conversation less its last
    (voted) answer, since the two sides' earlier answers differ; for any other vote both
    are the `prompt`. `row` holds the record's `prompt` and, when read, its conversations
    (JSON strings or null). Every reader that scores an answer (reward training, DPO,
    eval, review, export) goes through here, so a chat vote means one thing everywhere."""
    a, b = row.get("conversation_a"), row.get("conversation_b")
    if a is not None and b is not None:
        return _plain_messages(json.loads(a))[:-1], _plain_messages(json.loads(b))[:-1]
    prompt = _plain_messages(json.loads(row["prompt"]))
    return prompt, list(prompt)


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def complete_record(record: dict[str, Any]) -> dict[str, Any]:
    """A copy with what the store fills in when the caller did not: schema_version, a
    fresh uuid4 event_id, created_at = now (UTC). Every backend's writer starts here."""
    record = dict(record)
    record.setdefault("schema_version", SCHEMA_VERSION)
    record.setdefault("event_id", str(uuid.uuid4()))
    if record.get("created_at") is None:
        record["created_at"] = datetime.now(UTC)
    return record


def retract_record(
    event_id: str, annotator: str, vote: dict[str, Any] | None = None, **pair_fields: Any
) -> dict[str, Any]:
    """The retract event cancelling vote `event_id`. It carries the vote's pair fields
    (the record requires them): pass the vote, or the fields themselves."""
    vote = vote or {}
    fields = {k: vote.get(k, pair_fields.get(k)) for k in (*PAIR_FIELDS, *CONVERSATION_FIELDS)}
    # A chat vote's retract carries its conversations too (the record asks both or neither).
    return {
        **fields,
        "kind": "retract",
        "retracts": event_id,
        "choice": None,
        "strength": None,
        "annotator": annotator,
    }


def records_to_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """Normalised records (from validate_record) -> a table with exactly SCHEMA."""
    records = list(records)
    columns = {}
    for f in SCHEMA:
        values = [r[f.name] for r in records]
        if f.name == "created_at":
            columns[f.name] = pa.array(values, pa.int64()).cast(f.type)
        else:
            columns[f.name] = pa.array(values, f.type)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


# --------------------------------------------------------------------------------------
# Reader semantics, shared by both backends
# --------------------------------------------------------------------------------------


def concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables) if tables else empty_table()


def standing(tables: list[pa.Table]) -> list[pa.Table]:
    """Drop retract events and the votes they name, table by table; every other kind
    (flag events) is dropped too: only votes stand.

    Filtering copies every string, so it runs in parallel per file and skips the files
    that have nothing to drop (most of them, in a store with few undos).
    """
    retracted = pc.unique(
        pa.chunked_array([pc.drop_null(t["retracts"]) for t in tables], pa.string()).combine_chunks()
    )

    def keep(t: pa.Table) -> pa.Table:
        mask = pc.equal(t["kind"], "vote")
        if len(retracted):
            mask = pc.and_(mask, pc.invert(pc.is_in(t["event_id"], value_set=retracted)))
        if pc.all(mask).as_py() is not False:
            return t
        return t.filter(mask)

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(tables)))) as pool:
        return list(pool.map(keep, tables))


def apply_retractions(events: pa.Table) -> pa.Table:
    """The votes that stand: vote events not named by any retract event."""
    return concat(standing([events]))


def check_columns(columns: list[str] | None) -> list[str] | None:
    """The columns to read so that retractions can be applied: those asked for plus
    event_id, kind and retracts (None: all). Raises ValueError on an unknown name."""
    if columns is None:
        return None
    unknown = [c for c in columns if c not in FIELDS]
    if unknown:
        raise ValueError(f"unknown column {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    return list(dict.fromkeys([*columns, "event_id", "kind", "retracts"]))


def standing_votes(tables: list[pa.Table], columns: list[str] | None) -> pa.Table:
    """Tables of events (read with `check_columns(columns)`) -> the standing votes, with
    just `columns` in that order."""
    kept = standing(tables)
    if columns is None:
        return concat(kept)
    needed = check_columns(columns)
    return (pa.concat_tables(kept) if kept else empty_table().select(needed)).select(list(columns))
