"""Fine-tune the policy against a trained reward model: PPO, RLOO, REINFORCE, or the GRPO
family (GRPO, Dr. GRPO, REINFORCE++).

    preflab train-policy --reward runs/rm-1 --prompts trainer/data/prompts.jsonl --run-dir runs/pol-1
    python -m trainer.policy --reward runs/rm-1 --prompts comparisons/ --algo rloo --k 4
    accelerate launch -m trainer.policy --reward runs/rm-1 ...        # several GPUs (DDP)
    preflab serve --model runs/pol-1/policy                           # the result, in the arena

The training loop, read top to bottom (CleanRL style): every implementation detail of a
step is in the loop below with a comment naming it. The settings (PolicyConfig:
defaults, --help, checks, resume rules) are in trainer/policy_config.py; the model side
(causal LM + value head, log-probs of the sampled tokens, sampling, LoRA, the reward
scorer, saving) in trainer/policy_model.py; a run's bookkeeping (config.json, named
statistics, logged samples, checkpoints, the final save, the held-out evaluation, the
summary) in trainer/policy_run.py; the pure math (GAE, whitening, KL estimators, the RLOO
baseline, the clipped losses, explained variance, the adaptive KL controller) in
trainer/rl_math.py.

One step of training:

1. Rollout. `batch_size` prompts, each sampled `k` times, in one batched `generate` with
   the KV cache (sampling temperature T, no top-k / top-p, so the sampling distribution is
   exactly softmax(logits / T)). Answers end at their first EOS; one that reaches
   `max_new_tokens` without it is cut off and its score gets `- missing_eos_penalty`.
2. Log-probabilities of the sampled tokens under the policy (with the value head's
   values, for PPO) and under the reference, one batched forward each, with the same
   temperature applied. The reference is a frozen copy of the starting model, or, with
   LoRA, the same model with its adapters switched off (no second copy in memory).
3. Rewards: the reward model's normalised score (mean 0, std 1 on its validation set).
4. Advantages.
     PPO:  per-token reward -beta * KL_t (k1 or k3 estimator), plus the score on the last
           token; optionally whitened (scaled); GAE (gamma 1, lambda 0.95) against a value
           head (zero-initialised) on the policy's last hidden state; whitened.
     RLOO: k samples per prompt; R = score - beta * sum_t KL_t (sequence-level KL);
           advantage = R minus the mean R of the other k - 1 samples of that prompt.
     REINFORCE: R as for RLOO minus a moving-average baseline of past rewards.
     GRPO: R as for RLOO minus the mean R of the prompt's k samples, over their std
           (Dr. GRPO: not divided by the std).
     REINFORCE++: per-token reward -beta * KL_t plus, on the last token, the score minus
           the mean score of the prompt's k samples; returns-to-go; whitened over the batch.
5. Update: `epochs` passes over the batch in `minibatches` shuffled minibatches, each
   an optimizer step (micro-batches of `micro_batch` rows accumulate its gradient).
   PPO: clipped token ratio + clipped value loss. RLOO / REINFORCE: the clipped ratio of
   the whole answer's probability (with one pass, this is exactly REINFORCE). The GRPO
   family: the clipped token ratio, token losses aggregated by --loss-agg (per token as
   DAPO, per answer as GRPO, per answer over a constant as Dr. GRPO). --mask-truncated:
   answers cut off at max_new_tokens give no gradient (DAPO's overlong filtering). The KL
   penalty is in the reward for every algorithm, so they all maximise the same objective.
6. The adaptive KL coefficient (when `kl_target` > 0) moves toward the target KL.

A run directory (trainer/runs.py) holds:
    config.json       the settings, what was read, the schedule
    status.json       {"state": queued|running|done|failed|cancelled, "progress": 0..1, "message"}
    metrics.jsonl     one {"kind": "train"} object per step (reward, KL, entropy, clip
                      fraction, approx KL, value loss, explained variance, length, EOS rate,
                      tokens/s, step time...), {"kind": "samples"} every `sample_every` steps
                      (prompt, response, reward), {"kind": "resume"}, and a final {"kind": "summary"}
    checkpoint/       while the run can be resumed: the model (or LoRA adapter), the value
                      head, optimizer and step (training_state.pt)
    policy/           when done: a plain Hugging Face model directory with the tokenizer and
                      its chat template (LoRA merged in); `preflab serve --model` reads it
    heldout.jsonl     the `eval_prompts` prompts kept out of training
    eval.json         when done: the reward model's win rate of the policy over the
                      reference on those prompts (trainer/evaluate.py; the Leaderboard tab
                      shows it beside the human win rate)

Each step also writes one line to stderr (the Train tab's log pane shows it; in a terminal
it goes above the progress bar): step/total, reward mean, KL (k3, >= 0), loss, seconds a
step and the time left, held-out evaluation included (policy_run.StepClock); status.json
carries the same `step_s` and `eta_s`.

SIGTERM (or Ctrl-C) finishes the step, saves and stops with state `cancelled`; the same
command again resumes from the saved step. A NaN, or a KL to the reference above
`max_kl`, stops with state `failed` and a message saying what to change; the last good
checkpoint is kept.

On CUDA: fp32 master weights with bf16 autocast for training, a bf16 copy of the weights
for generation (refreshed after each update), the reference in bf16. On CPU: fp32.

torch / transformers are imported inside functions so that `preflab --help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import time
from functools import partial
from pathlib import Path

from trainer.checkpoints import CheckpointError, load_training_state
from trainer.config import add_config_arguments, script_config, script_main
from trainer.errors import PolicyInputError
from trainer.policy_config import DEFAULT_PROMPTS, TOKEN_ALGOS, PolicyConfig, resolve_config
from trainer.policy_model import (
    Sampler,
    add_lora,
    autocast_for,
    eos_token_ids,
    forward_rows,
    load_causal_lm,
    load_reward_scorer,
    make_value_head,
    policy_net,
    reward_model_dir,
    unit_rows,
)
from trainer.policy_run import (
    RolloutSums,
    StepClock,
    UpdateSums,
    add_to_config,
    evaluate_heldout,
    fail,
    finish_cancelled,
    finish_done,
    format_duration,
    policy_meta,
    prompt_rows,
    reduce_sum,
    samples_record,
    save_checkpoint,
    save_final,
    seed_for,
    step_line,
    write_start_config,
)
from trainer.prompts import load_prompts
from trainer.reward_blend import check_reward_weights, parse_reward_weights
from trainer.runs import CONFIG_FILE, STATE_FILE, Run, supervise
from trainer.store.errors import StoreError

# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train(cfg: PolicyConfig | dict, explicit: set[str] | None = None) -> int:
    """Run (or resume) one policy training. Returns the process exit code:
    0 done, 1 failed, 2 bad input, 128 + signal when cancelled."""
    if isinstance(cfg, dict):
        explicit = set(cfg) if explicit is None else explicit
        cfg = PolicyConfig(**cfg)
    explicit = {f.name for f in dataclasses.fields(PolicyConfig)} if explicit is None else explicit
    named = bool(cfg.run_dir)  # the caller named the run directory: a failure is recorded there
    cfg, run_path = resolve_config(cfg, explicit)

    return supervise(
        run_path,
        cfg.device,
        cfg.check,  # the config's own check is the only validator
        lambda run, accelerator, stop: _train(cfg, run, accelerator, stop),
        (PolicyInputError, StoreError, CheckpointError),
        keep_failed=named,
    )


def _train(cfg: PolicyConfig, run: Run, accelerator, stop: dict) -> int:
    t_start = time.time()
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    ckpt = run.checkpoint()
    resuming = ckpt is not None and (ckpt / STATE_FILE).exists()
    run.status("queued", 0.0, "reading the prompts")

    # ---- inputs, before any model is loaded: bad input fails in seconds -------------------
    import numpy as np

    rm_path = reward_model_dir(cfg.reward)
    reward_weights = parse_reward_weights(cfg.reward_weights)
    check_reward_weights(rm_path, reward_weights)  # a head the model lacks: refused before any loading
    prompts_path = cfg.prompts or str(DEFAULT_PROMPTS)
    conversations = load_prompts(prompts_path)
    # Held-out prompts: never trained on; the policy meets the reference on them at the end.
    # Seeded, so a resumed run holds out the same ones.
    n_heldout = min(cfg.eval_prompts, len(conversations) // 5)
    held = set(np.random.default_rng([cfg.seed, 1]).permutation(len(conversations))[:n_heldout].tolist())
    heldout = [c for i, c in enumerate(conversations) if i in held]
    conversations = [c for i, c in enumerate(conversations) if i not in held]
    if main and not resuming:
        write_start_config(run, cfg, prompts_path, len(conversations), heldout, rm_path)
    accelerator.wait_for_everyone()

    # ---- models ----------------------------------------------------------------------------
    import torch
    from tqdm.auto import tqdm

    from trainer import rl_math
    from trainer.models import check_model, load_tokenizer, render_prompt

    device = accelerator.device  # cuda:<local rank> under `accelerate launch`, else cuda or cpu
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for what still runs in fp32
    lora = cfg.lora_r > 0
    ppo = cfg.algo == "ppo"
    token_ratio = ppo or cfg.algo in TOKEN_ALGOS  # a ratio per token, not per answer
    per_token = ppo or cfg.loss_agg == "token"  # the loss is a mean over tokens
    # Master weights in fp32 (RL learning rates are ~1e-6: a bf16 weight would round most
    # updates away). With LoRA the base is frozen, so it can sit in bf16 on CUDA.
    weight_dtype = torch.bfloat16 if cfg.dtype == "bf16" or (lora and cuda) else torch.float32
    ref_dtype = torch.bfloat16 if cuda else torch.float32
    autocast = autocast_for(device)
    reduce = partial(reduce_sum, accelerator)

    run.status("queued", 0.0, f"loading {cfg.model} and the reward model")
    base_source = check_model(cfg.model)  # resolves smollm2 / tiny (built once) / dirs / ids
    tokenizer = load_tokenizer(cfg.model)  # left padding; pad = EOS when the model has no pad
    pad_id = tokenizer.pad_token_id
    lm = load_causal_lm(str(ckpt) if resuming and not lora else base_source, weight_dtype)
    if cfg.grad_checkpointing:
        # Recompute activations in backward: memory per layer O(1), ~30% more compute.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, ckpt if resuming else None)
    lm.to(device)
    inner = lm.get_base_model() if lora else lm
    hidden_size = inner.config.get_text_config().hidden_size

    # Reference: a frozen copy of the starting model; with LoRA none (adapters off instead).
    ref = None
    if not lora:
        ref = load_causal_lm(base_source, ref_dtype).to(device).eval().requires_grad_(False)
    value_head = make_value_head(hidden_size, device, ckpt if resuming else None) if ppo else None
    net = policy_net(lm, value_head)
    ref_net = policy_net(ref) if ref is not None else None
    reward_model = load_reward_scorer(rm_path, device, reward_weights)

    # ---- prompts -> token ids (chat template, assistant turn opened; oldest tokens cut) -----
    texts = [render_prompt(tokenizer, c) for c in conversations]
    add_special = not getattr(tokenizer, "chat_template", None)
    full_ids = tokenizer(texts, add_special_tokens=add_special).input_ids
    prompts_cut = sum(len(ids) > cfg.max_prompt_length for ids in full_ids)
    prompt_ids = [ids[-cfg.max_prompt_length :] for ids in full_ids]

    # Generation: a bf16 copy of the weights on CUDA with full fine-tuning (see Sampler).
    eos_ids = eos_token_ids(tokenizer, inner)
    eos_tensor = torch.tensor(eos_ids, device=device)
    sampler = Sampler(
        lm,
        tokenizer,
        eos_ids,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        width=max(len(ids) for ids in prompt_ids),
        bf16_copy=cuda and not lora and weight_dtype != torch.bfloat16,
        compile=cfg.compile_generation,
    )

    # ---- optimizer -----------------------------------------------------------------------
    params = [p for p in net.parameters() if p.requires_grad]
    # eps 1e-5 (CleanRL / the PPO reference implementations); fused: one kernel for all tensors.
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, eps=1e-5, weight_decay=0.0, fused=device.type in ("cuda", "cpu")
    )
    kl_ctl = rl_math.AdaptiveKLController(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
    step, baseline = 0, None
    totals = {"prompts": 0, "tokens": 0, "seconds": 0.0}
    if resuming:
        state = load_training_state(ckpt / STATE_FILE)  # data only: never runs code from the file
        optimizer.load_state_dict(state["optimizer"])
        step, baseline, totals = state["step"], state.get("baseline"), state.get("totals", totals)
        # The coefficient where the run left it (the adaptive controller moves it), unless a
        # new --kl-coef was given for the resume (how one continues a run that ran away).
        changed = cfg.kl_coef != state.get("kl_coef_setting", cfg.kl_coef)
        kl_ctl.value = cfg.kl_coef if changed else state["kl_coef"]
        run.truncate_metrics(step)
        run.log({"kind": "resume", "step": step, "from": str(ckpt), "time": time.time()})
        if main:
            print(f"resuming {run.path} from step {step} of {cfg.steps}", file=sys.stderr)

    ddp_net = accelerator.prepare_model(net)  # DDP under `accelerate launch`; unchanged otherwise
    net = accelerator.unwrap_model(ddp_net)
    sampler.sync()

    def checkpoint() -> None:  # this step's resumable state (the loop's variables, read when called)
        save_checkpoint(
            run,
            accelerator,
            net,
            tokenizer,
            policy_meta(cfg, base_source, rm_path, step, kl_ctl.value),
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "kl_coef": kl_ctl.value,
                "kl_coef_setting": cfg.kl_coef,
                "baseline": baseline,
                "totals": totals,
            },
        )

    rows_per_step = cfg.batch_size * cfg.k
    # Units of work: with k > 1 and prompt sharing, the k answers to one prompt always travel
    # together (one prompt forward for all of them); otherwise single answers.
    g_roll = cfg.k if cfg.k > 1 and cfg.share_prompt else 1
    g_train = g_roll if not cfg.grad_checkpointing else 1  # checkpointed layers run without a KV cache
    minibatch_rows = math.ceil(rows_per_step / g_train / cfg.minibatches) * g_train
    if main:
        add_to_config(
            run,
            prompts_cut,
            config=dataclasses.asdict(cfg),
            processes=world,
            device=str(device),
            rows_per_step=rows_per_step * world,
            minibatch_rows=minibatch_rows,
            shared_prompt_forward={"rollout": g_roll > 1, "update": g_train > 1},
            optimizer_steps_per_step=cfg.epochs * cfg.minibatches,
            reference="adapters off" if lora else "frozen copy",
            generation=("bf16 copy" if sampler.separate_copy else "training weights")
            + (", static cache, compiled" if sampler.compiled else ", dynamic cache"),
            eos_token_ids=eos_ids,
        )
    run.status(
        "running", step / cfg.steps, f"training: step {step} of {cfg.steps}", step=step, total_steps=cfg.steps
    )
    if stop:
        checkpoint()
        return finish_cancelled(run, stop["signal"], step, cfg.steps)

    # ---- the loop --------------------------------------------------------------------------
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=f"policy ({cfg.algo})",
        unit="step",
        disable=not (cfg.progress and main),
        dynamic_ncols=True,
    )
    lr_now = cfg.lr
    clock = StepClock(rows_per_step, len(heldout))  # the time left, from the measured steps
    while step < cfg.steps:
        t0, c0 = time.perf_counter(), time.process_time()
        torch.manual_seed(seed_for(cfg.seed, step, rank))
        if cfg.anneal_lr:  # linear decay to 0 at the last step (CleanRL's anneal_lr)
            lr_now = cfg.lr * (1.0 - step / cfg.steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_now

        # 1. Rollout: batch_size prompts x k samples, prompt-major (row = prompt * k + sample).
        chosen = prompt_rows(step, rank, world, cfg.batch_size, len(conversations), cfg.seed)
        row_prompt = [p for p in chosen for _ in range(cfg.k)]
        n = len(row_prompt)
        lengths_p = [len(prompt_ids[p]) for p in row_prompt]
        P = max(lengths_p)
        query = torch.full((n, P), pad_id, dtype=torch.long)
        query_mask = torch.zeros((n, P), dtype=torch.long)
        for i, p in enumerate(row_prompt):  # left padding: every prompt ends at column P - 1
            query[i, P - lengths_p[i] :] = torch.tensor(prompt_ids[p])
            query_mask[i, P - lengths_p[i] :] = 1
        query, query_mask = query.to(device), query_mask.to(device)
        out = sampler.sample(query, query_mask, lengths_p, cfg.gen_batch or n, autocast)
        # An answer ends at its first EOS (included: the policy chose to stop there); one
        # without EOS ran to max_new_tokens and was cut off.
        is_eos = torch.isin(out, eos_tensor)
        ended = is_eos.any(1)
        lengths = torch.where(
            ended, is_eos.int().argmax(1) + 1, torch.full_like(ended, cfg.max_new_tokens, dtype=torch.long)
        )
        R = int(lengths.max())
        response = out[:, :R]
        positions = torch.arange(R, device=device)
        resp_mask = (positions[None, :] < lengths[:, None]).float()
        response = torch.where(resp_mask.bool(), response, torch.full_like(response, pad_id))
        t_gen = time.perf_counter() - t0

        # 2. Log-probs of the sampled tokens: policy (+ values, entropy) and reference, one
        #    batched forward each (in micro-batches of rows), no gradient.
        rollout = (query, query_mask, response, resp_mask, cfg.temperature, autocast)
        old_logp = torch.zeros(n, R, device=device)
        ref_logp = torch.zeros(n, R, device=device)
        old_values = torch.zeros(n, R, device=device)
        entropy = torch.zeros(n, R, device=device)
        fwd_units = max(1, cfg.micro_batch * 2 // g_roll)  # no activations kept: twice the micro-batch
        net.eval()
        # Units of similar answer length together: little padding.
        by_length = torch.argsort(lengths.view(-1, g_roll).max(1).values)
        with torch.no_grad():
            for c in range(0, len(by_length), fwd_units):
                rows = unit_rows(by_length[c : c + fwd_units], g_roll)
                (lp, ent, val), w = forward_rows(
                    net, rows, *rollout, with_values=ppo, with_entropy=True, group=g_roll
                )
                old_logp[rows, :w], entropy[rows, :w] = lp, ent
                if ppo:
                    old_values[rows, :w] = val
                if ref_net is not None:
                    (lp, _, _), w = forward_rows(ref_net, rows, *rollout, group=g_roll)
                else:
                    with net.lm.disable_adapter():  # LoRA: the reference is the base, adapters off
                        (lp, _, _), w = forward_rows(net, rows, *rollout, group=g_roll)
                ref_logp[rows, :w] = lp
        old_logp, ref_logp = old_logp * resp_mask, ref_logp * resp_mask

        # 3. Rewards: the reward model's normalised score of (prompt, decoded answer).
        t_score = time.perf_counter()
        answers = [
            t.strip()
            for t in tokenizer.batch_decode(
                [response[i, : int(lengths[i])].tolist() for i in range(n)], skip_special_tokens=True
            )
        ]
        raw = torch.tensor(
            reward_model.score(
                [conversations[p] for p in row_prompt],
                answers,
                normalize=True,
                batch_size=cfg.reward_batch_size,
            ),
            device=device,
            dtype=torch.float32,
        )
        # Penalty for answers cut off without EOS: the reward model may like a long ramble;
        # the policy should still learn to finish.
        score = raw - cfg.missing_eos_penalty * (~ended).float()
        t_score = time.perf_counter() - t_score

        # Per-token KL to the reference as the reward uses it, and its sum per answer.
        kl_tokens = rl_math.kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * resp_mask
        kl_seq = kl_tokens.sum(1)
        k1_seq = ((old_logp - ref_logp) * resp_mask).sum(1)  # the adaptive controller's
        shown_seq = rl_math.kl_per_answer(old_logp, ref_logp, resp_mask)  # k3, >= 0: logged and shown
        beta = kl_ctl.value
        roll = RolloutSums.gather(
            reduce,
            reward=raw.sum(),
            reward_sq=(raw * raw).sum(),
            score=score.sum(),
            kl=shown_seq.sum(),
            kl_k1=k1_seq.sum(),
            kl_penalty=kl_seq.sum(),
            entropy=(entropy * resp_mask).sum(),
            tokens=resp_mask.sum(),
            eos=ended.float().sum(),
            answers=torch.tensor(float(n), device=device),
        )
        count, tokens = roll.answers, roll.tokens
        reward_mean = roll.reward / count
        reward_std = math.sqrt(max(roll.reward_sq / count - reward_mean**2, 0.0))
        kl_mean = roll.kl / count  # k3: what --max-kl is checked against, as the plot shows it

        # Guards: NaN in the rollout, or a policy that ran away from the reference.
        if not all(math.isfinite(x) for x in dataclasses.astuple(roll)):
            bar.close()
            return fail(
                run,
                f"non-finite values in the rollout at step {step + 1} (reward mean {reward_mean}, "
                f"KL {kl_mean}); stopped. Try a lower --lr or --max-grad-norm",
                step,
                cfg.steps,
            )
        if cfg.max_kl and kl_mean > cfg.max_kl:
            bar.close()
            return fail(
                run,
                f"the KL to the reference exploded at step {step + 1}: {kl_mean:.2f} nats per answer "
                f"> --max-kl {cfg.max_kl}; stopped. Try a lower --lr or a higher --kl-coef "
                f"(now {beta:.4g}), or raise --max-kl if this KL is intended",
                step,
                cfg.steps,
            )

        # 4. Advantages.
        explained_var = None
        if ppo:
            # Per-token reward: -beta * KL_t everywhere, plus the score at the last token.
            rewards = -beta * kl_tokens
            rewards[torch.arange(n, device=device), lengths - 1] += score
            if cfg.whiten_rewards:
                rewards = rl_math.masked_whiten(rewards, resp_mask, shift_mean=False, reduce=reduce)
            advantages, returns = rl_math.gae(rewards, old_values, resp_mask, cfg.gamma, cfg.lam)
            # How much of the returns' variance the value head predicted (1 = all; <= 0 = none).
            explained_var = rl_math.explained_variance(old_values, returns, resp_mask, reduce=reduce)
            if cfg.whiten_advantages:
                advantages = rl_math.masked_whiten(advantages, resp_mask, reduce=reduce)
        elif cfg.algo == "reinforce_pp":
            # REINFORCE++: per-token reward -beta * KL_t, plus on the last token the score minus
            # the mean score of the prompt's k samples (its "baseline" variant; k = 1: none);
            # returns-to-go (gamma 1, no critic), whitened over the whole batch (all processes).
            rewards = -beta * kl_tokens
            rewards[torch.arange(n, device=device), lengths - 1] += rl_math.group_centred(score, cfg.k)
            advantages = rl_math.returns_to_go(rewards, resp_mask)
            advantages = rl_math.masked_whiten(advantages, resp_mask, reduce=reduce)
        else:
            # Sequence-level reward with the KL penalty summed over the answer.
            seq_reward = score - beta * kl_seq
            if cfg.algo == "rloo":
                advantages = rl_math.rloo_advantages(seq_reward, cfg.k)  # leave-one-out baseline
            elif cfg.algo in ("grpo", "dr_grpo"):
                # Group-relative: minus the group's mean, over its std (GRPO) or not (Dr. GRPO).
                advantages = rl_math.group_advantages(seq_reward, cfg.k, scale=cfg.algo == "grpo")
            else:
                # REINFORCE with a moving-average baseline (of the KL-penalised reward), as in
                # Ahmadian et al. (2024); the first batch is its own baseline.
                batch_mean = float(reduce(seq_reward.sum().double())) / count
                b = batch_mean if baseline is None else baseline
                advantages = seq_reward - b
                baseline = (
                    batch_mean
                    if baseline is None
                    else cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * batch_mean
                )
            if cfg.whiten_advantages:
                ones = torch.ones_like(advantages)
                advantages = rl_math.masked_whiten(advantages, ones, reduce=reduce)
            returns = None

        # 5. Update: `epochs` passes, each over shuffled minibatches; one optimizer step each.
        # Overlong filtering (--mask-truncated): a cut-off answer gives no gradient at all.
        keep = (ended | (not cfg.mask_truncated)).float()
        loss_mask = resp_mask * keep[:, None]
        if cfg.algo in TOKEN_ALGOS:
            # The GRPO family: a token-level clipped ratio, each token's advantage weighted so
            # that the loss is the chosen aggregation (rl_math.token_loss_weights).
            adv_tokens = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(loss_mask)
            adv_tokens = adv_tokens * rl_math.token_loss_weights(loss_mask, cfg.loss_agg, cfg.max_new_tokens)
        t_train = time.perf_counter()
        net.train()
        acc = UpdateSums.zeros(device)
        grad_norms = []
        for _epoch in range(cfg.epochs):
            perm = unit_rows(torch.randperm(n // g_train, device=device), g_train)  # shuffled, groups intact
            micro_rows = max(1, cfg.micro_batch // g_train) * g_train
            for mb_start in range(0, n, minibatch_rows):
                mb = perm[mb_start : mb_start + minibatch_rows]
                mb_tokens = loss_mask[mb].sum().clamp(min=1)
                mb_answers = keep[mb].sum().clamp(min=1)
                micro = [mb[i : i + micro_rows] for i in range(0, len(mb), micro_rows)]
                for j, rows in enumerate(micro):
                    sync = j == len(micro) - 1
                    # Gradient accumulation: DDP all-reduces gradients only on the last micro-batch.
                    with contextlib.nullcontext() if sync else accelerator.no_sync(ddp_net):
                        (logp, _, values), w = forward_rows(
                            ddp_net, rows, *rollout, with_values=ppo, group=g_train
                        )
                        m = loss_mask[rows, :w]
                        if ppo:
                            pg, clipped, approx_kl = rl_math.ppo_policy_loss(
                                logp, old_logp[rows, :w], advantages[rows, :w], m, cfg.clip
                            )
                            vf, vclipped = rl_math.ppo_value_loss(
                                values, old_values[rows, :w], returns[rows, :w], m, cfg.clip_value
                            )
                            # Token-level mean over the minibatch, however it is cut into micro-batches.
                            loss = (pg + cfg.vf_coef * vf) / mb_tokens
                        elif cfg.algo in TOKEN_ALGOS:
                            pg, clipped, approx_kl = rl_math.ppo_policy_loss(
                                logp, old_logp[rows, :w], adv_tokens[rows, :w], m, cfg.clip
                            )
                            vf = vclipped = torch.zeros((), device=device)
                            loss = pg / (mb_tokens if cfg.loss_agg == "token" else mb_answers)
                        else:
                            pg, clipped = rl_math.sequence_policy_loss(
                                logp, old_logp[rows, :w], advantages[rows] * keep[rows], m, cfg.clip
                            )
                            with torch.no_grad():
                                approx_kl = rl_math.masked_sum(0.5 * (logp - old_logp[rows, :w]) ** 2, m)
                            vf = vclipped = torch.zeros((), device=device)
                            loss = pg / mb_answers  # mean over the minibatch's answers
                        loss.backward()
                    # In UpdateSums' field order: pg, vf, clipped, vclipped, approx_kl, tokens, answers.
                    acc += torch.stack(
                        [
                            pg.detach(),
                            vf.detach(),
                            clipped,
                            vclipped,
                            approx_kl,
                            m.sum(),
                            keep[rows].sum(),
                        ]
                    ).double()
                # Gradient clipping by global norm. A NaN/inf loss makes the (all-reduced) gradient
                # non-finite on every process alike, so all of them stop here together.
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    bar.close()
                    return fail(
                        run,
                        f"the loss or its gradient became non-finite at step {step + 1} (grad norm "
                        f"{float(grad_norm)}); stopped without applying it. Try a lower --lr or "
                        f"--max-grad-norm",
                        step,
                        cfg.steps,
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                grad_norms.append(float(grad_norm))
        net.eval()
        sampler.sync()  # the next rollout samples from the updated weights
        t_train = time.perf_counter() - t_train

        # 6. Adaptive KL coefficient (no-op when fixed), from this batch's KL per answer (k1,
        #    as in Ziegler et al.: the same KL in expectation, and runs behave as they did).
        kl_ctl.update(roll.kl_k1 / count, int(count))

        # ---- bookkeeping: metrics, samples, status, checkpoint, stop -------------------------
        step += 1
        dt = time.perf_counter() - t0
        upd = UpdateSums(*reduce(acc).tolist())
        tok_updates, seq_updates = max(upd.tokens, 1.0), max(upd.answers, 1.0)
        totals["prompts"] += int(count) // cfg.k
        totals["tokens"] += int(tokens)
        totals["seconds"] += dt
        record = {
            "kind": "train",
            "step": step,
            "reward_mean": reward_mean,
            "reward_std": reward_std,  # the reward model's normalised score
            "score_mean": roll.score / count,  # after the missing-EOS penalty
            "objective": roll.score / count
            - beta * roll.kl_penalty / count,  # what is maximised: score - beta * KL
            "kl": kl_mean,  # per answer, k3 (>= 0; rl_math.kl_per_answer)
            "kl_k1": roll.kl_k1 / count,  # per answer, sum_t log pi/ref (can be < 0)
            "kl_penalty": roll.kl_penalty / count,  # the estimator the reward uses, per answer
            "kl_coef": beta,
            "entropy": roll.entropy / max(tokens, 1.0),  # per token, at temperature T
            "clip_frac": upd.clipped / (tok_updates if token_ratio else seq_updates),
            "approx_kl": upd.approx_kl / tok_updates,  # 0.5 E[(log pi/pi_old)^2] over updates
            "pg_loss": upd.pg_loss / (tok_updates if per_token else seq_updates),
            "value_loss": upd.value_loss / tok_updates if ppo else None,
            # What the update minimised: per token (PPO, with the value loss; --loss-agg token)
            # or per answer.
            "loss": (upd.pg_loss + cfg.vf_coef * upd.value_loss) / tok_updates
            if ppo
            else upd.pg_loss / (tok_updates if per_token else seq_updates),
            "value_clip_frac": upd.value_clipped / tok_updates if ppo else None,
            # PPO: 1 - Var(returns - values) / Var(returns) of the rollout; None without a value
            # head, or when the returns did not vary (it is undefined then).
            "explained_variance": explained_var
            if explained_var is not None and math.isfinite(explained_var)
            else None,
            "response_len": tokens / count,
            "eos_rate": roll.eos / count,
            "gen_tokens": int(tokens),
            "prompts": int(count) // cfg.k,
            "rows": int(count),
            "tokens_per_s": round(tokens / dt, 2),
            "prompts_per_s": round(count / cfg.k / dt, 4),
            "step_s": round(dt, 4),
            "cpu_s": round(time.process_time() - c0, 4),
            "gen_s": round(t_gen, 4),
            "score_s": round(t_score, 4),
            "train_s": round(t_train, 4),
            "lr": lr_now,
            "grad_norm": float(np.mean(grad_norms)),
            "elapsed_s": round(time.time() - t_start, 2),
        }
        run.log(record)
        clock.add(record)
        eta = clock.eta(cfg.steps - step)
        if main:  # one line a step in the log (the Train tab's log pane; above the bar in a terminal)
            tqdm.write(step_line(step, cfg.steps, record, clock.step_s, eta), file=sys.stderr)
        if cfg.sample_every and cfg.samples and (step == 1 or step % cfg.sample_every == 0):
            run.log(samples_record(step, conversations, row_prompt, answers, raw, ended, cfg.samples))
        bar.update(1)
        bar.set_postfix(
            reward=f"{reward_mean:+.3f}", kl=f"{kl_mean:.3g}", len=f"{tokens / count:.1f}", refresh=False
        )
        run.status(
            "running",
            step / cfg.steps,
            f"training: step {step} of {cfg.steps}, reward {reward_mean:+.3f}, KL {kl_mean:.3g}; "
            f"{clock.step_s:.1f} s a step, about {format_duration(eta)} left",
            throttle=True,
            step=step,
            total_steps=cfg.steps,
            step_s=round(clock.step_s, 3),
            eta_s=round(eta, 1),
        )
        # Every process must agree to stop (one small all-reduce).
        stop_now = reduce(torch.tensor([float(bool(stop))], device=device)).item() > 0
        if stop_now and step < cfg.steps:
            bar.close()
            stop.setdefault("signal", signal.SIGTERM)
            checkpoint()
            return finish_cancelled(run, stop["signal"], step, cfg.steps)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            checkpoint()
    bar.close()

    # ---- done: the policy directory, loadable by trainer.models.load_model ----------------------
    save_final(
        run,
        accelerator,
        net,
        tokenizer,
        policy_meta(cfg, base_source, rm_path, step, kl_ctl.value),
        weight_dtype,
        base_source,
    )
    if main and heldout:
        evaluate_heldout(run, cfg, heldout, base_source, reward_model, step, device)
    return finish_done(run, step, cfg.steps, totals, device, t_start)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PolicyConfig)


def run(args: argparse.Namespace) -> int:
    cfg, explicit = script_config(PolicyConfig, args)
    if not cfg.reward and not (cfg.run_dir and (Path(cfg.run_dir) / CONFIG_FILE).exists()):
        raise PolicyInputError(
            "pass --reward RUN_DIR (a reward model from `preflab train-reward`), or --run-dir "
            "of a run to resume"
        )
    return train(cfg, explicit)


def main(argv: list[str] | None = None) -> int:
    return script_main("trainer.policy", __doc__, PolicyConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
