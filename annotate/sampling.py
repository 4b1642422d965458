"""Which fresh pair goes out next: `preflab serve --sampling uncertain --reward-model RUN`.

Uncertainty sampling: a vote teaches the reward model most where it cannot tell the two
answers apart, so prefer the pairs whose score gap |score_a - score_b| is smallest. But
pairs picked by the model are a biased sample (of the pairs it finds hard), so a share
`mix` of the handouts (default 0.5) is drawn uniformly at random from the pairs that
could go out; analyses that need an unbiased sample use those only.

How each pair was chosen is recorded with its votes, in `gen_params` (a JSON object;
the comparison record has no column for it, and gen_params is where a record says how
its pair came to be): a key "selection" is added next to whatever the pair already had:

    {"a": {...}, "b": {...}, "selection": {"method": "uncertain", "gap": 0.0312,
                                             "mix": 0.5, "reward_run": "rm-1"}}

method is one of
    random     the mix share: uniform over the fresh pairs this annotator could take
    uncertain  the smallest score gap among the scored pairs this annotator could take
    unscored   an uncertain draw with no scored pair to take: uniform, like random, but
               counted apart because it was not a random draw by design
    relabel    sent back from the Review tab for one more vote (annotate/review.py)
(A pairs file's gen_params that is not a JSON object is kept under "original".)

Only the choice among fresh pairs (no votes, nobody holding them) is the policy's: the
assignment queue still gives pairs sent back for relabelling and partly annotated pairs
first (agreement sets complete), and those votes carry the selection the pair got when
it was first handed out. Cost: one pass over the open pairs per handout, under the
queue's lock (a few milliseconds for 10^4 open pairs).

Scores come from annotate.scoring.PairScorer (cached per reward run, shared with the
Review tab): a pairs file is scored in a background thread at start (pairs not scored
yet can go out only as random or unscored), a generator's batches are scored before
they enter the queue.

    sampler = make_sampler("uncertain", reward_run="runs/rm-1", mix=0.5)   # None for "random"
    if sampler is not None:
        sampler.attach(queue, generator)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
from collections.abc import Iterable
from typing import Any

from annotate.scoring import items_from_pairs, scorer_for
from trainer.errors import PreflabError
from trainer.runs import RunDirError
from trainer.selection import selection_of  # noqa: F401  (its home is the library; re-exported)

log = logging.getLogger("preflab.sampling")

DEFAULT_MIX = 0.5


class SamplingError(PreflabError, ValueError):
    """Bad sampling settings; the message says what to pass instead."""


def with_selection(pair, how: dict[str, Any]):
    """The pair with `how` recorded as gen_params["selection"] (replacing an earlier one)."""
    params: Any = None
    if pair.gen_params:
        try:
            params = json.loads(pair.gen_params)
        except json.JSONDecodeError:
            params = pair.gen_params
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        params = {"original": params}
    params = {**params, "selection": how}
    return dataclasses.replace(pair, gen_params=json.dumps(params, sort_keys=True))


class UncertaintySampler:
    """The queue's policy for fresh pairs: `choose(candidates) -> (pair_id, how)`.

    `gaps` maps pair_id -> |score_a - score_b| for the pairs scored so far; it grows while
    scoring runs in the background (set_gaps), and choose() reads it as it is.
    """

    def __init__(self, mix: float = DEFAULT_MIX, *, reward_run: str = "", seed: int | None = None):
        if not 0.0 <= mix <= 1.0:
            raise SamplingError(f"--uncertain-mix must be between 0 and 1, got {mix}")
        self.mix = mix
        self.reward_run = reward_run
        self.rng = random.Random(seed)
        self.gaps: dict[str, float] = {}
        self.scorer = None
        self._status = {"state": "idle", "scored": 0, "total": 0, "message": ""}
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    # ---- the choice ----------------------------------------------------------------------

    def choose(self, candidates: list[str]) -> tuple[str, dict[str, Any]]:
        """One of the candidates (fresh pairs in queue order) and how it was chosen."""
        base = {"mix": self.mix, "reward_run": self.reward_run}
        if self.rng.random() < self.mix:
            pick = self.rng.choice(candidates)
            return pick, {"method": "random", "gap": _round(self.gaps.get(pick)), **base}
        gaps = self.gaps
        best, best_gap = None, None
        for pair_id in candidates:  # first in queue order on equal gaps
            gap = gaps.get(pair_id)
            if gap is not None and (best_gap is None or gap < best_gap):
                best, best_gap = pair_id, gap
        if best is None:
            return self.rng.choice(candidates), {"method": "unscored", "gap": None, **base}
        return best, {"method": "uncertain", "gap": _round(best_gap), **base}

    def set_gaps(self, gaps: dict[str, float]) -> None:
        self.gaps.update(gaps)  # one dict update: choose() in another thread sees old or new

    # ---- scoring the pool ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def _set(self, **fields: Any) -> None:
        with self._lock:
            self._status.update(fields)

    def _gaps_of(self, items, scores) -> dict[str, float]:
        return {it.pair_id: abs(scores[it.key][0] - scores[it.key][1]) for it in items if it.key in scores}

    def score_pairs(self, pairs: Iterable[Any]) -> int:
        """Score pairs now (cached ones are free) and add their gaps; returns how many
        have a gap. Used by the background thread and by the generator for each batch."""
        items = items_from_pairs(pairs)
        self.set_gaps(self._gaps_of(items, self.scorer.cached(items)))

        def on_chunk(new: dict) -> None:
            self.set_gaps(self._gaps_of(items, new))
            with self._lock:
                self._status["scored"] += sum(1 for it in items if it.key in new)

        scores = self.scorer.score(items, on_chunk=on_chunk)
        gaps = self._gaps_of(items, scores)
        self.set_gaps(gaps)
        return len(gaps)

    def score_batch(self, pairs: list[Any]) -> None:
        """Generator hook: score a new batch before it enters the queue. A failure is
        logged; the pairs still go out (as random or unscored)."""
        try:
            self._set(total=self.status()["total"] + len(pairs))
            self.score_pairs(pairs)
        except Exception:
            log.exception(
                "scoring a generated batch with %s failed; its pairs go out unscored", self.reward_run
            )

    def attach(self, queue, generator=None) -> None:
        """Become the queue's policy; score the pairs already in it in a background
        thread; with a generator, score each of its batches before it enters the queue."""
        queue.policy = self
        pool = queue.pool()
        if generator is not None:
            generator.before_add = self.score_batch
        self._set(
            state="scoring", total=len(pool), message=f"scoring {len(pool)} pairs with {self.reward_run}"
        )

        def work() -> None:
            try:
                n = self.score_pairs(pool)
                self._set(state="done", message=f"{n} of {len(pool)} pairs scored with {self.reward_run}")
                log.info("uncertainty sampling: %d of %d pairs scored with %s", n, len(pool), self.reward_run)
            except Exception as e:
                log.exception("scoring the pairs with %s failed; pairs go out unscored", self.reward_run)
                self._set(state="failed", message=f"{type(e).__name__}: {e}")
            queue.wake()

        self.thread = threading.Thread(target=work, name="preflab-sampling", daemon=True)
        self.thread.start()


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def make_sampler(
    kind: str = "random",
    *,
    reward_run: str | None = None,
    mix: float | None = None,
    device: str | None = None,
    seed: int | None = None,
) -> UncertaintySampler | None:
    """The sampler for `kind` (None for "random"), or SamplingError whose message names
    the `preflab serve` flag at fault. reward_run: a finished reward run (--reward-model),
    checked here, once; mix: the random share (--uncertain-mix, DEFAULT_MIX if None);
    device: where the reward model will run ("auto" or None: its own choice). Loads no
    model: the scorer loads it with the first pair to score."""
    kind = kind or "random"
    if kind == "random":
        if reward_run:
            raise SamplingError(
                "--reward-model is for --sampling uncertain; add --sampling uncertain, "
                "or leave --reward-model out"
            )
        if mix is not None:
            raise SamplingError("--uncertain-mix is for --sampling uncertain")
        return None
    if kind != "uncertain":
        raise SamplingError(f"--sampling must be random or uncertain, got {kind!r}")
    if not reward_run:
        raise SamplingError(
            "--sampling uncertain needs --reward-model runs/<id>: a finished reward run "
            "(preflab train-reward) whose scores rank the pairs"
        )
    try:
        scorer = scorer_for(reward_run, None if device in (None, "auto") else device)
    except RunDirError as e:
        raise SamplingError(f"--reward-model {e}") from None
    sampler = UncertaintySampler(DEFAULT_MIX if mix is None else mix, reward_run=scorer.run_id, seed=seed)
    sampler.scorer = scorer
    return sampler
