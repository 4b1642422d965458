"""Rubrics: criteria judged beside the overall vote, and per-answer flags.

    preflab serve --pairs pairs.jsonl --rubric rubric.toml

    rubric = load_rubric("rubric.toml")              # RubricError naming the file and entry
    rubric.check(shown)                               # BadRequest naming the criterion
    rubric.to_record(shown, left="b")                 # the record's `criteria` (a JSON string)
    rubric.to_shown(record_criteria, left="b")        # back to left/right (undo)
    rubric.describe()                                 # what /next tells an API client

A rubric file is TOML, read with tomllib and never executed:

    [[criteria]]
    name = "helpful"                 # [a-z][a-z0-9_]*, 32 characters at most
    label = "More helpful"           # what the page shows, 60 characters at most
    kind = "pairwise"                # A / B / tie; or "scale": 1-5 for each answer
    required = true                  # default false
    help = "Which answer does more of what was asked?"   # optional, 300 at most

    [[flags]]
    name = "unsafe"
    label = "Unsafe"

What an annotator sends is in the terms of the screen ("left" / "right", as for the
overall choice): {criterion: "left" | "right" | "tie"} for a pairwise criterion,
{criterion: {"left": 1-5, "right": 1-5}} for a scale, and {"flags": {"left": [names],
"right": [names]}}. The record keeps it in canonical a/b terms, mapped through the vote's
`left` (trainer/store/record.py's `criteria` field owns that shape). A required pairwise
criterion needs a judgment, a required scale a score for both answers; a vote without
them is refused with a message naming the criterion, and nothing is stored.

Labels and help are plain text with no markup characters, and the page escapes them
anyway (annotate/web/html.py).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.criteria import judgments
from trainer.errors import PreflabError
from trainer.store.record import CRITERION_NAME, FLAGS_KEY, SCALE_VALUES

KINDS = ("pairwise", "scale")
MAX_LABEL_CHARS = 60
MAX_HELP_CHARS = 300
MAX_CRITERIA = 12
MAX_FLAGS = 12
MAX_FILE_BYTES = 64 * 1024
SHOWN_SIDES = ("left", "right")
SHOWN_PAIRWISE = ("left", "right", "tie")
_KEYS = {"criteria": {"name", "label", "kind", "required", "help"}, "flags": {"name", "label", "help"}}


class RubricError(PreflabError, ValueError):
    """A rubric file that cannot be used; the message names the file and the entry."""


class RubricInputError(PreflabError, ValueError):
    """Judgments a vote cannot carry as sent (the service answers it as a bad request)."""


@dataclass(frozen=True)
class Criterion:
    name: str
    label: str
    kind: str  # "pairwise" | "scale"
    required: bool = False
    help: str = ""


@dataclass(frozen=True)
class Flag:
    name: str
    label: str
    help: str = ""


def _text(where: str, value: Any, limit: int, *, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RubricError(f"{where}: must be a string")
    value = value.strip()
    if required and not value:
        raise RubricError(f"{where}: must not be empty")
    if len(value) > limit:
        raise RubricError(f"{where}: {len(value)} characters, at most {limit}")
    bad = next((c for c in value if not c.isprintable() or c in "<>&\"'`"), None)
    if bad is not None:
        raise RubricError(f"{where}: the character {bad!r} is not allowed (plain text only)")
    return value


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not CRITERION_NAME.fullmatch(value):
        raise RubricError(
            f"{where}: must match [a-z][a-z0-9_]* (32 characters at most), got {str(value)[:40]!r}"
        )
    if value == FLAGS_KEY:
        raise RubricError(f"{where}: {FLAGS_KEY!r} is reserved (per-answer flags go in [[flags]])")
    return value


@dataclass(frozen=True)
class Rubric:
    criteria: tuple[Criterion, ...]
    flags: tuple[Flag, ...] = ()
    source: str = ""

    def criterion(self, name: str) -> Criterion | None:
        return next((c for c in self.criteria if c.name == name), None)

    def describe(self) -> dict[str, Any]:
        """The rubric as an API client needs it to build a vote's `criteria` (JSON-able):
        {"criteria": [{"name", "label", "kind", "required", "help", "values"}], "flags":
        [{"name", "label", "help"}], "sides": ["left", "right"]}. `values` is what one
        judgment takes: a pairwise criterion one of left / right / tie, a scale 1-5 for
        each side ({"left": 4, "right": 2}); flags go under "flags" per side."""
        return {
            "criteria": [
                {
                    "name": c.name,
                    "label": c.label,
                    "kind": c.kind,
                    "required": c.required,
                    "help": c.help,
                    "values": list(SHOWN_PAIRWISE) if c.kind == "pairwise" else list(SCALE_VALUES),
                }
                for c in self.criteria
            ],
            "flags": [{"name": f.name, "label": f.label, "help": f.help} for f in self.flags],
            "sides": list(SHOWN_SIDES),
        }

    def check(self, shown: dict[str, Any] | None) -> dict[str, Any]:
        """The judgments as sent (left/right terms), checked and with empties dropped;
        RubricInputError names the first criterion that is wrong or missing."""
        shown = dict(shown or {})
        out: dict[str, Any] = {}
        for name in shown:
            if name != FLAGS_KEY and self.criterion(name) is None:
                raise RubricInputError(f"criteria: no criterion {str(name)[:40]!r} in this rubric")
        for c in self.criteria:
            value = shown.get(c.name)
            if c.kind == "pairwise":
                if value in (None, ""):
                    value = None
                elif value not in SHOWN_PAIRWISE:
                    raise RubricInputError(f"{c.label} ({c.name}): must be left, right or tie")
                if value is not None:
                    out[c.name] = value
                elif c.required:
                    raise RubricInputError(f"{c.label} is required: choose A, B or tie (nothing was saved)")
            else:
                scores = {}
                if value not in (None, ""):
                    if not isinstance(value, dict) or not set(value) <= set(SHOWN_SIDES):
                        raise RubricInputError(f'{c.label} ({c.name}): must be {{"left": 1-5, "right": 1-5}}')
                    for side, score in value.items():
                        if score in (None, ""):
                            continue
                        if isinstance(score, str) and score.isdigit():
                            score = int(score)
                        if isinstance(score, bool) or not isinstance(score, int) or score not in SCALE_VALUES:
                            raise RubricInputError(
                                f"{c.label} ({c.name}): a score is 1-5, got {str(score)[:20]!r}"
                            )
                        scores[side] = score
                if c.required and len(scores) < 2:
                    raise RubricInputError(
                        f"{c.label} is required: score both answers 1-5 (nothing was saved)"
                    )
                if scores:
                    out[c.name] = scores
        flags = shown.get(FLAGS_KEY) or {}
        if not isinstance(flags, dict) or not set(flags) <= set(SHOWN_SIDES):
            raise RubricInputError('flags: must be {"left": [names], "right": [names]}')
        known = {f.name for f in self.flags}
        checked = {}
        for side, names in flags.items():
            names = names or []
            if not isinstance(names, list) or any(not isinstance(n, str) or n not in known for n in names):
                raise RubricInputError(
                    f"flags.{side}: each must be one of {', '.join(sorted(known)) or 'none'}"
                )
            if names:
                checked[side] = sorted(set(names))
        if checked:
            out[FLAGS_KEY] = checked
        return out

    def to_record(self, checked: dict[str, Any], left: str) -> str | None:
        """Checked judgments (left/right) -> the record's `criteria`, canonical a/b."""
        if not checked:
            return None
        right = "b" if left == "a" else "a"
        side = {"left": left, "right": right}
        out: dict[str, Any] = {}
        for name, value in checked.items():
            if isinstance(value, str):
                out[name] = side.get(value, value)
            else:
                out[name] = {side[s]: v for s, v in sorted(value.items(), key=lambda kv: side[kv[0]])}
        return json.dumps(out, separators=(",", ":"), sort_keys=True)

    @staticmethod
    def to_shown(criteria: str | None, left: str) -> dict[str, Any]:
        """The record's `criteria` back in left/right terms (undo gives them back)."""
        if not criteria:
            return {}
        shown_of = {left: "left", ("b" if left == "a" else "a"): "right"}
        out: dict[str, Any] = {}
        for name, value in json.loads(criteria).items():
            if isinstance(value, str):
                out[name] = shown_of.get(value, value)
            else:
                out[name] = {shown_of[s]: v for s, v in value.items()}
        return out


def load_rubric(path: str | Path) -> Rubric:
    """Read and check a rubric file (see the module docstring)."""
    path = Path(path)
    where = path.name
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RubricError(f"{path}: cannot read the rubric file ({e.strerror or e})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RubricError(f"{where}: {len(raw):,} bytes; a rubric file is at most {MAX_FILE_BYTES:,}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RubricError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise RubricError(f"{where}: not valid TOML ({e})") from None
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise RubricError(
            f"{where}: {sorted(unknown)[0]}: unknown key (a rubric has [[criteria]] and [[flags]])"
        )
    entries = {}
    for key, limit in (("criteria", MAX_CRITERIA), ("flags", MAX_FLAGS)):
        items = data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise RubricError(f"{where}: {key}: must be an array of tables ([[{key}]])")
        if len(items) > limit:
            raise RubricError(f"{where}: {key}: {len(items)} entries, at most {limit}")
        entries[key] = items
    if not entries["criteria"] and not entries["flags"]:
        raise RubricError(f"{where}: no [[criteria]] and no [[flags]]: nothing to judge")
    criteria, flags, seen = [], [], set()
    for key, items in entries.items():
        for i, item in enumerate(items):
            at = f"{where}: {key}[{i}]"
            extra = set(item) - _KEYS[key]
            if extra:
                raise RubricError(
                    f"{at}.{sorted(extra)[0]}: unknown key (allowed: {', '.join(sorted(_KEYS[key]))})"
                )
            name = _name(f"{at}.name", item.get("name"))
            if (key, name) in seen:
                raise RubricError(f"{at}.name: {name!r} appears twice")
            seen.add((key, name))
            label = _text(f"{at}.label", item.get("label"), MAX_LABEL_CHARS, required=True)
            help_text = _text(f"{at}.help", item.get("help"), MAX_HELP_CHARS, required=False)
            if key == "flags":
                flags.append(Flag(name, label, help_text))
                continue
            kind = item.get("kind")
            if kind not in KINDS:
                raise RubricError(f"{at}.kind: must be 'pairwise' or 'scale', got {str(kind)[:40]!r}")
            required = item.get("required", False)
            if not isinstance(required, bool):
                raise RubricError(f"{at}.required: must be true or false")
            criteria.append(Criterion(name, label, kind, required, help_text))
    return Rubric(tuple(criteria), tuple(flags), source=str(path))


def add_arguments(p) -> None:
    p.add_argument(
        "--rubric",
        metavar="FILE",
        default=None,
        help="criteria judged beside the overall vote (pairwise A/B/tie or a 1-5 scale per answer, "
        "required or optional) and per-answer flags, as TOML (annotate/rubric.py); kept with each vote",
    )


def rubric_from_args(args) -> Rubric | None:
    return load_rubric(args.rubric) if getattr(args, "rubric", None) else None


def by_criterion(votes, name: str):
    """(votes, report line) for `export --criterion NAME`; RubricInputError when NAME is
    no criterion name, is a scale, or no vote judged it."""
    if not CRITERION_NAME.fullmatch(name or "") or name == FLAGS_KEY:
        raise RubricInputError(f"--criterion: {str(name)[:40]!r} is not a criterion name")
    judged = criterion_choices(votes, name)
    if judged.num_rows == 0:
        kinds = {type(json.loads(t).get(name)).__name__ for t in votes["criteria"].drop_null().to_pylist()}
        if "dict" in kinds:
            raise RubricInputError(
                f"--criterion {name}: a scale criterion; a preference dataset needs a pairwise one"
            )
        raise RubricInputError(f"--criterion {name}: no standing vote judged it")
    return judged, f"criterion {name}: judged in {judged.num_rows} of {votes.num_rows} votes"


def criterion_choices(votes, name: str, *, scale_as_preference: bool = False):
    """The standing votes with `choice` replaced by pairwise criterion `name`'s judgment
    (canonical a/b/tie, trainer.criteria.judgments) and strength dropped; votes without it
    are left out. What the export (--criterion) and the per-criterion agreement start
    from. With `scale_as_preference` a scale criterion counts too, as the preference its
    two scores imply."""
    import pyarrow as pa

    picked = judgments(votes, name, scale_as_preference=scale_as_preference)
    keep = pa.array([p is not None for p in picked], pa.bool_())
    out = votes.set_column(votes.column_names.index("choice"), "choice", pa.array(picked, pa.string()))
    if "strength" in out.column_names:
        out = out.set_column(
            out.column_names.index("strength"), "strength", pa.nulls(out.num_rows, pa.int8())
        )
    return out.filter(keep)
