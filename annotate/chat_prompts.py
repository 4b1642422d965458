"""The prompts annotators wrote in chat mode, as a prompt pool for the next round.

    pool = chat_prompt_pool(votes)          # votes: standing votes (gen_params, prompt, prompt_id)
    write_chat_prompts(votes, path)         # the same as JSON lines: {"id", "messages", "tags"}

A chat vote (record schema version 3) says in `gen_params.chat.prompt_source` whether
its conversation opened with a prompt the annotator typed ("annotator") or one drawn from
the pool ("pool"); only the typed ones are new, so only they are kept. The prompt is the
vote's `prompt` field, the conversation's opening (the system message if any and the
first user message): a pool prompt is answered without history, so the later user turns,
which lean on what was said before, are not prompts of their own. Each prompt once (by
its messages), in the order of its first vote; the file is what trainer/prompts.py's
`load_prompt_pool` reads, so `serve --prompts chat-prompts.jsonl` or `generate` take it
as it is. The admin download is the Dashboard's (annotate/service.py, downloads.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

FILE_NAME = "chat-prompts.jsonl"
COLUMNS = ["prompt", "prompt_id", "gen_params", "created_at", "event_id"]


def _prompt_source(gen_params: str | None) -> str | None:
    if not gen_params:
        return None
    try:
        chat = json.loads(gen_params).get("chat")
    except (json.JSONDecodeError, AttributeError):
        return None  # a foreign store's gen_params: no chat vote of ours
    return chat.get("prompt_source") if isinstance(chat, dict) else None


def chat_prompt_pool(votes: pa.Table) -> list[dict[str, Any]]:
    """[{"id", "messages", "tags": ["chat"]}] of the prompts annotators wrote, each once."""
    missing = [c for c in ("prompt", "prompt_id", "gen_params") if c not in votes.column_names]
    if missing:
        raise ValueError(f"chat_prompt_pool needs the vote columns {', '.join(missing)}")
    if "created_at" in votes.column_names and "event_id" in votes.column_names:
        votes = votes.take(pc.sort_indices(votes, [("created_at", "ascending"), ("event_id", "ascending")]))
    pool, seen = [], set()
    for row in votes.select(["prompt", "prompt_id", "gen_params"]).to_pylist():
        if _prompt_source(row["gen_params"]) != "annotator" or row["prompt"] in seen:
            continue
        seen.add(row["prompt"])  # canonical JSON: one spelling per distinct prompt
        pool.append({"id": row["prompt_id"], "messages": json.loads(row["prompt"]), "tags": ["chat"]})
    return pool


def write_chat_prompts(votes: pa.Table, path: str | os.PathLike) -> int:
    """Write the pool as JSON lines at `path` (0600: annotators' own words); returns how
    many prompts it holds."""
    pool = chat_prompt_pool(votes)
    path = Path(path)
    with open(path, "w", encoding="utf-8", opener=lambda name, flags: os.open(name, flags, 0o600)) as f:
        for prompt in pool:
            f.write(json.dumps(prompt, ensure_ascii=False) + "\n")
    return len(pool)
