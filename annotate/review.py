"""Review: the voted pairs seen through a reward model, and where it disagrees with people.

    from annotate.review import Reviewer, review_rows, disagreements
    reviewer = Reviewer(data, runs_dir, queue)       # built once, by annotate/serve.py
    reviewer.start("rm-1"); job = reviewer.wait("rm-1")
    rows = job["rows"]                               # each vote + scores + P(a beats b)
    worst = disagreements(rows)                      # decisive votes the model doubts most
    reviewer.requeue("rm-1", top_pairs(rows, 5))     # one more vote each, by someone else

* Scores come from annotate/scoring.py (`scorer_for`: one cached scorer per reward run,
  the same the uncertainty sampler uses), so a second look scores only new pairs.
* P(a beats b) = sigmoid(score_a - score_b): the Bradley-Terry probability the reward
  model was trained to give. Next to a vote for `a` it is the probability the model gives
  the human's choice; for `b` it is 1 minus that. Ties and both-bad votes have no side.
* `disagreements`: the decisive votes the model calls wrong (that probability below
  0.5), the most confident first: worth a second look by another annotator
  (`Reviewer.requeue`: AssignmentQueue.requeue). A vote it agrees with is never one.
* Each row also says it as the annotator saw it (score_left / score_right, p_left,
  side), since the page showed them sides, not the stored a/b order.
* `Reviewer`: what the Review tab (annotate/web/review_tab.py) runs, without gradio.
  Scoring is a background job per reward run (the page polls its progress); a reloaded
  page finds the job, or its result, where it was.
* The votes are trainer/flags.py's `read_counted_votes`: those of annotators whose flag
  an admin confirmed are left out (not scored, never a disagreement to send back) unless
  the job is started with `include_flagged`; the job's message says how many were.

Nothing heavy at import: torch loads with the first model.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from annotate.scoring import content_key, items_from_votes, scorer_for
from trainer.errors import PreflabError
from trainer.flags import PAGE_SWITCH, FlagExclusion, read_counted_votes
from trainer.runs import RunDirError, reward_model_path, reward_runs
from trainer.store import is_chat_vote

log = logging.getLogger("preflab.review")

DECISIVE = ("a", "b")
VOTE_COLUMNS = (
    "event_id",
    "pair_id",
    "prompt_id",
    "prompt",
    "response_a",
    "response_b",
    "model_a",
    "model_b",
    "left",
    "choice",
    "strength",
    "annotator",
    "created_at",
    "gen_params",
    # a chat vote's: its answers are scored after each side's own history
    "conversation_a",
    "conversation_b",
)


class ReviewError(PreflabError, ValueError):
    """A review that cannot be done as asked (no such reward run, no queue to send to)."""


# --------------------------------------------------------------------------------------
# Votes beside scores; the disagreements
# --------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow for any x


def review_rows(
    votes: Iterable[dict[str, Any]], scores: dict[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """Each vote with the model's view of its pair: score_a, score_b, p_a = P(a beats b),
    p_human = the probability the model gives the side the human chose (None for ties
    and both-bad), agree = p_human > 0.5. Votes whose pair has no score are left out.

    And the same as the annotator saw it (`left`: which stored answer was on the left):
    score_left, score_right, p_left = P(left beats right), side = "left" / "right" for
    the answer they chose (None for ties and both-bad)."""
    rows = []
    for v in votes:
        s = scores.get(
            content_key(
                v["prompt"],
                v["response_a"],
                v["response_b"],
                v.get("conversation_a"),
                v.get("conversation_b"),
            )
        )
        if s is None:
            continue
        p_a = sigmoid(s[0] - s[1])
        choice = v.get("choice")
        p_human = p_a if choice == "a" else (1.0 - p_a if choice == "b" else None)
        left_is_a = v.get("left", "a") != "b"
        rows.append(
            {
                **{k: v.get(k) for k in VOTE_COLUMNS},
                "score_a": s[0],
                "score_b": s[1],
                "p_a": p_a,
                "p_human": p_human,
                "agree": None if p_human is None else p_human > 0.5,
                "score_left": s[0] if left_is_a else s[1],
                "score_right": s[1] if left_is_a else s[0],
                "p_left": p_a if left_is_a else 1.0 - p_a,
                "side": None
                if choice not in DECISIVE
                else ("left" if (choice == "a") == left_is_a else "right"),
            }
        )
    return rows


def disagreements(rows: Iterable[dict[str, Any]], n: int | None = None) -> list[dict[str, Any]]:
    """The decisive votes the model disagrees with (it gives the human's side less than
    even odds), the most confident disagreement first (lowest P(the human's side));
    equal probabilities in event_id order, so the list is stable."""
    against = [
        r for r in rows if r.get("choice") in DECISIVE and r.get("p_human") is not None and r["p_human"] < 0.5
    ]
    against.sort(key=lambda r: (r["p_human"], str(r.get("event_id"))))
    return against if n is None else against[:n]


def top_pairs(rows: Iterable[dict[str, Any]], n: int) -> list[str]:
    """The first n distinct pair_ids of the disagreement ranking."""
    out: list[str] = []
    for r in disagreements(rows):
        if r["pair_id"] not in out:
            out.append(r["pair_id"])
            if len(out) >= n:
                break
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    decisive = [r for r in rows if r["p_human"] is not None]
    agree = sum(1 for r in decisive if r["agree"])
    return {
        "votes": len(rows),
        "pairs": len({r["pair_id"] for r in rows}),
        "decisive": len(decisive),
        "agree": agree,
        "agreement": agree / len(decisive) if decisive else None,
        "mean_p_human": sum(r["p_human"] for r in decisive) / len(decisive) if decisive else None,
    }


# --------------------------------------------------------------------------------------
# The Review tab's background jobs
# --------------------------------------------------------------------------------------


class Job:
    """Scoring the store's votes with one reward run, in a thread."""

    def __init__(self, run_id: str, include_flagged: bool = False):
        self.run_id = run_id
        self.include_flagged = include_flagged
        self.flagged: dict[str, Any] | None = None  # FlagExclusion.to_dict of its read, with "note"
        self.lock = threading.Lock()
        self.state = "starting"  # starting | loading | scoring | done | failed
        self.done = self.total = 0
        self.message = "starting"
        self.rows: list[dict[str, Any]] | None = None
        self.new = 0  # pairs this job scored with the model
        self.started = time.time()
        self.finished: float | None = None
        self.thread: threading.Thread | None = None

    def update(self, **fields: Any) -> None:
        with self.lock:
            for k, v in fields.items():
                setattr(self, k, v)

    def view(self) -> dict[str, Any]:
        with self.lock:
            return {
                "run_id": self.run_id,
                "state": self.state,
                "done": self.done,
                "total": self.total,
                "message": self.message,
                "new": self.new,
                "rows": self.rows,
                "seconds": round((self.finished or time.time()) - self.started, 1),
                "include_flagged": self.include_flagged,
                "flagged": self.flagged,
            }

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Reviewer:
    """What the Review tab does, without gradio: list reward runs, score the votes with
    one (a background job; `status` to poll), send pairs back to the queue."""

    def __init__(
        self,
        data: str | os.PathLike,
        runs_dir: str | os.PathLike,
        queue=None,
        *,
        device: Any = None,
        extra_runs: Sequence[str | os.PathLike] = (),
        suggestions=None,
    ):
        # The store target as given (a directory, or a postgresql:// URL): never a Path,
        # which would fold a URL's "//".
        self.data = data
        self.runs_dir = Path(runs_dir)
        self.queue = queue
        self.device = device
        self.extra_runs = [Path(p) for p in extra_runs]  # e.g. serve --reward-model outside --runs
        self.suggestions = suggestions  # serve --suggest: annotate/suggestions.JudgeSuggestions
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def runs(self) -> list[dict[str, Any]]:
        found = reward_runs(self.runs_dir)
        ids = {r["id"] for r in found}
        for path in self.extra_runs:
            if path.name not in ids:
                try:
                    reward_model_path(path)
                except RunDirError:
                    continue
                found.append({"id": path.name, "path": str(path), "message": "", "finished": 0.0})
        return found

    def _path(self, run_id: str) -> Path:
        for r in self.runs():
            if r["id"] == run_id:
                return Path(r["path"])
        # Not listed: say why (still running, failed, not a reward run, no such run).
        reward_model_path(self.runs_dir / run_id)
        raise ReviewError(f"{run_id}: no such reward run under {self.runs_dir}")

    def start(self, run_id: str, include_flagged: bool = False) -> dict[str, Any]:
        """Score the store's current votes with this run (only pairs not scored before go
        through the model), without confirmed-flagged annotators' votes unless
        `include_flagged`. A job already running for the run is joined, not repeated
        (its view's include_flagged says which votes it reads)."""
        path = self._path(run_id)
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and job.running:
                return job.view()
            previous = job
            job = self._jobs[run_id] = Job(run_id, include_flagged)
            if previous is not None and previous.rows is not None:
                job.rows = previous.rows  # the old table stays on screen meanwhile
            job.thread = threading.Thread(
                target=self._work, args=(job, path), daemon=True, name=f"preflab-review-{run_id}"
            )
            job.thread.start()
            return job.view()

    def status(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(run_id)
        return job.view() if job is not None else None

    def wait(self, run_id: str, timeout: float = 600) -> dict[str, Any]:
        with self._lock:
            job = self._jobs[run_id]
        if job.thread is not None:
            job.thread.join(timeout)
        return job.view()

    def read_votes(self, include_flagged: bool = False) -> list[dict[str, Any]]:
        """The votes a review looks at, as records (`read_counted`)."""
        return self.read_counted(include_flagged)[0]

    def read_counted(self, include_flagged: bool = False) -> tuple[list[dict[str, Any]], FlagExclusion]:
        """(the standing votes as records, less confirmed-flagged annotators' unless
        include_flagged; what was done about those: trainer.flags.FlagExclusion)."""
        from trainer.store import store_exists

        if not store_exists(self.data):
            return [], FlagExclusion()
        from trainer.judges import select_judges

        table, exclusion = read_counted_votes(self.data, list(VOTE_COLUMNS), include_flagged=include_flagged)
        table, _ = select_judges(table, "exclude")  # people's votes to relabel, not a model's
        return table.to_pylist(), exclusion

    def _work(self, job: Job, path: Path) -> None:
        try:
            job.update(state="loading", message="reading the votes")
            votes, exclusion = self.read_counted(job.include_flagged)
            note = exclusion.note(PAGE_SWITCH)
            job.update(flagged={**exclusion.to_dict(), "note": note})
            items = items_from_votes(votes)
            job.update(message=f"loading the reward model {job.run_id}")
            scorer = scorer_for(path, self.device)
            todo = len(scorer.missing(items))
            job.update(
                state="scoring",
                total=todo,
                message=f"{len(items) - todo} of {len(items)} pairs scored before; scoring {todo}",
            )
            before = scorer.computed

            def progress(done: int, total: int) -> None:
                job.update(done=done, total=total, message=f"scoring pairs: {done} of {total}")

            scores = scorer.score(items, progress=progress)
            rows = review_rows(votes, scores)
            rows.sort(key=lambda r: r["created_at"], reverse=True)
            job.update(
                state="done",
                rows=rows,
                new=scorer.computed - before,
                done=todo,
                total=todo,
                finished=time.time(),
                message=f"{len(rows)} votes on {len(items)} pairs; {todo} pairs newly scored"
                + (f"; {note}" if note else ""),
            )
        except Exception as e:
            log.exception("review scoring with %s failed", job.run_id)
            job.update(state="failed", finished=time.time(), message=f"{type(e).__name__}: {e}")

    def judge_disagreements(self, include_flagged: bool = False) -> list[dict[str, Any]]:
        """serve --suggest: people's votes the judge voted otherwise on, newest first."""
        if self.suggestions is None:
            raise ReviewError("no judge to compare with: start the server with --suggest judge:<name>")
        return self.suggestions.disagreements(include_flagged)

    def requeue_judged(self, pair_ids: Sequence[str], include_flagged: bool = False) -> dict[str, Any]:
        """Send pairs of the judge's disagreements back for one more vote (as `requeue`)."""
        rows = self.judge_disagreements(include_flagged)
        return self._requeue(rows, pair_ids, {"method": "relabel", "judge": self.suggestions.judge})

    def requeue(self, run_id: str, pair_ids: Sequence[str]) -> dict[str, Any]:
        """Send pairs back to the annotation queue for one more vote, by an annotator who
        has not voted on them. Returns {"queued", "waiting", "unknown", "message"}."""
        job = self.status(run_id)
        rows = (job or {}).get("rows") or self.read_votes()
        return self._requeue(rows, pair_ids, {"method": "relabel", "reward_run": run_id})

    def _requeue(self, rows, pair_ids: Sequence[str], how: dict[str, Any]) -> dict[str, Any]:
        from annotate.pairs import pair_from_vote
        from trainer.rows import BadRow

        if self.queue is None:
            raise ReviewError("no annotation queue to send pairs to")
        wanted = list(dict.fromkeys(p for p in pair_ids if p))
        by_id: dict[str, dict] = {}
        for r in rows:
            by_id.setdefault(r["pair_id"], r)
        pairs, unknown, chats = [], 0, 0
        for pid in wanted:
            r = by_id.get(pid)
            if r is None:
                unknown += 1
                continue
            if is_chat_vote(r):  # its two histories are no pool pair: not relabelled
                chats += 1
                continue
            try:
                pairs.append(pair_from_vote(r))
            except (BadRow, ValueError):
                unknown += 1
        report = self.queue.requeue(pairs, how=how)
        queued, waiting = report["queued"], report["waiting"]
        parts = [
            f"Queued {queued} pair{'s' if queued != 1 else ''} for one more vote by an annotator "
            "who has not voted on them"
        ]
        if waiting:
            parts.append(f"{waiting} already waiting for a vote")
        if unknown:
            parts.append(f"{unknown} not found among the votes")
        if chats:
            parts.append(
                f"{chats} chat vote{'s' if chats != 1 else ''} left out (a chat turn cannot be relabelled)"
            )
        return {"queued": queued, "waiting": waiting, "unknown": unknown, "message": "; ".join(parts) + "."}
