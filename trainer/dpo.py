"""Direct preference optimisation from the votes: the policy learns from the pairs
themselves, with no reward model in between.

    preflab train-dpo --data comparisons/ --model smollm2 --run-dir runs/dpo-1
    python -m trainer.dpo --data prefs.jsonl --model tiny --lora-r 8

Read top to bottom: `train`, then the data (read, split by prompt, snapshotted: the
reward trainer's code), the tokens (the prompt cut from the left, the answers kept:
trainer/reward_batches.fit_pair), the reference, the loop, the evaluation and the save.
The losses are in trainer/dpo_math.py, the settings in trainer/dpo_config.py.

The reference: the starting model. Its answer log-probs are computed ONCE up front,
before the first step (when the policy still is the reference), cached in the run
directory (reference_logps.pt) and never computed again; so no second copy of the model
is ever held. With --lora-r they are computed with the adapters disabled. The same pass
samples one reference answer per held-out prompt (up to --kl-prompts) and caches its
log-prob: each evaluation estimates KL(reference || policy) = E_ref[log ref - log pi]
from those samples, a real KL that needs no reference at evaluation time.

The run directory follows trainer/runs.py's contract, as a policy run: config.json
("kind": "policy", "algo": "dpo"), status.json, metrics.jsonl ("train" per step, "eval"
per epoch, "summary"), data.parquet, checkpoint/ while resumable (with
training_state.pt), and when done policy/: a plain causal-LM directory that
`preflab serve --model runs/<id>/policy` loads like any policy run's (LoRA merged in).

SIGTERM (or Ctrl-C) saves and stops with state `cancelled`; the same command again
resumes from the saved step. A NaN/inf loss stops with state `failed` and leaves the last
good checkpoint untouched. One process (no DDP); bf16 autocast on CUDA.

torch / transformers are imported inside functions so that `preflab --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import time

import numpy as np

from trainer.checkpoints import CheckpointError
from trainer.config import add_config_arguments, script_config, script_main
from trainer.dpo_config import DPOConfig, resolve_config
from trainer.dpo_math import PreferenceLoss, preference_losses
from trainer.pair_snapshot import load_snapshot, save_snapshot
from trainer.policy_model import head_logits
from trainer.reward_batches import fit_sides, length_grouped_batches, prompt_ids_by_key, render_prompts
from trainer.reward_data import RewardDataError, read_pairs, split_by_prompt
from trainer.reward_state import restore_training_state, training_state
from trainer.runs import (
    CHECKPOINT,
    CONFIG_FILE,
    POLICY_DIR,
    REFERENCE_FILE,
    SNAPSHOT_FILE,
    STATE_FILE,
    Run,
    peak_memory_mb,
    read_json,
    supervise,
    write_json,
)
from trainer.store import messages_to_json
from trainer.store.errors import StoreError


def train(cfg: DPOConfig | dict, explicit: set[str] | None = None) -> int:
    """Run (or resume) one DPO training. Returns the exit code: 0 done, 1 failed, 2 bad
    input, 128 + signal when cancelled."""
    if isinstance(cfg, dict):
        explicit = set(cfg) if explicit is None else explicit
        cfg = DPOConfig(**cfg)
    explicit = {f.name for f in dataclasses.fields(DPOConfig)} if explicit is None else explicit
    named = bool(cfg.run_dir)
    cfg, run_path, resuming = resolve_config(cfg, explicit)
    return supervise(
        run_path,
        cfg.device,
        cfg.check,
        lambda run, accelerator, stop: _train(cfg, run, accelerator, resuming, stop),
        (RewardDataError, StoreError, CheckpointError),
        keep_failed=named,
    )


# --------------------------------------------------------------------------------------
# Data and tokens
# --------------------------------------------------------------------------------------


def snapshot_pairs(cfg: DPOConfig, run: Run, resuming: bool):
    """(pairs, train_idx, val_idx, summary): read from --data, split by prompt and saved
    into the run directory; on a resume the saved snapshot (not the store, which may have
    new votes by now). Ties and both-bad votes are left out: DPO needs a preferred answer."""
    snapshot = run.path / SNAPSHOT_FILE
    if not (resuming and snapshot.exists()):
        if not cfg.data:
            raise RewardDataError("no data: pass --data (a comparison store or a preference file)")
        pairs = read_pairs(
            cfg.data,
            ties="exclude",
            both_bad="exclude",
            exclude_flagged=cfg.exclude_flagged,
            judges=cfg.judges,
        )
        if len(pairs) == 0:
            raise RewardDataError(
                f"{cfg.data}: no pairs with a preferred answer (ties and both-bad are left out)"
            )
        train_idx, val_idx = split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
        save_snapshot(pairs, train_idx, val_idx, snapshot)
        from trainer.store import without_password  # a database password never goes to disk

        saved = {**dataclasses.asdict(cfg), "data": without_password(cfg.data)[0]}
        record = {"kind": "policy", "algo": "dpo", "config": saved, "data": pairs.summary}
        write_json(run.path / CONFIG_FILE, {**record, "created_at": time.time()})
    summary = read_json(run.path / CONFIG_FILE).get("data", {})
    pairs, train_idx, val_idx = load_snapshot(snapshot, summary)
    return pairs, train_idx, val_idx, summary


def encode(pairs, tokenizer, max_length: int):
    """Token ids of [prompt | chosen] and [prompt | rejected] (each answer closed by EOS)
    and where the answers begin. The prompt is cut from the left to fit the longer answer
    (one prompt tail for both sides, as the annotator saw them); an answer longer than
    max_length alone keeps its head and EOS. A chat vote's sides each have their own
    context (Pairs.rejected_prompts). Returns (chosen, rejected, (pairs, 2) answer starts
    of chosen and rejected, pairs whose prompt was cut)."""
    # Each side's own context: a chat vote's two answers follow two different histories.
    keys, rejected_keys, prompt_ids = prompt_ids_by_key(tokenizer, pairs)
    eos, n = tokenizer.eos_token or "", len(pairs)
    answers = tokenizer([a + eos for a in pairs.chosen + pairs.rejected], add_special_tokens=False).input_ids
    chosen, rejected, starts, rejected_starts, cut = [], [], [], [], 0
    for k, rk, a_c, a_r in zip(keys, rejected_keys, answers[:n], answers[n:]):
        c, r, prompt_cut, _ = fit_sides(prompt_ids[k], prompt_ids[rk], a_c, a_r, max_length)
        chosen.append(c)
        rejected.append(r)
        starts.append(max(0, len(c) - len(a_c)))  # 0 when the answer alone filled max_length
        rejected_starts.append(max(0, len(r) - len(a_r)))  # its own context: its own start
        cut += bool(prompt_cut)
    return chosen, rejected, np.array([starts, rejected_starts], dtype=np.int64).reshape(2, n).T, cut


def answer_logps(lm, rows: list[list[int]], starts, pad_id: int, device, autocast):
    """(summed log-prob of each row's answer tokens, answer tokens) under `lm`, rows
    right-padded into one forward. The answer begins at `starts[i]`; a first token with
    no context before it is not predicted, so it is not counted."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids, mask = ids.to(device), mask.to(device)
    pos = torch.arange(1, width, device=device)[None]
    start = torch.as_tensor(np.maximum(np.asarray(starts), 1), device=device)[:, None]
    answer = (pos >= start) & (pos < lengths.to(device)[:, None])  # predicted tokens that are answer
    # The LM head on the answer positions only: prompt and padding logits over the whole
    # vocabulary would be most of the forward's memory and time, and are never used.
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    with autocast():
        hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head_logits(inner, hidden[:, :-1][answer]).float()
    # log p(token) = logit - logsumexp(logits): no log-softmax tensor of the vocabulary
    targets = ids[:, 1:][answer]
    token_logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    rows_of = answer.nonzero()[:, 0]
    sums = torch.zeros(len(rows), device=device, dtype=token_logp.dtype).index_add(0, rows_of, token_logp)
    return sums, answer.sum(-1).float()


def pair_logps(lm, enc, idx, pad_id, device, autocast):
    """(chosen, rejected, chosen tokens, rejected tokens) of the pairs `idx`: both sides in ONE forward."""
    chosen, rejected, starts, _ = enc
    rows = [chosen[i] for i in idx] + [rejected[i] for i in idx]
    logps, tokens = answer_logps(
        lm, rows, np.concatenate([starts[idx, 0], starts[idx, 1]]), pad_id, device, autocast
    )
    return (*logps.chunk(2), *tokens.chunk(2))


def reference_pass(lm, cfg, enc, pairs, val_idx, tokenizer, pad_id, device, autocast) -> dict:
    """What the reference is ever needed for, computed once: the answer log-probs of every
    pair, and one sampled answer (with its log-prob) per held-out prompt for the KL."""
    import torch
    from transformers import GenerationConfig

    lm.eval()
    out = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for s in range(0, len(pairs), cfg.eval_batch_size):
            idx = np.arange(s, min(s + cfg.eval_batch_size, len(pairs)))
            c, r, _, _ = pair_logps(lm, enc, idx, pad_id, device, autocast)
            out["chosen"].append(c.float().cpu())
            out["rejected"].append(r.float().cpu())
        ref = {k: torch.cat(v) for k, v in out.items()}
        # KL samples: the full distribution (no top-k / top-p), else it is not the reference's.
        prompts = list(dict.fromkeys(messages_to_json(pairs.prompts[i]) for i in val_idx))[: cfg.kl_prompts]
        gen = GenerationConfig(
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=cfg.kl_tokens,
            pad_token_id=pad_id,
        )
        torch.manual_seed(cfg.seed)
        rows, starts = [], []
        by_key = {messages_to_json(p): p for p in pairs.prompts}
        texts, add_special = render_prompts(tokenizer, [by_key[k] for k in prompts])
        for ids in tokenizer(texts, add_special_tokens=add_special).input_ids if prompts else []:
            ids = ids[max(0, len(ids) - (cfg.max_length - cfg.kl_tokens)) :]  # cut from the left
            x = torch.tensor([ids], device=device)
            new = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)[
                0, len(ids) :
            ]
            new = new.tolist()
            if tokenizer.eos_token_id in new:  # the answer ends at its first EOS (EOS included)
                new = new[: new.index(tokenizer.eos_token_id) + 1]
            rows.append(ids + new)
            starts.append(len(ids))
        logps = (
            answer_logps(lm, rows, starts, pad_id, device, autocast)[0].float().cpu()
            if rows
            else torch.zeros(0)
        )
    return {**ref, "kl_rows": rows, "kl_starts": starts, "kl_logps": logps}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _train(cfg: DPOConfig, run: Run, accelerator, resuming: bool, stop: dict) -> int:
    import torch
    from tqdm.auto import tqdm

    from trainer.models import check_model, load_tokenizer
    from trainer.policy_model import add_lora, autocast_for, load_causal_lm, save_policy

    t_start = time.time()
    ckpt = run.checkpoint()
    resuming = resuming and ckpt is not None and (ckpt / STATE_FILE).exists()
    run.status("queued", 0.0, "reading the data")
    pairs, train_idx, val_idx, summary = snapshot_pairs(cfg, run, resuming)

    device = accelerator.device
    autocast = autocast_for(device)
    lora = cfg.lora_r > 0
    run.status("queued", 0.0, f"loading {cfg.model}")
    base_source = check_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id
    # fp32 weights: DPO's learning rates are ~1e-6, which a bf16 weight would round away.
    lm = load_causal_lm(str(ckpt) if resuming and not lora else base_source, torch.float32)
    if lora:
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, ckpt if resuming else None)
    lm.to(device)
    max_length = min(
        cfg.max_length, getattr(lm.config.get_text_config(), "max_position_embeddings", cfg.max_length)
    )
    enc = encode(pairs, tokenizer, max_length)
    cut_note = f"{enc[3]} of {len(pairs)} pairs had their prompt cut from the left (answers kept)"
    print(f"data: {len(pairs)} pairs ({len(train_idx)} train / {len(val_idx)} val, split by prompt) "
          f"from {summary.get('source')}; {cut_note}", file=sys.stderr)  # fmt: skip
    if (summary.get("judges") or {}).get("note"):  # trainer/judges.py: what --judges did
        print(f"judges: {summary['judges']['note']}", file=sys.stderr)

    # ---- the reference, once --------------------------------------------------------------
    ref_path, ref_seconds = run.path / REFERENCE_FILE, 0.0  # 0: read from the cache (a resume)
    if resuming:
        # Never recomputed from the checkpoint: that is the trained policy, not the reference.
        if not ref_path.exists():
            raise CheckpointError(
                f"{ref_path} is missing, and the reference cannot be recomputed from a trained checkpoint; "
                f"start the run again in a new run directory"
            )
        ref = torch.load(ref_path, map_location="cpu", weights_only=True)
    else:
        t_ref = time.perf_counter()
        run.status("queued", 0.0, "computing the reference log-probs")
        # Before any step the policy IS the reference; with LoRA, adapters off makes it so.
        with lm.disable_adapter() if lora else torch.no_grad():
            ref = reference_pass(lm, cfg, enc, pairs, val_idx, tokenizer, pad_id, device, autocast)
        # 0600, as data.parquet: the KL samples hold the held-out prompts' tokens
        with open(ref_path, "wb", opener=lambda name, flags: os.open(name, flags, 0o600)) as f:
            torch.save(ref, f)
        ref_seconds = time.perf_counter() - t_ref

    # ---- batches and schedule ---------------------------------------------------------------
    lengths = np.maximum([len(c) for c in enc[0]], [len(r) for r in enc[1]])[train_idx]
    steps_per_epoch = len(length_grouped_batches(lengths, cfg.batch_size, cfg.seed, 0))
    total_steps = steps_per_epoch * cfg.epochs
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = math.ceil(cfg.warmup * total_steps)

    def lr_factor(step: int) -> float:
        """Linear warmup, then linear decay to 0 after the last step (`step`: 0-based)."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    params = [p for p in lm.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    step, train_seconds, pairs_seen, last_eval = 0, 0.0, 0, {}
    if resuming:
        state = restore_training_state(ckpt / STATE_FILE, optimizer, scheduler, lr_factor, cfg.lr)
        step, train_seconds, pairs_seen = state["step"], state["train_seconds"], state["pairs_seen"]
        last_eval = state.get("last_eval", {})
        run.truncate_metrics(step)
        run.log({"kind": "resume", "step": step, "from": str(ckpt), "time": time.time()})
        print(f"resuming {run.path} from step {step} of {total_steps}", file=sys.stderr)

    def losses(c, r, ref_c, ref_r, n_c, n_r):
        return preference_losses(
            c, r, ref_c.to(device), ref_r.to(device), beta=cfg.beta, loss=cfg.loss,
            label_smoothing=cfg.label_smoothing, chosen_tokens=n_c, rejected_tokens=n_r,
        )  # fmt: skip

    def meta() -> dict:
        return {"format": 1, "algo": "dpo", "loss": cfg.loss, "beta": cfg.beta, "base_model": cfg.model,
                "base_source": base_source, "step": step, "lora": lora, "max_length": max_length}  # fmt: skip

    def save() -> None:
        state = training_state(step=step, train_seconds=train_seconds, train_cpu_seconds=0.0,
                               pairs_seen=pairs_seen, norm={}, last_eval=last_eval,
                               optimizer=optimizer, scheduler=scheduler)  # fmt: skip
        save_policy(run.path / CHECKPOINT, lm, tokenizer, meta(), training_state=state)

    def do_eval(epoch: float) -> dict:
        nonlocal last_eval
        idx = val_idx if len(val_idx) else train_idx  # no validation pairs: the training ones
        lm.eval()
        sums = np.zeros(5)  # loss, correct, margin, chosen logp, rejected logp
        with torch.no_grad():
            for s in range(0, len(idx), cfg.eval_batch_size):
                b = idx[s : s + cfg.eval_batch_size]
                c, r, n_c, n_r = pair_logps(lm, enc, b, pad_id, device, autocast)
                out = losses(c, r, ref["chosen"][b], ref["rejected"][b], n_c, n_r)
                sums += [float(t.sum()) for t in (out.loss, out.accuracy, out.margins, c, r)]
            kl = None
            if ref["kl_rows"]:
                pi = answer_logps(lm, ref["kl_rows"], ref["kl_starts"], pad_id, device, autocast)[0]
                kl = float((ref["kl_logps"].to(device) - pi.float()).mean())
        lm.train()
        n = len(idx)
        last_eval = {
            "kind": "eval", "step": step, "epoch": round(epoch, 4), "split": "val" if len(val_idx) else "train",
            "val_pairs": n, "val_loss": sums[0] / n, "val_acc": sums[1] / n, "val_margin": sums[2] / n,
            "val_chosen_logps": sums[3] / n, "val_rejected_logps": sums[4] / n,
            "val_kl": kl, "kl_samples": len(ref["kl_rows"]),
        }  # fmt: skip
        run.log(last_eval)
        tqdm.write(f"eval @ step {step}: implicit-reward acc {last_eval['val_acc']:.3f} on {n} {last_eval['split']} "
                   f"pairs, margin {last_eval['val_margin']:+.3f}, loss {last_eval['val_loss']:.4f}, "
                   f"KL(ref||policy) {kl if kl is None else round(kl, 4)}", file=sys.stderr)  # fmt: skip
        return last_eval

    def finish_cancelled() -> int:
        save()
        msg = f"cancelled at step {step} of {total_steps}; run the same command again to resume"
        run.status("cancelled", step / total_steps, msg, step=step, total_steps=total_steps)
        print(msg, file=sys.stderr)
        return 128 + stop["signal"]

    record = read_json(run.path / CONFIG_FILE)
    record.update(total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps,
                  device=str(device), max_length=max_length, truncation=cut_note, prompts_cut=enc[3],
                  train_pairs=len(train_idx), base_source=base_source)  # fmt: skip
    write_json(run.path / CONFIG_FILE, record)
    run.status("running", step / total_steps, f"training: step {step} of {total_steps}", step=step,
               total_steps=total_steps)  # fmt: skip
    if stop:
        return finish_cancelled()

    # ---- the loop -----------------------------------------------------------------------------
    lm.train()
    bar = tqdm(total=total_steps, initial=step, desc="dpo", unit="step", disable=not cfg.progress)
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        batches = [train_idx[b] for b in length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch)]
        # On resume: skip the batches this epoch already trained on (same seed, same order).
        for b in batches[step - epoch * steps_per_epoch :]:
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            # Gradient accumulation: each micro-batch's share of the batch's mean loss, so
            # the step is the same whatever --micro-batch is (up to float rounding).
            per_forward = cfg.micro_batch or len(b)
            outs, logps = [], []
            for m in range(0, len(b), per_forward):
                mb = b[m : m + per_forward]
                c, r, n_c, n_r = pair_logps(lm, enc, mb, pad_id, device, autocast)
                part = losses(c, r, ref["chosen"][mb], ref["rejected"][mb], n_c, n_r)
                (part.loss.sum() / len(b)).backward()
                outs.append([t.detach() for t in part])
                logps.append((c.detach(), r.detach()))
            out = PreferenceLoss(*(torch.cat(column) for column in zip(*outs)))  # the whole batch's
            c, r = (torch.cat(column) for column in zip(*logps))
            loss = out.loss.mean()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                # NaN/inf: do not step, do not save; the last good checkpoint stays as it is.
                bar.close()
                kept = run.checkpoint()
                msg = (f"loss became {loss.item()} (grad norm {grad_norm}) at step {step + 1}; stopped. Last good "
                       f"checkpoint: {kept or 'none (none was saved yet)'}. Try a lower --lr or --beta.")  # fmt: skip
                run.status("failed", step / total_steps, msg, step=step, total_steps=total_steps)
                print(f"error: {msg}", file=sys.stderr)
                return 1
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_seconds, pairs_seen = train_seconds + dt, pairs_seen + len(b)
            metrics = {
                "kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss.item(),
                "reward_acc": float(out.accuracy.mean()), "reward_margin": float(out.margins.mean()),
                "chosen_reward": float(out.chosen_rewards.mean()),
                "rejected_reward": float(out.rejected_rewards.mean()),
                "chosen_logps": c.mean().item(), "rejected_logps": r.mean().item(), "lr": lr,
                "grad_norm": grad_norm, "pairs": len(b), "step_s": round(dt, 4),
                "pairs_per_s": round(len(b) / dt, 3), "elapsed_s": round(time.time() - t_start, 2),
            }  # fmt: skip
            run.log(metrics)
            bar.update(1)
            run.status("running", step / total_steps, f"training: step {step} of {total_steps}, loss "
                       f"{loss.item():.4f}", throttle=True, step=step, total_steps=total_steps)  # fmt: skip
            if stop:
                bar.close()
                return finish_cancelled()
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save()
        do_eval(step / steps_per_epoch)
        if step >= total_steps:
            break
        save()  # the epoch's resume point
        if stop:
            bar.close()
            return finish_cancelled()
    bar.close()

    # ---- done: the policy, as a plain causal-LM directory ---------------------------------------
    if last_eval.get("step") != step:
        do_eval(step / steps_per_epoch)
    model = lm.merge_and_unload() if lora else lm  # fp32 weights: merging loses nothing
    save_policy(run.path / POLICY_DIR, model, tokenizer, meta())
    shutil.rmtree(run.path / CHECKPOINT, ignore_errors=True)
    shutil.rmtree(run.path / (CHECKPOINT + ".old"), ignore_errors=True)
    final = {k: v for k, v in last_eval.items() if k != "kind"}
    run.log({"kind": "summary", "step": step, "train_pairs": len(train_idx), "pairs_seen": pairs_seen,
             "train_seconds": round(train_seconds, 3),
             "reference_s": round(ref_seconds, 3), "pairs_per_s": round(pairs_seen / max(train_seconds, 1e-9), 3),
             "peak_memory_mb": round(peak_memory_mb(device), 1), "final_eval": final})  # fmt: skip
    msg = (f"done: {step} steps; held-out implicit-reward accuracy {final['val_acc']:.3f} on "
           f"{final['val_pairs']} {final['split']} pairs; policy in {run.path / POLICY_DIR}")  # fmt: skip
    run.status("done", 1.0, msg, step=step, total_steps=total_steps)
    print(msg, file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, DPOConfig)


def run(args: argparse.Namespace) -> int:
    cfg, explicit = script_config(DPOConfig, args)
    if not cfg.data and not cfg.run_dir:
        raise RewardDataError("pass --data (a comparison store or a preference file), or --run-dir to resume")
    return train(cfg, explicit)


def main(argv: list[str] | None = None) -> int:
    return script_main("trainer.dpo", __doc__, DPOConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
