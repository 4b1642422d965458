"""The annotation workflow of `preflab serve`, without gradio: next pair, vote, skip,
undo, the dashboard's numbers, export.

    service = Service(store, queue, data="comparisons", accounts=None, local_user="me")
    view = service.next("me")                            # {"pair": {...}, "progress": ..., "rubric": ...}
    view = service.vote("me", view["pair"]["pair_id"], "left", "clearly", "why")
    service.dashboard("me"); service.export("me", folder, format="standard")

Every vote is durable in the comparison store before it is acknowledged; the same call
that acknowledges it returns the next pair (one round trip). Each method that acts for
someone takes their name (already checked by `identify`, annotate/accounts.py) and
returns a view: a JSON-able dict the page renders and the JSON API (annotate/web/page.py)
returns as is. "left" and "right" are the answers as shown; the store records the
canonical a/b choice and which one was on the left. Model names are revealed in the
acknowledgement only. Admin-only calls (dashboard, export) check the role here too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from annotate.accounts import ADMIN, Accounts, identify, require_admin, role_of
from annotate.pair_generator import Generator
from annotate.pairs import MAX_NAME_CHARS
from annotate.queue import Assignment, AssignmentQueue, StaleVote
from trainer.errors import PreflabError
from trainer.flags import PAGE_SWITCH
from trainer.rows import text_problem
from trainer.store.errors import StoreError, StoreWriteError, VoteConflict

log = logging.getLogger("preflab.service")

SHOWN_CHOICES = ("left", "right", "tie", "both_bad")
STRENGTHS = {"slightly": 1, "clearly": 2}
EXPORT_FILETYPES = ("parquet", "jsonl")


# What one vote may carry: a rationale is a sentence or a paragraph, never a document (a
# 30 MB one was once acknowledged and stored); a pair id is a short hash-like name.
MAX_RATIONALE_CHARS = 2_000
MAX_PAIR_ID_CHARS = MAX_NAME_CHARS  # as long as a pairs file may make one


class BadRequest(PreflabError, ValueError):
    """A call the service cannot take as sent (an unknown choice from an API caller)."""


def check_vote_inputs(choice: str, strength: str, rationale: str) -> str:
    """What every vote (a pair's, a chat's: annotate/chat.py) is checked for before
    anything is stored: BadRequest naming the field. Returns the strength normalised."""
    if choice not in SHOWN_CHOICES:
        raise BadRequest(f"choice must be one of {', '.join(SHOWN_CHOICES)}, got {str(choice)[:40]!r}")
    strength = (strength or "").strip().lower()
    if strength and strength not in STRENGTHS:
        raise BadRequest(f"strength must be 'slightly', 'clearly' or empty, got {strength[:40]!r}")
    if len(rationale or "") > MAX_RATIONALE_CHARS:
        raise BadRequest(
            f"the rationale is {len(rationale):,} characters; at most {MAX_RATIONALE_CHARS:,} are kept "
            "with a vote: shorten it (nothing was saved)"
        )
    if problem := text_problem(rationale or ""):  # the one free text a vote carries
        raise BadRequest(f"the rationale is {problem}: remove that character (nothing was saved)")
    return strength


class Service:
    """The annotation workflow, independent of gradio (the tests call it directly too)."""

    def __init__(
        self,
        store,
        queue: AssignmentQueue,
        *,
        data: str | os.PathLike,
        accounts: Accounts | None = None,
        local_user: str = "local",
        generator: Generator | None = None,
        rubric=None,
        suggestions=None,
    ):
        self.store = store
        self.queue = queue
        self.data = str(data)  # the store's target: a directory or a postgresql:// URL
        self.accounts = accounts
        self.local_user = local_user
        self.generator = generator  # with --model: why there is no pair yet
        self.rubric = rubric  # annotate.rubric.Rubric with --rubric: criteria beside the vote
        self.suggestions = suggestions  # --suggest: annotate/suggestions.py, in the ack only
        # Rubric.describe, once: the views share it (JSON-able, never changed after this)
        self._rubric_description = rubric.describe() if rubric is not None else None

    # ---- who is asking ---------------------------------------------------------------

    def identify(self, request) -> tuple[str, str]:
        """(name, role) of the caller (annotate.accounts.identify); Forbidden if unknown."""
        return identify(request, self.accounts, self.local_user)

    def _require_admin(self, user: str) -> None:
        require_admin(user, role_of(user, self.accounts, self.local_user))

    # ---- views -----------------------------------------------------------------------

    def _waiting(self, user: str) -> dict[str, Any]:
        """Why there is no pair to show: still generating, others hold the last pairs,
        or all done."""
        if self.generator is not None:
            status = self.generator.status()
            if status["state"] in ("loading", "generating", "waiting"):
                # Seconds into this step (loading a model, this batch), not since the start:
                # "generating pair 7 (3s)" says how long this pair has been coming.
                seconds = int(time.time() - status.get("since", status["started"]))
                message = status["message"]
                if status["state"] == "generating" and status.get("last_batch_s"):
                    message += f"; the last batch took {status['last_batch_s']:.0f}s"
                if status.get("endpoint_error"):  # a model behind an endpoint failed: its pair dropped
                    # Only an admin is told which: to annotators the arena's models stay anonymous.
                    which = "a model's server failed (see the server log)"
                    if role_of(user, self.accounts, self.local_user) == ADMIN:
                        which = status["endpoint_error"]
                    message += f"; {which}: that pair was dropped and is made again"
                return {
                    "state": status["state"],
                    "message": message,
                    "seconds": seconds,
                    "generated": status["generated"],
                    "planned": status["planned"],
                }
            if status["state"] == "failed":
                return {"state": "failed", "message": status["message"]}
        held = self.queue.held_by_others(user)
        if held:
            return {
                "state": "held",
                "message": f"The last {held} pair{'s are' if held > 1 else ' is'} "
                "with other annotators right now; if one comes free it appears here.",
            }
        return {"state": "done", "message": "Nothing left for you to annotate. Thank you!"}

    def _view(
        self, user: str, a: Assignment | None, *, ok: bool = True, message: str = "", ack: dict | None = None
    ) -> dict[str, Any]:
        pair = None
        if a is not None:
            pair = {
                "pair_id": a.pair.pair_id,
                "prompt": list(a.pair.messages),
                "left": a.pair.response(a.left),
                "right": a.pair.response(a.right),
                # Stopped by the token limit: shown as cut, so it is not judged as rambling off.
                "left_cut": a.pair.cut(a.left),
                "right_cut": a.pair.cut(a.right),
            }
        return {
            "ok": ok,
            "message": message,
            "user": user,
            "ack": ack,
            "pair": pair,
            "progress": self.queue.progress(user),
            "waiting": None if a is not None else self._waiting(user),
            # What a vote on the pair must or may carry as `criteria` (None without --rubric):
            # in every view, so that every answer has one shape (a gold pair's included).
            "rubric": self._rubric_description,
        }

    def _next(self, user: str) -> tuple[Assignment | None, str]:
        """The annotator's next pair, or (None, why) when a shared store cannot be asked
        right now: whatever was just stored stays stored, the page says so."""
        try:
            return self.queue.next(user), ""
        except StoreError as e:
            log.error("%s", e)
            return None, "The vote store cannot be reached right now; your next pair comes when it is back."

    def next(self, user: str) -> dict[str, Any]:
        a, problem = self._next(user)
        if a is not None:
            a.shown_at = self.queue.clock()  # shown (again) now: decision time starts here
        return self._view(user, a, ok=not problem, message=problem)

    # ---- acting on a pair ------------------------------------------------------------

    def vote(
        self,
        user: str,
        pair_id: str,
        choice: str,
        strength: str = "",
        rationale: str = "",
        criteria: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`criteria`: the rubric's judgments as shown (annotate/rubric.py), checked before
        anything else happens: a missing required one is refused, nothing stored."""
        judged = self._check_criteria(criteria)
        strength = check_vote_inputs(choice, strength, rationale)
        if len(pair_id or "") > MAX_PAIR_ID_CHARS:
            raise BadRequest(f"pair_id is {len(pair_id):,} characters; no pair has an id that long")
        try:
            a = self.queue.begin_vote(user, pair_id)
        except StaleVote:
            a, problem = self._next(user)
            return self._view(
                user,
                a,
                ok=False,
                message=problem or "That pair was already answered (another tab?); here is your current one.",
            )
        decision_ms = int((self.queue.clock() - a.shown_at) * 1000)
        canonical = {"left": a.left, "right": a.right}.get(choice, choice)
        record = {
            **a.pair.record_fields(),
            "event_id": a.event_id,
            "kind": "vote",
            "left": a.left,
            "choice": canonical,
            # strength only qualifies a preference (the record refuses it on a tie)
            "strength": STRENGTHS.get(strength) if canonical in ("a", "b") else None,
            "rationale": (rationale or "").strip() or None,
            "annotator": user,
            "decision_ms": max(0, min(decision_ms, 2**31 - 1)),
            "criteria": self.rubric.to_record(judged, a.left) if judged else None,
        }
        try:
            stored = self.queue.record_vote(a, record, self.store)  # durable when it returns
        except VoteConflict:
            # Another server's annotators took the last slot (or this annotator voted on
            # the pair there): nothing was stored; the queue already moved on.
            nxt, problem = self._next(user)
            return self._view(
                user,
                nxt,
                ok=False,
                message=problem
                or "That pair was completed meanwhile; here is another one. Nothing was saved.",
            )
        except StoreWriteError as e:
            self.queue.cancel_vote(a)
            log.error("%s", e)
            return self._view(
                user, a, ok=False, message="Not saved: the store could not write your vote. Please try again."
            )
        except Exception:
            self.queue.cancel_vote(a)
            raise
        ack = {
            "event_id": stored["event_id"],
            "choice": choice,
            "decision_ms": record["decision_ms"],
            "left_model": a.pair.model(a.left),
            "right_model": a.pair.model(a.right),
        }
        gold = self.queue.gold  # --gold-feedback: a gold vote's acknowledgement says how it went
        feedback = gold.feedback_for(a.pair.pair_id, canonical, a.left) if gold is not None else None
        if feedback is not None:
            ack["gold"] = feedback
        if self.suggestions is not None:  # --suggest: the judge's choice, now that the vote is in
            suggestion = self.suggestions.ack(a.pair.pair_id, canonical, a.left)
            if suggestion is not None:
                ack["suggestion"] = suggestion
        nxt, problem = self._next(user)
        return self._view(user, nxt, ack=ack, message="Saved." + (f" {problem}" if problem else ""))

    def _check_criteria(self, criteria: dict[str, Any] | None) -> dict[str, Any]:
        from annotate.rubric import RubricInputError

        if self.rubric is None:
            if criteria:
                raise BadRequest("criteria: this server has no rubric (serve --rubric FILE)")
            return {}
        if criteria is not None and not isinstance(criteria, dict):
            raise BadRequest("criteria must be a JSON object of criterion -> judgment")
        try:
            return self.rubric.check(criteria)
        except RubricInputError as e:
            raise BadRequest(str(e)) from None

    def skip(self, user: str, pair_id: str) -> dict[str, Any]:
        skipped = self.queue.skip(user, pair_id)
        a, problem = self._next(user)
        return self._view(
            user,
            a,
            ok=skipped and not problem,
            message=problem
            or ("Skipped; it goes to someone else." if skipped else "That pair is no longer yours to skip."),
        )

    def undo(self, user: str) -> dict[str, Any]:
        record = self.queue.begin_undo(user)
        if record is None:
            a, problem = self._next(user)
            return self._view(user, a, ok=False, message=problem or "Nothing to undo.")
        if self._seen_gold_answer(record):
            self.queue.cancel_undo(user, record)
            return self._view(
                user,
                self.queue.current(user),
                ok=False,
                message="That vote was on a check item whose answer you were shown; it stays as it is.",
            )
        try:
            self.store.retract(record["event_id"], user, vote=record)
        except StoreWriteError as e:
            self.queue.cancel_undo(user, record)
            log.error("%s", e)
            return self._view(
                user,
                self.queue.current(user),
                ok=False,
                message="Not undone: the store could not write it. Please try again.",
            )
        except Exception:
            self.queue.cancel_undo(user, record)
            raise
        a = self.queue.finish_undo(user, record)
        view = self._view(user, a, message="Vote taken back; here is that pair again.")
        shown = {a.left: "left", a.right: "right"}.get(record["choice"], record["choice"])
        view["undone"] = {
            "event_id": record["event_id"],
            "choice": shown,
            "strength": {1: "slightly", 2: "clearly"}.get(record.get("strength")),
            "rationale": record.get("rationale") or "",
        }
        if record.get("criteria"):  # serve --rubric: the judgments come back too, as shown
            view["undone"]["criteria"] = _shown_criteria(record)
        return view

    def _seen_gold_answer(self, record: dict[str, Any]) -> bool:
        """A gold vote under --gold-feedback: its answer was shown, so an undo would let
        the annotator fix it. (Without feedback gold votes are undone like any other:
        refusing would tell them apart.)"""
        from trainer.selection import gold_of

        gold = self.queue.gold
        return gold is not None and gold.feedback and gold_of(record.get("gen_params")) is not None

    # ---- admins ----------------------------------------------------------------------

    def dashboard(self, user: str, include_flagged: bool = False) -> dict[str, Any]:
        """Every number of the dashboard (admins): {"summary", "queue", "tables",
        "excluded_flagged"}, tables as lists of records, all JSON-able (NaN is None). The
        numbers are people's; models' votes (judge:<name>) are counted in
        summary["judge_votes"] and compared with people's in tables["judges"]
        (annotate/judge_agreement.py). The
        votes of confirmed-flagged annotators are left out unless `include_flagged`
        (trainer/flags.py); "excluded_flagged" says what was done about them
        (FlagExclusion.to_dict, with its "note")."""
        from annotate import stats
        from annotate.judge_agreement import judge_agreement, with_interval
        from trainer.flags import read_counted_votes
        from trainer.judges import select_judges

        self._require_admin(user)
        every, exclusion = read_counted_votes(self.data, include_flagged=include_flagged)
        # People's numbers are people's: a model's votes (preflab judge) are measured
        # against them in their own table, never mixed into theirs.
        votes, _ = select_judges(every, "exclude")
        summary = stats.summary(votes)
        summary["judge_votes"] = every.num_rows - votes.num_rows
        for key in ("first_vote", "last_vote"):
            if summary[key] is not None:
                summary[key] = summary[key].isoformat(timespec="seconds")
        tables = {f"by_{by}": _clean(stats.votes_by(votes, by).to_dict(orient="records")) for by in stats.BY}
        tables["kappa"] = _clean(with_interval(stats.cohens_kappa(votes)).to_dict(orient="records"))
        tables["judges"] = _clean(judge_agreement(every))  # [] without judge votes
        tables["choices"] = outcomes_as_shown(votes)
        from annotate.rubric_agreement import criterion_agreement

        tables["criteria"] = criterion_agreement(votes, self.rubric)  # [] without rubric judgments
        flagged = {**exclusion.to_dict(), "note": exclusion.note(PAGE_SWITCH)}  # "" if nobody is
        return {
            "summary": _clean(summary),
            "queue": self.queue.overview(),
            "tables": tables,
            "excluded_flagged": flagged,
        }

    def export(
        self,
        user: str,
        folder: str | os.PathLike,
        format: str = "standard",
        margin: bool = False,
        ties: str = "exclude",
        aggregate: str = "none",
        filetype: str = "parquet",
        include_flagged: bool = False,
    ) -> tuple[list[str], str]:
        """Write the standing votes as a preference dataset (annotate/export.py) into
        `folder`, under a new name each time (admins). Returns (files, a one-line report).
        Confirmed-flagged annotators' votes are left out unless `include_flagged`."""
        from annotate.export import export_preferences
        from annotate.table_files import ties_path_for, write_table
        from trainer.flags import read_counted_votes

        self._require_admin(user)
        if filetype not in EXPORT_FILETYPES:
            raise BadRequest(f"filetype must be parquet or jsonl, got {filetype!r}")
        votes, exclusion = read_counted_votes(self.data, include_flagged=include_flagged)
        pairs, ties_table, report = export_preferences(
            votes, format=format, margin=margin, ties=ties, aggregate=aggregate
        )
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        out = Path(folder) / f"preferences-{format}-{stamp}-{os.urandom(3).hex()}.{filetype}"
        files = [str(write_table(pairs, out))]
        if ties_table is not None:
            files.append(str(write_table(ties_table, ties_path_for(out))))
        flagged = [exclusion.note(PAGE_SWITCH)] if exclusion.annotators else []
        return files, " · ".join(report.lines() + flagged)

    def chat_prompts(
        self, user: str, folder: str | os.PathLike, include_flagged: bool = False
    ) -> tuple[list[str], str]:
        """The prompts annotators wrote in chat mode as a prompt pool, `chat-prompts.jsonl`
        (annotate/chat_prompts.py), in a new folder under `folder` (admins). Returns
        (files, a one-line report). Confirmed-flagged annotators' votes are left out
        unless `include_flagged`, as in the export."""
        from annotate.chat_prompts import COLUMNS, FILE_NAME, write_chat_prompts
        from trainer.flags import read_counted_votes
        from trainer.store import store_exists

        self._require_admin(user)
        if not store_exists(self.data):
            raise BadRequest("no votes yet: the store is empty")
        votes, exclusion = read_counted_votes(self.data, COLUMNS, include_flagged=include_flagged)
        # A folder of its own: the file keeps its name, and two downloads never share one.
        out = Path(folder) / f"chat-prompts-{os.urandom(6).hex()}"
        out.mkdir(mode=0o700)
        n = write_chat_prompts(votes, out / FILE_NAME)
        flagged = [exclusion.note(PAGE_SWITCH)] if exclusion.annotators else []
        line = f"{n} prompt{'s' if n != 1 else ''} written by annotators in chat mode"
        return [str(out / FILE_NAME)], " · ".join([line, *flagged])


def _shown_criteria(record: dict[str, Any]) -> dict[str, Any]:
    from annotate.rubric import Rubric

    return Rubric.to_shown(record.get("criteria"), record["left"])


def outcomes_as_shown(votes) -> list[dict[str, Any]]:
    """Share of each outcome as the annotators saw it: the left answer, the right
    answer, tie, both bad, as records {"choice", "share", "votes"} (share None without
    votes). Canonical a/b say nothing about the screen."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = votes.num_rows
    decisive = pc.is_in(votes["choice"], value_set=pa.array(["a", "b"], pa.string()))
    left = pc.sum(pc.and_(decisive, pc.equal(votes["choice"], votes["left"]))).as_py() or 0
    right = (pc.sum(decisive).as_py() or 0) - left
    tie = pc.sum(pc.equal(votes["choice"], "tie")).as_py() or 0
    both_bad = pc.sum(pc.equal(votes["choice"], "both_bad")).as_py() or 0
    names = ("A better", "B better", "Tie", "Both bad")  # A: shown left, or on top on a phone
    return [
        {"choice": name, "share": count / n if n else None, "votes": count}
        for name, count in zip(names, (left, right, tie, both_bad))
    ]


def _clean(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python, recursively: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
