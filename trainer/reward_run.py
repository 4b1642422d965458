"""The bookkeeping of a reward run around its loop (trainer/reward.py): the data it
trains on, snapshotted into the run directory, what it reports about that data, the
summary it ends with, and the one process-wide setting it runs under.

    with cudnn_attention_off():                                       # around the whole run
        pairs, train_idx, val_idx, summary = snapshot_data(cfg, run, resuming, accelerator)
        report_data(summary, len(pairs), len(train_idx), len(val_idx), cut_note)   # main process
        train_idx, mean_weight, note = weigh_training_pairs(cfg, pairs, train_idx)  # --weights
        ...                                                                        # the loop
        return finish_done(run, main, step=step, ..., peak_mb=peak_memory_mb(device))  # exit 0

torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

from trainer.criteria import parse_criteria
from trainer.pair_snapshot import load_snapshot, save_snapshot
from trainer.reward_config import RewardConfig
from trainer.reward_data import RewardDataError, read_pairs, split_by_prompt
from trainer.runs import CHECKPOINT, CONFIG_FILE, SNAPSHOT_FILE, Run, read_json, write_json


@contextlib.contextmanager
def cudnn_attention_off():
    """cuDNN's attention kernels off for the code inside, then as they were."""
    # cuDNN's attention kernels build an execution plan for every new input shape (about
    # 0.1 s of CPU each), and length-grouped batches bring a new shape nearly every step:
    # on an H100 that doubled the step time of SmolLM2-135M. Flash and memory-efficient
    # attention need no plan. Process-wide, so restored afterwards.
    import torch

    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def snapshot_data(cfg: RewardConfig, run: Run, resuming: bool, accelerator) -> tuple:
    """The pairs and the train/val split every process (and every resume) trains on:
    read from --data and saved in the run directory with config.json (main process), or,
    on a resume, the saved snapshot. Returns (pairs, train_idx, val_idx, data summary)."""
    main = accelerator.is_main_process
    snapshot = run.path / SNAPSHOT_FILE
    if not (resuming and snapshot.exists()):
        if not cfg.data:
            raise RewardDataError("no data: pass --data (a comparison store or a preference file)")
        pairs = read_pairs(
            cfg.data,
            ties=cfg.ties,
            both_bad=cfg.both_bad,
            margin=cfg.margin,
            margin_scale=cfg.margin_scale,
            weights=cfg.weights,
            exclude_flagged=cfg.exclude_flagged,
            criteria=parse_criteria(cfg.criteria),
            judges=cfg.judges,
        )
        train_idx, val_idx = split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
        summary = pairs.summary
        if main:
            save_snapshot(pairs, train_idx, val_idx, snapshot)
            # A database password never goes to disk: the saved --data has it taken out (a
            # resume gets it from PGPASSWORD or ~/.pgpass, as libpq does).
            from trainer.store import without_password

            saved = {
                **dataclasses.asdict(cfg),
                "data": without_password(cfg.data)[0] if cfg.data else cfg.data,
            }
            write_json(
                run.path / CONFIG_FILE,
                {"kind": "reward", "config": saved, "data": summary, "created_at": time.time()},
            )
    accelerator.wait_for_everyone()
    summary = read_json(run.path / CONFIG_FILE).get("data", {})
    # Every process (and every resume) trains on the snapshot: the same pairs, the same split.
    pairs, train_idx, val_idx = load_snapshot(snapshot, summary)
    if len(val_idx) == 0 and main:
        prompts = len(set(pairs.groups))  # what the split keeps together
        if cfg.val_fraction == 0:
            why = "--val-fraction 0"
        elif prompts < 2:
            why = "all pairs share one prompt, and a prompt is never split"
        else:
            why = f"{len(pairs)} pairs x --val-fraction {cfg.val_fraction} rounds to none"
        print(
            f"warning: no validation pairs ({why}): metrics and normalisation use the training pairs",
            file=sys.stderr,
        )
    return pairs, train_idx, val_idx, summary


def report_data(summary: dict, n_pairs: int, n_train: int, n_val: int, cut_note: str) -> None:
    """The two lines on stderr that say what the run trains on and what was cut."""
    s = summary
    votes = (
        (
            f"; of {s['votes']} votes, {s['ties']} ties were {s['ties_mode']}d and "
            f"{s['both_bad']} both-bad {s['both_bad_mode']}d"
        )
        if s.get("kind") == "store"
        else ""
    )
    print(
        f"data: {n_pairs} pairs ({n_train} train / {n_val} val, split by prompt) "
        f"from {s.get('source')}{votes}",
        file=sys.stderr,
    )
    if (s.get("judges") or {}).get("note"):  # trainer/judges.py: what --judges did
        print(f"judges: {s['judges']['note']}", file=sys.stderr)
    print(f"truncation: {cut_note}", file=sys.stderr)


def eval_line(step: int, record: dict) -> str:
    """An evaluation in one line of the log (and per head, for a multi-head run)."""
    r = record
    line = (
        f"eval @ step {step}: acc {r['val_acc']:.3f} (95% CI {r['val_acc_low']:.2f}-"
        f"{r['val_acc_high']:.2f}, {r['val_pairs']} {r['split']} pairs)  loss {r['val_loss']:.4f}  "
        f"ece {r['val_ece']:.3f}  reward {r['reward_mean']:+.3f}±{r['reward_std']:.3f}  "
        f"length corr {r['length_corr']:+.2f} (headers {r.get('headers_corr', 0):+.2f}, "
        f"lists {r.get('lists_corr', 0):+.2f}, bold {r.get('bold_corr', 0):+.2f})"
    )
    heads = r.get("heads") or {}
    return line + "".join(
        f"\n  head {h}: acc {v['val_acc']:.3f} on {v['val_pairs']} pairs" for h, v in heads.items()
    )


FEW_VALIDATION_PAIRS = 50  # below this an accuracy is an estimate with a wide interval


def accuracy_words(final: dict) -> str:
    """The final accuracy as a claim the data can carry: with its interval, on how many
    pairs; none at all without validation pairs (then it is the training pairs' own)."""
    acc, n = final.get("val_acc", float("nan")), final.get("val_pairs", 0)
    interval = (
        f"95% CI {final.get('val_acc_low', float('nan')):.2f}-{final.get('val_acc_high', float('nan')):.2f}"
    )
    if final.get("split") == "train":
        return f"no validation pairs, so no validation accuracy (on its own training pairs: {acc:.3f})"
    words = f"validation accuracy {acc:.3f} ({interval}, {n} pairs)"
    if n < FEW_VALIDATION_PAIRS:
        words += f"; fewer than {FEW_VALIDATION_PAIRS} validation pairs: an estimate, not a verdict"
    return words


def finish_done(
    run: Run,
    main: bool,
    *,
    step: int,
    total_steps: int,
    pairs_seen: int,
    train_seconds: float,
    train_cpu_seconds: float,
    peak_mb: float,
    prompts_cut: int,
    responses_cut: int,
    final_eval: dict,
    norm: dict,
    t_start: float,
    **extra,
) -> int:
    """The run's "summary" record and its state `done`, once the model is saved; exit code 0.
    `extra`: more of the run's settings the summary should show (e.g. weights)."""
    run.log(
        {
            "kind": "summary",
            "step": step,
            "train_pairs": pairs_seen,
            "train_seconds": round(train_seconds, 3),
            "train_pairs_per_s": round(pairs_seen / train_seconds, 3) if train_seconds else None,
            "train_cpu_seconds": round(train_cpu_seconds, 3),
            "peak_memory_mb": round(peak_mb, 1),
            "prompts_cut": prompts_cut,
            "responses_cut": responses_cut,
            **final_eval,
            **norm,
            "wall_s": round(time.time() - t_start, 2),
            **extra,
        }
    )
    msg = f"done: {step} steps, {accuracy_words(final_eval)}; checkpoint in {run.path / CHECKPOINT}"
    run.status("done", 1.0, msg, step=step, total_steps=total_steps)
    if main:
        print(msg, file=sys.stderr)
    return 0


def weigh_training_pairs(cfg: RewardConfig, pairs, train_idx):
    """(training pairs to step on, their mean weight, a line saying what --weights did).
    The weights came with the pairs (computed from all the store's votes before the
    split, trainer/reward_data.py); here the training pairs of weight 0 are left out of
    the batches: they would add nothing to the loss but the time to compute it, and a
    batch of nothing but them would be a step of zero gradient. Validation keeps every
    pair and stays unweighted: it measures the model against all the votes as cast."""
    import numpy as np

    from trainer.store import describe

    weights = np.asarray(pairs.weight, dtype=np.float64)
    if cfg.weights == "none":
        return train_idx, 1.0, ""
    keep = train_idx[weights[train_idx] > 0]
    if len(keep) == 0:
        raise RewardDataError(
            f"--weights {cfg.weights} gives all {len(train_idx)} training votes weight 0 "
            f"(see `preflab annotators --data {describe(cfg.data)}`); use --weights none"
        )
    mean = float(weights[keep].mean())
    info = (pairs.summary.get("weights") or {}).get("per_annotator", {})
    per = ", ".join(f"{name} {w:.2f}" for name, w in sorted(info.items(), key=lambda x: -x[1]))
    note = (
        f"--weights {cfg.weights}: {len(train_idx) - len(keep)} of {len(train_idx)} training votes "
        f"have weight 0 and are left out; mean weight of the rest {mean:.3f}"
        + (f"; per annotator: {per}" if per else "")
    )
    return keep, mean, note
