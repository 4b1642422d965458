"""Building candidate pairs from sampled answers: which models answer a prompt, one
pairs-file row from two answers, and writing a pairs file whole.

    sides = plan_sides(prompts, ["smollm2", "tiny"], seed=0)   # per prompt: ((model, seed), (model, seed))
    row = make_pair(prompt, {"model": "m1", "response": "...", "params": {...}},
                    {"model": "m2", "response": "...", "params": {...}})
    write_jsonl_atomic(Path("pairs.jsonl"), rows)

Used by `preflab generate` (annotate/generate.py) and by the serve-time generator
(annotate/pair_generator.py `Generator`). The row is the pairs-file shape annotate/pairs.py
reads back: the two answers in canonical order (sorted by model, then answer), so the
same pair always gets the same pair_id.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from trainer.store import messages_to_json, pair_id_for, prompt_id_for


def plan_sides(prompts, model_names: list[str], seed: int) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """For each prompt, the two (model, seed) sides that answer it: with one model two
    seeds of it (seed, seed+1); with several a random pair of two different models,
    drawn with the seed."""
    if len(model_names) == 1:
        return [((model_names[0], seed), (model_names[0], seed + 1)) for _ in prompts]
    rng = random.Random(seed)
    return [tuple((m, seed) for m in rng.sample(model_names, 2)) for _ in prompts]


def make_pair(prompt, side_x: dict, side_y: dict) -> dict:
    """One pairs-file row; sides are {"model", "response", "params"}."""
    a, b = sorted([side_x, side_y], key=lambda s: (s["model"], s["response"]))
    prompt_json = messages_to_json(prompt.messages)
    return {
        "prompt": prompt.messages,
        "response_a": a["response"],
        "response_b": b["response"],
        "model_a": a["model"],
        "model_b": b["model"],
        "pair_id": pair_id_for(prompt_json, a["response"], b["response"]),
        "prompt_id": prompt.id or prompt_id_for(prompt.messages),
        "gen_params": json.dumps({"a": a["params"], "b": b["params"]}, sort_keys=True),
    }


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write to a temp file and rename, so a reader never sees half a pairs file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
