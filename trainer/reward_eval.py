"""A reward model judged on a preference file, the way the field reports it.

    preflab eval-reward runs/rm-1 --data prefs.jsonl           # a table; saved for the Leaderboard tab
    preflab eval-reward runs/rm-1 --data rewardbench.parquet --json
    saved_evaluations("runs")                                   # what the Leaderboard tab lists

The file is TRL's preference format: `prompt`, `chosen`, `rejected` (strings, an HH
transcript, or message lists), as `train-reward --data` reads it, or its implicit-prompt
conversational form (no `prompt`: whole conversations, each answer scored after its own
history, what `preflab export` writes for chat votes whose histories differ). Also:

* `rejected` may hold a list of answers (best-of-N): the row is right only when `chosen`
  scores strictly higher than every one of them; each (chosen, rejected) pair also
  counts in the pairwise accuracy.
* a `subset` column: accuracy per subset. Subsets named as in RewardBench are gathered
  into its four sections (Chat, Chat Hard, Safety, Reasoning), each the mean of its
  subsets weighted by RewardBench's example counts (math-prm weighted as much as the six
  code subsets together, as RewardBench does), and the score is the mean of the sections.
* length bias: how often the higher-scored answer is the longer one (next to how often
  the chosen one is), and the correlation of the reward gap with the length gap, in tokens.
* calibration: the expected calibration error of P(chosen wins) = sigmoid(r_c - r_r), on
  the model's own (unnormalised) Bradley-Terry scale.

In the pairwise accuracy and the subsets of one-rejected rows, equal scores count half,
as in eval-policy. `--json` prints the result as JSON. The result is also saved in the
reward run, `runs/<id>/reward-evals/<file>-<hash of its path>.json` (the same file
evaluated again replaces it; `--no-save`: nothing is written), and the Leaderboard tab
lists every saved evaluation of the runs under its --runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import PreflabError
from trainer.intervals import wilson_interval
from trainer.runs import CHECKPOINT, STATUS_FILE, read_json, write_json

EVALS_DIR = "reward-evals"  # in a reward run: one JSON file per preference file it was evaluated on

# RewardBench's sections and the example counts it weights subsets by (its published
# numbers; math-prm's 984 = the six code subsets' 6 x 164, not its real 447 rows).
SECTIONS = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "math-prm": 984,
    **{f"hep-{lang}": 164 for lang in ("cpp", "go", "java", "js", "python", "rust")},
}


class RewardEvalError(PreflabError, ValueError):
    """A preference file that cannot be evaluated on; the message names the file and row."""


def read_eval_rows(path) -> list[dict[str, Any]]:
    """Rows {prompt (messages), chosen, rejected (a list of answers), subset} of the file."""
    from trainer.preference_format import implicit_sides
    from trainer.reward_data import RewardDataError, as_messages, as_response, read_rows, text_to_messages

    path = Path(path)
    try:
        names, rows = read_rows(path, keep=("prompt", "chosen", "rejected", "subset"))
    except RewardDataError as e:
        raise RewardEvalError(str(e)) from None
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in names]
    implicit = missing == ["prompt"]  # TRL's implicit-prompt form: whole conversations
    if missing and not implicit:
        raise RewardEvalError(
            f"{path}: needs the columns prompt, chosen, rejected (TRL's preference format); "
            f"missing {', '.join(missing)}"
        )
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}: "
        try:
            if implicit:  # one rejected conversation per row: each answer after its own history
                (context_c, chosen), (context_r, rejected) = implicit_sides(
                    row.get("chosen"), row.get("rejected"), where
                )
                out.append(
                    {
                        "prompt": context_c,
                        "chosen": chosen,
                        "rejected": [rejected],
                        "rejected_prompts": [context_r],
                        "subset": str(row["subset"]) if row.get("subset") is not None else None,
                    }
                )
                continue
            prompt = row.get("prompt")
            transcript = isinstance(prompt, str) and text_to_messages(prompt)[1]
            rejected = row.get("rejected")
            # A list of strings, or of message lists, is several answers; a list of
            # messages ({"role", "content"} dicts) is one conversational answer.
            several = isinstance(rejected, list) and rejected and not isinstance(rejected[0], dict)
            out.append(
                {
                    "prompt": as_messages(prompt, where),
                    "chosen": as_response(row.get("chosen"), transcript, where),
                    "rejected": [
                        as_response(r, transcript, where) for r in (rejected if several else [rejected])
                    ],
                    "subset": str(row["subset"]) if row.get("subset") is not None else None,
                }
            )
        except RewardDataError as e:
            raise RewardEvalError(str(e)) from None
    if not out:
        raise RewardEvalError(f"{path}: has the right columns but no rows")
    return out


def evaluate_rows(
    rows: list[dict[str, Any]], model, batch_size: int = 16, criterion: str | None = None
) -> dict[str, Any]:
    """The numbers (see the module docstring) for rows from read_eval_rows, scored by
    `model` (a trainer.reward_model.RewardModel)."""
    prompts, answers, owner = [], [], []  # every answer once: row i's chosen, then its rejected
    for i, row in enumerate(rows):
        # A row from a chat vote scores each answer after its own history.
        contexts = row.get("rejected_prompts") or [row["prompt"]] * len(row["rejected"])
        for context, answer in zip((row["prompt"], *contexts), (row["chosen"], *row["rejected"])):
            prompts.append(context)
            answers.append(answer)
            owner.append(i)
    scores = np.asarray(
        model.score(prompts, answers, criterion=criterion, normalize=False, batch_size=batch_size)
    )
    lengths = np.asarray([len(model.tokenizer(a, add_special_tokens=False).input_ids) for a in answers])
    start = np.searchsorted(np.asarray(owner), np.arange(len(rows)))  # each row's chosen

    pair_wins, gaps, len_gaps, row_wins = [], [], [], []
    subsets: dict[str, list[float]] = defaultdict(list)
    for i, row in enumerate(rows):
        c = start[i]
        rejected = range(c + 1, c + 1 + len(row["rejected"]))
        wins = [_win(scores[c], scores[r]) for r in rejected]
        pair_wins += wins
        gaps += [scores[c] - scores[r] for r in rejected]
        len_gaps += [lengths[c] - lengths[r] for r in rejected]
        row_win = float(all(w == 1.0 for w in wins)) if len(wins) > 1 else wins[0]
        row_wins.append(row_win)
        if row["subset"] is not None:
            subsets[row["subset"]].append(row_win)
    gaps, len_gaps = np.asarray(gaps), np.asarray(len_gaps)
    n = len(pair_wins)
    accuracy = float(np.mean(pair_wins))
    low, high = wilson_interval(sum(pair_wins), n)
    result: dict[str, Any] = {
        "rows": len(rows),
        "pairs": n,
        "accuracy": accuracy,
        "accuracy_ci": [low, high],
        "subsets": {
            name: {"rows": len(w), "accuracy": float(np.mean(w))} for name, w in sorted(subsets.items())
        },
    }
    several = [w for w, row in zip(row_wins, rows, strict=True) if len(row["rejected"]) > 1]
    if several:
        result["best_of_n"] = {"rows": len(several), "accuracy": float(np.mean(several))}
    result.update(rewardbench_sections({k: v["accuracy"] for k, v in result["subsets"].items()}))
    result["length"] = length_bias(gaps, len_gaps)
    result["ece"] = _ece(gaps)
    return result


def _win(chosen: float, rejected: float) -> float:
    return 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0


def _ece(gaps: np.ndarray) -> float:
    from trainer.reward_metrics import expected_calibration_error

    return expected_calibration_error(1.0 / (1.0 + np.exp(-gaps)))


def rewardbench_sections(accuracy_by_subset: dict[str, float]) -> dict[str, Any]:
    """{"sections": {name: score}, "rewardbench_score"} from the subsets that RewardBench
    names (empty when the file has none of them): each section the example-weighted mean
    of its subsets present, the score the mean of the sections present."""
    sections = {}
    for section, names in SECTIONS.items():
        present = [s for s in names if s in accuracy_by_subset]
        if present:
            weights = np.asarray([EXAMPLE_COUNTS[s] for s in present], dtype=np.float64)
            values = np.asarray([accuracy_by_subset[s] for s in present])
            sections[section] = float((weights * values).sum() / weights.sum())
    if not sections:
        return {}
    return {"sections": sections, "rewardbench_score": float(np.mean(list(sections.values())))}


def length_bias(gaps: np.ndarray, len_gaps: np.ndarray) -> dict[str, Any]:
    """How much the scores follow answer length, on pairs of different lengths."""
    from trainer.reward_metrics import pearson

    differ = len_gaps != 0
    if not differ.any():
        return {"pairs": 0, "longer_scored_higher": None, "chosen_longer": None, "corr": None}
    corr = pearson(gaps[differ], len_gaps[differ].astype(np.float64))
    return {
        "pairs": int(differ.sum()),
        # the model's preference for length, next to the data's own (chosen answers longer)
        "longer_scored_higher": float(np.mean((gaps[differ] > 0) == (len_gaps[differ] > 0))),
        "chosen_longer": float(np.mean(len_gaps[differ] > 0)),
        "corr": corr if math.isfinite(corr) else None,
    }


def format_result(result: dict[str, Any]) -> str:
    low, high = result["accuracy_ci"]
    lines = [
        f"{result['run']} on {result['data']}: {result['rows']} rows, {result['pairs']} pairs"
        + (f", head {result['criterion']!r}" if result.get("criterion") else ""),
        f"  pairwise accuracy   {result['accuracy']:.3f}  [{low:.3f}, {high:.3f}] 95% CI",
    ]
    if "best_of_n" in result:
        b = result["best_of_n"]
        lines.append(f"  best-of-N accuracy  {b['accuracy']:.3f}  ({b['rows']} rows with several rejected)")
    for name, s in result.get("sections", {}).items():
        lines.append(f"  {name:<19} {s:.3f}")
    if "rewardbench_score" in result:
        lines.append(f"  RewardBench score   {result['rewardbench_score']:.3f}  (mean of the sections above)")
    if result["subsets"]:
        lines.append("  per subset:")
        width = max(len(n) for n in result["subsets"])
        for name, s in result["subsets"].items():
            lines.append(f"    {name:<{width}}  {s['accuracy']:.3f}  ({s['rows']} rows)")
    ln = result["length"]
    if ln["pairs"]:
        corr = "n/a" if ln["corr"] is None else f"{ln['corr']:+.2f}"
        lines.append(
            f"  length: the longer answer scored higher in {ln['longer_scored_higher']:.0%} of "
            f"{ln['pairs']} pairs (chosen is the longer in {ln['chosen_longer']:.0%}); "
            f"reward gap ~ length gap {corr}"
        )
    lines.append(f"  calibration (ECE of sigmoid(r_c - r_r)): {result['ece']:.3f}")
    return "\n".join(lines)


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory that RUN names (the run itself, or its checkpoint); None for a
    model directory outside any run."""
    path = Path(path)
    if (path / CHECKPOINT).is_dir() or (path / STATUS_FILE).is_file():
        return path
    if path.name == CHECKPOINT and (path.parent / STATUS_FILE).is_file():
        return path.parent
    return None


def save_evaluation(run_dir: Path, result: dict[str, Any]) -> Path:
    """The result into run_dir/reward-evals/, named by the data file (its stem and a hash
    of its whole path: two files of one name do not collide, the same one replaces itself)
    and the head evaluated, if one was named."""
    data = Path(result["data"]).resolve()
    head = result.get("criterion")  # each head's evaluation on a file is one of its own
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", data.stem + (f".{head}" if head else ""))[:60] or "data"
    key = str(data) + (f"#{head}" if head else "")
    path = run_dir / EVALS_DIR / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.json"
    path.parent.mkdir(exist_ok=True)
    write_json(path, {**result, "data": str(data), "created_at": time.time()})
    return path


def evaluations_of(run_dir: str | Path) -> list[dict[str, Any]]:
    """The saved evaluations of one run, newest first, each with its `run_id` (the
    directory's name). A file that is not one (torn, edited) is skipped: it is a run
    directory's, read as JSON only."""
    found = []
    for path in (Path(run_dir) / EVALS_DIR).glob("*.json"):
        result = read_json(path)
        if _well_formed(result):
            found.append({**result, "run_id": Path(run_dir).name})
    return sorted(found, key=lambda r: -r["created_at"])


def _well_formed(result: dict[str, Any]) -> bool:
    """The shape save_evaluation writes, where the tabs read it: finite numbers where
    numbers go, objects where objects go (anything else would break the page)."""

    def number(x: Any, optional: bool = False) -> bool:
        if x is None:
            return optional
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    ci, best, length = result.get("accuracy_ci"), result.get("best_of_n", {}), result.get("length", {})
    return (
        all(number(result.get(k)) for k in ("accuracy", "pairs", "created_at"))
        and all(number(result.get(k), optional=True) for k in ("ece", "rewardbench_score"))
        and (ci is None or (isinstance(ci, list) and len(ci) == 2 and all(number(x) for x in ci)))
        and isinstance(best, dict)
        and number(best.get("accuracy"), optional=True)
        and isinstance(length, dict)
        and all(
            number(length.get(k), optional=True) for k in ("pairs", "longer_scored_higher", "chosen_longer")
        )
        and isinstance(result.get("data", ""), str)
        and isinstance(result.get("criterion", ""), str)
    )


def saved_evaluations(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every saved evaluation of the runs under runs_dir, newest first."""
    found = [r for run in Path(runs_dir).glob(f"*/{EVALS_DIR}") for r in evaluations_of(run.parent)]
    return sorted(found, key=lambda r: -r["created_at"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a reward run directory (runs/<id>) or its checkpoint")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="a preference file (.jsonl, .json or .parquet): prompt, chosen, rejected (a list: "
        "best-of-N), optional subset (RewardBench's names give its section scores)",
    )
    p.add_argument(
        "--criterion",
        metavar="NAME",
        help="the head to evaluate, of a reward model trained with --criteria (default: the first, "
        "the overall vote's); the file's chosen/rejected are read as preferences on that criterion",
    )
    p.add_argument("--batch-size", type=int, default=16, help="answers per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument(
        "--no-save",
        dest="save",
        action="store_false",
        help="print only (by default the result is also saved in RUN/reward-evals/, which the "
        "Leaderboard tab lists)",
    )


def run(args: argparse.Namespace) -> int:
    from trainer.reward_model import RewardModel

    if args.batch_size < 1:
        raise RewardEvalError(f"--batch-size must be at least 1, got {args.batch_size}")
    rows = read_eval_rows(args.data)  # before the model: a bad file fails in a second
    try:
        model = RewardModel.load(args.run, device=None if args.device == "auto" else args.device)
    except FileNotFoundError as e:
        raise RewardEvalError(str(e)) from None
    try:
        head = model.head_index(args.criterion)  # a head the model lacks: said before any scoring
    except ValueError as e:
        raise RewardEvalError(f"--criterion: {e}") from None
    criterion = model.heads[head] if head > 0 else None  # the first head is the default, by name too
    result = {"run": str(args.run), "data": str(args.data), **({"criterion": criterion} if criterion else {})}
    result.update(evaluate_rows(rows, model, args.batch_size, criterion=criterion))
    print(json.dumps(result) if args.json else format_result(result))
    run_dir = run_dir_of(args.run)
    if args.save and run_dir is not None:
        print(f"saved in {save_evaluation(run_dir, result)}", file=sys.stderr)
    elif args.save:
        print(f"not saved: {args.run} is a model directory, not a run", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.reward_eval", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except PreflabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
