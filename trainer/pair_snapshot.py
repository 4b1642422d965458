"""The run's own copy of its data: the exact pairs and split a reward or DPO run trains on.

    save_snapshot(pairs, train_idx, val_idx, path)   written once into the run directory
    load_snapshot(path, summary) -> (pairs, train_idx, val_idx)

A resumed run reads this, not the store (which may have new votes by then), so it
continues the very same optimisation; and one can always tell what a model saw. Written
by trainer/reward_run.py and trainer/dpo.py; the pairs come from trainer/reward_data.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from trainer.reward_data import Pairs


def save_snapshot(pairs: Pairs, train_idx, val_idx, path) -> None:
    """Pairs and split as one Parquet file (0600: it is the votes themselves)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = np.array(["train"] * len(pairs), dtype=object)
    split[np.asarray(val_idx, dtype=np.int64)] = "val"
    prompts, rejected_prompts = pairs.prompt_keys(), pairs.rejected_prompt_keys()
    table = pa.table(
        {
            "prompt": prompts,
            "chosen": pairs.chosen,
            "rejected": pairs.rejected,
            "label": pa.array(pairs.label, pa.float32()),
            "margin": pa.array(pairs.margin, pa.float32()),
            "weight": pa.array(pairs.weight, pa.float32()),
            "split": split.tolist(),
            # the head each pair trains; only in a multi-head run's snapshot (--criteria)
            **({"head": pa.array(pairs.head, pa.int16())} if any(pairs.head) else {}),
            # the rejected answer's own context; only when a chat vote gave it one
            **({"rejected_prompt": rejected_prompts} if rejected_prompts != prompts else {}),
            # what the split kept together (a chat vote's opening); only when not the prompt
            **({"group": pairs.groups} if pairs.groups != prompts else {}),
        }
    )
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    # 0600: the snapshot is the votes themselves, as private as the store they came from
    with open(tmp, "wb", opener=lambda name, flags: os.open(name, flags, 0o600)) as f:
        pq.write_table(table, f, compression="zstd")
    os.replace(tmp, path)


def load_snapshot(path, summary: dict | None = None) -> tuple[Pairs, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    cols = pq.read_table(path).to_pydict()
    pairs = Pairs(summary=dict(summary or {}))
    parsed: dict[str, list[dict[str, str]]] = {}
    n = len(cols["chosen"])
    # A snapshot from before --weights has no weight column: every vote weighed 1 then.
    weight = cols.get("weight") or [1.0] * n
    head = cols.get("head") or [0] * n  # a single-head snapshot has no column
    rejected_prompt = cols.get("rejected_prompt") or cols["prompt"]  # no chat votes: one context
    group = cols.get("group") or cols["prompt"]

    def messages(key: str):
        if key not in parsed:
            parsed[key] = json.loads(key)
        return parsed[key]

    for p, c, r, label, m, w, h, rp, g in zip(
        cols["prompt"],
        cols["chosen"],
        cols["rejected"],
        cols["label"],
        cols["margin"],
        weight,
        head,
        rejected_prompt,
        group,
    ):
        pairs.add(messages(p), c, r, label, m, w, h, messages(rp), g)
    split = np.array(cols["split"])
    return pairs, np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
