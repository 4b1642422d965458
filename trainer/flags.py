"""Annotator flags as events in the comparison store: who is flagged, confirmed, cleared.

    from trainer.flags import confirmed_flags, read_counted_votes, read_flag_events
    votes, left_out = read_counted_votes("comparisons", ["model_a", "model_b", "choice"])
    left_out.note()   # "10 votes of 1 confirmed-flagged annotator left out (mallory); --include-flagged keeps them"
    votes, kept = read_counted_votes("comparisons", include_flagged=True)  # every standing vote
    events = read_flag_events("comparisons")       # the flag events, in the store's order
    excluded = confirmed_flags(events)             # {"mallory"}

The flag rule (a gold-check rule, computed by trainer/annotator_quality.py's
`annotator_table`) raises a `flag` event about an annotator; an admin then writes
`flag_confirm` (the annotator's votes are excluded by default from everything downstream
of the votes) or `flag_clear` (they count again). Every decision is an event in the store
(record schema version 2: kind, `subject` = the annotator it is about, `detail` = JSON
evidence, `annotator` = who wrote it, `rationale` = an admin's note), so the state of
every annotator is recomputed from the store and nothing lives only in memory.

An annotator's state is their latest flag event's, latest in the store's order
(trainer.store.read_flag_events: a database's seq, not created_at, which two servers'
clocks may stamp out of order): `flag` -> "flagged" (waiting for an
admin), `flag_confirm` -> "confirmed", `flag_clear` -> "cleared". A cleared annotator is
flagged again only on new evidence: more failed gold checks than the flag that was
cleared counted (`due_flags`).

The rule "a confirmed annotator's votes are left out unless asked for" lives here, in
`read_counted_votes`, and every reader downstream of the votes calls it: export, reward
training, the leaderboard (command, tab, /leaderboard API, the policy evaluations' human
win rate), the dashboard's statistics and the Review tab. Each takes the one switch
`include_flagged` (`--include-flagged` on a command, a checkbox on a page) and says what
it did with `FlagExclusion.note()`. Who is confirmed is read from the store on every
call. (The annotator table and the flag rule itself read every vote: they are how a flag
is decided. The assignment queue keeps confirmed annotators' votes out of overlap K from
flag events it is handed: annotate/queue_flags.py.)
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trainer.store.record import FLAG_KINDS, to_micros

# Who writes the rule's flags: not an account (an account name has no colon).
RULE_AUTHOR = "rule:gold"
STATES = {"flag": "flagged", "flag_confirm": "confirmed", "flag_clear": "cleared"}
# The columns a flag event needs; reading only these skips every vote's text.
FLAG_COLUMNS = ["event_id", "kind", "subject", "annotator", "created_at", "detail", "rationale"]
# What `confirmed_flags` needs: a directory reads these of every vote too, skipping its text.
DECISION_COLUMNS = ["event_id", "kind", "subject", "created_at"]
# What a command's switch and a page's checkbox say (one name everywhere: --include-flagged).
INCLUDE_FLAGGED_HELP = (
    "keep the votes of annotators whose flag an admin confirmed (by default they are left out; "
    "trainer/flags.py)"
)
INCLUDE_FLAGGED_LABEL = "Include confirmed-flagged annotators' votes"
PAGE_SWITCH = f'the box "{INCLUDE_FLAGGED_LABEL}"'  # FlagExclusion.note's switch on a page
# Flag events' ids are derived from what they say, so that two servers evaluating the rule
# on one database at once raise one flag, not two (inserts are idempotent by event_id).
_NAMESPACE = uuid.UUID("0b6f1c9e-6a1d-4f55-9a3e-7d2f1e0c4b21")


def read_flag_events(target: str | os.PathLike, columns: list[str] = FLAG_COLUMNS) -> list[dict[str, Any]]:
    """The store's flag events as records (`columns`), in the store's order
    (trainer.store.read_flag_events: a database's seq, not the servers' clocks)."""
    from trainer.store import read_flag_events as read

    return read(target, list(columns)).to_pylist()


def flag_events(events) -> list[dict[str, Any]]:
    """The flag events among `events` (records, or an Arrow table), in the order given:
    the store's, as read_flag_events gives them. Not re-sorted by created_at: with two
    servers on one database their clocks may disagree, and the later decision must win."""
    if isinstance(events, pa.Table):
        if events.num_rows == 0:
            return []
        hit = pc.is_in(events["kind"], value_set=pa.array(FLAG_KINDS, pa.string()))
        events = events.filter(hit).to_pylist()
    return [e for e in events if e.get("kind") in FLAG_KINDS]


def flag_states(events) -> dict[str, dict[str, Any]]:
    """{annotator: {"state", "since", "by", "note", "flag"}} from the flag events: the
    state of their latest one; "flag" is the latest `flag` event's evidence (dict)."""
    out: dict[str, dict[str, Any]] = {}
    for e in flag_events(events):
        entry = out.setdefault(e["subject"], {"flag": None, "flag_event_id": None})
        entry.update(
            state=STATES[e["kind"]],
            since=to_micros(e["created_at"]),
            by=e["annotator"],
            note=e.get("rationale") or "",
        )
        if e["kind"] == "flag":
            entry["flag"] = json.loads(e["detail"]) if e.get("detail") else {}
            entry["flag_event_id"] = e["event_id"]
    return out


def confirmed_flags(events) -> set[str]:
    """The annotators whose latest flag event is an admin's confirmation: the ones whose
    votes are left out downstream by default. Needs only DECISION_COLUMNS of the events."""
    latest = {e["subject"]: e["kind"] for e in flag_events(events)}  # oldest first: the last wins
    return {name for name, kind in latest.items() if kind == "flag_confirm"}


def without_confirmed(votes: pa.Table, excluded: set[str]) -> tuple[pa.Table, int]:
    """(votes without those of `excluded` annotators, how many were dropped)."""
    if not excluded or votes.num_rows == 0:
        return votes, 0
    keep = pc.invert(pc.is_in(votes["annotator"], value_set=pa.array(sorted(excluded), pa.string())))
    kept = votes.filter(keep)
    return kept, votes.num_rows - kept.num_rows


@dataclass(frozen=True)
class FlagExclusion:
    """What `read_counted_votes` did about confirmed-flagged annotators: who they are (at
    the time of the read), how many of the standing votes read were theirs, and whether
    those were kept (`included`, the switch) or left out."""

    annotators: tuple[str, ...] = ()
    votes: int = 0
    included: bool = False

    @property
    def dropped(self) -> int:
        """How many votes were left out."""
        return 0 if self.included else self.votes

    def note(self, switch: str = "--include-flagged") -> str:
        """One line for a report, a notice or a page ("" when nobody is confirmed):
        how many votes of how many confirmed-flagged annotators were left out (or kept),
        and `switch`, what keeps them (or says they were kept)."""
        if not self.annotators:
            return ""
        n = len(self.annotators)
        who = f"{self.votes} vote{'s' if self.votes != 1 else ''} of {n} confirmed-flagged annotator"
        who += "s" if n != 1 else ""
        names = ", ".join(self.annotators)
        if self.included:
            return f"{who} included ({names}; {switch})"
        return f"{who} left out ({names}); {switch} keeps them"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: {"annotators", "votes", "included", "dropped"}."""
        return {
            "annotators": list(self.annotators),
            "votes": self.votes,
            "included": self.included,
            "dropped": self.dropped,
        }


def read_counted_votes(
    target: str | os.PathLike, columns: list[str] | None = None, *, include_flagged: bool = False
) -> tuple[pa.Table, FlagExclusion]:
    """The standing votes a reader downstream of the votes counts: `read_comparisons`
    (with `columns` in that order, or all), less the votes of annotators whose flag an
    admin confirmed, unless `include_flagged`. Returns (votes, FlagExclusion); the flags
    are read from the store, now. A store that cannot be read raises what
    `read_comparisons` raises (StoreError, FileNotFoundError for a missing directory)."""
    from trainer.store import read_comparisons

    wanted = None if columns is None else list(dict.fromkeys([*columns, "annotator"]))
    votes = read_comparisons(target, columns=wanted)
    excluded = confirmed_flags(read_flag_events(target, DECISION_COLUMNS)) if votes.num_rows else set()
    kept, dropped = without_confirmed(votes, excluded)
    exclusion = FlagExclusion(tuple(sorted(excluded)), dropped, include_flagged)
    out = votes if include_flagged else kept
    return (out if columns is None else out.select(list(columns))), exclusion


def due_flags(rows: list[dict[str, Any]], states: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The annotators the rule flags now and whose flag is not in the store yet: rows of
    `annotator_table` with flag_rule true and no flag, or a cleared one that counted
    fewer failed gold checks than they have now. A flagged or confirmed annotator is
    never flagged twice."""
    due = []
    for row in rows:
        if not row.get("flag_rule"):
            continue
        failed = int(row["gold_n"]) - int(row["gold_correct"])
        state = states.get(row["annotator"])
        if state is not None and state["state"] in ("flagged", "confirmed"):
            continue
        if state is not None and (state.get("flag") or {}).get("gold_failed", -1) >= failed:
            continue  # cleared on this evidence already
        due.append(row)
    return due


def flag_record(row: dict[str, Any], *, min_failed_gold: int, flag_below: float) -> dict[str, Any]:
    """The `flag` event the rule writes for one `annotator_table` row, with the numbers it
    decided on (so the decision can be checked against the store later)."""
    failed = int(row["gold_n"]) - int(row["gold_correct"])
    detail = {
        "rule": "gold",
        "gold_n": int(row["gold_n"]),
        "gold_correct": int(row["gold_correct"]),
        "gold_failed": failed,
        "gold_accuracy": _number(row.get("gold_accuracy")),
        "gold_high": _number(row.get("gold_high")),
        "min_failed_gold": min_failed_gold,
        "flag_below": flag_below,
        "reason": row.get("flag_reason") or "",
    }
    event_id = str(uuid.uuid5(_NAMESPACE, f"flag\0{row['annotator']}\0{failed}"))
    return _event("flag", row["annotator"], RULE_AUTHOR, detail, event_id=event_id)


def _number(x: Any) -> float | None:
    """A float for JSON: NaN (no gold votes) is null, as JSON has no NaN."""
    return None if x is None or x != x else float(x)


def decision_record(kind: str, subject: str, admin: str, flag_event_id: str | None, note: str = "") -> dict:
    """An admin's `flag_confirm` or `flag_clear` of `subject`'s flag."""
    if kind not in ("flag_confirm", "flag_clear"):
        raise ValueError(f"kind must be flag_confirm or flag_clear, got {kind!r}")
    return _event(kind, subject, admin, {"flag": flag_event_id}, rationale=(note or "").strip() or None)


def _event(kind: str, subject: str, author: str, detail: dict, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "subject": subject,
        "annotator": author,
        "detail": json.dumps(detail, sort_keys=True),
        **extra,
    }
