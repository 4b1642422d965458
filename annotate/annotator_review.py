"""Annotator review (admins): the quality table, the flag rule, confirm and clear.

    review = AnnotatorReview(store, service, min_failed_gold=2, flag_below=0.6)   # annotate/serve.py
    view = review.table("admin")            # {"rows": [...], "thresholds": {...}, "history": [...]}
    view = review.decide("admin", "mallory", "confirm", note="random clicking")

The numbers per annotator are trainer/annotator_quality.py's `annotator_table` over the
standing votes; the rule's decision is its `flag_rule`. Whenever the table is computed
here, an annotator the rule newly flags gets a `flag` event in the store (with the
numbers it was decided on), and an admin's confirm or clear is a `flag_confirm` /
`flag_clear` event (trainer/flags.py): the state shown is recomputed from those events
every time, so it is the same on every server and after a restart. Results are JSON-able
(NaN is None); a decision that does not fit the state (confirming someone not flagged) is
a PreflabError saying so.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from annotate.accounts import require_admin, role_of
from trainer.errors import PreflabError
from trainer.flags import (
    decision_record,
    due_flags,
    flag_record,
    flag_states,
    read_flag_events,
)
from trainer.rows import text_problem
from trainer.store.record import to_micros

ACTIONS = {"confirm": "flag_confirm", "clear": "flag_clear"}
HISTORY = 50  # flag events shown, newest first


class ReviewError(PreflabError, ValueError):
    """A confirm or clear that does not fit the annotator's state."""


def _iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    return datetime.fromtimestamp(micros / 1e6, UTC).isoformat(timespec="seconds")


class AnnotatorReview:
    """See the module docstring. `store` is the server's writer; `service` gives the
    store's target and the accounts (for the role check)."""

    def __init__(self, store, service, min_failed_gold: int = 2, flag_below: float = 0.6):
        self.store = store
        self.service = service
        self.min_failed_gold = min_failed_gold
        self.flag_below = flag_below
        # One evaluation or decision at a time in this server, so one click never raises
        # a flag twice. Across servers (PostgreSQL) a flag's event_id is derived from what
        # it says, and the store takes an event_id once.
        self._lock = threading.Lock()

    def _require_admin(self, user: str) -> None:
        require_admin(user, role_of(user, self.service.accounts, self.service.local_user))

    def table(self, user: str) -> dict[str, Any]:
        """The annotator table with each annotator's flag state; raises the flags the rule
        calls for that are not in the store yet."""
        self._require_admin(user)
        return self._evaluate()

    def decide(self, user: str, subject: str, action: str, note: str = "") -> dict[str, Any]:
        """An admin confirms ("confirm": their votes are excluded downstream) or clears
        ("clear") the flag of `subject`; returns the table as `table` does."""
        self._require_admin(user)
        kind = ACTIONS.get(action)
        if kind is None:
            raise ReviewError(f"action must be confirm or clear, got {str(action)[:20]!r}")
        subject = (subject or "").strip()
        if not subject:
            raise ReviewError("choose an annotator first")
        if len(note or "") > 2_000:
            raise ReviewError("the note is longer than 2,000 characters; shorten it (nothing was saved)")
        if problem := text_problem(note or ""):  # what no store can hold (trainer/rows.py)
            raise ReviewError(f"note: {problem} (nothing was saved)")
        with self._lock:
            state = flag_states(read_flag_events(self.service.data)).get(subject)
            current = state["state"] if state else "not flagged"
            allowed = ("flagged",) if action == "confirm" else ("flagged", "confirmed")
            if current not in allowed:
                raise ReviewError(
                    f"{subject} is {current}: only a flagged annotator can be "
                    + ("confirmed" if action == "confirm" else "cleared")
                )
            stored = self.store.append(decision_record(kind, subject, user, state.get("flag_event_id"), note))
            # Their votes stop (or start again) filling pairs' K now, not at the next restart.
            self.service.queue.learn_flags([stored])
        return self._evaluate()

    def _evaluate(self) -> dict[str, Any]:
        from annotate.service import _clean
        from trainer.annotator_quality import annotator_table
        from trainer.store import read_comparisons

        votes = read_comparisons(self.service.data)
        rows = annotator_table(votes, min_failed_gold=self.min_failed_gold, flag_below=self.flag_below)
        with self._lock:
            events = read_flag_events(self.service.data)
            due = due_flags(rows, flag_states(events))
            for row in due:
                self.store.append(
                    flag_record(row, min_failed_gold=self.min_failed_gold, flag_below=self.flag_below)
                )
            if due:
                events = read_flag_events(self.service.data)
        states = flag_states(events)
        out = []
        for row in rows:
            state = states.get(row["annotator"]) or {}
            out.append(
                {
                    **row,
                    "flag_state": state.get("state", ""),
                    "flag_since": _iso(state.get("since")),
                    "flag_by": state.get("by", ""),
                    "flag_note": state.get("note", ""),
                }
            )
        history = [
            {
                "at": _iso(to_micros(e["created_at"])),
                "kind": e["kind"],
                "annotator": e["subject"],
                "by": e["annotator"],
                "note": e.get("rationale") or "",
            }
            for e in reversed(events[-HISTORY:])
        ]
        return _clean(
            {
                "rows": out,
                "thresholds": {"min_failed_gold": self.min_failed_gold, "flag_below": self.flag_below},
                "flagged": sorted(n for n, s in states.items() if s["state"] == "flagged"),
                "confirmed": sorted(n for n, s in states.items() if s["state"] == "confirmed"),
                "history": history,
            }
        )
