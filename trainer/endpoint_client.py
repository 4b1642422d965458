"""Answers from a model behind an endpoint (trainer/endpoints.py reads the file), through
the official `openai` client; and `answers_of`, the one call that samples answers from
either kind of model, in-process or endpoint, for `generate`, `serve` and `eval-policy`.

    model = EndpointModel(endpoint)            # endpoint: trainer.endpoints.Endpoint
    for piece in model.stream(messages, max_new_tokens=64, temperature=0.7, top_p=1, seed=0):
        ...                                    # text as the server sends it
    model.chunks(messages, ...)                # (piece, None)..., then ("", finish_reason)
    model.answer(messages, ...)                # Answer(text, cut), or EndpointFailure raised
    answers_of(source, conversations, ...)     # [Answer | EndpointFailure], source either kind
    side_params(source, sampling, seed)        # what gen_params records for that side
    model.close()                              # or close_all(connect(endpoints)) when done

Every request streams: the timeout is then the longest wait for the next byte, so a long
answer from a working server is never cut short while a server that stalls or vanishes is
noticed within `timeout` seconds. Retries are the openai client's own (`max_retries`): it
already retries what is worth retrying (connection errors, timeouts, 408, 409, 429, 5xx)
with exponential backoff and jitter from 0.5 s up to 8 s, and honours Retry-After (which
`preflab serve-model` sends with its 503), so a second layer here would only multiply the
waits. A stream that breaks after it began is not retried: that answer is given up.

At most `concurrency` requests go to one model at once (a semaphore per model, shared by
everything in the process that asks it), so a server sized for N sequences is never sent
N + 1. A request that fails comes back as an `EndpointFailure` whose message names the
endpoint, the model and the URL, never the key; the caller drops that answer's pair.

A judge (a model that votes) would call `answer` with its judging prompt: nothing here
knows what the answers are for.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from trainer.endpoints import EXTRA, Endpoint
from trainer.errors import PreflabError, requires

log = logging.getLogger("preflab.endpoints")

COOL_DOWN_S = 30.0  # after a failure, a model is passed over where another can answer


class EndpointFailure(PreflabError):
    """One request to an endpoint failed (status, timeout, connection); the message says how.
    `status`: the HTTP status the server answered with, where it did."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Cancelled(EndpointFailure):
    """The caller's `stop` was set before the answer was done: no answer, and no failure
    of the model's (it is not passed over for it)."""


def _transport_error(e: BaseException) -> bool:
    """An error of the HTTP layer under the client (httpx or its fork), raised as-is when
    a stream breaks in some versions; anything else is a bug and is not caught."""
    top = type(e).__module__.split(".")[0]
    return top in ("httpx", "httpx2", "httpcore", "httpcore2") or isinstance(e, OSError)


def _openai():
    """The openai package (the `endpoints` extra), imported where it is used: a store or
    an in-process model never needs it. load_endpoints has said so already when it is
    missing; this says it too for a caller that builds an EndpointModel itself."""
    return requires("openai", EXTRA, "--endpoints")


class EndpointModel:
    def __init__(self, endpoint: Endpoint):
        openai = _openai()

        self.endpoint = endpoint
        self.name = endpoint.name
        self.client = openai.OpenAI(
            base_url=endpoint.api_base,
            api_key=endpoint.api_key,
            timeout=endpoint.timeout,
            max_retries=endpoint.max_retries,
        )
        # The client reads OPENAI_ORG_ID and OPENAI_PROJECT_ID for these when they are None
        # and sends them as headers; they are only the file's to give (nothing from the
        # environment goes to a server its entry did not name), and None now omits them.
        self.client.organization = None
        self.client.project = None
        self.slots = threading.BoundedSemaphore(endpoint.concurrency)
        self.failed_at: float | None = None  # monotonic time of the last failure

    def close(self) -> None:
        """Close the client's connections (it sends nothing more)."""
        self.client.close()

    def __repr__(self) -> str:  # the client's repr is not ours to trust with the key
        return f"EndpointModel({self.name!r}, {self.endpoint.model_name!r} at {self.endpoint.api_base})"

    @property
    def cooling_down(self) -> bool:
        return self.failed_at is not None and time.monotonic() - self.failed_at < COOL_DOWN_S

    def _failure(self, e: BaseException) -> EndpointFailure:
        openai = _openai()

        ep = self.endpoint

        def said(text: str) -> str:  # a server could echo the key: out first, then cut
            if ep.api_key and len(ep.api_key) >= 4:
                text = text.replace(ep.api_key, "[key]")
            return text[:300]

        if isinstance(e, EndpointFailure):
            how = str(e)
        elif isinstance(e, openai.APITimeoutError) or "Timeout" in type(e).__name__:
            how = f"timed out (nothing from the server for {ep.timeout:g} s)"
        elif isinstance(e, openai.APIStatusError):
            how = f"HTTP {e.status_code}: {said(str(getattr(e, 'message', e)))}"
        elif isinstance(e, openai.APIConnectionError) or _transport_error(e):
            how = f"connection failed or lost ({type(e).__name__})"
        else:  # an error event in the stream
            how = f"{type(e).__name__}: {said(str(e))}"
        message = f"endpoint {ep.name!r} ({ep.model_name} at {ep.api_base}): {how}"
        if ep.api_key and len(ep.api_key) >= 4:  # the key is in no message, whatever made it
            message = message.replace(ep.api_key, "[key]")
        self.failed_at = time.monotonic()
        return EndpointFailure(message, e.status_code if isinstance(e, openai.APIStatusError) else None)

    def chunks(self, messages, *, max_new_tokens, temperature, top_p, seed=None, stop=None):
        """(text piece, None) as the server sends them, then ("", finish_reason) once at the
        end ("length": the token limit cut the answer): a chat that shows the answer as it
        streams and marks it cut. EndpointFailure for any failure; Cancelled (one) once the
        threading.Event `stop` is set."""
        openai = _openai()

        settings = self.endpoint.sampling(temperature, top_p, max_new_tokens)
        finish = None
        cancelled = Cancelled(f"endpoint {self.name!r}: cancelled before the answer was done")
        with self.slots:
            if stop is not None and stop.is_set():  # nothing is sent for an answer nobody waits for
                raise cancelled
            try:
                stream = self.client.chat.completions.create(
                    model=self.endpoint.model_name,
                    messages=list(messages),
                    max_tokens=settings["max_new_tokens"],
                    temperature=settings["temperature"],
                    top_p=settings["top_p"],
                    seed=seed,
                    stream=True,
                )
                with stream:
                    try:
                        for chunk in stream:
                            if stop is not None and stop.is_set():
                                raise cancelled
                            for choice in chunk.choices or ():
                                finish = choice.finish_reason or finish
                                if choice.delta and choice.delta.content:
                                    yield choice.delta.content, None
                    except (ValueError, AttributeError, TypeError, KeyError) as e:
                        # not JSON (json.JSONDecodeError is a ValueError), or a chunk of another shape
                        malformed = EndpointFailure(
                            f"the server sent a malformed stream ({type(e).__name__})"
                        )
                        raise self._failure(malformed) from None
            except openai.APIError as e:
                raise self._failure(e) from None
            except EndpointFailure:
                raise
            except Exception as e:
                if not _transport_error(e):
                    raise
                raise self._failure(e) from None
        if finish is None:  # no finish_reason and no [DONE]: the server went away mid-answer
            raise self._failure(EndpointFailure("the stream ended before the answer did"))
        yield "", finish

    def stream(self, messages, *, max_new_tokens, temperature, top_p, seed=None, stop=None):
        """The answer's text in pieces as the server sends them. EndpointFailure if the
        request or the stream fails; Cancelled (one) once the threading.Event `stop` is set."""
        for piece, _ in self.chunks(
            messages,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        ):
            if piece:
                yield piece

    def answer(self, messages, *, max_new_tokens, temperature, top_p, seed=None, stop=None):
        """The whole answer as trainer.sampling.Answer (stripped, as in-process answers are;
        cut when the token limit ended it). EndpointFailure if it failed, Cancelled if
        `stop` was set before it was done: a partial answer is never passed off as whole."""
        from trainer.sampling import Answer

        text, finish = [], None
        for piece, reason in self.chunks(
            messages,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        ):
            text.append(piece)
            finish = reason or finish
        return Answer("".join(text).strip(), cut=finish == "length")

    def answers(self, conversations, *, max_new_tokens, temperature, top_p, seed=None, stop=None):
        """One answer per conversation, `concurrency` requests at once: Answer or the
        EndpointFailure of that one request (the others are unaffected)."""

        def one(messages):
            try:
                return self.answer(
                    messages,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    stop=stop,
                )
            except EndpointFailure as e:
                return e

        if not conversations:
            return []
        with ThreadPoolExecutor(max_workers=self.endpoint.concurrency, thread_name_prefix="endpoint") as pool:
            return list(pool.map(one, [_messages(c) for c in conversations]))


def _messages(conversation) -> list[dict]:
    if isinstance(conversation, str):  # as trainer.models takes a bare prompt
        return [{"role": "user", "content": conversation}]
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def connect(endpoints: dict[str, Endpoint]) -> dict[str, EndpointModel]:
    """A client per endpoint (no request is made until an answer is asked for); close
    them with close_all when done."""
    return {name: EndpointModel(ep) for name, ep in endpoints.items()}


def close_all(models: dict[str, EndpointModel]) -> None:
    for model in models.values():
        model.close()


def answers_of(
    source,
    conversations,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int = 8,
    progress: bool = False,
    stop=None,
) -> list:
    """One answer per conversation from `source`, an EndpointModel or an in-process
    (model, tokenizer): trainer.sampling.Answer each, or an EndpointFailure where an
    endpoint's request failed (an in-process model's error is raised, as before)."""
    if isinstance(source, EndpointModel):
        return source.answers(
            conversations,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )
    from trainer.sampling import generate_answers

    model, tokenizer = source
    answers = generate_answers(
        model,
        tokenizer,
        conversations,
        n=1,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        stop=stop,
    )
    return [a for (a,) in answers]


def side_params(source, sampling: dict, seed: int) -> dict:
    """A side's gen_params: the sampling settings it was made with and its seed; for an
    endpoint also its display name and the model's served name (never the key or URL)."""
    if not isinstance(source, EndpointModel):
        return {**sampling, "seed": seed}
    ep = source.endpoint
    used = ep.sampling(sampling["temperature"], sampling["top_p"], sampling["max_new_tokens"])
    return {**sampling, **used, "seed": seed, "endpoint": ep.name, "model_name": ep.model_name}
