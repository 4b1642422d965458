"""Each policy's reward-model win rate over its reference (runs/<id>/eval.json, written by
`preflab eval-policy`) beside the humans' head-to-head win rate of the same two models
from the votes: does the reward model's verdict hold up with people?

    from annotate.policy_evals import policy_evals, evals_table
    evals = policy_evals("runs", votes)     # [{"policy", "reference", "rm_win_rate", ..., "human"}]
    print(evals_table(evals))

In the arena a policy's answers carry its run id as model id, so the human side is
head_to_head(votes, policy, reference). Used by `preflab leaderboard --runs` and the
Leaderboard tab.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trainer.runs import EVAL_FILE

log = logging.getLogger("preflab.leaderboard")


def head_to_head(votes: pa.Table | None, model_x: str, model_y: str, both_bad: str = "tie") -> dict[str, Any]:
    """Human win rate of model_x over model_y (ties 0.5) with a 95% Wilson interval.

    Counts every standing vote whose two sides are x and y, in either order. n is the
    number of votes used; win_rate and ci are None when n is 0.
    """
    from trainer.evaluate import wilson_interval

    wins = losses = ties = 0
    if votes is not None and votes.num_rows:
        a, b, choice = votes["model_a"], votes["model_b"], votes["choice"]
        x_is_a = pc.and_(pc.equal(a, model_x), pc.equal(b, model_y))
        x_is_b = pc.and_(pc.equal(a, model_y), pc.equal(b, model_x))

        def count(mask, value):
            return int(pc.sum(pc.and_(mask, pc.equal(choice, value))).as_py() or 0)

        wins = count(x_is_a, "a") + count(x_is_b, "b")
        losses = count(x_is_a, "b") + count(x_is_b, "a")
        ties = count(x_is_a, "tie") + count(x_is_b, "tie")
        if both_bad == "tie":
            ties += count(x_is_a, "both_bad") + count(x_is_b, "both_bad")
    n = wins + losses + ties
    if n == 0:
        return {
            "model": model_x,
            "opponent": model_y,
            "n": 0,
            "wins": 0,
            "losses": 0,
            "ties": 0,
            "win_rate": None,
            "ci": None,
        }
    points = wins + 0.5 * ties
    low, high = wilson_interval(points, n)
    return {
        "model": model_x,
        "opponent": model_y,
        "n": n,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": points / n,
        "ci": [low, high],
    }


EVAL_KEYS = ("policy", "reference", "prompts", "rm_win_rate", "rm_win_rate_ci", "reward_run")


def policy_evals(runs_dir: str | os.PathLike, votes: pa.Table | None) -> list[dict[str, Any]]:
    """Every runs/<run_id>/eval.json (a policy's reward-model win rate over its reference
    on held-out prompts) next to the humans' head-to-head win rate of the same two models.

    In the arena a policy's answers carry its run id as model id, so the human side is
    head_to_head(votes, policy, reference). A file that cannot be read is skipped with a
    warning naming it.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob(f"*/{EVAL_FILE}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            missing = [k for k in EVAL_KEYS if k not in record]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (OSError, ValueError) as e:
            log.warning("%s: skipped (%s)", path, e)
            continue
        entry = {k: record[k] for k in EVAL_KEYS}
        entry["file"] = str(path)  # not "path": gradio takes a dict with "path" for a file to send
        entry["human"] = head_to_head(votes, str(record["policy"]), str(record["reference"]))
        out.append(entry)
    return out


def _pct(x: float | None) -> str:
    """A share as a percentage with one decimal, a dash for none: what
    annotate.web.html.pct(x, 1) gives, without this layer importing the web layer."""
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def human_text(h: dict[str, Any]) -> str:
    if not h["n"]:
        return "no votes yet"
    return f"{_pct(h['win_rate'])} ({_pct(h['ci'][0])}–{_pct(h['ci'][1])}, n={h['n']})"


def rm_text(e: dict[str, Any]) -> str:
    ci = e.get("rm_win_rate_ci") or [None, None]
    return f"{_pct(e['rm_win_rate'])} ({_pct(ci[0])}–{_pct(ci[1])}, {e['prompts']} prompts)"


def evals_table(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return "no policy evaluations (runs/<id>/eval.json) found"
    rows = [("policy", "reference", "reward model win rate", "human win rate")]
    rows += [(e["policy"], e["reference"], rm_text(e), human_text(e["human"])) for e in evals]
    widths = [max(len(str(r[c])) for r in rows) for c in range(4)]
    return "\n".join("  ".join(f"{str(v):<{w}}" for v, w in zip(r, widths)).rstrip() for r in rows)
