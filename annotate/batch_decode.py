"""Continuous batching for one in-process model: a single decode thread runs every
answer the engine (annotate/model_engine.py) has started, one token per row per step.

Each step admits the requests that arrived since the last one: they are prefilled together
(left padded, with an attention mask), and their KV cache is joined to the running batch's
(the shorter side padded on the left with masked zeros), so a new request waits at most
one step, never for the answers already running to end. Finished rows (end of sequence,
their max_tokens, cancelled, the server closing) leave the batch at once; the cache's
columns that only they still used are cut off. Models whose cache layers are not plain
transformers DynamicLayers (sliding windows, quantized, ...) cannot be joined this way:
for them a batch is whoever is waiting when it starts (static batching).

Positions are per row (a row's own count of real tokens), so padding never shifts a
row's rotary positions. Sampling is per row with the row's own torch.Generator, seeded
from the request: the same seed draws the same random numbers whatever else is batched.
Greedy answers are the model's argmax, the same as generating alone unless the batched
logits' rounding (other shapes, padding; more so in bf16) flips a near tie; a sampled
answer is the same as alone when the request runs by itself, and in a batch unless that
rounding moves a draw across a token's boundary.

Text streams per row: the row's new ids are decoded whole (from the last newline on, as
transformers' TextIteratorStreamer does) and the new suffix is sent; a decode ending in
U+FFFD (half a multi-byte character) waits for the next token.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("preflab.serve_model")

_END = object()
STREAM_TIMEOUT_S = 600  # a reader never waits forever on a decode thread that died


class RowStream:
    """Text pieces of one answer, in order, for the one thread that reads them."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def put(self, text: str) -> None:
        self._queue.put(text)

    def end(self) -> None:
        self._queue.put(_END)

    def __iter__(self):
        while (piece := self._queue.get(timeout=STREAM_TIMEOUT_S)) is not _END:
            yield piece


@dataclass
class Row:
    """One answer in the batch: the request, and what has been generated for it."""

    job: Any  # model_engine.Job: cancelled, stop_hit, completion_tokens, _eos_seen, error, _done
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: Any  # torch.Generator, or None for greedy
    new: list[int] = field(default_factory=list)
    eos_seen: bool = False
    closed: bool = False  # finished and reported: never twice
    _window: int = 0  # decode from this new id on (the text before it has been sent)
    _sent: int = 0  # characters of the window's text already sent

    def finished(self, closing: threading.Event) -> bool:
        return (
            self.eos_seen
            or len(self.new) >= self.max_tokens
            or self.job.cancelled.is_set()
            or closing.is_set()
        )


@dataclass
class Batch:
    rows: list[Row]
    cache: Any  # transformers DynamicCache, one row per Row
    mask: Any  # [rows, cache length] attention mask: 0 on left padding
    next_pos: Any  # [rows] the position of each row's next token
    last: Any  # [rows] each row's latest token, the next step's input


class BatchDecoder:
    """The decode thread and the requests it holds: at most `max_rows`, waiting or running."""

    def __init__(self, model, tokenizer, *, eos: list[int], max_rows: int, closing: threading.Event):
        self.model = model
        self.tokenizer = tokenizer
        self.eos = set(eos)
        self.max_rows = max_rows
        self.closing = closing
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        # transformers 5 renamed forward's past_key_values to cache; logits_to_keep=1 (as
        # generate passes it) computes the last position's logits only.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._forward_extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._lock = threading.Condition()
        self._waiting: list[Row] = []
        self._held = 0  # rows waiting or in the batch
        self._batch: Batch | None = None
        self.joinable = False  # learnt from the first prefill's cache layers
        self._thread: threading.Thread | None = None
        # What the batching did, for tests and benches: the most rows in one step, and how
        # many rows joined a batch that was already running.
        self.largest_batch = 0
        self.joined = 0

    def submit(self, row: Row) -> bool:
        """Queue a row for the next step; False when `max_rows` are already held."""
        with self._lock:
            if self._held >= self.max_rows:
                return False
            self._held += 1
            self._waiting.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-decode", daemon=True)
                self._thread.start()
            self._lock.notify()
        return True

    # ---- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        while True:
            with self._lock:
                while not self._waiting and self._batch is None:
                    if self.closing.is_set():  # the server stopped: the thread and the model go
                        self._thread = None
                        return
                    self._lock.wait(timeout=0.5)  # closing is an Event, not this condition
                admit: list[Row] = []
                if self._waiting and (self._batch is None or self.joinable):
                    admit, self._waiting = self._waiting, []
            try:
                with torch.inference_mode():
                    if admit:
                        try:
                            new = self._prefill(admit)
                        except BaseException as e:  # only the new rows fail: the batch is intact
                            self._fail(admit, e)
                        else:
                            self._add(new)
                        admit = []
                    self._retire()
                    if self._batch is not None:
                        self._step()
                        self._retire()
            except BaseException as e:  # the batch's state is unknown: every row in it fails
                self._fail(admit + (self._batch.rows if self._batch is not None else []), e)
                self._batch = None

    def _fail(self, rows: list[Row], error: BaseException) -> None:
        """Each reader raises the error (serve-model answers its client with a 500)."""
        log.error("batched generation failed for %d rows", len(rows), exc_info=error)
        for row in rows:
            if not row.closed:
                row.job.error = error
                self._finish(row)

    def _prefill(self, rows: list[Row]) -> Batch:
        """The new rows prefilled together (left padded) and their first tokens picked."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        device = self.model.device
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt, device=device)
            mask[i, width - len(row.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
            **self._forward_extra,
        )
        self.joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        last = self._pick(rows, out.logits[:, -1].to(dtype=torch.float32))
        self._record(rows, last)
        return Batch(rows, cache, mask, positions[:, -1] + 1, last)

    def _add(self, new: Batch) -> None:
        """The prefilled rows join the running batch (or are it)."""
        if self._batch is None:
            self._batch = new
        else:
            self._batch = _join(self._batch, new)
            self.joined += len(new.rows)
        self.largest_batch = max(self.largest_batch, len(self._batch.rows))

    def _step(self) -> None:
        """One token for every row in the batch."""
        import torch

        b = self._batch
        b.mask = torch.cat([b.mask, b.mask.new_ones((len(b.rows), 1))], dim=1)
        out = self.model(
            input_ids=b.last[:, None],
            attention_mask=b.mask,
            position_ids=b.next_pos[:, None],
            use_cache=True,
            **{self._cache_arg: b.cache},
            **self._forward_extra,
        )
        b.next_pos = b.next_pos + 1
        b.last = self._pick(b.rows, out.logits[:, -1].to(dtype=torch.float32))
        self._record(b.rows, b.last)

    def _pick(self, rows: list[Row], logits):
        """The next token per row: argmax for greedy rows, else temperature and top-p then a
        draw from the row's own generator (the same operations as transformers' sampling,
        so a request alone in the batch answers as `model.generate` would)."""
        import torch

        picked = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.generator is None:
                continue
            scores = logits[i : i + 1]
            if row.temperature != 1.0:
                scores = scores / row.temperature
            if row.top_p < 1.0:
                scores = _top_p(scores, row.top_p)
            probs = torch.softmax(scores, dim=-1)
            picked[i] = torch.multinomial(probs, num_samples=1, generator=row.generator)[0, 0]
        return picked

    def _record(self, rows: list[Row], tokens) -> None:
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.new.append(token)
            row.job.completion_tokens = len(row.new)
            if token in self.eos:
                row.eos_seen = True
            else:
                self._emit(row, final=False)

    def _emit(self, row: Row, *, final: bool) -> None:
        end = len(row.new) - 1 if row.eos_seen else len(row.new)  # the end token is not text
        text = self.tokenizer.decode(row.new[row._window : end], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # half a multi-byte character: the next token completes it
        if len(text) > row._sent:
            row.job.streamer.put(text[row._sent :])
        if text.endswith("\n"):  # what came before is settled: decode from here on
            row._window, row._sent = len(row.new), 0
        else:
            row._sent = max(row._sent, len(text))

    def _retire(self) -> None:
        """Rows that are done leave the batch; padding no remaining row needs is cut off."""
        b = self._batch
        if b is None:
            return
        keep = [i for i, row in enumerate(b.rows) if not row.finished(self.closing)]
        if len(keep) == len(b.rows):
            return
        for i, row in enumerate(b.rows):
            if i not in keep:
                self._finish(row)
        if not keep:
            self._batch = None
            return
        import torch

        index = torch.tensor(keep, device=b.mask.device)
        b.cache.batch_select_indices(index)
        b.rows = [b.rows[i] for i in keep]
        b.mask, b.next_pos, b.last = b.mask[index], b.next_pos[index], b.last[index]
        if self.joinable:
            start = int(b.mask.any(dim=0).int().argmax())  # the first column a row uses
            if start > 0:
                b.mask = b.mask[:, start:]
                for layer in _filled(b.cache):
                    layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]

    def _finish(self, row: Row) -> None:
        """Report the row's end to its reader and free its place; never raises, so the
        decode thread outlives any one row."""
        if row.closed:
            return
        row.closed = True
        job = row.job
        if job.error is None:
            try:
                self._emit(row, final=True)
            except Exception as e:  # the reader raises it
                job.error = e
        job.completion_tokens = len(row.new)
        job.token_ids = list(row.new)
        job._eos_seen = row.eos_seen
        gone = job.cancelled.is_set() and not job.stop_hit and not row.eos_seen
        how = "ended: the client went away" if gone else "done"
        log.info("%d prompt + %d new tokens, %s", job.prompt_tokens, job.completion_tokens, how)
        job.streamer.end()
        job._done.set()
        with self._lock:
            self._held -= 1


def _filled(cache) -> list:
    """The cache's layers that hold keys (a layer that shares another's has none)."""
    return [layer for layer in cache.layers if layer.is_initialized]


def _top_p(scores, top_p: float):
    """transformers' TopPLogitsWarper: keep the most likely tokens whose probabilities
    add up to top_p (at least one), the rest at -inf."""
    import torch

    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)
    drop[..., -1:] = False
    drop = drop.scatter(1, order, drop)
    return scores.masked_fill(drop, -float("inf"))


def _join(running: Batch, new: Batch) -> Batch:
    """One batch of both: the shorter cache padded on the left (masked), rows stacked."""
    import torch
    import torch.nn.functional as F

    width = max(running.mask.shape[1], new.mask.shape[1])

    def widen(b: Batch):
        extra = width - b.mask.shape[1]
        if extra:
            b.mask = F.pad(b.mask, (extra, 0))
            for layer in _filled(b.cache):
                layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
                layer.values = F.pad(layer.values, (0, 0, extra, 0))

    widen(running)
    widen(new)
    for mine, theirs in zip(_filled(running.cache), _filled(new.cache), strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
    running.rows = running.rows + new.rows
    running.mask = torch.cat([running.mask, new.mask], dim=0)
    running.next_pos = torch.cat([running.next_pos, new.next_pos], dim=0)
    running.last = torch.cat([running.last, new.last], dim=0)
    return running
