"""One in-process model answering chat requests one token at a time: the generation side
of `preflab serve-model` (annotate/serve_model.py holds the HTTP side).

    engine = Engine(model, tokenizer, max_new_tokens=256, concurrency=1)
    job = engine.start(messages, max_tokens=64, temperature=0, top_p=1, seed=0, stop=["\\n\\n"])
    for piece in job.pieces():    # text as it is generated (blocking; run it off the event loop)
        ...
    job.finish_reason, job.prompt_tokens, job.completion_tokens
    job.cancel()                  # the client went away: generation ends at the next token

Each job runs `model.generate` in its own thread with a transformers streamer; the thread
holds one of `concurrency` slots for as long as the model works on it (so a client that
vanishes before reading anything still frees its slot when the thread ends), and
`start` raises `Busy` when none is free. Nothing here knows about HTTP.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("preflab.serve_model")


class Busy(Exception):
    """Every generation slot is taken."""


@dataclass
class Job:
    streamer: Any
    stop: list[str]
    cancelled: threading.Event
    prompt_tokens: int
    max_tokens: int
    completion_tokens: int = 0
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
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.slots = threading.BoundedSemaphore(concurrency)
        self.closing = threading.Event()  # the server is stopping: every generation ends
        eos = {tokenizer.eos_token_id}
        gen_eos = model.generation_config.eos_token_id
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        eos.discard(None)
        self.eos = sorted(eos)
        self.context = getattr(model.config, "max_position_embeddings", None)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from trainer.models import render_prompt

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
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if not self.slots.acquire(blocking=False):
            raise Busy
        try:
            cancelled = threading.Event()
            closing = self.closing

            class Cancelled(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    done = cancelled.is_set() or closing.is_set()
                    return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

            # timeout: a reader never waits forever on a thread that died without a word
            streamer = TextIteratorStreamer(
                self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
            )
            job = Job(streamer, stop, cancelled, prompt_tokens=len(prompt_ids), max_tokens=max_tokens)
            settings = dict(
                max_new_tokens=max_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos,
                use_cache=True,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
            )
            if temperature > 0:
                # top_k=0: no top-k cut on top of top-p (transformers would otherwise apply 50).
                settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                settings.update(do_sample=False)
            thread = threading.Thread(
                target=self._generate, args=(job, prompt_ids, seed, settings), daemon=True
            )
            thread.start()
        except BaseException:
            self.slots.release()
            raise
        return job

    def _generate(self, job: Job, prompt_ids: list[int], seed: int, settings: dict) -> None:
        import torch

        device = self.model.device
        forked = [device.index or 0] if device.type == "cuda" else []
        try:
            ids = torch.tensor([prompt_ids], device=device)
            # The seed applies to this answer alone; the process's RNG is left as it was.
            # (With --concurrency above 1, two sampled answers at once share torch's
            # global generator, so a seed repeats an answer only at concurrency 1.)
            with torch.random.fork_rng(devices=forked), torch.inference_mode():
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
            new = out[0, len(prompt_ids) :].tolist()
            job.completion_tokens = len(new)
            job._eos_seen = any(t in self.eos for t in new)
        except BaseException as e:  # reported to the reader, who answers the client
            job.error = e
            job.streamer.end()
        finally:
            gone = job.cancelled.is_set() and not job.stop_hit and not job._eos_seen
            how = "ended: the client went away" if gone else "done"
            log.info("%d prompt + %d new tokens, %s", job.prompt_tokens, job.completion_tokens, how)
            job._done.set()
            self.slots.release()
