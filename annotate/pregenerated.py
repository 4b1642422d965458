"""Pairs made ahead of time that `preflab serve --model M` serves as if its own generator
had made them: the head start that lets the CPU demo show its first pair at once.

    pairs, note = matching_pairs("trainer/data/demo-pairs.jsonl", generator)   # annotate/serve.py
    queue.add(generator.adopt(pairs))    # counted as the generator's own; it makes the rest
    log.info("%s", note)

A pregenerated pairs file is what `preflab generate --out FILE` writes (`make
demo-pairs` makes the shipped one, `DEMO_PAIRS`, for the shipped pool with the demo's
settings). Each side's gen_params says how it was made (model, seed, temperature,
top_p, max_new_tokens) and `"pregenerated": true`, and votes on the pair carry those
gen_params into the store, so nobody mistakes them for answers this server sampled.

A pair is used only where it is one the generator could have made itself: its prompt
id is in the pool with the same messages; its models are the run's base models (one
model: both sides that model, seeds {seed, seed + 1}; an arena: two different base
models, both sampled with seed); and every sampling setting equals the run's. Anything
else is left out, and the note says how many and why (first reason of each kind), so a
user with their own --model, --max-new-tokens or prompts never gets the shipped answers
in their arena. On top of that, `serve` offers the shipped file only for the shipped
pool (`default_file`): a pool of one's own is one's own, even where a prompt happens to
match.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from annotate.pairs import Pair, PairsFileError, load_pairs
from trainer.data import DEMO_PAIRS
from trainer.prompts import DEFAULT_PROMPTS
from trainer.store import messages_to_json

SETTINGS = ("temperature", "top_p", "max_new_tokens")


def default_file(prompts: str | os.PathLike) -> Path | None:
    """The shipped demo pairs when the pool is the shipped one, else None."""
    try:
        same = Path(prompts).resolve() == DEFAULT_PROMPTS.resolve()
    except OSError:
        same = False
    return DEMO_PAIRS if same and DEMO_PAIRS.is_file() else None


def _sides(pair: Pair) -> tuple[dict, dict] | None:
    try:
        params = json.loads(pair.gen_params or "")
    except ValueError:
        return None
    if not isinstance(params, dict) or not all(isinstance(params.get(s), dict) for s in "ab"):
        return None
    return params["a"], params["b"]


def mismatch(pair: Pair, generator, prompts: dict) -> tuple[str, str] | None:
    """Why `pair` is not one `generator` could have made: (kind, reason), or None."""
    prompt = prompts.get(pair.prompt_id)
    if prompt is None:
        return "pool", f"prompt {pair.prompt_id!r} is not in the pool"
    if pair.prompt != messages_to_json(prompt.messages):
        return "text", f"prompt {pair.prompt_id!r} has other text in the pool"
    sides = _sides(pair)
    if sides is None:
        return "params", "no per-side gen_params"
    if not all(side.get("pregenerated") is True for side in sides):
        return "mark", 'not marked "pregenerated": true'
    base = generator.base_models
    models = (pair.model_a, pair.model_b)
    if len(base) == 1:
        if models != (base[0], base[0]):
            return "models", f"models {' vs '.join(models)}, this server samples {base[0]}"
        want_seeds = [generator.seed, generator.seed + 1]
    else:
        if pair.model_a == pair.model_b or not set(models) <= set(base):
            return "models", f"models {' vs '.join(models)}, not two of this arena's {', '.join(base)}"
        want_seeds = [generator.seed, generator.seed]
    for key in SETTINGS:
        got = {side.get(key) for side in sides}
        if got != {generator.sampling[key]}:
            shown = ", ".join(map(str, sorted(got, key=str)))
            return key, f"{key} {shown}, this server samples {generator.sampling[key]}"
    seeds = [side.get("seed") for side in sides]
    if not all(isinstance(s, int) for s in seeds) or sorted(seeds) != want_seeds:
        return "seed", f"seeds {seeds[0]}/{seeds[1]}, this server's --seed is {generator.seed}"
    return None


def matching_pairs(path: str | os.PathLike, generator) -> tuple[list[Pair], str]:
    """The pairs of the file at `path` that `generator` could have made, and one line
    saying how many were used and why the others were not. A file that cannot be read
    gives no pairs (the server runs on without a head start; the line says why)."""
    try:
        pairs, problems = load_pairs(path)
    except PairsFileError as e:
        return [], f"pregenerated pairs not used: {e}"
    prompts = {p.id: p for p in generator.prompts}
    used, reasons = [], Counter()
    first: dict[str, str] = {}
    for pair in pairs:
        why = mismatch(pair, generator, prompts)
        if why is None:
            used.append(pair)
            continue
        kind, reason = why
        reasons[kind] += 1
        first.setdefault(kind, reason)  # one example of each kind is enough to act on
    note = f"{path}: {len(used)} of {len(pairs)} pregenerated pairs match this server's models and settings"
    left = [f"{n} left out ({first[kind]})" for kind, n in reasons.most_common()]
    if problems:
        left.append(f"{len(problems)} unreadable rows ({problems[0]})")
    if left:
        note += "; " + "; ".join(left)
    return used, note


def head_start(choice: str | None, prompts: str | os.PathLike, generator) -> tuple[list[Pair], str | None]:
    """What `serve --pregenerated` gives the generator to adopt, and the line to log.
    `choice`: a file, "none", or None (the default: the shipped demo pairs, only when
    the pool is the shipped one)."""
    if choice is not None and choice.lower() == "none":
        return [], None
    if choice is None:
        path = default_file(prompts)
        if path is None:
            if DEMO_PAIRS.is_file():
                return [], (
                    f"shipped demo pairs ({DEMO_PAIRS.name}) not used: they are for the shipped "
                    f"pool, and --prompts is {prompts}"
                )
            return [], None
    else:
        path = Path(choice)
    return matching_pairs(path, generator)
