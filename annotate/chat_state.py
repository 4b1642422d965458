"""What one chat conversation of `serve --chat` is (annotate/chat.py runs them): its two
sides, each with its own history and the answer streaming into it, and the vote record
its last turn makes (record schema version 3, trainer/store/record.py). Plain data: the
service holds a conversation's `cond` while it reads or changes one.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from annotate.chat_models import StopSignal
from annotate.service import STRENGTHS
from trainer.store import messages_to_json, prompt_id_for

SIDES = ("left", "right")
CHAT_SCHEMA_VERSION = 3  # the record version that carries conversation_a / conversation_b


@dataclass
class Side:
    name: str  # the model's display name: in the record and the ack, never in a view before
    model: Any  # annotate.chat_models.InProcessChat | EndpointChat
    history: list[dict[str, str]]  # what this side was asked: up to the current user message
    answer: str = ""  # the current turn's answer, as far as it is written
    streaming: bool = False
    error: str | None = None  # shown on the page: names no model
    cut: bool = False
    ttft_ms: int | None = None
    tokens_per_s: float | None = None
    seed: int = 0
    stop: StopSignal = field(default_factory=StopSignal)

    def view(self) -> dict[str, Any]:
        messages = [dict(m) for m in self.history]
        if self.answer or self.streaming:
            messages.append({"role": "assistant", "content": self.answer})
        return {
            "messages": messages,
            "streaming": self.streaming,
            "ttft_ms": self.ttft_ms,
            "tokens_per_s": self.tokens_per_s,
            "error": self.error,
            "cut": self.cut,
        }

    def conversation(self) -> list[dict[str, str]]:
        return [*self.history, {"role": "assistant", "content": self.answer}]


@dataclass
class Conversation:
    id: str
    user: str
    sides: dict[str, Side]
    opening: list[dict[str, str]]  # the record's prompt: the first user message
    prompt_source: str  # "annotator" | "pool"
    last_active: float
    turns: int = 0  # user messages sent, the one being answered included
    state: str = "ready"  # streaming | ready | voting | voted
    run: int = 0  # which answering this is: a stale generator stops on a newer one
    version: int = 0  # bumped on every change the views show
    done_at: float = 0.0  # when both answers of the last turn were done: decision time starts
    ack: dict[str, Any] | None = None
    # The last turn's vote event id, kept for a retry after "not saved": the write may have
    # landed (a lost COMMIT reply), and the same id then finds it instead of storing it twice.
    vote_event_id: str = ""
    stored_vote: dict[str, Any] | None = None  # the vote as stored: what a take-back retracts
    take_back: str = ""  # "" | "saving" | "done": the vote taken back (the conversation stays closed)
    cond: threading.Condition = field(default_factory=threading.Condition)


def vote_record(
    conv: Conversation, choice: str, strength: str, rationale: str, *, sampling: dict[str, Any], now: float
) -> dict[str, Any]:
    """The version-3 vote event of this conversation's last turn (under conv.cond): both
    whole conversations, canonical a/b, each side's sampling and speed in gen_params."""
    # canonical order: a is the model whose display name sorts first
    a_key = min(SIDES, key=lambda k: conv.sides[k].name)
    b_key = "right" if a_key == "left" else "left"
    letter = {a_key: "a", b_key: "b"}
    a, b = conv.sides[a_key], conv.sides[b_key]
    canonical = letter.get(choice, choice)
    decision_ms = int((now - conv.done_at) * 1000)

    def side_params(side: Side) -> dict[str, Any]:
        params = side.model.params(sampling, side.seed)
        return {**params, "ttft_ms": side.ttft_ms, "tokens_per_s": side.tokens_per_s, "cut": side.cut}

    gen_params = {
        "a": side_params(a),
        "b": side_params(b),
        "chat": {"turn": conv.turns, "prompt_source": conv.prompt_source},
    }
    return {
        "schema_version": CHAT_SCHEMA_VERSION,
        "event_id": conv.vote_event_id,
        "kind": "vote",
        "pair_id": f"chat-{conv.id}-t{conv.turns}",
        "prompt_id": prompt_id_for(conv.opening),
        "prompt": messages_to_json(conv.opening),
        "response_a": a.answer,
        "response_b": b.answer,
        "model_a": a.name,
        "model_b": b.name,
        "left": letter["left"],
        "choice": canonical,
        "strength": STRENGTHS.get(strength) if canonical in ("a", "b") else None,
        "rationale": (rationale or "").strip() or None,
        "annotator": conv.user,
        "decision_ms": max(0, min(decision_ms, 2**31 - 1)),
        "gen_params": json.dumps(gen_params),
        "conversation_a": messages_to_json(a.conversation()),
        "conversation_b": messages_to_json(b.conversation()),
    }


def empty_view(message: str = "") -> dict[str, Any]:
    """The view of no conversation (before the first message, after `new`)."""
    side = {
        "messages": [],
        "streaming": False,
        "ttft_ms": None,
        "tokens_per_s": None,
        "error": None,
        "cut": False,
    }
    return {
        "conversation_id": "",
        "turn": 0,
        "left": dict(side),
        "right": dict(side),
        "can_vote": False,
        "voted": False,
        "ack": None,
        "taken_back": False,
        "message": message,
        "ok": True,
    }
