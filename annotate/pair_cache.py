"""The file of pairs a server generated, `<store>/pairs/generated-<key>.jsonl`: every pair
annotate/pair_generator.py samples is appended to it (fsync'd) before it reaches the
queue, so a restarted server serves the same pairs again, votes cast on them still
count, and a pair one of two annotators voted on can still get its second vote.

    path = cache_file(store / "pairs", ["smollm2", "ep"], sampling, seed, endpoints)
    pairs = read_pairs(path)      # what an earlier server wrote; torn or bad lines dropped
    append_pairs(path, batch)     # durable when it returns

The key names what makes two servers' pairs interchangeable: the models, the sampling
settings and the seed, and for a model behind an endpoint what it is served as
(`model_name`, `api_base`) and the settings it really samples with (its
recommended_config over the command's).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from annotate.pairs import Pair, pair_from_row, pair_to_row
from trainer.rows import BadRow, check_values, load_json


def cache_file(
    cache_dir: str | os.PathLike | None,
    model_names: list[str],
    sampling: dict[str, Any],
    seed: int,
    endpoints: dict[str, Any] | None = None,
) -> Path | None:
    """The cache file for these models and settings; None without a cache directory.
    `endpoints`: display name -> trainer.endpoint_client.EndpointModel (or Endpoint)."""
    if not cache_dir:
        return None
    what: list[Any] = [sorted(model_names), sampling, seed]
    served = {}
    for name in sorted(endpoints or {}):
        if name in model_names:
            ep = getattr(endpoints[name], "endpoint", endpoints[name])
            settings = ep.sampling(sampling["temperature"], sampling["top_p"], sampling["max_new_tokens"])
            served[name] = [ep.model_name, ep.api_base, settings]
    if served:  # only then: in-process models keep the files earlier servers wrote
        what.append(served)
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"generated-{key}.jsonl"


def read_pairs(path: Path | None) -> list[Pair]:
    """The pairs in the file, in order; none if it is missing. A torn last line (a server
    killed mid-write) or any line that is no pair is skipped: the file is a cache."""
    if path is None or not path.is_file():
        return []
    pairs = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            row = load_json(raw)
            check_values(row)
            pairs.append(pair_from_row(row))
        except (BadRow, UnicodeDecodeError):
            continue
    return pairs


def append_pairs(path: Path | None, pairs: list[Pair]) -> None:
    """Append the pairs, fsync'd; after a torn last line they start on a line of their own."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(pair_to_row(p), ensure_ascii=False) + "\n" for p in pairs)
    with open(path, "a+b") as f:  # appends go to the end whatever we read
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a server killed mid-write left a torn line
                data = "\n" + data
        f.write(data.encode())
        f.flush()
        os.fsync(f.fileno())
