"""The two kinds of model a chat (annotate/chat.py) talks to, behind one call:

    model = InProcessChat(engine)              # annotate.model_engine.Engine, loaded by serve
    model = EndpointChat(endpoint_model)       # trainer.endpoint_client.EndpointModel
    outcome = model.generate(messages, sampling=..., seed=7, stop=StopSignal(), on_piece=print)
    outcome.cut, outcome.tokens                # stopped (token limit or Stop); tokens written
    model.params(sampling, seed)               # that side's gen_params (endpoint_client.side_params)

`generate` blocks until the answer is done, calling `on_piece(text)` as text comes;
setting `stop` ends it at the next token (what is written so far is the answer, cut).
A failure raises `ChatModelError`, whose `shown` text names no model: the chat's two
models stay anonymous until the vote, failures included; the full message goes to the log.
Nothing here knows about conversations or the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

BUSY_WAIT_S = 120.0  # how long an answer waits for a free generation slot of an in-process model


class ChatModelError(Exception):
    """One answer failed. str(): for the log (may name the model); `shown`: for the page."""

    def __init__(self, message: str, shown: str):
        super().__init__(message)
        self.shown = shown


@dataclass(frozen=True)
class Outcome:
    cut: bool  # the answer did not end on its own: the token limit or Stop ended it
    tokens: int | None  # tokens written, where known


class StopSignal:
    """A threading.Event (`is_set`, `set`, as EndpointModel checks it) that also runs the
    callbacks registered with `on_set` once it is set: an in-process job is cancelled at
    once, not when its next piece happens to arrive."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


class InProcessChat:
    """A model loaded in this process, answering through its Engine's jobs (only the
    Engine's public calls: prompt_ids, start, Job.pieces / cancel / finish_reason)."""

    def __init__(self, engine, *, busy_wait_s: float = BUSY_WAIT_S):
        self.engine = engine
        self.busy_wait_s = busy_wait_s

    def params(self, sampling: dict, seed: int) -> dict:
        from trainer.endpoint_client import side_params

        return side_params(self.engine, sampling, seed)

    def _start(self, ids: list[int], max_tokens: int, sampling: dict, seed: int, stop: StopSignal):
        from annotate.model_engine import Busy

        deadline = time.monotonic() + self.busy_wait_s
        while True:
            try:
                return self.engine.start(
                    ids,
                    max_tokens=max_tokens,
                    temperature=sampling["temperature"],
                    top_p=sampling["top_p"],
                    seed=seed,
                    stop=[],
                )
            except Busy:
                # every slot is answering someone else: wait for one (the annotator sees
                # the answer "streaming" with nothing yet), unless stopped or too long
                if stop.is_set():
                    return None
                if time.monotonic() > deadline:
                    raise ChatModelError(
                        f"in-process model: no generation slot came free within {self.busy_wait_s:g}s",
                        "this model is busy with other annotators' answers: regenerate in a moment",
                    ) from None
                time.sleep(0.05)

    def generate(self, messages, *, sampling: dict, seed: int, stop: StopSignal, on_piece) -> Outcome:
        ids = self.engine.prompt_ids(messages)
        max_tokens = sampling["max_new_tokens"]
        context = getattr(self.engine, "context", None)
        if context:
            if len(ids) >= context:
                raise ChatModelError(
                    f"in-process model: the conversation is {len(ids)} tokens, the model's context {context}",
                    "the conversation is longer than this model can read: start a new one",
                )
            max_tokens = min(max_tokens, context - len(ids))
        job = self._start(ids, max_tokens, sampling, seed, stop)
        if job is None:  # stopped while waiting for a slot: no answer at all
            return Outcome(cut=True, tokens=0)
        stop.on_set(job.cancel)
        try:
            for piece in job.pieces():
                on_piece(piece)
        except Exception as e:
            raise ChatModelError(
                f"in-process model: generation failed: {type(e).__name__}: {e}",
                "this model failed while answering: regenerate or start a new conversation",
            ) from e
        finally:
            job.cancel()  # a no-op once done; ends generation if the reader stopped early
        cut = stop.is_set() or job.finish_reason == "length"
        return Outcome(cut=cut, tokens=job.completion_tokens or None)


class EndpointChat:
    """A model behind an OpenAI-compatible server (trainer/endpoint_client.py: its
    retries, timeouts and per-model concurrency limit apply)."""

    def __init__(self, model):
        self.model = model

    def params(self, sampling: dict, seed: int) -> dict:
        from trainer.endpoint_client import side_params

        return side_params(self.model, sampling, seed)

    def generate(self, messages, *, sampling: dict, seed: int, stop: StopSignal, on_piece) -> Outcome:
        from trainer.endpoint_client import Cancelled, EndpointFailure

        tokens, finish = 0, None
        try:
            for piece, reason in self.model.chunks(
                messages,
                max_new_tokens=sampling["max_new_tokens"],
                temperature=sampling["temperature"],
                top_p=sampling["top_p"],
                seed=seed,
                stop=stop,
            ):
                if piece:
                    tokens += 1  # a stream's chunk is a token on vLLM, TGI, llama.cpp and serve-model
                    on_piece(piece)
                finish = reason or finish
        except Cancelled:
            return Outcome(cut=True, tokens=tokens)
        except EndpointFailure as e:
            why = f"HTTP {e.status}" if e.status else "no answer, or the connection was lost"
            raise ChatModelError(
                str(e), f"this model's server failed ({why}): regenerate or start a new conversation"
            ) from None
        return Outcome(cut=finish == "length", tokens=tokens)
