"""The arena's added models: finished policies served next to the models the server
started with.

    add_to_arena(generator, state_dir, launcher, "policy-1")   # serve runs/policy-1/policy as "policy-1"
    restore_arena(generator, state_dir)                        # at startup: the same models again
    in_arena(generator, "policy-1")
    arena_name("runs/policy-1/policy")                         # "policy-1": serve --model names it so too
    arena_name("runs/policy-1")                                # "policy-1" as well

`add_to_arena` puts a finished policy (runs/<id>/policy) into the running Generator under
the name <id> (votes on its answers carry that model id), and records it in
<state>/arena.json so that a restarted server with the same --data serves it again
(`restore_arena`). <state> is the server's local state directory (`ServeContext.state_dir`):
the store directory itself for a directory store; for a PostgreSQL store, a local
directory of the server's (arena.json is server state, not a vote and not a run file).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from annotate.launcher import Launcher, LaunchError
from trainer.runs import (
    POLICY_DIR,
    RunDir,
    RunDirError,
    is_model_dir,
    policy_model_path,
    read_json,
    write_json,
)

ARENA_FILE = "arena.json"


def arena_name(source: str) -> str:
    """The name votes record for a model given to `serve --model`: a policy run's
    finished policy (runs/<id>/policy, or runs/<id>) is its run id, as "Add to arena" names it, so the
    leaderboard and the reward-model-vs-humans table agree on it; anything else its
    canonical name (the default model's aliases become its full id)."""
    from trainer.models import canonical_name

    path = Path(source).expanduser().resolve()
    try:
        path = policy_model_path(path) or path  # the run directory: resolve_model serves its policy/
    except RunDirError:
        pass  # no finished policy: resolve_model refuses it and says why
    if path.name == POLICY_DIR and is_model_dir(path) and RunDir(path.parent).kind() == "policy":
        return path.parent.name
    return canonical_name(source)


def arena_file(state_dir: str | os.PathLike) -> Path:
    """<state_dir>/arena.json. state_dir is the server's local state directory
    (`ServeContext.state_dir`), never a store URL: arena.json is a file, not a vote."""
    from trainer.store import is_database

    if is_database(state_dir):
        raise ValueError("the arena is kept in a local state directory, not in a database URL")
    return Path(state_dir) / ARENA_FILE


def read_arena(state_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The models added to the arena of this server: [{"model_id", "path", "added_at"}]."""
    models = read_json(arena_file(state_dir)).get("models")
    return (
        [m for m in models if isinstance(m, dict) and m.get("model_id") and m.get("path")]
        if isinstance(models, list)
        else []
    )


def add_to_arena(generator, state_dir: str | os.PathLike, launcher: Launcher, run_id: str) -> str:
    """Put the finished policy of run `run_id` into the arena (votes on it carry the
    model id `run_id`) and remember it in <state_dir>/arena.json. Returns a message; raises
    LaunchError when it cannot be done."""
    info = launcher.info(run_id or "")
    if info is None:
        raise LaunchError(f"Run: there is no run {run_id!r}")
    if not info.servable:
        raise LaunchError(
            f"{run_id} is not a finished policy run (kind {info.kind}, state {info.state}); "
            f"only a done policy run has a model to serve"
        )
    if generator is None:
        raise LaunchError(
            f"This server shows pairs from a file (serve --pairs): no model generates answers here, so the "
            f"arena cannot take a model. To compare this policy, restart with "
            f"`preflab serve --model smollm2 --model {info.path / POLICY_DIR}` "
            f"(or generate a pairs file with `preflab generate`)."
        )
    path = info.path / POLICY_DIR
    try:
        added = generator.add_model(path, run_id)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if not added:
        return f"{run_id} is already in the arena"
    file = arena_file(state_dir)
    models = [m for m in read_arena(state_dir) if m["model_id"] != run_id]
    models.append({"model_id": run_id, "path": str(path), "added_at": time.time()})
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, {"models": models})
    names = ", ".join(generator.model_names)
    return f"{run_id} joined the arena ({len(generator.model_names)} models: {names}); its pairs are being generated"


def restore_arena(generator, state_dir: str | os.PathLike) -> list[str]:
    """At startup: put the models of <state_dir>/arena.json back into the arena. Returns notes
    (one per model, and one per model that could not be restored)."""
    notes = []
    for m in read_arena(state_dir):
        try:
            if generator.add_model(m["path"], m["model_id"]):
                notes.append(f"arena: {m['model_id']} ({m['path']}) from {arena_file(state_dir)}")
        except ValueError as e:
            notes.append(f"arena: {m['model_id']} left out: {e}")
    return notes


def in_arena(generator, run_id: str) -> bool:
    return generator is not None and run_id in getattr(generator, "model_names", ())
