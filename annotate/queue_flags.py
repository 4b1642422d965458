"""The assignment queue's side of annotator flags: a confirmed-flagged annotator's votes
do not fill a pair's overlap K.

Downstream of the votes, a confirmed annotator's votes are left out by default
(trainer/flags.py's `read_counted_votes`, the one rule); a pair judged only by such an
annotator would then have no counted vote at all, so the queue must not call it done. It
counts every vote as before (who voted on what: never twice still holds for the flagged
annotator), and `_count` leaves the confirmed annotators out of how many votes a pair has.

    queue.learn_flags(read_flag_events(data))   # at start, after restore (annotate/serve.py;
                                                 # PostgresStore.flag_events() with a database)
    queue.learn_flags([decision])                # an admin's confirm / clear (annotator_review.py)

Flag events come in the store's order (trainer/flags.py); each annotator's latest one
decides, as in `confirmed_flags`. A database's events carry their `seq` (the store's
order): sync hands them out in commit order, which is not seq order, so the queue keeps
each annotator's highest-seq event and an older one committed later changes nothing, as
a restart (`PostgresStore.flag_events`, seq order) would decide. An event without a seq
(a directory's, or this server's own decision, learned before sync brings it back with
its seq) simply decides until the next event with a seq about that annotator. A change
reopens (or closes) the pool's pairs at once, one pass over the pool per decision: a
rare admin action, never per vote. With a shared store (PostgreSQL) the database counts
every standing vote towards K in its claims, so the queue asks it for K plus the pair's
excluded votes (`_shared_want`); other servers' decisions arrive with `sync` like its
votes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class FlagCounting:
    """Mixed into AssignmentQueue (annotate/queue.py), which owns the state it uses:
    `_votes`, `_pairs`, `_open`, `_wanted`, `_lock`, `_changed`, and this module's
    `_excluded` (confirmed-flagged annotators), `_flag_kinds` (annotator -> the kind of
    their latest flag event) and `_flag_seqs` (annotator -> (seq, kind) of their
    highest-seq flag event, with a database)."""

    def _count(self, pair_id: str) -> int:
        """Votes a pair has towards K: its voters less the confirmed-flagged ones."""
        voters = self._votes.get(pair_id, ())
        if not self._excluded:  # the usual case: no set arithmetic on the vote path
            return len(voters)
        return sum(1 for name in voters if name not in self._excluded)

    def _shared_want(self, pair_id: str) -> int:
        """What the database is asked to allow: it counts every standing vote, so K
        grows by the pair's votes that do not count here. Under the lock: it reads the
        pair's voters, which finish_vote and finish_undo change on other threads."""
        return self._wanted(pair_id) + len(self._votes.get(pair_id, ())) - self._count(pair_id)

    def excluded_annotators(self) -> set[str]:
        with self._lock:
            return set(self._excluded)

    def learn_flags(self, events: Iterable[dict[str, Any]]) -> bool:
        """Take flag events (records with kind and subject, in the store's order; other
        kinds are ignored). True when who is confirmed changed, and the pool with it."""
        with self._lock:
            return self._learn_flags_locked(events)

    def _learn_flags_locked(self, events: Iterable[dict[str, Any]]) -> bool:
        kinds, stored = self._flag_kinds, self._flag_seqs
        for e in events:
            kind, subject = e.get("kind"), e.get("subject")
            if kind not in ("flag", "flag_confirm", "flag_clear") or not subject:
                continue
            seq = e.get("seq")
            if seq is None:  # a directory's event, or this server's decision before sync brings it
                kinds[subject] = kind
                continue
            best = stored.get(subject)
            if best is None or seq > best[0]:  # sync hands events out in commit order, not seq
                best = stored[subject] = (seq, kind)
            kinds[subject] = best[1]
        excluded = frozenset(name for name, kind in kinds.items() if kind == "flag_confirm")
        if excluded == self._excluded:
            return False
        self._excluded = excluded
        for pair_id in self._pairs:  # the pool's pairs: reopened or completed under the new count
            if self._count(pair_id) < self._wanted(pair_id):
                self._open.setdefault(pair_id, None)
            else:
                self._open.pop(pair_id, None)
        self._changed.notify_all()
        return True
