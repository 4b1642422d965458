"""Fit a Bradley-Terry reward model to the votes: the training script.

    preflab train-reward --data comparisons/ --run-dir runs/rm-1
    python -m trainer.reward --data prefs.parquet --model tiny --epochs 2
    accelerate launch -m trainer.reward --data comparisons/ ...   # several GPUs (DDP)

Read top to bottom: `train`, then the data (read, split by prompt, snapshotted), the
model, the tokens, batches and schedule, the loop, the final evaluation and save; the
command line last. Elsewhere:

    trainer/reward_config.py    the settings (RewardConfig): defaults, --help, checks, resume rules
    trainer/reward_model.py     the model (RewardModel, reward_net, packed attention, saving)
    trainer/reward_metrics.py   the loss (preference_loss) and the validation metrics
    trainer/reward_data.py      pairs from a store or a file, the split, the snapshot
    trainer/reward_batches.py   tokens (prompt cut from the left), packing, batches by length
    trainer/reward_state.py     the precision (fp32 master weights), training_state.pt: written, restored
    trainer/reward_run.py       the data snapshot, the data report, the summary; cuDNN attention off
    trainer/checkpoints.py      crash-safe checkpoint swaps and the RNG state of a resume

Where the speed comes from (see bench/reward_vs_trl.py):
  * shared-prompt packing (reward_data.pack): each pair is one segment
    [prompt | chosen | rejected] with an attention mask that hides chosen from rejected
    and position ids that restart after the prompt: the prompt runs once, not twice, and
    the shorter answer is never padded to the longer one. Exact: the same numbers as
    scoring each prompt + answer on its own (tested);
  * batches grouped by length, so rows are nearly full (~5% padding);
  * the head on the 2B read-out vectors only; fused AdamW; bf16 autocast + TF32 on CUDA.

A run directory (trainer/runs.py) holds:
    config.json       the run's settings and what was read
    status.json       {"state": queued|running|done|failed|cancelled, "progress": 0..1, "message"}
    metrics.jsonl     one JSON object per optimizer step ("kind": "train"), per evaluation
                      ("eval"), and a final "summary"
    data.parquet      the exact pairs and train/val split (a resume reads this, not the store)
    checkpoint/       a Hugging Face model directory + tokenizer + preflab_reward.json (the
                      normalisation gain/bias) + training_state.pt (optimizer, scheduler,
                      step, RNG) while the run can still be resumed

SIGTERM (or Ctrl-C) saves and stops with state `cancelled`; the same command again
resumes from the saved step. A NaN/inf loss stops with state `failed` and leaves the last
good checkpoint untouched.

torch / transformers are imported inside functions so that `preflab --help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time

import numpy as np

from trainer.checkpoints import CheckpointError
from trainer.config import add_config_arguments, script_config, script_main
from trainer.criteria import heads_of
from trainer.reward_batches import collate, encode_pairs, length_grouped_batches, pack
from trainer.reward_config import RewardConfig, resolve_config
from trainer.reward_data import RewardDataError
from trainer.reward_metrics import (
    evaluate,
    head_norms,
    normalisation,
    own_head,
    preference_loss,
    style_penalty,
    to_device,
)
from trainer.reward_model import load_for_training, reward_meta, save_checkpoint, use_packed_attention
from trainer.reward_run import (
    cudnn_attention_off,
    eval_line,
    finish_done,
    report_data,
    snapshot_data,
    weigh_training_pairs,
)
from trainer.reward_state import (
    choose_precision,
    fp32_masters,
    masters_in_place,
    restore_training_state,
    training_state,
)
from trainer.runs import (
    CONFIG_FILE,
    STATE_FILE,
    Run,
    peak_memory_mb,
    read_json,
    supervise,
    write_json,
)
from trainer.store.errors import StoreError


def train(cfg: RewardConfig | dict, explicit: set[str] | None = None) -> int:
    """Run (or resume) one reward-model training. Returns the process exit code:
    0 done, 1 failed, 2 bad input, 128 + signal when cancelled."""
    if isinstance(cfg, dict):
        explicit = set(cfg) if explicit is None else explicit
        cfg = RewardConfig(**cfg)
    explicit = {f.name for f in dataclasses.fields(RewardConfig)} if explicit is None else explicit
    named = bool(cfg.run_dir)  # the caller named the run directory: a failure is recorded there
    cfg, run_path, resuming = resolve_config(cfg, explicit)

    def train_without_cudnn_attention(run, accelerator, stop):
        with cudnn_attention_off():
            return _train(cfg, run, accelerator, resuming, stop)

    # A store that cannot be read (missing, database down) is bad input too: its message
    # names the store and says what to do, as the run's status and one line of the log.
    return supervise(
        run_path,
        cfg.device,
        cfg.check,  # the config's own check is the only validator
        train_without_cudnn_attention,
        (RewardDataError, StoreError, CheckpointError),
        keep_failed=named,
    )


def _train(cfg: RewardConfig, run: Run, accelerator, resuming: bool, stop: dict) -> int:
    t_start = time.time()
    main = accelerator.is_main_process
    ckpt = run.checkpoint()
    resuming = resuming and ckpt is not None and (ckpt / STATE_FILE).exists()
    run.status("queued", 0.0, "reading the data")

    # ---- data, before any model is loaded: bad input fails in seconds -------------------
    pairs, train_idx, val_idx, summary = snapshot_data(cfg, run, resuming, accelerator)
    train_idx, mean_weight, weight_note = weigh_training_pairs(cfg, pairs, train_idx)

    # ---- model ---------------------------------------------------------------------------
    import torch

    device = accelerator.device  # cuda:<local rank> under `accelerate launch`, else cuda or cpu
    cuda = device.type == "cuda"
    if cuda:
        # TF32 matmuls for whatever still runs in fp32 (the head, the loss, the optimizer).
        torch.set_float32_matmul_precision("high")
    lora = cfg.lora_r > 0
    # Mixed: bf16 weights, fp32 masters that the optimizer steps (why: reward_state.py).
    weight_dtype, mixed, precision, autocast = choose_precision(cfg.dtype, lora, cuda)

    run.status("queued", 0.0, f"loading {cfg.model}")
    tokenizer, net, base_source = load_for_training(cfg, ckpt if resuming else None, device, weight_dtype)
    pad_id = tokenizer.pad_token_id
    inner, causal = net.inner, net.causal
    net.train()
    packed = cfg.pack and net.can_pack
    layout = pack if packed else collate
    if packed:
        use_packed_attention(inner)
    if cfg.pack and not packed and accelerator.is_main_process:
        print(
            f"note: shared-prompt packing needs a causal backbone with sdpa or eager attention "
            f"(this one: causal={causal}, {inner.config._attn_implementation}); using plain padding",
            file=sys.stderr,
        )

    # ---- tokens --------------------------------------------------------------------------
    max_length = min(
        cfg.max_length,
        getattr(inner.config.get_text_config(), "max_position_embeddings", None) or cfg.max_length,
    )
    enc = encode_pairs(pairs, tokenizer, max_length)
    cut_note = (
        f"{enc.prompts_cut} of {len(pairs)} pairs had their prompt cut from the left (both answers "
        f"keep the same prompt tail); {enc.responses_cut} answers were longer than --max-length "
        f"{max_length} by themselves and were cut at their end"
    )
    if main:
        report_data(summary, len(pairs), len(train_idx), len(val_idx), cut_note)
        if weight_note:
            print(f"weights: {weight_note}", file=sys.stderr)

    # ---- batches and schedule ------------------------------------------------------------
    world, rank = accelerator.num_processes, accelerator.process_index
    train_lengths = enc.lengths(packed)[train_idx]

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        """This process's batches (pair indices) of an epoch: grouped by length, seeded,
        cut to a multiple of the number of processes so every process steps together."""
        batches = length_grouped_batches(train_lengths, cfg.batch_size, cfg.seed, epoch)
        batches = batches[: len(batches) - len(batches) % world] if world > 1 else batches
        return [train_idx[b] for b in batches[rank::world]]

    per_rank = len(epoch_batches(0))
    if per_rank == 0:
        raise RewardDataError(f"{len(train_idx)} training pairs is fewer than one batch per process")
    steps_per_epoch = math.ceil(per_rank / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = math.ceil(cfg.warmup * total_steps)

    def lr_factor(step: int) -> float:
        """Linear warmup to the peak, then linear decay that reaches 0 after the last step.
        `step` is the 0-based index of the step about to be taken (never a zero-lr step)."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    params = [p for p in net.parameters() if p.requires_grad]
    # What the optimizer steps: the parameters themselves, or their fp32 masters (mixed).
    master = fp32_masters(params, keep_fp32=inner.score.parameters()) if mixed else params
    # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts.
    groups = [
        {"params": [p for p in master if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in master if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel (CUDA) / one vectorised loop (CPU) over all parameters at once.
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cuda", "cpu")
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    step, train_seconds, train_cpu_seconds, pairs_seen = 0, 0.0, 0.0, 0
    norm, last_eval, heads = {"gain": 1.0, "bias": 0.0}, {}, heads_of(cfg.criteria)
    norm_by_head: dict[str, dict] = {}
    if resuming:
        state = restore_training_state(ckpt / STATE_FILE, optimizer, scheduler, lr_factor, cfg.lr)
        step, train_seconds, pairs_seen = state["step"], state["train_seconds"], state["pairs_seen"]
        train_cpu_seconds = state.get("train_cpu_seconds", 0.0)
        norm, last_eval = state.get("norm", norm), state.get("last_eval", {})
        norm_by_head = {h: {k: v[k] for k in ("gain", "bias")} for h, v in last_eval.get("heads", {}).items()}
        run.truncate_metrics(step)
        run.log({"kind": "resume", "step": step, "from": str(ckpt), "time": time.time()})
        if main:
            print(f"resuming {run.path} from step {step} of {total_steps}", file=sys.stderr)
    net = accelerator.prepare_model(net)  # DDP under `accelerate launch`; unchanged otherwise
    unwrapped = accelerator.unwrap_model(net)

    def meta() -> dict:
        return reward_meta(
            norm, max_length, cfg.model, base_source, step, lora, causal, last_eval, heads, norm_by_head
        )

    def save(final: bool = False) -> None:
        model = unwrapped.seqcls
        if final and lora:
            model = model.merge_and_unload()  # a plain model: loadable without peft
        model.config.get_text_config().pad_token_id = pad_id
        resumable = (
            None
            if final
            else training_state(
                step=step,
                train_seconds=train_seconds,
                train_cpu_seconds=train_cpu_seconds,
                pairs_seen=pairs_seen,
                norm=norm,
                last_eval=last_eval,
                optimizer=optimizer,
                scheduler=scheduler,
            )
        )
        with masters_in_place(params, master if mixed else None):  # save the fp32 masters
            save_checkpoint(run, model, tokenizer, meta(), resumable)
        accelerator.wait_for_everyone()

    def do_eval(epoch: float) -> dict:
        nonlocal norm, last_eval
        idx = val_idx if len(val_idx) else train_idx
        # The unwrapped module: evaluation is forward-only, no DDP gradient bookkeeping.
        last_eval = {
            **evaluate(unwrapped, enc, idx, cfg, pad_id, device, autocast, accelerator, packed),
            "step": step,
            "split": "val" if len(val_idx) else "train",  # no validation pairs: the training ones
        }
        # Normalisation: gain and bias so that validation rewards have mean 0 and std 1 (per head).
        if len(heads) > 1:
            last_eval["heads"] = head_norms(last_eval, heads)
            norm_by_head.update(
                {h: {k: v[k] for k in ("gain", "bias")} for h, v in last_eval["heads"].items()}
            )
            norm = dict(norm_by_head[heads[0]])
        else:
            norm = normalisation(last_eval["_rewards"])
        record = {
            "kind": "eval",
            **{k: v for k, v in last_eval.items() if not k.startswith("_")},
            "epoch": round(epoch, 4),
            **norm,
        }
        run.log(record)
        if main:
            tqdm.write(eval_line(step, record), file=sys.stderr)
        return record

    def finish_cancelled() -> int:
        save()
        msg = f"cancelled at step {step} of {total_steps}; run the same command again to resume"
        run.status("cancelled", step / total_steps, msg, step=step, total_steps=total_steps)
        if main:
            tqdm.write(msg, file=sys.stderr)
        return 128 + stop["signal"]

    from tqdm.auto import tqdm

    config_record = read_json(run.path / CONFIG_FILE)
    config_record.update(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup_steps,
        effective_batch=cfg.batch_size * cfg.grad_accum * world,
        processes=world,
        device=str(device),
        max_length=max_length,
        truncation=cut_note,
        prompts_cut=enc.prompts_cut,
        responses_cut=enc.responses_cut,
        causal_backbone=causal,
        layout="packed" if packed else "padded",
        precision=precision,
        weights=cfg.weights,
        weights_note=weight_note or None,
        train_pairs=len(train_idx),
    )
    if main:
        write_json(run.path / CONFIG_FILE, config_record)
    run.status(
        "running",
        step / total_steps,
        f"training: step {step} of {total_steps}",
        step=step,
        total_steps=total_steps,
    )
    if stop:
        return finish_cancelled()

    # ---- the loop ------------------------------------------------------------------------
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="reward model",
        unit="step",
        disable=not (cfg.progress and main),
        dynamic_ncols=True,
    )
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        batches = epoch_batches(epoch)
        # On resume: skip the micro-batches this epoch already trained on (same seed, same order).
        first = (step - epoch * steps_per_epoch) * cfg.grad_accum
        for g in range(first, len(batches), cfg.grad_accum):
            if step >= total_steps:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            group = batches[g : g + cfg.grad_accum]
            n_pairs = sum(len(b) for b in group)
            # weighted loss, correct, votes, pairs, gap, weight
            stats = torch.zeros(6, dtype=torch.float64, device=device)
            tokens = slots = 0
            for j, b in enumerate(group):
                batch = layout(enc, b, pad_id)
                inputs = to_device(batch, device)
                label, margin = batch["label"].to(device), batch["margin"].to(device)
                weight = batch["weight"].to(device)
                tokens, slots = tokens + batch["tokens"], slots + batch["slots"]
                # Gradient accumulation: DDP all-reduces gradients only on the last micro-batch.
                sync = j == len(group) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(net):
                    with autocast():
                        rewards = net(**inputs)  # chosen and rejected in one forward
                    r_c, r_r = own_head(rewards, batch["head"]).chunk(2)  # each pair its own head
                    per_pair = preference_loss(r_c, r_r, label, margin if cfg.margin else None, cfg.center)
                    # Weighted sum / (pairs in the step x the training set's mean weight):
                    # the same update however the step is cut up, and on average over the
                    # batches the gradient of the weighted mean over all training pairs.
                    # Dividing by the step's own weight sum instead would blow a step of
                    # mostly low-weight votes up to full size. (--weights none: all 1, the
                    # plain mean.)
                    objective = (weight * per_pair).sum() / (n_pairs * mean_weight)
                    if cfg.style_penalty:
                        # one correlation per micro-batch, weighted by its share of the step's pairs
                        style = torch.from_numpy(enc.style_differences(b))
                        objective = (
                            objective + cfg.style_penalty * style_penalty(r_c, r_r, style) * len(b) / n_pairs
                        )
                    objective.backward()
                with torch.no_grad():
                    votes = label == 1.0
                    stats += torch.stack(
                        [
                            (weight * per_pair).sum().double(),
                            ((r_c > r_r) & votes).sum().double(),
                            votes.sum().double(),
                            torch.tensor(len(b), device=device, dtype=torch.float64),
                            (r_c - r_r).sum().double(),
                            weight.sum().double(),
                        ]
                    )
            if mixed:  # bf16 gradients (summed over the step's micro-batches) -> fp32 masters
                for p, m in zip(params, master):
                    m.grad, p.grad = (p.grad.float() if p.grad is not None else None), None
            grad_norm = torch.nn.utils.clip_grad_norm_(master, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            # One small all-reduce: global numbers for the log, and every process agrees to stop.
            stats = torch.cat([stats, torch.tensor([float(bool(stop))], device=device, dtype=torch.float64)])
            stats = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
            loss_sum, correct, votes_n, pairs_n, gap_sum, weight_sum, stop_n = stats.tolist()
            loss = loss_sum / weight_sum if weight_sum else 0.0  # the weighted mean of the step
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                # NaN/inf: do not step, do not save; the last good checkpoint stays as it is.
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                kept = run.checkpoint()
                msg = (
                    f"loss became {loss} (grad norm {float(grad_norm)}) at step {step + 1}; stopped. "
                    f"Last good checkpoint: {kept or 'none (no checkpoint was saved yet)'}. "
                    f"Try a lower --lr or --max-grad-norm."
                )
                run.status("failed", step / total_steps, msg, step=step, total_steps=total_steps)
                if main:
                    print(f"error: {msg}", file=sys.stderr)
                return 1
            optimizer.step()
            if mixed:
                torch._foreach_copy_([p.data for p in params], master)  # fp32 -> bf16, one fused call
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            train_cpu_seconds += time.process_time() - c0  # CPU time: steadier than wall on a busy box
            pairs_seen += int(pairs_n)
            record = {
                "kind": "train",
                "step": step,
                "epoch": round(epoch + (g + len(group)) / len(batches), 4),
                "loss": loss,
                "acc": correct / votes_n if votes_n else None,
                "reward_gap": gap_sum / pairs_n,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "pairs": int(pairs_n),
                "tokens": tokens * world,
                "padding": round(1 - tokens / slots, 4),  # this process's
                "step_s": round(dt, 4),
                "pairs_per_s": round(pairs_n / dt, 3),
                "elapsed_s": round(time.time() - t_start, 2),
            }
            run.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{record['acc'] or 0:.2f}", refresh=False)
            run.status(
                "running",
                step / total_steps,
                f"training: step {step} of {total_steps}, loss {loss:.4f}",
                throttle=True,
                step=step,
                total_steps=total_steps,
            )
            if stop_n:
                bar.close()
                return finish_cancelled()
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save()
        # The epoch is over (or the run, at --max-steps): evaluate; save a resume point.
        do_eval(step / steps_per_epoch)
        if step >= total_steps:
            break
        save()
        if stop:
            bar.close()
            return finish_cancelled()
    bar.close()

    # ---- done: evaluate (unless that just happened), save the model with its normalisation ----
    if last_eval.get("step") != step:
        do_eval(step / steps_per_epoch)
    save(final=True)
    return finish_done(
        run,
        main,
        step=step,
        total_steps=total_steps,
        pairs_seen=pairs_seen,
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        peak_mb=peak_memory_mb(device),
        prompts_cut=enc.prompts_cut,
        responses_cut=enc.responses_cut,
        final_eval={k: v for k, v in last_eval.items() if not k.startswith("_")},
        norm=norm,
        t_start=t_start,
        weights=cfg.weights,
    )


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, RewardConfig)


def run(args: argparse.Namespace) -> int:
    cfg, explicit = script_config(RewardConfig, args)
    if not cfg.data and not cfg.run_dir:
        raise RewardDataError("pass --data (a comparison store or a preference file), or --run-dir to resume")
    return train(cfg, explicit)


def main(argv: list[str] | None = None) -> int:
    return script_main("trainer.reward", __doc__, RewardConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
