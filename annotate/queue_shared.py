"""The assignment queue's shared mode: several `preflab serve` on one PostgreSQL store.

    queue = AssignmentQueue(overlap=2, shared=postgres_store)   # annotate/queue.py
    queue.restore(votes, cursor=cursor)    # votes, cursor = postgres_store.snapshot()
    queue.sync()                           # every second or two (annotate/serve.py)

With `shared` set, the database has the last word (trainer/store/postgres.py): a pair
picked by this server is claimed there (one of its K slots, row-locked), a vote is
stored only if it still fits (VoteConflict otherwise), skips are kept there, an undo
moves the leases there too, and `sync()` folds in the votes other servers took. The
queue then only chooses the order; never-twice and K hold across any number of
servers.

`SharedMode` is a base class of `AssignmentQueue`: these methods work on the queue's
own state (its lock, votes, leases, annotators), and every database call is made
outside the lock, so other annotators are not held up by it. Without a shared store
none of them is called (and `sync` is a no-op).
"""

from __future__ import annotations

import logging
from typing import Any

from trainer.judges import JUDGE_PREFIX
from trainer.store.errors import VoteConflict

# Votes that are nobody's work here (imports, models' votes): they fill no pair's K.
NOT_WORK = ("import:", JUDGE_PREFIX)


def not_work(annotator: str) -> bool:
    """An imported vote or a model's: it fills no pair's K and is nobody's to undo."""
    return annotator.startswith(NOT_WORK)


log = logging.getLogger("preflab.queue")


def sync_forever(queue, stop, every_s: float = 1.5) -> None:
    """`queue.sync()` every `every_s` seconds until the threading.Event `stop` is set
    (a thread of `preflab serve` on a PostgreSQL store)."""
    while not stop.wait(every_s):
        try:
            queue.sync()
        except Exception as e:  # the database away for a moment: the next round catches up
            log.warning("sync with the shared store failed (%s); retrying", e)


class SharedMode:
    """The database's side of AssignmentQueue (see the module docstring)."""

    def _restore_shared(self, cursor: Any) -> None:
        """Start syncing from `cursor`, and take back the skips kept in the database."""
        self._cursor = cursor
        with self._lock:
            for pair_id, annotator in self.shared.skipped():
                self._person(annotator).skipped.add(pair_id)

    def _claim_shared(self, person, a, pair_id: str, want: int) -> bool:
        """Claim the pair just leased here in the database. False (lease dropped, the
        pair ruled out for a while) when the other servers hold or skipped it."""
        annotator = a.annotator
        try:
            ok, voters = self.shared.claim(pair_id, annotator, want, self.lease_s)
        except Exception:  # the database away: no lease there, so none here either
            with self._lock:
                if person.current is a:
                    person.current = None
                self._release(annotator, pair_id)
            raise
        with self._lock:
            self._learn_voters(pair_id, voters)
            if ok:
                return True
            if person.current is a:
                person.current = None
            self._release(annotator, pair_id)
            # Held by other servers' annotators, or skipped there: look again later.
            self._refused[(annotator, pair_id)] = self.clock() + min(60.0, self.lease_s)
        return False

    def _learn_voters(self, pair_id: str, voters: set[str]) -> None:
        """The database's standing voters of a pair replace what this server knew."""
        known = self._votes.setdefault(pair_id, set())
        for gone in known - voters:
            self._person(gone).voted.discard(pair_id)
        for new in voters - known:
            self._person(new).voted.add(pair_id)
        self._votes[pair_id] = set(voters)
        if pair_id in self._pairs:
            if self._count(pair_id) >= self._wanted(pair_id):
                self._open.pop(pair_id, None)
            else:
                self._open.setdefault(pair_id, None)

    def sync(self) -> int:
        """Fold in the votes and retracts stored since the last sync, by any server (a
        no-op without a shared store). Returns the events seen. The store's cursor is
        opaque (a database snapshot): each committed event comes back exactly once."""
        if self.shared is None:
            return 0
        start = self._cursor
        events, cursor = self.shared.changes_since(start)
        with self._lock:
            if start != self._cursor:  # another sync got there first
                return 0
            self._cursor = cursor
            # Another server's confirm or clear: who counts towards K (annotate/queue_flags.py).
            # Each comes with its seq (the order flags are decided in); one committed late may
            # be older than one already learned, and the highest seq wins.
            self._learn_flags_locked(e for e in events if e["kind"] not in ("vote", "retract"))
            for e in events:  # a retract is made by the voter it cancels (Service.undo)
                if e["kind"] not in ("vote", "retract") or not_work(e["annotator"]):
                    continue  # flag events are about people, not pairs (trainer/flags.py)
                voters = set(self._votes.get(e["pair_id"], ()))
                (voters.add if e["kind"] == "vote" else voters.discard)(e["annotator"])
                self._learn_voters(e["pair_id"], voters)
                if e["kind"] == "retract":  # undone on another server: not undoable here again
                    history = self._person(e["annotator"]).history
                    history[:] = [r for r in history if r["event_id"] != e["retracts"]]
            self._changed.notify_all()
        return len(events)

    def _vote_shared(self, a, record: dict[str, Any]) -> dict[str, Any]:
        """Store the vote in the database if it still fits. VoteConflict: nothing was
        stored, and the pair is dropped for this annotator."""
        with self._lock:  # _shared_want reads the pair's voters, which finish_vote/undo change
            want = self._shared_want(a.pair.pair_id)
        try:
            return self.shared.vote(record, want)
        except VoteConflict:
            with self._lock:
                self._release(a.annotator, a.pair.pair_id)
                self._refused[(a.annotator, a.pair.pair_id)] = self.clock() + self.lease_s
            try:
                self.sync()  # learn what the other servers did with it
            except Exception as e:  # the conflict is the news; the next sync catches up
                log.warning("sync after a vote conflict failed (%s)", e)
            raise

    def _skip_shared(self, pair_id: str, annotator: str) -> None:
        try:
            self.shared.skip(pair_id, annotator)
        except Exception as e:  # skipped here all the same; the lease there runs out
            log.warning(
                "could not record the skip of %s by %s in the shared store (%s)", pair_id, annotator, e
            )

    def _move_shared_lease(self, annotator: str, previous: str | None, pair_id: str, want: int) -> None:
        """After an undo: free the lease of the pair they were looking at, take the one
        of the pair that came back."""
        try:
            if previous is not None:
                self.shared.release(previous, annotator)
            self.shared.claim(pair_id, annotator, want, self.lease_s)
        except Exception as e:  # the retract is stored; the vote on it will be checked anyway
            log.warning("could not move %s's lease in the shared store after an undo (%s)", annotator, e)
