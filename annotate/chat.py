"""Chat mode of `preflab serve --chat`, without gradio: an annotator writes a message (or
takes one from the prompt pool), two anonymous models answer side by side as they
stream, follow-up turns go to both, and a vote at any completed turn stores both whole
conversations (record schema version 3, trainer/store/record.py).

    chat = ChatService(store, {"m1": model1, "m2": model2}, prompts=[...], prompt_filter=PromptFilter(),
                       sampling={"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128})
    for view in chat.send("ann", "", "Hello"):     # "" starts a new conversation
        ...                                        # views while both sides stream; the last has both done
    chat.send("ann", view["conversation_id"], "And then?")   # a follow-up, to both
    chat.regenerate("ann", cid); chat.stop("ann", cid); chat.new("ann")
    chat.vote("ann", cid, "left", "clearly", "why")          # view with "ack": names only now
    chat.take_back("ann", cid)                               # a mis-click: the vote is retracted

Models are annotate/chat_models.py's (in-process or endpoint), by display name. Each side
keeps its own history: the user's turns are the same, each side's earlier answers are its
own. Each answer streams in its own thread; the generator a caller iterates yields a view
whenever either side wrote more (at most every COALESCE_S). A view is JSON-able, the
same for the page (annotate/web/chat_tab.py) and the JSON API (annotate/web/chat_api.py),
and never names a model before that conversation's vote. Errors the caller can fix raise
annotate.service.BadRequest; a model that fails shows `error` on its side, and that turn
cannot be voted on (regenerate, or a new conversation). A user has one live
conversation; conversations left idle for `idle_s` are dropped, so memory stays bounded
by the number of active annotators times `max_turns`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from typing import Any

from annotate.chat_filter import DEFAULT_IDLE_S, DEFAULT_MAX_TURNS, PromptFilter
from annotate.chat_models import ChatModelError, StopSignal
from annotate.chat_state import SIDES, Conversation, Side, empty_view, vote_record
from annotate.service import BadRequest, check_vote_inputs
from trainer.errors import PreflabError
from trainer.rows import storable_text
from trainer.store.errors import StoreWriteError

log = logging.getLogger("preflab.chat")

COALESCE_S = 0.05  # a streaming view at most this often: a page cannot show more, a server would pay for it
STOP_WAIT_S = 5.0  # how long stop() waits for both sides to end before it answers
MAX_ID_CHARS = 64  # a conversation id is 32 hex digits


class ChatError(PreflabError):
    """The chat cannot be set up as asked (fewer than two models, a bad setting)."""


class ChatService:
    def __init__(
        self,
        store,
        models: dict[str, Any],
        *,
        prompts: list[str] = (),
        prompt_filter: PromptFilter | None = None,
        sampling: dict[str, Any],
        max_turns: int = DEFAULT_MAX_TURNS,
        idle_s: float = DEFAULT_IDLE_S,
        clock=time.monotonic,
        rng: random.Random | None = None,
    ):
        if len(models) < 2:
            raise ChatError(
                f"chat mode needs two or more models, got {len(models)}: give --model twice or more"
            )
        if max_turns < 1:
            raise ChatError(f"--chat-max-turns must be at least 1, got {max_turns}")
        if not idle_s > 0:
            raise ChatError(f"--chat-idle must be a positive number of minutes, got {idle_s / 60:g}")
        self.store = store
        self.models = dict(models)
        self.prompts = list(prompts)
        self._pool = set(self.prompts)
        self.filter = prompt_filter or PromptFilter()
        self.sampling = dict(sampling)
        self.max_turns = max_turns
        self.idle_s = idle_s
        self.clock = clock
        self.rng = rng or random.Random()
        self._lock = threading.Lock()  # guards _conversations (each conversation has its own lock)
        self._conversations: dict[str, Conversation] = {}  # user -> their one live conversation

    # ---- conversations ---------------------------------------------------------------

    def random_prompt(self, user: str) -> str:
        if not self.prompts:
            raise BadRequest("this server has no prompt pool to draw from (serve --prompts FILE)")
        return self.rng.choice(self.prompts)

    def send(self, user: str, conversation_id: str, message: str, from_pool: bool = False):
        """Send `message` to both models: a new conversation if conversation_id is "",
        else a follow-up. Checked now (BadRequest, nothing generated); returns the
        generator of views."""
        if not isinstance(message, str):
            raise BadRequest("message must be text")
        if problem := self.filter.problem(message):
            raise BadRequest(problem)
        text = message.strip()
        if not conversation_id:
            conv = self._new_conversation(user, text, from_pool)
        else:
            conv = self._own(user, conversation_id)
        with conv.cond:
            if conversation_id:
                self._check_open(conv)
                if conv.turns >= self.max_turns:
                    raise BadRequest(
                        f"this conversation has reached its {self.max_turns} turns: vote, or start a new one"
                    )
                if any(s.error for s in conv.sides.values()):
                    raise BadRequest(
                        "a model failed on the last turn, so the conversation cannot go on: "
                        "regenerate, or start a new conversation"
                    )
                for side in conv.sides.values():
                    side.history.append({"role": "assistant", "content": side.answer})
                    side.answer = ""
            for side in conv.sides.values():
                side.history.append({"role": "user", "content": text})
            conv.turns += 1
            run = self._begin_turn(conv)
        return self._updates(conv, run)

    def regenerate(self, user: str, conversation_id: str):
        """The last turn again, for both sides (a fresh seed each); the generator of views."""
        conv = self._own(user, conversation_id)
        with conv.cond:
            self._check_open(conv)
            if conv.turns == 0:
                raise BadRequest("nothing to regenerate yet: send a message first")
            for side in conv.sides.values():
                side.answer = ""
            run = self._begin_turn(conv)
        return self._updates(conv, run)

    def stop(self, user: str, conversation_id: str) -> dict[str, Any]:
        """Both sides stop at their next token; what they wrote is the (cut) answer."""
        conv = self._own(user, conversation_id)
        with conv.cond:
            if conv.state == "streaming":
                for side in conv.sides.values():
                    side.stop.set()
                conv.cond.wait_for(lambda: conv.state != "streaming", timeout=STOP_WAIT_S)
            return self._view(conv)

    def new(self, user: str) -> dict[str, Any]:
        """Forget the user's conversation (its answers stop); an empty view."""
        with self._lock:
            conv = self._conversations.pop(user, None)
        if conv is not None:
            self._end(conv)
        return empty_view("Write a message to start a new conversation.")

    def vote(
        self, user: str, conversation_id: str, choice: str, strength: str = "", rationale: str = ""
    ) -> dict[str, Any]:
        """Vote on the last turn's answers as shown: choice left | right | tie | both_bad.
        Durable in the store before this returns the view with `ack`; the conversation is
        then closed."""
        strength = check_vote_inputs(choice, strength, rationale)
        conv = self._own(user, conversation_id)
        with conv.cond:
            if conv.state == "voted":
                raise BadRequest("this conversation was already voted on: start a new one")
            self._check_open(conv)
            if conv.turns == 0:
                raise BadRequest("nothing to vote on yet: send a message first")
            if any(s.error for s in conv.sides.values()):
                raise BadRequest(
                    "a model failed on this turn, so it cannot be voted on: regenerate, or start a new conversation"
                )
            conv.state = "voting"  # a second vote meanwhile is refused, the sides are frozen
            record = vote_record(conv, choice, strength, rationale, sampling=self.sampling, now=self.clock())
        try:
            stored = self.store.append(record)  # durable when it returns
        except StoreWriteError as e:
            log.error("%s", e)
            with conv.cond:
                conv.state = "ready"
                view = self._view(conv, "Not saved: the store could not write your vote. Please try again.")
            view["ok"] = False
            return view
        except BaseException:
            with conv.cond:
                conv.state = "ready"
            raise
        with conv.cond:
            conv.state = "voted"
            conv.stored_vote = stored
            conv.version += 1
            conv.ack = {
                "event_id": stored["event_id"],
                "choice": choice,
                "left_model": conv.sides["left"].name,
                "right_model": conv.sides["right"].name,
            }
            conv.last_active = self.clock()
            return self._view(conv)

    def take_back(self, user: str, conversation_id: str) -> dict[str, Any]:
        """Take back the vote on the user's conversation (a mis-click): a retract event,
        durable before this returns, after which the vote counts nowhere (export,
        training, leaderboard). The conversation stays closed: both models' names were
        shown, so a second vote on it would not be blind."""
        conv = self._own(user, conversation_id)
        with conv.cond:
            if conv.state != "voted" or conv.stored_vote is None:
                raise BadRequest("this conversation has no vote to take back")
            if conv.take_back:
                raise BadRequest("that vote was already taken back: start a new conversation")
            conv.take_back = "saving"  # a second take-back meanwhile is refused
            vote = conv.stored_vote
        try:
            # A retry after "not taken back" may write a second retract if the first
            # landed after all: harmless, a vote is retracted by any retract naming it.
            self.store.retract(vote["event_id"], user, vote=vote)
        except BaseException as e:
            with conv.cond:
                conv.take_back = ""
            if not isinstance(e, StoreWriteError):
                raise
            log.error("%s", e)
            with conv.cond:
                view = self._view(conv, "Not taken back: the store could not write it. Please try again.")
            view["ok"] = False
            return view
        with conv.cond:
            conv.take_back = "done"
            conv.version += 1
            return self._view(conv)

    # ---- inside ----------------------------------------------------------------------

    def _new_conversation(self, user: str, text: str, from_pool: bool) -> Conversation:
        left, right = self.rng.sample(sorted(self.models), 2)
        now = self.clock()
        opening = [{"role": "user", "content": text}]
        conv = Conversation(
            id=uuid.uuid4().hex,
            user=user,
            sides={
                "left": Side(left, self.models[left], []),
                "right": Side(right, self.models[right], []),
            },
            opening=opening,
            # "pool" only for a pool prompt sent as it is: an edited one is the annotator's
            prompt_source="pool" if from_pool and text in self._pool else "annotator",
            last_active=now,
        )
        with self._lock:
            self._sweep(now)
            old = self._conversations.get(user)
            self._conversations[user] = conv  # one live conversation per user
        if old is not None:
            self._end(old)
        return conv

    def _own(self, user: str, conversation_id: str) -> Conversation:
        if not isinstance(conversation_id, str) or len(conversation_id) > MAX_ID_CHARS:
            raise BadRequest("conversation_id must be the id of your conversation, or empty for a new one")
        now = self.clock()
        with self._lock:
            self._sweep(now)
            conv = self._conversations.get(user)
            if conv is None or conv.id != conversation_id:
                raise BadRequest(
                    "that conversation is no longer open (replaced by a newer one, or idle too long): "
                    "start a new one"
                )
            conv.last_active = now
            return conv

    def _sweep(self, now: float) -> None:
        """Drop the conversations idle for idle_s (under self._lock): a streaming one is not idle."""
        for user, conv in list(self._conversations.items()):
            if conv.state != "streaming" and now - conv.last_active > self.idle_s:
                del self._conversations[user]

    @staticmethod
    def _end(conv: Conversation) -> None:
        for side in conv.sides.values():
            side.stop.set()

    @staticmethod
    def _check_open(conv: Conversation) -> None:
        if conv.state == "voted":
            raise BadRequest("this conversation was voted on: start a new one")
        if conv.state == "streaming":
            raise BadRequest("both answers are still coming: wait for them, or Stop them first")
        if conv.state == "voting":
            raise BadRequest("a vote on this conversation is being saved right now")

    def _begin_turn(self, conv: Conversation) -> int:
        """Start both sides answering (under conv.cond). Returns the run number."""
        conv.state = "streaming"
        conv.run += 1
        conv.version += 1
        conv.ack = None
        conv.vote_event_id = str(uuid.uuid4())  # new answers: a new vote
        for side in conv.sides.values():
            side.streaming, side.error, side.cut = True, None, False
            side.ttft_ms = side.tokens_per_s = None
            side.seed = self.rng.randrange(2**31)  # regenerate samples anew
            side.stop = StopSignal()
        for key in SIDES:
            threading.Thread(
                target=self._answer, args=(conv, conv.run, key), daemon=True, name=f"chat-{key}"
            ).start()
        return conv.run

    def _answer(self, conv: Conversation, run: int, key: str) -> None:
        """One side's answer (its own thread): stream into the side, then mark it done."""
        side = conv.sides[key]
        with conv.cond:
            messages = [dict(m) for m in side.history]
            stop, seed = side.stop, side.seed
        started = self.clock()
        first: float | None = None

        def on_piece(piece: str) -> None:
            nonlocal first
            with conv.cond:
                if conv.run != run:
                    return
                if first is None:
                    first = self.clock()
                    side.ttft_ms = int((first - started) * 1000)
                side.answer += storable_text(piece)  # a NUL would make the turn unstorable
                conv.version += 1
                conv.cond.notify_all()

        outcome, error = None, None
        try:
            outcome = side.model.generate(
                messages, sampling=self.sampling, seed=seed, stop=stop, on_piece=on_piece
            )
        except ChatModelError as e:
            log.warning("chat %s, %s: %s", conv.id, side.name, e)
            error = e.shown
        except Exception:
            log.exception("chat %s, %s: the answer failed", conv.id, side.name)
            error = "this model failed while answering (see the server log): regenerate or start a new conversation"
        end = self.clock()
        with conv.cond:
            if conv.run != run:
                return
            side.streaming, side.error = False, error
            side.answer = side.answer.strip()
            if outcome is not None:
                side.cut = outcome.cut
                if outcome.tokens and outcome.tokens > 1 and first is not None and end > first:
                    # the decoding rate: the tokens after the first over the time they took
                    side.tokens_per_s = round((outcome.tokens - 1) / (end - first), 1)
            if not any(s.streaming for s in conv.sides.values()):
                conv.state = "ready"
                conv.done_at = end
            conv.version += 1
            conv.cond.notify_all()

    def _updates(self, conv: Conversation, run: int):
        """Views while the sides stream, at most every COALESCE_S; the last with both done.
        A caller that goes away (the generator closed) stops the answers."""
        seen, last = -1, float("-inf")
        finished = False
        try:
            while not finished:
                with conv.cond:

                    def moved(seen: int = seen) -> bool:
                        return conv.version != seen or conv.run != run or conv.state != "streaming"

                    conv.cond.wait_for(moved, timeout=5.0)
                    wait = COALESCE_S - (time.monotonic() - last)
                    if wait > 0 and conv.run == run and conv.state == "streaming":
                        conv.cond.wait_for(lambda: conv.run != run or conv.state != "streaming", timeout=wait)
                    seen = conv.version
                    finished = conv.run != run or conv.state != "streaming"
                    view = self._view(conv)
                last = time.monotonic()
                yield view
        finally:
            if not finished:
                with conv.cond:
                    if conv.run == run and conv.state == "streaming":
                        self._end(conv)

    def _view(self, conv: Conversation, message: str | None = None) -> dict[str, Any]:
        """The conversation as the page shows it (under conv.cond)."""
        errored = any(s.error for s in conv.sides.values())
        done = conv.state not in ("streaming",)
        can_vote = conv.state == "ready" and conv.turns > 0 and not errored
        if message is None:
            if conv.take_back == "done":
                message = "Vote taken back: it no longer counts. Your next message starts a new conversation."
            elif conv.state == "voted":
                message = "Saved. Your next message starts a new conversation."
            elif conv.state == "streaming":
                message = "Both models are answering..."
            elif errored:
                message = "A model failed on this turn: regenerate, or start a new conversation."
            elif conv.turns >= self.max_turns:
                message = f"That was the last of {self.max_turns} turns: vote for the better answer."
            else:
                message = f"Vote for the better answer, or send a follow-up (turn {conv.turns} of {self.max_turns})."
        return {
            "conversation_id": conv.id,
            "turn": conv.turns if done else conv.turns - 1,
            "left": conv.sides["left"].view(),
            "right": conv.sides["right"].view(),
            "can_vote": can_vote,
            "voted": conv.state == "voted",
            "ack": conv.ack,
            "taken_back": conv.take_back == "done",
            "message": message,
            "ok": True,
        }
