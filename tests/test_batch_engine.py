"""The model engine's batched generation (annotate/model_engine.py, annotate/batch_decode.py)
on the tiny in-process model, against `model.generate` run on each prompt alone.

Covered: four greedy requests of different prompt lengths at once (left padded in one
batch) answer token for token what each answers alone; requests that join a batch
already running, each with its own max_tokens and sampling seed, answer as alone too,
and a cancelled row stops while the others go on; stop strings and end-of-sequence per
row; the batch's size limit (Busy); streamed pieces join up to the decoded answer and
never show half a multi-byte character; a model whose cache cannot be joined (sliding
window) batches only the requests waiting when a batch starts.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from helpers import TRAIN_DEVICE

torch = pytest.importorskip("torch")

LONG = 1900  # tokens: a row that goes on until the test cancels it (tiny's context is 2048)


@pytest.fixture(scope="module")
def tiny():
    from trainer import models

    return models.load_model("tiny", device=TRAIN_DEVICE)


def _engine(tiny, concurrency=4, max_new_tokens=LONG):
    from annotate.model_engine import Engine

    model, tokenizer = tiny
    return Engine(model, tokenizer, max_new_tokens=max_new_tokens, concurrency=concurrency)


def _prompts(*lengths, seed=3):
    """Prompts of random token ids: the tiny model's greedy answers to them differ from
    prompt to prompt (to chat-template prompts it answers newlines)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in lengths]


def _alone(tiny, engine, ids, max_tokens, temperature=0.0, top_p=1.0, seed=0):
    """What `model.generate` answers for this prompt by itself (the new ids)."""
    model, tokenizer = tiny
    x = torch.tensor([ids], device=model.device)
    settings = dict(do_sample=False)
    if temperature > 0:
        settings = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            eos_token_id=engine.eos,
            pad_token_id=tokenizer.pad_token_id,
            **settings,
        )
    return out[0, len(ids) :].tolist()


class Reader:
    """Reads one job's pieces in a thread of its own, as a server's request would."""

    def __init__(self, job):
        self.job, self.pieces, self.error = job, [], None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for piece in self.job.pieces():
                self.pieces.append(piece)
                self.first.set()
        except BaseException as e:
            self.error = e
        self.first.set()

    def text(self) -> str:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive() and self.error is None, self.error
        return "".join(self.pieces)


def _start(engine, ids, max_tokens, temperature=0.0, seed=0, top_p=1.0, stop=()):
    return engine.start(
        ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=list(stop)
    )


def test_concurrent_greedy_rows_answer_as_alone(tiny):
    engine = _engine(tiny)
    prompts = _prompts(5, 17, 33, 60)
    jobs = [_start(engine, ids, max_tokens=24) for ids in prompts]
    readers = [Reader(job) for job in jobs]
    texts = [r.text() for r in readers]
    tokenizer = tiny[1]
    answers = [_alone(tiny, engine, ids, 24) for ids in prompts]
    assert len({tuple(a) for a in answers}) == 4  # four different answers, not one repeated
    for job, text, alone in zip(jobs, texts, answers, strict=True):
        assert job.token_ids == alone
        assert text == tokenizer.decode(alone, skip_special_tokens=True)
        assert job.completion_tokens == 24 and job.finish_reason == "length"
        assert job.prompt_tokens in (5, 17, 33, 60)
    assert engine.decoder.largest_batch == 4


def test_rows_join_a_running_batch_and_leave_it(tiny):
    """A long sampled row runs; three more join it (their own max_tokens, seeds, greedy or
    not); one of them is cancelled mid-answer and stops while the first goes on."""
    engine = _engine(tiny)
    tokenizer = tiny[1]
    first_ids, short_ids, sampled_ids, cancelled_ids = _prompts(9, 40, 3, 25, seed=5)
    first = Reader(_start(engine, first_ids, LONG, temperature=1.0, seed=1))
    assert first.first.wait(60)  # generating now
    short = Reader(_start(engine, short_ids, 7))
    sampled = Reader(_start(engine, sampled_ids, 30, temperature=0.8, top_p=0.9, seed=2))
    cancelled = Reader(_start(engine, cancelled_ids, LONG, temperature=1.0, seed=3))

    short_text, sampled_text = short.text(), sampled.text()
    assert cancelled.first.wait(60)
    cancelled.job.cancel()
    cancelled_text = cancelled.text()
    at_cancel = first.job.completion_tokens
    deadline = time.monotonic() + 120  # the first row goes on after the other one is cancelled
    while first.job.completion_tokens < at_cancel + 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.job.completion_tokens >= at_cancel + 5
    first.job.cancel()
    first_text = first.text()

    assert engine.decoder.joinable
    assert engine.decoder.joined == 3  # continuous batching: none of them waited for the first
    assert short.job.token_ids == _alone(tiny, engine, short_ids, 7)
    assert short.job.completion_tokens == 7 and short.job.finish_reason == "length"
    assert sampled.job.token_ids == _alone(tiny, engine, sampled_ids, 30, 0.8, 0.9, seed=2)
    assert sampled.job.completion_tokens == 30
    for reader, ids, seed in ((cancelled, cancelled_ids, 3), (first, first_ids, 1)):
        got = reader.job.token_ids
        assert 0 < len(got) < LONG and reader.job.finish_reason == "stop"
        assert got == _alone(tiny, engine, ids, len(got), 1.0, seed=seed)  # as alone, up to the cancel
    for reader, text in (
        (short, short_text),
        (sampled, sampled_text),
        (cancelled, cancelled_text),
        (first, first_text),
    ):
        assert text == tokenizer.decode(reader.job.token_ids, skip_special_tokens=True)
        if "\ufffd" not in text:  # a piece never ends in half a multi-byte character
            assert not any("\ufffd" in p for p in reader.pieces)
    assert len(first.pieces) > 1


def test_stop_strings_and_end_of_sequence_per_row(tiny):
    model, tokenizer = tiny
    plain = _engine(tiny)
    stop_ids, other_ids = _prompts(12, 30, seed=8)
    full = tokenizer.decode(_alone(tiny, plain, stop_ids, 40, 1.0, seed=4), skip_special_tokens=True)
    words = full.split()
    assert len(words) > 4, full
    stop = words[len(words) // 2]
    stopped = Reader(_start(plain, stop_ids, 40, temperature=1.0, seed=4, stop=[stop]))
    other = Reader(_start(plain, other_ids, 40))
    assert stopped.text() == full[: full.find(stop)] and stopped.job.finish_reason == "stop"
    assert other.text() == tokenizer.decode(_alone(tiny, plain, other_ids, 40), skip_special_tokens=True)
    assert other.job.finish_reason == "length"

    # End of sequence: an engine whose model also ends on a token that comes later in its
    # sampled answer to one prompt; that row stops there, the other one goes on.
    eos_ids = _prompts(20, seed=9)[0]
    answer = _alone(tiny, plain, eos_ids, 30, 1.0, seed=6)
    k = next((k for k in range(3, len(answer)) if answer[k] not in answer[:k]), None)
    assert k is not None, answer
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, answer[k]]
    try:
        engine = _engine(tiny)
    finally:
        model.generation_config.eos_token_id = original
    ended = Reader(_start(engine, eos_ids, 30, temperature=1.0, seed=6))
    going = Reader(_start(engine, other_ids, 30))
    assert ended.text() == tokenizer.decode(answer[:k], skip_special_tokens=True)
    assert ended.job.token_ids == answer[: k + 1] and ended.job.finish_reason == "stop"
    going.text()
    assert going.job.completion_tokens == 30 and going.job.finish_reason == "length"


def test_the_batch_limit_answers_busy(tiny):
    from annotate.model_engine import Busy

    engine = _engine(tiny, concurrency=2)
    a_ids, b_ids = _prompts(6, 8, seed=11)
    a = Reader(_start(engine, a_ids, LONG, temperature=1.0))
    b = Reader(_start(engine, b_ids, LONG, temperature=1.0))
    with pytest.raises(Busy):
        _start(engine, a_ids, 3)
    for bad in ([], [len(tiny[1]) + 10**6]):  # refused before it takes a place in the batch
        with pytest.raises(ValueError, match="prompt_ids"):
            _start(engine, bad, 3)
    a.job.cancel()
    a.text()  # its row has ended: its place is free
    c = Reader(_start(engine, b_ids, 3))
    assert c.text() == tiny[1].decode(_alone(tiny, engine, b_ids, 3), skip_special_tokens=True)
    b.job.cancel()
    b.text()
    engine.closing.set()  # the server stops: a new row ends at once, with what it had
    d = Reader(_start(engine, a_ids, LONG))
    thread = engine.decoder._thread  # None if it already ended with d's row
    d.text()
    assert d.job.completion_tokens < LONG
    if thread is not None:  # and the decode thread ends with the server, letting the model go
        thread.join(timeout=30)
        assert not thread.is_alive()
    deadline = time.monotonic() + 30
    while engine.decoder._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.decoder._thread is None


def test_a_cache_that_cannot_be_joined_batches_whoever_waits(tiny):
    """A sliding-window model (its cache layers are not plain DynamicLayers): a request that
    comes while a batch runs waits for it to end, then answers as alone."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from annotate.model_engine import Engine

    _, tokenizer = tiny
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=256,  # longer than any row here: the window itself never cuts
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(TRAIN_DEVICE).eval()
    slide = (model, tokenizer)
    engine = Engine(model, tokenizer, max_new_tokens=200, concurrency=4)
    first_ids, later_ids = _prompts(7, 21, seed=13)
    first = Reader(_start(engine, first_ids, 200, temperature=1.0, seed=1))
    assert first.first.wait(60)
    later = Reader(_start(engine, later_ids, 20, temperature=1.0, seed=2))
    first.text(), later.text()
    assert not engine.decoder.joinable  # learnt from the first prefill's cache
    assert engine.decoder.joined == 0 and engine.decoder.largest_batch == 1
    assert first.job.token_ids == _alone(slide, engine, first_ids, 200, 1.0, seed=1)
    assert later.job.token_ids == _alone(slide, engine, later_ids, 20, 1.0, seed=2)
