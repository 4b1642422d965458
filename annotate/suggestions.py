"""`serve --suggest judge:<name>`: a model judge's choice as a pre-label, shown to an
annotator only after they voted (never before: it would anchor them), and the votes
where people and the judge disagree, for the Review tab.

    suggestions = JudgeSuggestions("comparisons", "judge:llama")   # annotate/serve.py
    suggestions.ack(pair_id, canonical_choice, left)   # {"judge", "choice", "agrees"} or None
    suggestions.disagreements(include_flagged=False)   # people's votes the judge voted otherwise on

The judge's votes are `preflab judge`'s, read from the store: its latest standing vote per
pair. They are read at start and again, at most once a minute, when a vote finds no
judge's vote for its pair (the judge may be running beside the server). The view an
annotator votes on never carries a suggestion; only the acknowledgement of their vote.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from trainer.errors import PreflabError
from trainer.judges import JUDGE_PREFIX, is_judge

RELOAD_S = 60.0
SHOWN = {"tie": "tie", "both_bad": "both_bad"}


class SuggestError(PreflabError):
    """--suggest names no judge; the message says what it takes."""


def check_judge(name: str) -> str:
    if not is_judge(name) or len(name) == len(JUDGE_PREFIX):
        raise SuggestError(
            f"--suggest takes a judge's annotator name, {JUDGE_PREFIX}<name>, got {name[:80]!r}"
        )
    return name


def shown(choice: str, left: str) -> str:
    """A canonical choice (a / b / tie / both_bad) as an annotator saw it (left / right)."""
    if choice in ("a", "b"):
        return "left" if choice == left else "right"
    return choice


class JudgeSuggestions:
    def __init__(self, data: str, judge: str, clock=time.monotonic):
        self.data = str(data)
        self.judge = check_judge(judge)
        self.clock = clock
        self._lock = threading.Lock()
        self._choices: dict[str, str] = {}
        self._read_at = -RELOAD_S
        self.reload()

    def reload(self) -> int:
        """Read the judge's standing votes from the store; how many pairs it has voted on."""
        import pyarrow.compute as pc

        from trainer.store import read_comparisons, store_exists

        choices: dict[str, str] = {}
        if store_exists(self.data):
            votes = read_comparisons(self.data, columns=["pair_id", "annotator", "choice", "created_at"])
            mine = votes.filter(pc.equal(votes["annotator"], self.judge)).sort_by("created_at")
            choices = dict(zip(mine["pair_id"].to_pylist(), mine["choice"].to_pylist()))  # latest wins
        with self._lock:
            self._choices, self._read_at = choices, self.clock()
        return len(choices)

    def choice(self, pair_id: str) -> str | None:
        """The judge's canonical choice on the pair, or None when it has not voted on it."""
        with self._lock:
            found = self._choices.get(pair_id)
            stale = self.clock() - self._read_at >= RELOAD_S
        if found is None and stale:
            self.reload()
            with self._lock:
                found = self._choices.get(pair_id)
        return found

    def ack(self, pair_id: str, canonical: str, left: str) -> dict[str, Any] | None:
        """What the acknowledgement of a vote says about the judge: its choice as the
        annotator saw the pair, and whether they agree; None when it did not vote on it."""
        theirs = self.choice(pair_id)
        if theirs is None:
            return None
        return {"judge": self.judge, "choice": shown(theirs, left), "agrees": theirs == canonical}

    def disagreements(self, include_flagged: bool = False, limit: int = 200) -> list[dict[str, Any]]:
        """People's standing votes on pairs the judge voted on, where their choice is not
        the judge's, newest first (at most `limit`): {"pair_id", "annotator", "choice",
        "judge_choice" (both as that annotator saw the pair), "prompt" (its last message),
        "created_at", and the pair's fields to send it back for one more vote}."""
        from trainer.flags import read_counted_votes
        from trainer.judges import select_judges

        every, _ = read_counted_votes(self.data, include_flagged=include_flagged)
        judge_choice = {}
        for r in (
            every.select(["pair_id", "annotator", "choice", "created_at"]).sort_by("created_at").to_pylist()
        ):
            if r["annotator"] == self.judge:
                judge_choice[r["pair_id"]] = r["choice"]
        people, _ = select_judges(every, "exclude")
        rows = []
        for r in people.sort_by([("created_at", "descending")]).to_pylist():
            theirs = judge_choice.get(r["pair_id"])
            if theirs is None or theirs == r["choice"]:
                continue
            messages = json.loads(r["prompt"])
            rows.append(
                {
                    **r,
                    "choice": shown(r["choice"], r["left"]),
                    "judge_choice": shown(theirs, r["left"]),
                    "prompt_text": messages[-1]["content"] if messages else "",
                    "created_at": r["created_at"].isoformat(timespec="seconds"),
                }
            )
            if len(rows) >= limit:
                break
        return rows
