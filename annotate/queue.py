"""Who gets which pair next: the assignment queue of the annotation app.

The rules, all enforced here (the app only asks):

* Overlap: each pair goes to `overlap` (K) different annotators, so that the same
  pair collects K independent votes (agreement data). A pair with K standing votes is
  done and leaves the queue; a confirmed-flagged annotator's vote does not count
  towards K (annotate/queue_flags.py), as it does not count downstream; nor do
  imported votes (`import:<source>`) or a model's (`judge:<name>`, `preflab judge`):
  K counts people.
* Never twice: an annotator is never given a pair they have voted on, nor one they
  skipped in this server's lifetime (a skipped pair goes to someone else).
* Leases: a pair handed to an annotator holds one of its K slots until they vote or
  skip, so two annotators are never both given the last slot of a pair. A lease runs
  out after `lease_s` (a tab left open overnight does not hold a pair forever); the
  annotator may still vote on it.
* Balance: partly annotated pairs go first, so agreement sets complete early and a
  late annotator is not left with only half-finished work; then pairs in the order
  they arrived. Each annotator's "assigned" count is their fair share of all the votes
  the pool needs: ceil(pairs * K / annotators), never less than what they did.
* Undo: a vote can be taken back (the app writes a `retract` event); the pair then
  becomes the annotator's current pair again, with the same side on the left.
* Relabelling: `requeue(pairs)` asks for one more vote on pairs already done (the
  Review tab sends back the votes a reward model disagrees with most); the new vote
  comes from an annotator who has not voted on the pair, and such pairs go out before
  any other. (The request lives in memory, like leases and skips.)
* Policy: with `policy` set (annotate/sampling.py, `--sampling uncertain`), the policy
  picks among fresh pairs (no votes, nobody holding them) instead of arrival order.
  How a pair was picked goes into the gen_params of its votes ("selection").
* Restart-safe: `restore(votes)` rebuilds all of this from the standing votes in the
  comparison store, so votes cast before a restart count, and undo still reaches the
  last `history` votes of each annotator. (On a directory store leases and skips live
  in memory: after a restart an annotator may see a pair they skipped.)
* Several servers: with `shared` (a PostgreSQL store) the database has the last word
  on claims, votes and skips, and `sync()` folds in the votes other servers took; this
  queue then only chooses the order (annotate/queue_shared.py).
* Gold: with `gold` set (annotate/gold.py, `serve --gold`), a gold item sometimes takes
  the place of the pair about to be handed out; gold pairs are never in the pool.
* Status: each annotator's progress, the dashboard's overview and whether the
  generator should make more pairs are read off this state by annotate/queue_status.py.

One lock guards everything; every method is short, so 32 annotators voting at once
wait on it for microseconds. The only store calls are `record_vote` (the app hands it
the vote to store) and, with a shared store, the database's claims, skips and sync,
all made outside the lock.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from annotate.pairs import Pair, pair_from_vote
from annotate.queue_flags import FlagCounting
from annotate.queue_shared import SharedMode, not_work
from annotate.queue_status import QueueStatus
from annotate.sampling import selection_of, with_selection
from trainer.errors import PreflabError
from trainer.store import is_chat_vote


class StaleVote(PreflabError):
    """The pair named is not the one this annotator holds (already answered in another
    tab, or never given to them). The app shows them their current pair instead."""


@dataclass
class Assignment:
    """One pair handed to one annotator, and how it is shown to them."""

    pair: Pair
    annotator: str
    left: str  # "a" or "b": which canonical candidate is shown on the left
    shown_at: float  # clock() when it was last shown; decision time runs from here
    # The event_id its vote is stored under: a retry after "not saved" (which may have been
    # saved after all, when a database's COMMIT reply was lost) reuses it, so the store
    # returns the stored vote instead of taking a second one.
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def right(self) -> str:
        return "b" if self.left == "a" else "a"


@dataclass
class _Annotator:
    voted: set = field(default_factory=set)  # pair_ids with a standing vote
    skipped: set = field(default_factory=set)
    history: list = field(default_factory=list)  # latest standing vote records, oldest first
    current: Assignment | None = None
    last_seen: float = -math.inf


class AssignmentQueue(SharedMode, QueueStatus, FlagCounting):
    """The queue (see the module docstring). Its shared mode is annotate/queue_shared.py;
    what the page and the generator ask of it, annotate/queue_status.py; confirmed-flagged
    annotators' votes left out of K, annotate/queue_flags.py."""

    def __init__(
        self,
        overlap: int = 1,
        *,
        lease_s: float = 1800.0,
        active_s: float = 300.0,
        history: int = 50,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared=None,
    ):
        if overlap < 1:
            raise ValueError(f"overlap must be at least 1, got {overlap}")
        self.overlap = overlap
        self.lease_s = lease_s
        self.active_s = active_s
        self.history = history
        self.clock = clock
        self.planned = 0  # pairs a generator will still add (counts towards fair shares)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pairs: dict[str, Pair] = {}  # insertion order = serving order
        self._open: dict[str, None] = {}  # pairs with fewer than K votes, in order
        self._votes: dict[str, set[str]] = {}  # pair_id -> annotators (any pair, pooled or not)
        self._leases: dict[str, dict[str, float]] = {}  # pair_id -> {annotator: leased at}
        self._people: dict[str, _Annotator] = {}
        self.policy = None  # chooses among fresh pairs: .choose(pair_ids) -> (pair_id, how)
        self._want: dict[str, int] = {}  # pair_id -> votes wanted, for pairs sent back (requeue)
        self._how: dict[str, dict] = {}  # pair_id -> how it was picked (gen_params "selection")
        self.shared = shared  # the database's assignment, with several servers
        self._cursor = None  # where sync goes on in the shared store (opaque)
        self._refused: dict[tuple[str, str], float] = {}  # (annotator, pair_id) -> retry after
        self.gold = None  # annotate.gold.GoldItems: checks mixed in, outside the pool (set before add)
        # Confirmed-flagged annotators, whose votes fill no K, and each one's latest flag event
        # kind (annotate/queue_flags.py); on the instance, as _fill reads it for every pair.
        self._excluded: frozenset = frozenset()
        self._flag_kinds: dict[str, str] = {}
        self._flag_seqs: dict[str, tuple[int, str]] = {}

    def _wanted(self, pair_id: str) -> int:
        """Votes this pair should collect: K, or one more than it had when sent back; a
        gold pair one per annotator (never full)."""
        if self.gold is not None and pair_id in self.gold:
            from annotate.gold import GOLD_WANT

            return GOLD_WANT
        return self._want.get(pair_id, self.overlap)

    # ---- filling the pool ------------------------------------------------------------

    def add(self, pairs: Iterable[Pair], *, front: bool = False) -> int:
        """Add pairs to the end of the queue, or with `front` ahead of every fresh pair
        already waiting (a model that just joined the arena); ones already there are
        ignored. Returns how many were new."""
        added = 0
        with self._lock:
            opened = {}
            for p in pairs:
                if p.pair_id in self._pairs or (self.gold is not None and p.pair_id in self.gold):
                    continue  # a gold item is served as gold only, never as a pool pair
                self._pairs[p.pair_id] = p
                if self._count(p.pair_id) < self._wanted(p.pair_id):
                    opened[p.pair_id] = None
                added += 1
            # Serving order is _open's order (partly voted pairs still go first: _pick).
            if front:
                self._open = {**opened, **self._open}
            else:
                self._open.update(opened)
            self._changed.notify_all()
        return added

    def requeue(self, pairs: Iterable[Pair], how: dict[str, Any] | None = None) -> dict[str, int]:
        """Ask for one more vote on each pair (relabelling), by an annotator who has not
        voted on it; these pairs go out before any other. A pair not in the pool joins
        it. `how` is recorded with the new vote (gen_params "selection"). Returns
        {"queued": pairs sent back, "waiting": pairs that were already waiting for a vote}."""
        queued = waiting = 0
        with self._lock:
            for p in pairs:
                pair_id = p.pair_id
                if self.gold is not None and pair_id in self.gold:
                    continue  # its votes are checks, not labels to complete
                self._pairs.setdefault(pair_id, p)
                votes = self._count(pair_id)
                if pair_id in self._open and votes < self._wanted(pair_id):
                    waiting += 1
                    continue
                self._want[pair_id] = votes + 1
                self._open[pair_id] = None
                if how is not None:
                    self._how[pair_id] = how
                queued += 1
            self._changed.notify_all()
        return {"queued": queued, "waiting": waiting}

    def pool(self) -> list[Pair]:
        """Every pair in the pool, in arrival order."""
        with self._lock:
            return list(self._pairs.values())

    def restore(self, votes, *, cursor: Any = None) -> int:
        """Count the standing votes of a comparison store (a table from
        `read_comparisons`, or a list of records): who voted on what, and each
        annotator's latest votes for undo. Call once at startup, before or after add().
        With a shared store, `votes` and `cursor` come from `shared.snapshot()` (the same
        instant: sync goes on exactly from there) and the database's skips come back too."""
        if self.shared is not None:
            self._restore_shared(cursor)
        if hasattr(votes, "column_names"):  # an Arrow table: only the tail rows become dicts
            rows = self._latest_rows(votes)
            pairs_and_people = zip(votes.column("pair_id").to_pylist(), votes.column("annotator").to_pylist())
            selections = self._selections(votes)
        else:
            rows = sorted(votes, key=lambda r: r["created_at"])
            pairs_and_people = [(r["pair_id"], r["annotator"]) for r in rows]
            selections = [(r["pair_id"], r.get("gen_params")) for r in rows]
        with self._lock:
            n = 0
            for pair_id, annotator in pairs_and_people:
                if not_work(annotator):  # imported data and models' votes are not anyone's work here
                    continue
                self._votes.setdefault(pair_id, set()).add(annotator)
                self._person(annotator).voted.add(pair_id)
                n += 1
            for row in rows:
                # A chat vote is no pair of this queue: undo would show its last turn
                # without the history before it, and the vote again would store it so.
                if not_work(row["annotator"]) or is_chat_vote(row):
                    continue
                history = self._person(row["annotator"]).history
                history.append(row)
                del history[: -self.history]
            for pair_id in list(self._open):
                if self._count(pair_id) >= self._wanted(pair_id):
                    del self._open[pair_id]
            for pair_id, gen_params in selections:  # partly done pairs keep how they were picked
                how = selection_of(gen_params)
                # Not a gold item's: its label is the gold file's as it is now (an admin may
                # have corrected it), and a pair no longer gold must not score as a check.
                if how is not None and how.get("method") != "gold":
                    self._how[pair_id] = how
            return n

    @staticmethod
    def _selections(table) -> list[tuple[str, str]]:
        """(pair_id, gen_params) of the votes whose gen_params record a selection."""
        import pyarrow.compute as pc

        if table.num_rows == 0 or "gen_params" not in table.column_names:
            return []
        hit = pc.fill_null(pc.match_substring(table.column("gen_params"), '"selection"'), False)
        picked = table.filter(hit).sort_by([("created_at", "ascending")])
        return list(zip(picked.column("pair_id").to_pylist(), picked.column("gen_params").to_pylist()))

    def _latest_rows(self, table) -> list[dict[str, Any]]:
        """The last `history` votes of each annotator as dicts, oldest first."""
        if table.num_rows == 0:
            return []
        table = table.sort_by([("annotator", "ascending"), ("created_at", "ascending")])
        names = table.column("annotator").to_pylist()
        keep = [
            i
            for i in range(len(names))
            if i + self.history >= len(names) or names[i + self.history] != names[i]
        ]
        rows = table.take(keep).to_pylist()
        return sorted(rows, key=lambda r: r["created_at"])

    def _person(self, annotator: str) -> _Annotator:
        person = self._people.get(annotator)
        if person is None:
            person = self._people[annotator] = _Annotator()
        return person

    def _person_or_blank(self, annotator: str) -> _Annotator:
        """Like _person, but someone not seen yet gets a blank state that is not kept
        (asking about them changes nothing)."""
        return self._people.get(annotator) or _Annotator()

    # ---- handing out pairs -----------------------------------------------------------

    def _fill(self, pair_id: str, now: float) -> int:
        """Slots of a pair that are taken: standing votes plus live leases."""
        leases = self._leases.get(pair_id)
        live = sum(1 for t in leases.values() if now - t < self.lease_s) if leases else 0
        # _count inlined for the usual case: this runs for every open pair a _pick looks at
        counted = len(self._votes.get(pair_id, ())) if not self._excluded else self._count(pair_id)
        return counted + live

    def _can_take(self, annotator: str, person: _Annotator, pair_id: str, now: float) -> bool:
        return (
            pair_id not in person.voted
            and pair_id not in person.skipped
            and annotator not in self._leases.get(pair_id, ())
            and (not self._refused or self._refused.get((annotator, pair_id), -math.inf) <= now)
        )

    def _pick(self, annotator: str, person: _Annotator, now: float) -> str | None:
        """The open pair this annotator should do next: one sent back for relabelling;
        else the fullest one they may take (finish agreement sets first), earliest on a
        tie; among fresh pairs (none taken) the policy chooses, when there is one."""
        for pair_id, want in self._want.items():  # few: pairs sent back from the Review tab
            if (
                pair_id in self._open
                and self._can_take(annotator, person, pair_id, now)
                and self._fill(pair_id, now) < want
            ):
                return pair_id
        best, best_fill = None, -1
        fresh: list[str] | None = [] if self.policy is not None else None
        for pair_id in self._open:
            if not self._can_take(annotator, person, pair_id, now):
                continue
            fill, want = self._fill(pair_id, now), self._wanted(pair_id)
            if fresh is not None and fill == 0:
                fresh.append(pair_id)
                continue
            if best_fill < fill < want:
                best, best_fill = pair_id, fill
                if fill == want - 1:  # cannot do better than the last slot
                    break
        if best is None and fresh:
            best, how = self.policy.choose(fresh)
            self._how[best] = how
        return best

    def _lease(self, person: _Annotator, annotator: str, pair: Pair, left: str, now: float) -> Assignment:
        self._leases.setdefault(pair.pair_id, {})[annotator] = now
        how = self._how.get(pair.pair_id)
        if how is not None:  # the vote records how its pair was picked
            pair = with_selection(pair, how)
        person.current = Assignment(pair=pair, annotator=annotator, left=left, shown_at=now)
        return person.current

    def _release(self, annotator: str, pair_id: str) -> None:
        leases = self._leases.get(pair_id)
        if leases is not None:
            leases.pop(annotator, None)
            if not leases:
                del self._leases[pair_id]

    def next(self, annotator: str) -> Assignment | None:
        """The annotator's current pair, or a new one; None when there is nothing left
        for them (for now: a generator may still add pairs)."""
        for _ in range(50):  # with a shared store, each refused claim rules one pair out
            with self._lock:
                now = self.clock()
                person = self._person(annotator)
                person.last_seen = now
                self._changed.notify_all()  # a generator waiting for demand looks again
                if person.current is not None:
                    return person.current
                pair_id = self._pick(annotator, person, now)
                if pair_id is None:
                    return None  # gold only ever takes a pool pair's turn: it never comes alone
                pair = self._pairs[pair_id]
                if self.gold is not None:
                    pair = self.gold.draw(partial(self._can_take, annotator, person, now=now)) or pair
                a = self._lease(person, annotator, pair, self._rng.choice("ab"), now)
                if self.shared is None:
                    return a
                pair_id = pair.pair_id
                want = self._shared_want(pair_id)
            if self._claim_shared(person, a, pair_id, want):  # outside the lock: others are not held up
                return a
        return None

    def record_vote(self, a: Assignment, record: dict[str, Any], store) -> dict[str, Any]:
        """Store the vote (durable when this returns) and count it. With a shared store
        the database checks that it still fits (VoteConflict: nothing stored, the pair
        dropped for this annotator); otherwise `store.append`. Other errors propagate
        with the assignment untouched: the caller cancels the vote."""
        stored = store.append(record) if self.shared is None else self._vote_shared(a, record)
        self.finish_vote(a, stored)
        return stored

    def current(self, annotator: str) -> Assignment | None:
        with self._lock:
            person = self._people.get(annotator)
            return person.current if person else None

    # ---- votes, skips, undo ----------------------------------------------------------

    def begin_vote(self, annotator: str, pair_id: str) -> Assignment:
        """Take the annotator's current assignment for a vote on `pair_id`. Taking it
        makes a second, concurrent vote on the same pair (a double click) a StaleVote.
        Follow with finish_vote once the vote is stored, or cancel_vote if it failed."""
        with self._lock:
            person = self._person(annotator)
            person.last_seen = self.clock()
            a = person.current
            if a is None or a.pair.pair_id != pair_id:
                raise StaleVote(pair_id)
            person.current = None  # the lease stays until finish/cancel: the slot is ours
            return a

    def cancel_vote(self, a: Assignment) -> None:
        with self._lock:
            person = self._person(a.annotator)
            if person.current is None:
                person.current = a
            else:
                self._release(a.annotator, a.pair.pair_id)

    def finish_vote(self, a: Assignment, record: dict[str, Any]) -> None:
        """The vote is durable: count it, and remember it for undo."""
        with self._lock:
            pair_id = a.pair.pair_id
            self._release(a.annotator, pair_id)
            voters = self._votes.setdefault(pair_id, set())
            voters.add(a.annotator)
            if self._count(pair_id) >= self._wanted(pair_id):
                self._open.pop(pair_id, None)
                self._want.pop(pair_id, None)  # a relabel request is answered
            person = self._person(a.annotator)
            person.voted.add(pair_id)
            person.history.append(record)
            del person.history[: -self.history]
            self._changed.notify_all()

    def skip(self, annotator: str, pair_id: str) -> bool:
        """Give the current pair back (to someone else). False if it was not current."""
        with self._lock:
            person = self._person(annotator)
            person.last_seen = self.clock()
            if person.current is None or person.current.pair.pair_id != pair_id:
                return False
            person.current = None
            person.skipped.add(pair_id)
            self._release(annotator, pair_id)
            self._changed.notify_all()
        if self.shared is not None:  # kept in the database: every server, and a restart, knows
            self._skip_shared(pair_id, annotator)
        return True

    def begin_undo(self, annotator: str) -> dict[str, Any] | None:
        """The annotator's latest standing vote record, taken off their undo history
        (None if there is none). Follow with finish_undo once the retract is stored,
        or cancel_undo if it failed."""
        with self._lock:
            person = self._person(annotator)
            person.last_seen = self.clock()
            return person.history.pop() if person.history else None

    def cancel_undo(self, annotator: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._person(annotator).history.append(record)

    def finish_undo(self, annotator: str, record: dict[str, Any]) -> Assignment:
        """The retract is durable: the vote no longer counts, and its pair comes back as
        the annotator's current pair, shown the same way round. The pair they were
        looking at goes back to the queue."""
        with self._lock:
            now = self.clock()
            pair_id = record["pair_id"]
            person = self._person(annotator)
            voters = self._votes.get(pair_id, set())
            voters.discard(annotator)
            person.voted.discard(pair_id)
            pair = self._pairs.get(pair_id)
            in_pool = pair is not None  # only a pool pair goes back to the open set below
            if pair is None and self.gold is not None:
                pair = self.gold.pair(pair_id)  # a gold item: back as it was, never into the pool
            if pair is None:  # a vote on a pair outside this pool: rebuild it from the record
                pair = pair_from_vote(record)
            elif in_pool and self._count(pair_id) < self._wanted(pair_id) and pair_id not in self._open:
                self._open[pair_id] = None
            previous = person.current.pair.pair_id if person.current is not None else None
            if previous is not None:
                self._release(annotator, previous)
            self._changed.notify_all()
            a = self._lease(person, annotator, pair, record["left"], now)
            want = self._shared_want(pair_id)
        if self.shared is not None:  # the database's leases follow: one freed, one taken
            self._move_shared_lease(annotator, previous, pair_id, want)
        return a
