"""Review: the voted pairs seen through a reward model, and where it disagrees with people.

    from annotate.review import PairScorer, review_rows, disagreements
    scorer = PairScorer("runs/rm-1")                 # a finished reward run
    scores = scorer.score(items_from_votes(votes))   # {content key: (score_a, score_b)}
    rows = review_rows(votes, scores)                # each vote + scores + P(a beats b)
    worst = disagreements(rows)                      # decisive votes the model doubts most

* `PairScorer` scores pairs with `trainer.reward.RewardModel` (normalised scores) and
  keeps every score in `<run>/review_scores.parquet`, keyed by the pair's content (a hash
  of prompt and both answers: the default pair_id) and the checkpoint's fingerprint, so
  a second look at the same votes scores nothing, and only new pairs are scored. The
  uncertainty sampler (annotate/sampling.py) uses the same scorer and the same file.
* P(a beats b) = sigmoid(score_a - score_b): the Bradley-Terry probability the reward
  model was trained to give. Next to a vote for `a` it is the probability the model gives
  the human's choice; for `b` it is 1 minus that. Ties and both-bad votes have no side.
* `disagreements`: decisive votes ranked by that probability, lowest first: the votes
  the model most confidently calls wrong, worth a second look by another annotator
  (`Reviewer.requeue`, which the Review tab calls: AssignmentQueue.requeue).
* `Reviewer`: what the Review tab runs. Scoring is a background job per reward run (the
  page polls its progress); a reloaded page finds the job, or its result, where it was.

Nothing heavy at import: torch loads with the first model. (No `from __future__ import
annotations` here: gradio reads the handlers' `request: gr.Request` annotations as objects.)
"""

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger("preflab.review")

CACHE_FILE = "review_scores.parquet"
CHECKPOINT = "checkpoint"          # trainer.runs.CHECKPOINT (not imported: that pulls nothing heavy,
META_FILE = "preflab_reward.json"  # but trainer.reward does); both are part of the run-dir contract
DECISIVE = ("a", "b")
VOTE_COLUMNS = ("event_id", "pair_id", "prompt_id", "prompt", "response_a", "response_b", "model_a",
                "model_b", "left", "choice", "strength", "annotator", "created_at", "gen_params")


class ReviewError(ValueError):
    """A reward run that cannot be used (missing, not finished, not a reward model)."""


# --------------------------------------------------------------------------------------
# Which runs hold a finished reward model
# --------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_reward_run(path: str | os.PathLike) -> Path:
    """The run directory if it holds a finished reward model; ReviewError saying why not."""
    path = Path(path)
    if not path.is_dir():
        raise ReviewError(f"{path}: no such run directory")
    if not (path / "status.json").is_file():
        raise ReviewError(f"{path}: not a run directory (no status.json)")
    status = _read_json(path / "status.json")
    state = status.get("state", "unknown")
    if state != "done":
        note = f" ({status['message']})" if status.get("message") else ""
        raise ReviewError(f"{path}: the reward run is {state}, not done{note}; "
                          "wait until it is done, or pick a finished run")
    if not (path / CHECKPOINT / META_FILE).is_file():
        raise ReviewError(f"{path}: not a reward model run (no {CHECKPOINT}/{META_FILE}; "
                          "a policy run cannot score pairs)")
    return path


def reward_runs(runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished reward runs under runs_dir, newest first: {"id", "path", "message", "finished"}."""
    runs_dir = Path(runs_dir)
    found = []
    if not runs_dir.is_dir():
        return found
    for path in runs_dir.iterdir():
        try:
            check_reward_run(path)
        except ReviewError:
            continue
        status = _read_json(path / "status.json")
        finished = status.get("updated_at") or (path / "status.json").stat().st_mtime
        found.append({"id": path.name, "path": str(path), "message": status.get("message", ""),
                      "finished": float(finished)})
    return sorted(found, key=lambda r: (-r["finished"], r["id"]))


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """Names one set of weights: the normalisation file's bytes plus name, size and mtime
    of each weight file. A retrained checkpoint gets a new fingerprint, so old scores in
    the cache are never mistaken for its own."""
    h = hashlib.sha256((checkpoint / META_FILE).read_bytes())
    for f in sorted(checkpoint.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.name != "training_state.pt":
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Scoring pairs, with a cache per reward run
# --------------------------------------------------------------------------------------

def content_key(prompt: str, response_a: str, response_b: str) -> str:
    """What a pair's scores depend on: prompt (canonical JSON) and the two answers. The
    same hash as a default pair_id, but computed, so a pair_id chosen by a pairs file
    never decides which scores a pair gets."""
    from trainer.store import pair_id_for
    return pair_id_for(prompt, response_a, response_b)


@dataclass(frozen=True)
class Item:
    """One pair to score."""

    key: str
    pair_id: str
    prompt: str          # canonical JSON of the chat messages
    response_a: str
    response_b: str


def item(pair_id: str, prompt: str, response_a: str, response_b: str) -> Item:
    return Item(content_key(prompt, response_a, response_b), pair_id, prompt, response_a, response_b)


def items_from_votes(votes: Iterable[dict[str, Any]]) -> list[Item]:
    """One Item per distinct pair content among vote records."""
    seen: dict[str, Item] = {}
    for v in votes:
        it = item(v["pair_id"], v["prompt"], v["response_a"], v["response_b"])
        seen.setdefault(it.key, it)
    return list(seen.values())


def items_from_pairs(pairs: Iterable[Any]) -> list[Item]:
    """Items of annotate.pairs.Pair objects."""
    return [item(p.pair_id, p.prompt, p.response_a, p.response_b) for p in pairs]


class PairScorer:
    """Normalised reward-model scores of pairs: `score(items) -> {key: (score_a, score_b)}`.

    Scores already in `<run>/review_scores.parquet` for this checkpoint are not computed
    again; new ones are added to it (write-then-rename, merged with what another server
    wrote meanwhile). Thread-safe: one model, one lock around each chunk.
    """

    def __init__(self, run_dir: str | os.PathLike, *, device: Any = None, chunk: int = 32,
                 loader: Callable[[Path], Any] | None = None):
        self.run_dir = check_reward_run(run_dir)
        self.run_id = self.run_dir.name
        self.fingerprint = checkpoint_fingerprint(self.run_dir / CHECKPOINT)
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
        self.computed = 0      # pairs this scorer ran through the model (not from the cache)
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
        except Exception as e:   # a damaged cache costs a rescore, never the review
            log.warning("%s: unreadable score cache, ignored (%s)", self.cache_path, e)
            self._cache_mtime = mtime
            return
        cols = table.to_pydict()
        for key, pid, ckpt, a, b in zip(cols["key"], cols["pair_id"], cols["checkpoint"],
                                        cols["score_a"], cols["score_b"]):
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
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "pair_id": pa.array([self._pair_ids.get(k, k) for k in keys], pa.string()),
                          "checkpoint": pa.array([self.fingerprint] * len(keys), pa.string()),
                          "score_a": pa.array([self._scores[k][0] for k in keys], pa.float64()),
                          "score_b": pa.array([self._scores[k][1] for k in keys], pa.float64())})
        tmp = self.cache_path.with_name(f".{CACHE_FILE}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, self.cache_path)
        except OSError as e:   # a read-only run dir: scores stay in memory
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
                from trainer.reward import RewardModel
                cores = os.cpu_count() or 1
                if cores > 1 and torch.get_num_threads() >= cores:
                    torch.set_num_threads(cores - 1)   # leave a core to the web server's requests
                self._model = RewardModel.load(self.run_dir, device=self.device)
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

    def score(self, items: Sequence[Item], progress: Callable[[int, int], None] | None = None,
              on_chunk: Callable[[dict[str, tuple[float, float]]], None] | None = None
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
            part = todo[start:start + self.chunk]
            with self._lock:
                model = self._load_model()
                prompts = [it.prompt for it in part] * 2
                answers = [it.response_a for it in part] + [it.response_b for it in part]
                out = model.score(prompts, answers, normalize=True)
                new = {}
                for k, it in enumerate(part):
                    new[it.key] = (float(out[k]), float(out[len(part) + k]))
                    self._pair_ids[it.key] = it.pair_id
                self._scores.update(new)
                self.computed += len(part)
                self._unsaved += len(part)
                if time.monotonic() - last_save > 2.0:   # a long job keeps what it did so far
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
KEEP_SCORERS = 2   # reward models kept loaded at once (the sampler's and one more to review)


def scorer_for(run_dir: str | os.PathLike, device: Any = None) -> PairScorer:
    """One PairScorer (one loaded model) per reward run and checkpoint in this process,
    shared by the Review tab and the sampler; the least recently used beyond
    KEEP_SCORERS is dropped."""
    path = check_reward_run(run_dir).resolve()
    key = (str(path), checkpoint_fingerprint(path / CHECKPOINT))
    with _scorers_lock:
        scorer = _scorers.get(key)
        if scorer is None:
            scorer = _scorers[key] = PairScorer(path, device=device)
        _scorers.move_to_end(key)
        while len(_scorers) > KEEP_SCORERS:
            _scorers.popitem(last=False)
        return scorer


# --------------------------------------------------------------------------------------
# Votes beside scores; the disagreements
# --------------------------------------------------------------------------------------

def sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))   # no overflow for any x


def review_rows(votes: Iterable[dict[str, Any]], scores: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """Each vote with the model's view of its pair: score_a, score_b, p_a = P(a beats b),
    p_human = the probability the model gives the side the human chose (None for ties
    and both-bad), agree = p_human > 0.5. Votes whose pair has no score are left out."""
    rows = []
    for v in votes:
        s = scores.get(content_key(v["prompt"], v["response_a"], v["response_b"]))
        if s is None:
            continue
        p_a = sigmoid(s[0] - s[1])
        choice = v.get("choice")
        p_human = p_a if choice == "a" else (1.0 - p_a if choice == "b" else None)
        rows.append({**{k: v.get(k) for k in VOTE_COLUMNS}, "score_a": s[0], "score_b": s[1], "p_a": p_a,
                     "p_human": p_human, "agree": None if p_human is None else p_human > 0.5})
    return rows


def disagreements(rows: Iterable[dict[str, Any]], n: int | None = None) -> list[dict[str, Any]]:
    """Decisive votes, the ones the model disagrees with most confidently first (lowest
    P(the human's side)); equal probabilities in event_id order, so the list is stable."""
    decisive = [r for r in rows if r.get("choice") in DECISIVE and r.get("p_human") is not None]
    decisive.sort(key=lambda r: (r["p_human"], str(r.get("event_id"))))
    return decisive if n is None else decisive[:n]


def top_pairs(rows: Iterable[dict[str, Any]], n: int) -> list[str]:
    """The first n distinct pair_ids of the disagreement ranking."""
    out: list[str] = []
    for r in disagreements(rows):
        if r["pair_id"] not in out:
            out.append(r["pair_id"])
            if len(out) >= n:
                break
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    decisive = [r for r in rows if r["p_human"] is not None]
    agree = sum(1 for r in decisive if r["agree"])
    return {"votes": len(rows), "pairs": len({r["pair_id"] for r in rows}), "decisive": len(decisive),
            "agree": agree, "agreement": agree / len(decisive) if decisive else None,
            "mean_p_human": sum(r["p_human"] for r in decisive) / len(decisive) if decisive else None}


# --------------------------------------------------------------------------------------
# The Review tab's background jobs
# --------------------------------------------------------------------------------------

class Job:
    """Scoring the store's votes with one reward run, in a thread."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.lock = threading.Lock()
        self.state = "starting"        # starting | loading | scoring | done | failed
        self.done = self.total = 0
        self.message = "starting"
        self.rows: list[dict[str, Any]] | None = None
        self.new = 0                   # pairs this job scored with the model
        self.started = time.time()
        self.finished: float | None = None
        self.thread: threading.Thread | None = None

    def update(self, **fields: Any) -> None:
        with self.lock:
            for k, v in fields.items():
                setattr(self, k, v)

    def view(self) -> dict[str, Any]:
        with self.lock:
            return {"run_id": self.run_id, "state": self.state, "done": self.done, "total": self.total,
                    "message": self.message, "new": self.new, "rows": self.rows,
                    "seconds": round((self.finished or time.time()) - self.started, 1)}

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Reviewer:
    """What the Review tab does, without gradio: list reward runs, score the votes with
    one (a background job; `status` to poll), send pairs back to the queue."""

    def __init__(self, data: str | os.PathLike, runs_dir: str | os.PathLike, queue=None,
                 *, device: Any = None, extra_runs: Sequence[str | os.PathLike] = ()):
        # The store target as given (a directory, or a postgresql:// URL): never a Path,
        # which would fold a URL's "//".
        self.data = data
        self.runs_dir = Path(runs_dir)
        self.queue = queue
        self.device = device
        self.extra_runs = [Path(p) for p in extra_runs]   # e.g. serve --reward-model outside --runs
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def runs(self) -> list[dict[str, Any]]:
        found = reward_runs(self.runs_dir)
        ids = {r["id"] for r in found}
        for path in self.extra_runs:
            if path.name not in ids:
                try:
                    check_reward_run(path)
                except ReviewError:
                    continue
                found.append({"id": path.name, "path": str(path), "message": "", "finished": 0.0})
        return found

    def _path(self, run_id: str) -> Path:
        for r in self.runs():
            if r["id"] == run_id:
                return Path(r["path"])
        # Not listed: say why (still running, failed, not a reward run, no such run).
        check_reward_run(self.runs_dir / run_id)
        raise ReviewError(f"{run_id}: no such reward run under {self.runs_dir}")

    def start(self, run_id: str) -> dict[str, Any]:
        """Score the store's current votes with this run (only pairs not scored before go
        through the model). A job already running for the run is joined, not repeated."""
        path = self._path(run_id)
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and job.running:
                return job.view()
            previous = job
            job = self._jobs[run_id] = Job(run_id)
            if previous is not None and previous.rows is not None:
                job.rows = previous.rows          # the old table stays on screen meanwhile
            job.thread = threading.Thread(target=self._work, args=(job, path), daemon=True,
                                          name=f"preflab-review-{run_id}")
            job.thread.start()
            return job.view()

    def status(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(run_id)
        return job.view() if job is not None else None

    def wait(self, run_id: str, timeout: float = 600) -> dict[str, Any]:
        with self._lock:
            job = self._jobs[run_id]
        if job.thread is not None:
            job.thread.join(timeout)
        return job.view()

    def read_votes(self) -> list[dict[str, Any]]:
        from trainer.store import read_comparisons, store_exists
        if not store_exists(self.data):
            return []
        table = read_comparisons(self.data, columns=list(VOTE_COLUMNS))
        return table.select(list(VOTE_COLUMNS)).to_pylist()

    def _work(self, job: Job, path: Path) -> None:
        try:
            job.update(state="loading", message="reading the votes")
            votes = self.read_votes()
            items = items_from_votes(votes)
            job.update(message=f"loading the reward model {job.run_id}")
            scorer = scorer_for(path, self.device)
            todo = len(scorer.missing(items))
            job.update(state="scoring", total=todo,
                       message=f"{len(items) - todo} of {len(items)} pairs scored before; scoring {todo}")
            before = scorer.computed

            def progress(done: int, total: int) -> None:
                job.update(done=done, total=total, message=f"scoring pairs: {done} of {total}")

            scores = scorer.score(items, progress=progress)
            rows = review_rows(votes, scores)
            rows.sort(key=lambda r: r["created_at"], reverse=True)
            job.update(state="done", rows=rows, new=scorer.computed - before, done=todo, total=todo,
                       finished=time.time(),
                       message=f"{len(rows)} votes on {len(items)} pairs; {todo} pairs newly scored")
        except Exception as e:
            log.exception("review scoring with %s failed", job.run_id)
            job.update(state="failed", finished=time.time(), message=f"{type(e).__name__}: {e}")

    def requeue(self, run_id: str, pair_ids: Sequence[str]) -> dict[str, Any]:
        """Send pairs back to the annotation queue for one more vote, by an annotator who
        has not voted on them. Returns {"queued", "waiting", "unknown", "message"}."""
        from annotate.pairs import pair_from_row
        from trainer.rows import BadRow

        if self.queue is None:
            raise ReviewError("no annotation queue to send pairs to")
        wanted = list(dict.fromkeys(p for p in pair_ids if p))
        job = self.status(run_id)
        rows = (job or {}).get("rows") or self.read_votes()
        by_id: dict[str, dict] = {}
        for r in rows:
            by_id.setdefault(r["pair_id"], r)
        pairs, unknown = [], 0
        for pid in wanted:
            r = by_id.get(pid)
            if r is None:
                unknown += 1
                continue
            try:
                pairs.append(pair_from_row({"prompt": json.loads(r["prompt"]), **{k: r.get(k) for k in (
                    "response_a", "response_b", "model_a", "model_b", "pair_id", "prompt_id", "gen_params")}}))
            except (BadRow, ValueError):
                unknown += 1
        report = self.queue.requeue(pairs, how={"method": "relabel", "reward_run": run_id})
        queued, waiting = report["queued"], report["waiting"]
        parts = [f"Queued {queued} pair{'s' if queued != 1 else ''} for one more vote by an annotator "
                 "who has not voted on them"]
        if waiting:
            parts.append(f"{waiting} already waiting for a vote")
        if unknown:
            parts.append(f"{unknown} not found among the votes")
        return {"queued": queued, "waiting": waiting, "unknown": unknown, "message": "; ".join(parts) + "."}


# --------------------------------------------------------------------------------------
# The Review tab (admins): gradio parts, built inside the app's Tabs by annotate/app.py
# --------------------------------------------------------------------------------------

SHOW_VOTES = 200          # latest votes listed on the page
SHOW_DISAGREEMENTS = 25   # disagreements listed (and offered for sending back)

REVIEW_CSS = """
.review-table { width: 100%; border-collapse: collapse; font-size: 0.92em; }
.review-table th, .review-table td { border-bottom: 1px solid var(--border-color-primary);
  padding: 4px 6px; text-align: left; vertical-align: top; }
.review-table td.num { font-variant-numeric: tabular-nums; white-space: nowrap; width: 1%; }
.review-table th { white-space: nowrap; }
.review-table td:last-child { width: 55%; }
.review-table tr.disagree td.p { color: var(--error-text-color, #b91c1c); font-weight: 600; }
.review-table details summary { cursor: pointer; }
.review-table .pair-body { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; margin: 6px 0; }
.review-table .pair-body .card { max-height: 40vh; overflow-y: auto; }
.review-table .pair-body .prompt-card { grid-column: 1 / span 2; }
.review-note { color: var(--body-text-color-subdued); font-size: 0.9em; margin: 4px 0; }
"""


def _vote_words(row: dict[str, Any]) -> str:
    choice = row.get("choice")
    if choice in DECISIVE:
        strength = {1: " (slightly)", 2: " (clearly)"}.get(row.get("strength"), "")
        return f"{choice.upper()} better{strength}"
    return {"tie": "tie", "both_bad": "both bad"}.get(choice, str(choice))


def _excerpt(prompt_json: str, width: int = 90) -> str:
    try:
        messages = json.loads(prompt_json)
        text = " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "user") or \
            " ".join(str(m.get("content", "")) for m in messages)
    except (ValueError, AttributeError, TypeError):
        text = prompt_json
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _pair_details(row: dict[str, Any]) -> str:
    """The pair in full, folded: the prompt and both answers rendered safely."""
    from annotate.web.html import escape as _e, render_markdown, render_prompt
    try:
        prompt = render_prompt(json.loads(row["prompt"]))
    except (ValueError, KeyError, TypeError):
        prompt = f"<pre>{_e(row['prompt'])}</pre>"
    return (f'<details><summary>{_e(_excerpt(row["prompt"]))}</summary><div class="pair-body">'
            f'<div class="card prompt-card"><h4>Prompt</h4>{prompt}</div>'
            f'<div class="card answer"><h4>A · {_e(row["model_a"])}</h4>{render_markdown(row["response_a"])}</div>'
            f'<div class="card answer"><h4>B · {_e(row["model_b"])}</h4>{render_markdown(row["response_b"])}</div>'
            f'</div></details>')


def votes_html(rows: list[dict[str, Any]], limit: int = SHOW_VOTES) -> str:
    """Each vote with the model's scores beside it, newest first."""
    from annotate.web.html import escape as _e
    if not rows:
        return '<p class="review-note">No votes yet.</p>'
    body = []
    for r in rows[:limit]:
        cls = "disagree" if r["agree"] is False else ""
        when = r["created_at"].strftime("%Y-%m-%d %H:%M") if hasattr(r["created_at"], "strftime") else ""
        agree = "–" if r["agree"] is None else ("yes" if r["agree"] else "no")
        body.append(
            f'<tr class="{cls}" data-pair-id="{_e(r["pair_id"])}" data-event-id="{_e(r["event_id"])}" '
            f'data-choice="{_e(r["choice"])}" data-p-a="{r["p_a"]:.4f}">'
            f'<td class="num">{_e(when)}</td><td>{_e(r["annotator"])}</td><td class="vote">{_e(_vote_words(r))}</td>'
            f'<td class="num score-a">{r["score_a"]:+.2f}</td><td class="num score-b">{r["score_b"]:+.2f}</td>'
            f'<td class="num p p-a">{r["p_a"]:.2f}</td><td class="agree">{agree}</td>'
            f'<td>{_pair_details(r)}</td></tr>')
    more = (f'<p class="review-note">Showing the latest {limit} of {len(rows)} votes.</p>'
            if len(rows) > limit else "")
    return (f'{more}<table class="review-table" id="review-votes-table"><thead><tr><th>when (UTC)</th>'
            f'<th>annotator</th><th>human vote</th><th>score A</th><th>score B</th><th>P(A beats B)</th>'
            f'<th>model agrees</th><th>pair</th></tr></thead><tbody>{"".join(body)}</tbody></table>')


def disagreements_html(rows: list[dict[str, Any]], limit: int = SHOW_DISAGREEMENTS) -> str:
    from annotate.web.html import escape as _e
    worst = disagreements(rows, limit)
    if not worst:
        return '<p class="review-note">No decisive votes (A or B better) to compare with.</p>'
    body = []
    for k, r in enumerate(worst, start=1):
        cls = "disagree" if not r["agree"] else ""
        body.append(
            f'<tr class="{cls}" data-pair-id="{_e(r["pair_id"])}" data-event-id="{_e(r["event_id"])}" '
            f'data-p-human="{r["p_human"]:.4f}"><td class="num">{k}</td>'
            f'<td class="num p">{r["p_human"]:.2f}</td><td class="vote">{_e(_vote_words(r))}</td>'
            f'<td>{_e(r["annotator"])}</td><td class="num">{r["score_a"]:+.2f}</td>'
            f'<td class="num">{r["score_b"]:+.2f}</td><td>{_pair_details(r)}</td></tr>')
    return ('<p class="review-note">Decisive votes, the ones the reward model doubts most first: '
            'P(human\'s side) is the probability it gives the answer the annotator chose.</p>'
            '<table class="review-table" id="review-disagreements-table"><thead><tr><th>#</th>'
            '<th>P(human\'s side)</th><th>human vote</th><th>annotator</th><th>score A</th><th>score B</th>'
            f'<th>pair</th></tr></thead><tbody>{"".join(body)}</tbody></table>')


def summary_html(job: dict[str, Any]) -> str:
    from annotate.web.html import escape as _e, pct as _pct
    s = summary(job["rows"] or [])

    def metric(label: str, value: str, note: str = "") -> str:
        return (f'<div class="metric"><div class="label">{_e(label)}</div>'
                f'<div class="value">{_e(value)}</div><div class="note">{_e(note)}</div></div>')

    mean = "–" if s["mean_p_human"] is None else f"{s['mean_p_human']:.2f}"
    return '<div class="metrics" id="review-metrics">' + "".join([
        metric("Votes scored", str(s["votes"]), f"{s['pairs']} pairs"),
        metric("Decisive votes", str(s["decisive"]), "A or B better"),
        metric("Model agrees", _pct(s["agreement"]) if s["agreement"] is not None else "–",
               f"{s['agree']} of {s['decisive']} decisive votes"),
        metric("Mean P(human's side)", mean),
        metric("Newly scored", str(job["new"]), f"pairs, in {job['seconds']:.1f} s"),
    ]) + "</div>"


def progress_html(job: dict[str, Any] | None) -> str:
    from annotate.web.html import escape as _e
    if job is None:
        return '<div class="review-note" id="review-state" data-state="idle">Pick a finished reward run.</div>'
    state = job["state"]
    if state == "failed":
        return (f'<div class="status error" id="review-state" data-state="failed">Scoring failed: '
                f'{_e(job["message"])}</div>')
    if state == "done":
        return (f'<div class="review-note" id="review-state" data-state="done">{_e(job["run_id"])}: '
                f'{_e(job["message"])}.</div>')
    width = 100 * job["done"] / job["total"] if job["total"] else 0
    return (f'<div class="progress-box review-note" id="review-state" data-state="{_e(state)}">'
            f'{_e(job["run_id"])}: {_e(job["message"])} '
            f'<span class="progress-bar"><span style="width:{width:.1f}%"></span></span></div>')


def build_review_tab(service, demo, tab, admin) -> "Reviewer":
    """The Review tab's components and handlers; call inside `with gr.Tab(...) as tab:`.
    `admin(request)` raises gr.Error for anyone but an admin; every handler calls it."""
    import gradio as gr

    policy = getattr(service.queue, "policy", None)
    scorer = getattr(policy, "scorer", None)
    reviewer = Reviewer(service.data, service.runs_dir, service.queue,
                        extra_runs=[scorer.run_dir] if scorer is not None else ())

    gr.Markdown("Every voted pair scored by a reward model, beside the human vote: "
                "**P(A beats B)** = sigmoid(score A − score B). Scores are kept with the reward run, "
                "so only votes new since the last look are scored.")
    with gr.Row():
        r_run = gr.Dropdown(label="Reward run (finished)", choices=[], value=None, elem_id="review-run",
                            scale=3, interactive=True)
        r_score = gr.Button("Score votes", variant="primary", elem_id="review-score", scale=0, min_width=140)
    r_progress = gr.HTML(progress_html(None), elem_id="review-progress", js_on_load=None)
    r_summary = gr.HTML(elem_id="review-summary", js_on_load=None)
    with gr.Accordion("Disagreements: votes to relabel", open=True):
        r_disagree = gr.HTML(elem_id="review-disagreements", js_on_load=None, css_template=REVIEW_CSS)
        r_pick = gr.CheckboxGroup(label="Pairs to send back (by rank)", choices=[], value=[],
                                  elem_id="review-pick")
        with gr.Row():
            r_topn = gr.Number(value=5, precision=0, minimum=1, label="N", scale=0, min_width=90,
                               elem_id="review-topn")
            r_send_top = gr.Button("Send the top N back for one more vote", elem_id="review-send-top")
            r_send_sel = gr.Button("Send the selected back", elem_id="review-send-selected")
        r_report = gr.Markdown(elem_id="review-report")
    with gr.Accordion("Voted pairs, newest first", open=True):
        r_votes = gr.HTML(elem_id="review-votes", js_on_load=None, css_template=REVIEW_CSS)
    r_timer = gr.Timer(1.0, active=False)

    def checked(fn, *args):
        try:
            return fn(*args)
        except ReviewError as e:
            raise gr.Error(str(e)) from None

    def show(job: dict[str, Any] | None):
        """(progress, summary, disagreements, pick, votes, timer) for a job's state."""
        running = job is not None and job["state"] not in ("done", "failed")
        if job is None or job["rows"] is None:
            tables = ("", "", gr.CheckboxGroup(choices=[], value=[]), "")
        elif running:   # the previous result stays on screen until the new one is ready
            tables = (gr.skip(), gr.skip(), gr.skip(), gr.skip())
        else:
            rows = job["rows"]
            picks = []
            for r in disagreements(rows, SHOW_DISAGREEMENTS):
                if r["pair_id"] not in [v for _, v in picks]:
                    picks.append((f"#{len(picks) + 1} · P={r['p_human']:.2f} · {r['pair_id'][:18]}", r["pair_id"]))
            tables = (summary_html(job), disagreements_html(rows), gr.CheckboxGroup(choices=picks, value=[]),
                      votes_html(rows))
        return (progress_html(job), tables[0], tables[1], tables[2], tables[3], gr.Timer(active=running))

    outputs = [r_progress, r_summary, r_disagree, r_pick, r_votes, r_timer]
    kw = dict(api_visibility="private", concurrency_limit=4, concurrency_id="review", show_progress="hidden")

    def on_load(request: gr.Request):
        return gr.Tab(visible=service.is_admin(request))

    def on_open(current, request: gr.Request):
        admin(request)
        runs = reviewer.runs()
        ids = [r["id"] for r in runs]
        run_id = current if current in ids else (ids[0] if ids else None)
        dropdown = gr.Dropdown(choices=[(r["id"], r["id"]) for r in runs], value=run_id)
        if run_id is None:
            return (dropdown, '<div class="review-note" id="review-state" data-state="none">No finished reward '
                    f'run under {service.runs_dir}/ yet: train one (preflab train-reward) first.</div>',
                    "", "", gr.CheckboxGroup(choices=[], value=[]), "", gr.Timer(active=False))
        return (dropdown, *show(checked(reviewer.start, run_id)))

    def on_score(run_id, request: gr.Request):
        admin(request)
        if not run_id:
            raise gr.Error("pick a reward run first")
        return show(checked(reviewer.start, run_id))

    def on_tick(run_id, request: gr.Request):
        admin(request)
        return show(reviewer.status(run_id) if run_id else None)

    def send(run_id, pair_ids) -> str:
        if not run_id:
            raise gr.Error("pick a reward run first")
        if not pair_ids:
            return "Nothing selected."
        return checked(reviewer.requeue, run_id, pair_ids)["message"]

    def on_send_top(run_id, n, request: gr.Request):
        admin(request)
        job = reviewer.status(run_id) if run_id else None
        if job is None or job["rows"] is None:
            raise gr.Error("score the votes first")
        return send(run_id, top_pairs(job["rows"], max(1, int(n or 1))))

    def on_send_selected(run_id, picked, request: gr.Request):
        admin(request)
        return send(run_id, picked or [])

    demo.load(on_load, None, tab, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    tab.select(on_open, [r_run], [r_run, *outputs], **kw)
    r_run.input(on_score, [r_run], outputs, **kw)
    r_score.click(on_score, [r_run], outputs, **kw)
    r_timer.tick(on_tick, [r_run], outputs, **kw)
    r_send_top.click(on_send_top, [r_run, r_topn], [r_report], **kw)
    r_send_sel.click(on_send_selected, [r_run, r_pick], [r_report], **kw)
    return reviewer
