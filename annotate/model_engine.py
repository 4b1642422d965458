"""One in-process model answering chat requests one token at a time: the generation side
of `preflab serve-model` (annotate/serve_model.py holds the HTTP side).

    engine = Engine(model, tokenizer, max_new_tokens=256, concurrency=8)
    job = engine.start(ids, max_tokens=64, temperature=0, top_p=1, seed=0, stop=["\\n\\n"])
    for piece in job.pieces():    # text as it is generated (blocking; run it off the event loop)
        ...
    job.finish_reason, job.prompt_tokens, job.completion_tokens
    job.cancel()                  # the client went away: generation ends at the next token

The answers being generated share one decode thread that batches them
(annotate/batch_decode.py: continuous batching, a request joins the running batch at the
next token). `concurrency` is the largest batch: a request beyond it (waiting or running)
makes `start` raise `Busy`. A row holds its place until the model is done with it, so a
client that vanishes before reading anything still frees it when its row ends. Nothing
here knows about HTTP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


class Busy(Exception):
    """The batch is full: `concurrency` answers are being generated or waiting."""


@dataclass
class Job:
    streamer: Any  # batch_decode.RowStream: the text pieces, in order
    stop: list[str]
    cancelled: threading.Event
    prompt_tokens: int
    max_tokens: int
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # the answer's ids, once it has ended
    finish_reason: str | None = None
    error: BaseException | None = None
    stop_hit: bool = False
    _eos_seen: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def pieces(self):
        """The answer's text in pieces as the model writes it, a stop sequence and what
        follows it cut off. Text that could be the start of a stop sequence is held back
        until it is clear that it is not."""
        hold = max((len(s) for s in self.stop), default=1) - 1
        text, sent = "", 0
        stopped = False
        for piece in self.streamer:
            text += piece
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, stopped = text[:cut], True
                self.stop_hit = True
                self.cancelled.set()  # generation ends at the next token
            end = len(text) if stopped else max(sent, len(text) - hold)
            if end > sent:
                yield text[sent:end]
                sent = end
            if stopped:
                break
        self._done.wait()
        if self.error is not None:
            raise self.error
        if not stopped and len(text) > sent:
            yield text[sent:]
        if stopped or self._eos_seen:
            self.finish_reason = "stop"
        else:
            self.finish_reason = "length" if self.completion_tokens >= self.max_tokens else "stop"


class Engine:
    def __init__(self, model, tokenizer, *, max_new_tokens: int, concurrency: int):
        from annotate.batch_decode import BatchDecoder

        if concurrency < 1:
            raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.closing = threading.Event()  # the server is stopping: every generation ends
        eos = {tokenizer.eos_token_id}
        gen_eos = model.generation_config.eos_token_id
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        eos.discard(None)
        self.eos = sorted(eos)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.decoder = BatchDecoder(
            model, tokenizer, eos=self.eos, max_rows=concurrency, closing=self.closing
        )

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from trainer.sampling import render_prompt

        text = render_prompt(self.tokenizer, messages)
        # The chat template already spells out BOS/role tokens; a transcript needs them added.
        add_special = not getattr(self.tokenizer, "chat_template", None)
        return self.tokenizer(text, add_special_tokens=add_special).input_ids

    def start(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        stop: list[str],
    ) -> Job:
        import torch

        from annotate.batch_decode import Row, RowStream

        if not prompt_ids:
            raise ValueError("prompt_ids: empty; the model needs at least one token to continue")
        vocab = self.model.get_input_embeddings().num_embeddings
        if any(not 0 <= i < vocab for i in prompt_ids):
            raise ValueError(f"prompt_ids: every id must be in [0, {vocab}), the model's vocabulary")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be at least 1, got {max_tokens}")
        job = Job(RowStream(), stop, threading.Event(), prompt_tokens=len(prompt_ids), max_tokens=max_tokens)
        generator = None
        if temperature > 0:
            # The row's own generator: its seed gives the same draws whatever else is batched,
            # and the process's RNG is left as it was.
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(seed)
        row = Row(job, list(prompt_ids), max_tokens, temperature, top_p, generator)
        if not self.decoder.submit(row):
            raise Busy
        return job
