"""Pair scoring with a reward model, cached per reward run: what the Review tab and the
uncertainty sampler both read.

    from annotate.scoring import scorer_for, items_from_votes
    scorer = scorer_for("runs/rm-1")                 # a finished reward run (RunDirError if not)
    scores = scorer.score(items_from_votes(votes))   # {content key: (score_a, score_b)}

* `PairScorer` scores pairs with `trainer.reward_model.RewardModel` (normalised scores) and
  keeps every score in `<run>/review_scores.parquet`, keyed by the pair's content (a hash
  of prompt and both answers: the default pair_id) and the checkpoint's fingerprint, so
  a second look at the same votes scores nothing, and only new pairs are scored.
* `scorer_for`: one scorer (one loaded model) per reward run and checkpoint in this
  process, shared by annotate/review.py and annotate/sampling.py.
* Whether a directory holds a finished reward model is `trainer.runs.reward_model_path`'s
  answer, asked once per scorer.

Nothing heavy at import: torch loads with the first model, pyarrow with the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.runs import CHECKPOINT, REVIEW_SCORES_FILE, REWARD_META_FILE, STATE_FILE, reward_model_path

log = logging.getLogger("preflab.scoring")

# The score cache is annotate's file, kept inside the reward run it belongs to (the
# trainer neither writes nor reads it); its name is trainer.runs.REVIEW_SCORES_FILE.
CACHE_FILE = REVIEW_SCORES_FILE
KEEP_SCORERS = 2  # reward models kept loaded at once (the sampler's and one more to review)


def checkpoint_fingerprint(model_dir: Path) -> str:
    """Names one set of weights: the normalisation file's bytes plus name, size and mtime
    of each weight file. A retrained checkpoint gets a new fingerprint, so old scores in
    the cache are never mistaken for its own."""
    h = hashlib.sha256((model_dir / REWARD_META_FILE).read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.name != STATE_FILE:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def content_key(
    prompt: str,
    response_a: str,
    response_b: str,
    conversation_a: str | None = None,
    conversation_b: str | None = None,
) -> str:
    """What a pair's scores depend on: prompt (canonical JSON) and the two answers. The
    same hash as a default pair_id, but computed, so a pair_id chosen by a pairs file
    never decides which scores a pair gets. A chat vote's answers are scored after each
    side's own history, so its key covers the two conversations (which end with them)."""
    from trainer.store import pair_id_for

    if conversation_a is not None and conversation_b is not None:
        return pair_id_for(prompt, conversation_a, conversation_b).replace("pair-", "chat-", 1)
    return pair_id_for(prompt, response_a, response_b)


@dataclass(frozen=True)
class Item:
    """One pair to score."""

    key: str
    pair_id: str
    prompt: str  # canonical JSON of the chat messages
    response_a: str
    response_b: str
    # What each answer is scored after (trainer.store.side_contexts): the prompt, but for
    # a chat vote each side's own conversation before its answer.
    context_a: list[dict[str, str]] | None = None
    context_b: list[dict[str, str]] | None = None


def item(
    pair_id: str,
    prompt: str,
    response_a: str,
    response_b: str,
    conversation_a: str | None = None,
    conversation_b: str | None = None,
) -> Item:
    from trainer.store import side_contexts

    a, b = side_contexts(
        {"prompt": prompt, "conversation_a": conversation_a, "conversation_b": conversation_b}
    )
    key = content_key(prompt, response_a, response_b, conversation_a, conversation_b)
    return Item(key, pair_id, prompt, response_a, response_b, a, b)


def items_from_votes(votes: Iterable[dict[str, Any]]) -> list[Item]:
    """One Item per distinct pair content among vote records."""
    seen: dict[str, Item] = {}
    for v in votes:
        conversations = (v.get("conversation_a"), v.get("conversation_b"))
        it = item(v["pair_id"], v["prompt"], v["response_a"], v["response_b"], *conversations)
        seen.setdefault(it.key, it)
    return list(seen.values())


def items_from_pairs(pairs: Iterable[Any]) -> list[Item]:
    """Items of annotate.pairs.Pair objects."""
    return [item(p.pair_id, p.prompt, p.response_a, p.response_b) for p in pairs]


class PairScorer:
    """Normalised reward-model scores of pairs: `score(items) -> {key: (score_a, score_b)}`.

    `run_dir` is a finished reward run (or its model directory); RunDirError otherwise.
    Scores already in `<run>/review_scores.parquet` for this checkpoint are not computed
    again; new ones are added to it (write-then-rename, merged with what another server
    wrote meanwhile). Thread-safe: one model, one lock around each chunk.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        device: Any = None,
        chunk: int = 32,
        loader: Callable[[Path], Any] | None = None,
    ):
        self.model_dir = reward_model_path(run_dir)
        # Given the model directory of a run (runs/rm-1/checkpoint), the run is its parent:
        # votes record the run's name, and the cache lives with the run, not in the model.
        given = Path(run_dir)
        self.run_dir = given.parent if given == self.model_dir and given.name == CHECKPOINT else given
        self.run_id = self.run_dir.name
        self.fingerprint = checkpoint_fingerprint(self.model_dir)
        self.cache_path = self.run_dir / CACHE_FILE
        self.device = device
        self.chunk = chunk
        self._loader = loader
        self._model = None
        self._lock = threading.Lock()
        self._scores: dict[str, tuple[float, float]] = {}
        self._pair_ids: dict[str, str] = {}
        self._unsaved = 0
        self._cache_mtime: int | None = None
        self.computed = 0  # pairs this scorer ran through the model (not from the cache)
        with self._lock:
            self._merge_from_disk()

    # ---- the cache file ----------------------------------------------------------------

    def _merge_from_disk(self) -> None:
        import pyarrow.parquet as pq

        try:
            mtime = self.cache_path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._cache_mtime:
            return
        try:
            table = pq.read_table(self.cache_path)
        except Exception as e:  # a damaged cache costs a rescore, never the review
            log.warning("%s: unreadable score cache, ignored (%s)", self.cache_path, e)
            self._cache_mtime = mtime
            return
        cols = table.to_pydict()
        for key, pid, ckpt, a, b in zip(
            cols["key"], cols["pair_id"], cols["checkpoint"], cols["score_a"], cols["score_b"]
        ):
            if ckpt == self.fingerprint and key not in self._scores:
                self._scores[key] = (a, b)
                self._pair_ids[key] = pid
        self._cache_mtime = mtime

    def _save(self) -> None:
        """Write every score we know to the cache file (under self._lock)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._unsaved:
            return
        self._merge_from_disk()
        keys = list(self._scores)
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "pair_id": pa.array([self._pair_ids.get(k, k) for k in keys], pa.string()),
                "checkpoint": pa.array([self.fingerprint] * len(keys), pa.string()),
                "score_a": pa.array([self._scores[k][0] for k in keys], pa.float64()),
                "score_b": pa.array([self._scores[k][1] for k in keys], pa.float64()),
            }
        )
        tmp = self.cache_path.with_name(f".{CACHE_FILE}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, self.cache_path)
        except OSError as e:  # a read-only run dir: scores stay in memory
            log.warning("%s: cannot write the score cache (%s)", self.cache_path, e)
            tmp.unlink(missing_ok=True)
            return
        self._cache_mtime = self.cache_path.stat().st_mtime_ns
        self._unsaved = 0

    # ---- scoring -----------------------------------------------------------------------

    def _load_model(self):
        if self._model is None:
            if self._loader is not None:
                self._model = self._loader(self.run_dir)
            else:
                import torch

                from trainer.reward_model import RewardModel

                cores = os.cpu_count() or 1
                if cores > 1 and torch.get_num_threads() >= cores:
                    torch.set_num_threads(cores - 1)  # leave a core to the web server's requests
                self._model = RewardModel.load(self.model_dir, device=self.device)
        return self._model

    def cached(self, items: Iterable[Item]) -> dict[str, tuple[float, float]]:
        """The scores already known (memory or cache file), without touching the model."""
        with self._lock:
            return {it.key: self._scores[it.key] for it in items if it.key in self._scores}

    def missing(self, items: Iterable[Item]) -> list[Item]:
        with self._lock:
            self._merge_from_disk()
            seen, out = set(), []
            for it in items:
                if it.key not in self._scores and it.key not in seen:
                    seen.add(it.key)
                    out.append(it)
            return out

    def score(
        self,
        items: Sequence[Item],
        progress: Callable[[int, int], None] | None = None,
        on_chunk: Callable[[dict[str, tuple[float, float]]], None] | None = None,
    ) -> dict[str, tuple[float, float]]:
        """Scores of every item; only the ones not in the cache go through the model,
        `chunk` pairs at a time. progress(done, total) is called after each chunk (and
        once before the first); on_chunk gets each chunk's new scores."""
        todo = self.missing(items)
        total = len(todo)
        if progress:
            progress(0, total)
        last_save = time.monotonic()
        for start in range(0, total, self.chunk):
            part = todo[start : start + self.chunk]
            with self._lock:
                model = self._load_model()
                prompts = [it.context_a or it.prompt for it in part] + [
                    it.context_b or it.prompt for it in part
                ]
                answers = [it.response_a for it in part] + [it.response_b for it in part]
                out = model.score(prompts, answers, normalize=True)
                new = {}
                for k, it in enumerate(part):
                    new[it.key] = (float(out[k]), float(out[len(part) + k]))
                    self._pair_ids[it.key] = it.pair_id
                self._scores.update(new)
                self.computed += len(part)
                self._unsaved += len(part)
                if time.monotonic() - last_save > 2.0:  # a long job keeps what it did so far
                    self._save()
                    last_save = time.monotonic()
            if on_chunk:
                on_chunk(new)
            if progress:
                progress(min(start + self.chunk, total), total)
        with self._lock:
            self._save()
            return {it.key: self._scores[it.key] for it in items if it.key in self._scores}


_scorers: OrderedDict[tuple[str, str], PairScorer] = OrderedDict()
_scorers_lock = threading.Lock()


def scorer_for(run_dir: str | os.PathLike, device: Any = None) -> PairScorer:
    """One PairScorer (one loaded model) per reward run and checkpoint in this process,
    shared by the Review tab and the sampler; the least recently used beyond
    KEEP_SCORERS is dropped. RunDirError when run_dir holds no finished reward model."""
    path = Path(run_dir).resolve()
    key = (str(path), checkpoint_fingerprint(reward_model_path(path)))
    with _scorers_lock:
        scorer = _scorers.get(key)
        if scorer is None:
            scorer = _scorers[key] = PairScorer(path, device=device)
        _scorers.move_to_end(key)
        while len(_scorers) > KEEP_SCORERS:
            _scorers.popitem(last=False)
        return scorer
