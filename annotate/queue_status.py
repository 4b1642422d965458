"""What the assignment queue says about itself: the questions the page, the dashboard
and the pair generator ask, answered from the queue's own state.

    queue.progress("ann")          # {"done", "assigned", "pool_done", "pool_total"}: the top bar
    queue.held_by_others("ann")    # why there is nothing to show: others hold the last pairs
    queue.overview()               # the dashboard's numbers about the pool
    queue.needs_pairs(2)           # the generator: make the next batch now?
    queue.wait_for_need(2)         # ... or block until something changed

`QueueStatus` is a base class of `AssignmentQueue` (annotate/queue.py), like its shared
mode (annotate/queue_shared.py): these methods read the queue's state under its lock
and change nothing in it; the rules (overlap, never twice, leases, fair shares) are
the queue's, and so are the helpers used here (`_fill`, `_can_take`, `_wanted`).
"""

from __future__ import annotations

import math


class QueueStatus:
    """The read side of AssignmentQueue (see the module docstring)."""

    def progress(self, annotator: str) -> dict[str, int]:
        """{"done": pairs of this pool they voted on, "assigned": their fair share,
        "pool_done": pairs with all the votes they want, "pool_total": pairs planned};
        with gold items mixed in, gold votes count in "done" and the pool's two are absent.

        Everything here comes from votes (restored from the store at a restart), so it
        reads the same for everyone and after a restart: the share divides the pool
        among the people who have voted in it (and the one asking), not among whoever
        holds a pair this minute, so someone logging in moves nobody's target."""
        with self._lock:
            person = self._person_or_blank(annotator)
            done = sum(1 for p in person.voted if p in self._pairs)
            # Gold votes count like any vote here, or the counter standing still after a
            # vote would tell a gold item apart: each adds one to "done" and none to what is
            # left, exactly as a pool vote does. For the same reason the pool's numbers are
            # left out while gold items are mixed in (with overlap 1 a pool vote completes a
            # pair, a gold vote never does).
            gold_done = sum(1 for p in person.voted if p in self.gold) if self.gold is not None else 0
            total = max(len(self._pairs), self.planned)
            in_play = sum(
                1
                for name, other in self._people.items()
                if name == annotator or any(p in self._pairs for p in other.voted)
            )
            in_play += annotator not in self._people
            share = math.ceil(total * self.overlap / max(in_play, self.overlap))
            possible = total - sum(1 for p in person.skipped if p not in person.voted)
            complete = self._complete_count()
            progress = {"done": done + gold_done, "assigned": max(done + gold_done, min(share, possible))}
            if self.gold is None:
                progress |= {"pool_done": complete, "pool_total": total}
            return progress

    def _complete_count(self) -> int:
        """Pairs of the pool with all the votes they want. queue.py keeps `_open` as exactly
        the pool's pairs still short of votes (add, vote, undo, requeue, restore, sync), so
        this is a subtraction, not a scan: progress() runs after every vote, and a scan of
        a 5,000-pair pool was a tenth of the server's CPU per vote at 512 annotators."""
        return len(self._pairs) - len(self._open)

    def active_annotators(self) -> list[str]:
        with self._lock:
            now = self.clock()
            return [name for name, p in self._people.items() if now - p.last_seen < self.active_s]

    def _available(self, annotator: str | None, limit: int, now: float) -> int:
        """How many open pairs this annotator could be given now (besides their
        current one), counting up to `limit`. None: anyone (a slot is free)."""
        person = self._people.get(annotator) if annotator else None
        n = 0
        for pair_id in self._open:
            if person is not None and not self._can_take(annotator, person, pair_id, now):
                continue
            if self._fill(pair_id, now) < self._wanted(pair_id):
                n += 1
                if n >= limit:
                    break
        return n

    def ready(self, annotator: str | None = None, limit: int = 1) -> int:
        """Open pairs someone (or this annotator) could be given now, counted up to limit."""
        with self._lock:
            return self._available(annotator, limit, self.clock())

    def held_by_others(self, annotator: str) -> int:
        """Open pairs this annotator may still do that are all leased to others right
        now: they come free if those annotators skip them or go away."""
        with self._lock:
            now = self.clock()
            person = self._person_or_blank(annotator)
            return sum(
                1
                for pair_id in self._open
                if self._can_take(annotator, person, pair_id, now)
                and self._fill(pair_id, now) >= self._wanted(pair_id)
            )

    def needs_pairs(self, per_annotator: int = 2) -> bool:
        """True while some active annotator has fewer than `per_annotator` pairs ready,
        or the free slots of all open pairs are fewer than that per active annotator.
        With nobody active, keep `per_annotator` pairs ready for the first one."""
        with self._lock:
            now = self.clock()
            active = [name for name, p in self._people.items() if now - p.last_seen < self.active_s]
            if not active:
                return self._available(None, per_annotator, now) < per_annotator
            if any(self._available(name, per_annotator, now) < per_annotator for name in active):
                return True
            want = per_annotator * len(active)
            free = 0
            for pair_id in self._open:
                free += max(0, self._wanted(pair_id) - self._fill(pair_id, now))
                if free >= want:
                    return False
            return True

    def wait_for_need(self, per_annotator: int = 2, timeout: float = 1.0) -> bool:
        """Block until something changed (or timeout); then say whether pairs are needed."""
        with self._changed:
            self._changed.wait(timeout)
        return self.needs_pairs(per_annotator)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def overview(self) -> dict[str, int]:
        """Numbers about the pool as a whole (for the dashboard)."""
        with self._lock:
            now = self.clock()
            complete = self._complete_count()
            in_progress = sum(
                1
                for p, leases in self._leases.items()
                if any(now - t < self.lease_s for t in leases.values())
            )
            return {
                "pairs": len(self._pairs),
                "complete": complete,
                "open": len(self._open),
                "in_progress": in_progress,
                "overlap": self.overlap,
                "planned": max(self.planned, len(self._pairs)),
            }
