"""Pairs sampled while the server runs: `Generator`, the background thread behind
`preflab serve --model M [--model M2 ...]`.

    generator = Generator(["smollm2"], prompts, queue, cache_dir=store / "pairs")   # annotate/serve.py
    queue.add(generator.load_cache())   # what an earlier server generated, before start()
    queue.add(generator.adopt(pairs))   # pairs made ahead of time (annotate/pregenerated.py)
    generator.start()                   # then it keeps the queue ahead of the annotators

It samples pairs in batches and hands them to the assignment queue, keeping it ahead
of the annotators: whenever an active annotator has fewer than two pairs ready, the
next batch is generated (and, after a head start of pairs made ahead of time, whenever
anyone is voting). Every generated pair is also appended (fsync'd) to the store's
cache of generated pairs (annotate/pair_cache.py), so a restarted server serves the same
pairs again. The pairs are `Pair`s, the shape a pairs file gives too
(annotate/pairs.py); each row is built by annotate/pair_building.py.

Nothing heavy is imported at module level: torch loads only when a Generator starts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from annotate.pair_cache import append_pairs, cache_file, read_pairs
from annotate.pairs import Pair, pair_from_row
from trainer.runs import CONFIG_FILE

log = logging.getLogger("preflab.pairs")

# The longest answer where nobody chose. On a CPU, sampling is slower than people vote
# (SmolLM2 on this project's two cores: 16 s or more per 128-token answer, measured for
# #17), and the length is what sets the wait between pairs: 128 tokens halve it against
# 256. Most answers are cut at 128 (about 100 words); a cut answer is marked as cut.
MAX_NEW_TOKENS = 256
CPU_MAX_NEW_TOKENS = 128


def default_max_new_tokens(device: str | None) -> int:
    from trainer.models import pick_device

    return CPU_MAX_NEW_TOKENS if pick_device(device).type == "cpu" else MAX_NEW_TOKENS


MAX_TRIES = 3  # failed requests for one prompt (on one track) before it is given up
RETRIED_4XX = (408, 409, 429)  # the 4xx statuses a later try may not get again


class Generator(threading.Thread):
    """Samples pairs for a prompt pool and feeds them to an AssignmentQueue.

    With one model the two sides are two samples of it with different seeds; with
    several, each prompt gets a random pair of two different models. Each prompt is
    answered once per round, least-voted prompts first; `rounds` rounds in all.

    `status()` says what the thread is doing (for the page's cold-start progress):
    {"state": "loading" | "generating" | "waiting" | "done" | "failed", "message",
    "since" (when this step began), "last_batch_s" (how long the last batch took), ...}.

    `add_model(path, model_id)` puts one more model into the arena while the server runs
    (the Train tab's "Add to arena", or a restart that restores it): it gets `rounds` more
    pairs per prompt, each one the new model against one of the others, recorded under
    `model_id`. A newcomer does not wait for the base rounds to finish: from the moment it
    joins, `newcomer_share` of the pairs generated are its own (all of them once the base
    rounds are done), and its pairs go to the front of the queue, so people meet it in the
    next few pairs. A generator that had finished starts again for them.

    `sources` maps a model's name (what votes record) to what loads it, where the two
    differ (`--model runs/<id>/policy` is recorded as `<id>`). `endpoints` maps a name to
    the trainer.endpoint_client.EndpointModel that answers for it (`--endpoints`): a pair
    with an answer whose request failed is dropped (logged, and in status()'s
    "endpoint_error" for the page), its prompt drawn again, and a model that failed is
    passed over for trainer.endpoint_client.COOL_DOWN_S wherever two others can answer.
    A prompt whose request failed MAX_TRIES times on its track (or once with a status that
    no retry changes: a 4xx other than 408, 409, 429, e.g. a prompt too long for the
    model's context) is given up, with one warning, so that generation still ends.
    """

    def __init__(
        self,
        model_names: list[str],
        prompts: list,
        queue,
        *,
        cache_dir: Path | None,
        voted_prompts: dict[str, int] | None = None,
        rounds: int = 1,
        batch_size: int = 4,
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 0,
        per_annotator: int = 2,
        device: str = "auto",
        model_cache_dir: str | None = None,
        newcomer_share: float = 0.5,
        sources: dict[str, str] | None = None,
        endpoints: dict | None = None,
    ):
        super().__init__(name="preflab-generator", daemon=True)
        self.model_names = list(dict.fromkeys(model_names))
        self.prompts = list(prompts)
        self.queue = queue
        self.rounds = rounds
        self.batch_size = batch_size
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
        self.seed = seed
        self.per_annotator = per_annotator
        self.device = device
        self.model_cache_dir = model_cache_dir
        self.voted_prompts = voted_prompts or {}
        self._stop_event = threading.Event()
        self._extra_workers: list[threading.Thread] = []  # started by add_model after a finish
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {
            "state": "loading",
            "message": "starting",
            "generated": 0,
            "planned": len(self.prompts) * rounds,
            "started": time.time(),
            "since": time.time(),
        }
        # The cache file is named by what makes pairs comparable (annotate/pair_cache.py).
        self.cache_path = cache_file(cache_dir, self.model_names, self.sampling, seed, endpoints)
        # Pairs generated so far, per (track, prompt_id): track None is the base rounds (the
        # models the server started with), a model id the rounds of a model added later.
        self._answered: dict[tuple[str | None, str], int] = {}
        self._failures: dict[tuple[str | None, str], int] = {}  # failed tries, same keys
        self._given_up: set[tuple[str | None, str]] = set()  # its requests kept failing
        self._batches = 0
        if not 0.0 <= newcomer_share <= 1.0:
            raise ValueError(f"newcomer_share must be between 0 and 1, got {newcomer_share}")
        self.newcomer_share = newcomer_share
        self._made = {"newcomer": 0, "base": 0}  # pairs made since the first newcomer joined
        # What each model id loads, the rounds the server started with, and the models
        # added at runtime (add_model), in order.
        self.sources: dict[str, str] = {name: (sources or {}).get(name, name) for name in self.model_names}
        self.endpoints = dict(endpoints or {})
        self._base_models = list(self.model_names)
        self._base_rounds = rounds
        self._added: list[str] = []
        self._loaded: dict[str, Any] = {}
        self._rng = random.Random(seed)  # the arena's draws of models
        # Prompts go out in a seeded shuffle, not file order: a pool sorted by category
        # would otherwise show every first annotator nothing but its first category.
        shuffled = random.Random(f"prompt-order-{seed}").sample(range(len(self.prompts)), len(self.prompts))
        self._rank = {i: position for position, i in enumerate(shuffled)}
        self._ran = False  # run() was called (not `_started`: threading.Thread has one)
        self._working = False  # a thread is generating (or about to); guarded by _lock
        self.before_add = None  # called with each new batch before it enters the queue
        self._head_start = False  # adopt() took pairs made ahead of time

    # ---- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def _set(self, **fields: Any) -> None:
        with self._lock:
            if "message" in fields and fields["message"] != self._status.get("message"):
                fields.setdefault("since", time.time())  # when this step (loading, a batch) began
            self._status.update(fields)

    @property
    def base_models(self) -> list[str]:
        """The models the server started with (the base rounds), not those added later."""
        return list(self._base_models)

    @property
    def planned(self) -> int:
        return len(self.prompts) * self.rounds

    def stop(self, wait_s: float = 0.0) -> None:
        """Stop generating; with `wait_s`, wait that long for the worker to finish its
        token (a process that exits while torch is mid-generate aborts in C++:
        "terminate called without an active exception")."""
        self._stop_event.set()
        self.queue.wake()
        if wait_s > 0:
            deadline = time.monotonic() + wait_s
            for worker in [self, *self._extra_workers]:
                if worker.is_alive():
                    worker.join(max(0.0, deadline - time.monotonic()))

    # ---- more models while the server runs -------------------------------------------

    def add_model(self, path: str | os.PathLike, model_id: str) -> bool:
        """Add the model in `path` (a Hugging Face model directory) to the arena under the
        name `model_id`, the name its votes carry. Thread-safe; returns False when that id
        is already in the arena. Each prompt gets `rounds` more pairs, each one `model_id`
        against another model; a generator that had finished starts again."""
        model_id = (model_id or "").strip()
        if not model_id:
            raise ValueError("a model added to the arena needs a name (model_id)")
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"{path}: not a model directory (no {CONFIG_FILE})")
        with self._lock:
            if model_id in self.model_names:
                return False
            self.model_names.append(model_id)
            self.sources[model_id] = str(path)
            self._added.append(model_id)
            self._made = {"newcomer": 0, "base": 0}  # the share is measured from this join on
            self.rounds += self._base_rounds
            self._status["planned"] = self.planned
            restart = self._ran and not self._working and not self._stop_event.is_set()
            if restart:
                self._working = True
        if hasattr(self.queue, "planned"):
            self.queue.planned = self.planned
        log.info("arena: added %s (%s)", model_id, path)
        if restart:  # the thread had run out of work: a new one takes it up
            worker = threading.Thread(target=self._work, name="preflab-generator-more", daemon=True)
            self._extra_workers.append(worker)
            worker.start()
        else:
            self.queue.wake()  # a worker waiting for "need" looks at the plan again
        return True

    def _sides(self, prompt, track: str | None, seed: int, rng: random.Random) -> tuple:
        """The (model, seed) of each side of the next pair for `prompt`. Base rounds: two
        seeds of the one model, or two different base models; a newcomer's round: that
        model against a random other one. A model that failed lately is passed over where
        another can answer."""
        if track is not None:
            # Its opponent: a model that is loaded already (one added this instant is not).
            with self._lock:
                others = [m for m in self.model_names if m != track and m in self._loaded]
            healthy = [m for m in others if not getattr(self._loaded.get(m), "cooling_down", False)]
            return (track, seed), (rng.choice(healthy or others), seed)
        if len(self._base_models) == 1:
            return (self._base_models[0], seed), (self._base_models[0], seed + 1)
        healthy = [m for m in self._base_models if not getattr(self._loaded.get(m), "cooling_down", False)]
        return tuple((m, seed) for m in rng.sample(healthy if len(healthy) >= 2 else self._base_models, 2))

    def _track_of(self, pair: Pair) -> str | None:
        """Which rounds a pair belongs to: the newcomer its gen_params name (written since
        tracks exist), else the newest added model on either side, else base."""
        try:
            params = json.loads(pair.gen_params or "{}")
            named = {side.get("newcomer") for side in params.values() if isinstance(side, dict)} - {None}
        except (ValueError, AttributeError):
            named = set()
        if named:
            track = named.pop()
            return track if track in self._added else None
        for model_id in reversed(self._added):
            if model_id in (pair.model_a, pair.model_b):
                return model_id
        return None

    # ---- the pairs generated by an earlier run ---------------------------------------

    def load_cache(self) -> list[Pair]:
        """Pairs that an earlier server with the same models and settings generated,
        for prompts still in the pool. Call before start(); a torn last line (a server
        killed mid-write) is dropped."""
        wanted = {p.id for p in self.prompts}
        pairs = []
        for pair in read_pairs(self.cache_path):
            key = (self._track_of(pair), pair.prompt_id)
            if pair.prompt_id in wanted and self._answered.get(key, 0) < self._base_rounds:
                self._answered[key] = self._answered.get(key, 0) + 1
                pairs.append(pair)
        self._batches = len(pairs)  # seeds keep moving on after a restart
        self._set(generated=len(pairs))
        return pairs

    def adopt(self, pairs: list[Pair]) -> list[Pair]:
        """Take pairs made ahead of time (annotate/pregenerated.py checked that this
        generator could have made them) as base-round pairs of its own: each fills a
        round of its prompt, so the generator goes on with the prompts and rounds they
        leave. Returns those taken (none beyond `rounds` per prompt), in the seeded
        prompt order, so that the first pairs shown are not one category's. Call after
        load_cache, before start()."""
        rank = {p.id: self._rank[i] for i, p in enumerate(self.prompts)}
        taken = []
        for pair in sorted(pairs, key=lambda p: rank.get(p.prompt_id, len(rank))):
            key = (None, pair.prompt_id)
            if pair.prompt_id in rank and self._answered.get(key, 0) < self._base_rounds:
                self._answered[key] = self._answered.get(key, 0) + 1
                taken.append(pair)
        # Seeds move on past them too: a later round of the same prompt samples anew.
        self._batches += len(taken)
        self._head_start = self._head_start or bool(taken)
        self._set(generated=self.status()["generated"] + len(taken))
        return taken

    # ---- the work --------------------------------------------------------------------

    def _todo(self, track: str | None) -> list:
        """The prompts that still need a pair on `track`: fewest pairs so far first, then
        fewest votes in the store, then the seeded shuffle of the pool."""
        order = sorted(
            range(len(self.prompts)),
            key=lambda i: (
                self._answered.get((track, self.prompts[i].id), 0),
                self.voted_prompts.get(self.prompts[i].id, 0),
                self._rank[i],
            ),
        )
        return [
            self.prompts[i]
            for i in order
            if self._answered.get((track, self.prompts[i].id), 0) < self._base_rounds
            and (track, self.prompts[i].id) not in self._given_up
        ]

    def _next_jobs(self, size: int) -> list[tuple[Any, str | None]]:
        """The next `size` (prompt, track) to generate. While a newcomer has rounds left,
        each slot goes to it when its share of what was made since it joined is below
        `newcomer_share` (or when the base rounds are done); the newest newcomer first."""
        with self._lock:
            added = [m for m in self._added if m in self._loaded]  # one added this instant: next batch
        todo = {track: self._todo(track) for track in [None, *reversed(added)]}
        newcomers = [t for t in reversed(added) if todo[t]]
        jobs = []
        made = dict(self._made)  # counted for real once the batch is made (_run)
        for _ in range(size):
            newcomers = [t for t in newcomers if todo[t]]
            want_new = bool(newcomers) and (
                not todo[None]
                or made["newcomer"] < self.newcomer_share * (made["newcomer"] + made["base"] + 1)
            )
            if not want_new and not todo[None]:
                break
            track = newcomers[0] if want_new else None
            jobs.append((todo[track].pop(0), track))
            made["newcomer" if want_new else "base"] += 1
        return jobs

    def _count_failures(self, jobs, answers: dict, failed: set[int]) -> None:
        """Count each failed pair's try against its (track, prompt); give up a prompt after
        MAX_TRIES, or at once for a status that no retry changes."""
        for i in sorted(failed):
            prompt, track = jobs[i]
            key = (track, prompt.id)
            self._failures[key] = self._failures.get(key, 0) + 1
            statuses = [getattr(a, "status", None) for (j, _, _), a in answers.items() if j == i]
            final = any(s is not None and 400 <= s < 500 and s not in RETRIED_4XX for s in statuses)
            if final or self._failures[key] >= MAX_TRIES:
                self._given_up.add(key)
                log.warning(
                    "prompt %s given up after %d failed tr%s%s: no pair is made for it",
                    prompt.id,
                    self._failures[key],
                    "y" if self._failures[key] == 1 else "ies",
                    " (the server refused it)" if final else "",
                )

    def _has_work(self) -> bool:
        return any(self._todo(track) for track in [None, *self._added])

    def run(self) -> None:
        with self._lock:
            self._ran = self._working = True
        self._work()

    def _work(self) -> None:
        try:
            self._run()
        except Exception as e:  # the page shows it; the server keeps serving what exists
            log.exception("pair generation failed")
            with self._lock:
                self._working = False
            self._set(state="failed", message=f"generation failed: {type(e).__name__}: {e}")
            self.queue.wake()

    def _load_new_models(self) -> None:
        """Load every arena model not loaded yet (all at the start; added ones later)."""
        from trainer import models

        with self._lock:
            todo = [
                (k, n, self.sources[n])
                for k, n in enumerate(self.model_names, start=1)
                if n not in self._loaded
            ]
            total = len(self.model_names)
        for k, name, source in todo:
            if name in self.endpoints:  # answered by its server: nothing to load
                self._loaded[name] = self.endpoints[name]
                continue
            self._set(state="loading", message=f"loading model {name} ({k}/{total})")
            self._loaded[name] = models.load_model(source, device=self.device, cache_dir=self.model_cache_dir)

    def _run(self) -> None:
        from transformers.utils import logging as hf_logging

        from annotate.pair_building import make_pair
        from trainer.endpoint_client import EndpointFailure, answers_of, side_params

        hf_logging.disable_progress_bar()  # the page shows progress; the log needs no bars
        hf_logging.set_verbosity_error()

        loaded = self._loaded
        rng = self._rng  # one stream across restarts of the work (add_model)
        while not self._stop_event.is_set():
            self._load_new_models()
            # Cold (nothing to show anyone): one prompt, so the first pair comes soonest.
            jobs = self._next_jobs(self.batch_size if self.queue.ready() else 1)
            if not jobs:
                with self._lock:  # add_model may have planned more just now: check under the lock
                    finished = not self._has_work()
                    if finished:
                        self._working = False
                        message = f"all {self.planned} pairs generated"
                        if self._given_up:
                            message = (
                                f"{self._status['generated']} pairs generated; {len(self._given_up)} "
                                "prompt(s) given up: their requests kept failing"
                            )
                        self._status.update(state="done", message=message)
                if finished:
                    self.queue.wake()
                    return
                continue
            # Pairs made ahead of time (adopt) are a head start to build on, not a reason
            # to idle: while someone votes, the generator keeps working, so an annotator
            # faster than the model (SmolLM2 on a CPU) reaches the end of them later.
            building = self._head_start and self.queue.active_annotators()
            if not building and not self.queue.needs_pairs(self.per_annotator):
                self._set(state="waiting", message="enough pairs ready")
                self.queue.wait_for_need(self.per_annotator, timeout=1.0)
                continue
            batch = [prompt for prompt, _ in jobs]
            done = self.status()["generated"]
            span = f"pair {done + 1}" if len(batch) == 1 else f"pairs {done + 1}-{done + len(batch)}"
            self._set(state="generating", message=f"generating {span} of {self.planned}")
            t_batch = time.time()
            # Each prompt's two sides: (model, seed). Seeds move on with every batch, so
            # a second round samples new answers.
            seed = self.seed + 2 * self._batches
            self._batches += 1
            sides = [self._sides(prompt, track, seed, rng) for prompt, track in jobs]
            rows_of: dict[tuple[str, int], list[int]] = {}  # (model, seed) -> the pairs it answers
            for i, pair_sides in enumerate(sides):
                for side in pair_sides:
                    rows_of.setdefault(side, []).append(i)
            answers: dict[tuple[int, str, int], Any] = {}  # trainer.sampling.Answer or EndpointFailure
            for (name, s), indices in sorted(rows_of.items()):
                texts = answers_of(
                    loaded[name],
                    [batch[i].messages for i in indices],
                    seed=s,
                    batch_size=self.batch_size,
                    stop=self._stop_event,
                    **self.sampling,
                )
                for i, answer in zip(indices, texts):
                    answers[i, name, s] = answer
                if self._stop_event.is_set():
                    return
            problems = [(i, str(a)) for (i, _, _), a in answers.items() if isinstance(a, EndpointFailure)]
            failed = {i for i, _ in problems}
            for problem in dict.fromkeys(p for _, p in problems):
                log.warning("%s; its pair is dropped and its prompt drawn again", problem)
            self._set(endpoint_error=problems[0][1] if problems else None)
            if failed and len(failed) == len(sides):  # nothing came: do not hammer a server that is down
                self._stop_event.wait(5.0)
            self._count_failures(jobs, answers, failed)
            keep = [i for i in range(len(sides)) if i not in failed]
            new = []
            for i in keep:
                x, y = sides[i]
                row = make_pair(
                    batch[i],
                    *[
                        {
                            "model": m,
                            "response": answers[i, m, s].text,
                            # "cut": the token limit stopped it; the page says so next to it
                            "params": {
                                **side_params(loaded[m], self.sampling, s),
                                **({"cut": True} if answers[i, m, s].cut else {}),
                                # the newcomer whose rounds this pair belongs to (a restart reads it back)
                                **({"newcomer": jobs[i][1]} if jobs[i][1] is not None else {}),
                            },
                        }
                        for m, s in (x, y)
                    ],
                )
                new.append(pair_from_row(row))
            jobs = [jobs[i] for i in keep]
            append_pairs(self.cache_path, new)
            for prompt, track in jobs:
                key = (track, prompt.id)
                self._answered[key] = self._answered.get(key, 0) + 1
                if self._added:  # the newcomer share is measured from the first join on
                    self._made["newcomer" if track is not None else "base"] += 1
            if self.before_add is not None:  # e.g. reward-model scores for --sampling uncertain
                self.before_add(new)
            # A newcomer's pairs go to the front of the queue: the next people to ask for a
            # pair meet it, instead of every pair already waiting first.
            newcomer = [pair for pair, (_, track) in zip(new, jobs) if track is not None]
            added = self.queue.add(newcomer, front=True) if newcomer else 0
            added += self.queue.add([pair for pair, (_, track) in zip(new, jobs) if track is None])
            self._set(generated=self.status()["generated"] + len(new), last_batch_s=time.time() - t_batch)
            log.info("generated %d pairs (%d new)", len(new), added)
