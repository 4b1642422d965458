"""What one step of policy training does with the models (trainer/policy.py runs the loop
around it): the rollout (steps 1-3), the advantages (step 4) and the first-order update
(step 5); the second-order update of --algo trpo is trainer/natural_gradient.py.

    parts = StepParts(cfg, net, ddp_net, ref_net, sampler, ...)       # built once by the trainer
    roll = rollout(parts, chosen_prompts)                              # answers, log-probs, scores
    adv, returns, explained_var, baseline = advantages(parts, roll, kl_tokens, kl_seq, beta, count, baseline)
    result = gradient_update(parts, optimizer, params, roll, adv, returns)   # AdamW steps

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
     RLOO (and TRPO): k samples per prompt; R = score - beta * sum_t KL_t (sequence-level
           KL); advantage = R minus the mean R of the other k - 1 samples of that prompt.
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
   TRPO: no optimizer; one natural-gradient step in a KL trust region
   (trainer/natural_gradient.trpo_update).
6. The adaptive KL coefficient (when `kl_target` > 0) moves toward the target KL.

torch is imported inside functions so that `preflab --help` stays instant.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from trainer.policy_config import TOKEN_ALGOS
from trainer.policy_model import forward_rows, unit_rows


@dataclass
class StepParts:
    """What every step uses, built once: the settings, the models and how rows are grouped."""

    cfg: Any  # PolicyConfig
    net: Any  # policy_model.policy_net (unwrapped)
    ddp_net: Any  # the same under DDP (what the first-order update calls)
    ref_net: Any  # the frozen reference, or None with LoRA (adapters off instead)
    sampler: Any
    tokenizer: Any
    reward_model: Any
    prompt_ids: list  # token ids of each training prompt
    conversations: list
    eos_tensor: Any
    device: Any
    autocast: Any
    accelerator: Any
    reduce: Any  # sum over processes (DDP); identity on one
    g_roll: int  # rows per unit in the rollout forwards (k with a shared prompt, else 1)
    g_train: int  # the same in the update
    minibatch_rows: int

    @property
    def ppo(self) -> bool:
        return self.cfg.algo == "ppo"


@dataclass
class Rollout:
    """Steps 1-3 of one step: the sampled answers, their log-probs and scores."""

    row_prompt: list[int]  # the prompt of each row (prompt-major: row = prompt * k + sample)
    query: Any
    query_mask: Any
    response: Any  # [n, R] answer tokens, pad after the answer
    resp_mask: Any  # [n, R] 1 on the answer's tokens (EOS included)
    lengths: Any
    ended: Any  # the answer ended with EOS
    answers: list[str]
    raw: Any  # the reward model's normalised score
    score: Any  # after the missing-EOS penalty
    old_logp: Any
    ref_logp: Any
    old_values: Any
    entropy: Any
    temperature: float
    autocast: Any
    t_gen: float
    t_score: float
    tensors: tuple = field(init=False)  # forward_rows' arguments after `rows`

    def __post_init__(self):
        self.tensors = (
            self.query,
            self.query_mask,
            self.response,
            self.resp_mask,
            self.temperature,
            self.autocast,
        )

    @property
    def n(self) -> int:
        return len(self.row_prompt)


def rollout(parts: StepParts, chosen: list[int]) -> Rollout:
    """Steps 1-3 for the prompts `chosen`: sample k answers each, their log-probs under the
    policy (with values, for PPO) and the reference, and the reward model's scores."""
    import torch

    cfg, device, net, g_roll = parts.cfg, parts.device, parts.net, parts.g_roll
    pad_id = parts.tokenizer.pad_token_id
    t0 = time.perf_counter()
    # 1. Rollout: batch_size prompts x k samples, prompt-major (row = prompt * k + sample).
    row_prompt = [p for p in chosen for _ in range(cfg.k)]
    n = len(row_prompt)
    lengths_p = [len(parts.prompt_ids[p]) for p in row_prompt]
    P = max(lengths_p)
    query = torch.full((n, P), pad_id, dtype=torch.long)
    query_mask = torch.zeros((n, P), dtype=torch.long)
    for i, p in enumerate(row_prompt):  # left padding: every prompt ends at column P - 1
        query[i, P - lengths_p[i] :] = torch.tensor(parts.prompt_ids[p])
        query_mask[i, P - lengths_p[i] :] = 1
    query, query_mask = query.to(device), query_mask.to(device)
    out = parts.sampler.sample(query, query_mask, lengths_p, cfg.gen_batch or n, parts.autocast)
    # An answer ends at its first EOS (included: the policy chose to stop there); one
    # without EOS ran to max_new_tokens and was cut off.
    is_eos = torch.isin(out, parts.eos_tensor)
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
    tensors = (query, query_mask, response, resp_mask, cfg.temperature, parts.autocast)
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
                net, rows, *tensors, with_values=parts.ppo, with_entropy=True, group=g_roll
            )
            old_logp[rows, :w], entropy[rows, :w] = lp, ent
            if parts.ppo:
                old_values[rows, :w] = val
            if parts.ref_net is not None:
                (lp, _, _), w = forward_rows(parts.ref_net, rows, *tensors, group=g_roll)
            else:
                with net.lm.disable_adapter():  # LoRA: the reference is the base, adapters off
                    (lp, _, _), w = forward_rows(net, rows, *tensors, group=g_roll)
            ref_logp[rows, :w] = lp
    old_logp, ref_logp = old_logp * resp_mask, ref_logp * resp_mask

    # 3. Rewards: the reward model's normalised score of (prompt, decoded answer).
    t_score = time.perf_counter()
    answers = [
        t.strip()
        for t in parts.tokenizer.batch_decode(
            [response[i, : int(lengths[i])].tolist() for i in range(n)], skip_special_tokens=True
        )
    ]
    raw = torch.tensor(
        parts.reward_model.score(
            [parts.conversations[p] for p in row_prompt],
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
    return Rollout(
        row_prompt,
        query,
        query_mask,
        response,
        resp_mask,
        lengths,
        ended,
        answers,
        raw,
        score,
        old_logp,
        ref_logp,
        old_values,
        entropy,
        cfg.temperature,
        parts.autocast,
        t_gen,
        t_score,
    )


def advantages(parts: StepParts, roll: Rollout, kl_tokens, kl_seq, beta: float, count: float, baseline):
    """Step 4: (advantages, returns (PPO) or None, explained variance (PPO) or None, the
    REINFORCE baseline after this batch)."""
    import torch

    from trainer import rl_math

    cfg, reduce, n = parts.cfg, parts.reduce, roll.n
    explained_var = None
    if parts.ppo:
        # Per-token reward: -beta * KL_t everywhere, plus the score at the last token.
        rewards = -beta * kl_tokens
        rewards[torch.arange(n, device=parts.device), roll.lengths - 1] += roll.score
        if cfg.whiten_rewards:
            rewards = rl_math.masked_whiten(rewards, roll.resp_mask, shift_mean=False, reduce=reduce)
        adv, returns = rl_math.gae(rewards, roll.old_values, roll.resp_mask, cfg.gamma, cfg.lam)
        # How much of the returns' variance the value head predicted (1 = all; <= 0 = none).
        explained_var = rl_math.explained_variance(roll.old_values, returns, roll.resp_mask, reduce=reduce)
        if cfg.whiten_advantages:
            adv = rl_math.masked_whiten(adv, roll.resp_mask, reduce=reduce)
        return adv, returns, explained_var, baseline
    if cfg.algo == "reinforce_pp":
        # REINFORCE++: per-token reward -beta * KL_t, plus on the last token the score minus
        # the mean score of the prompt's k samples (its "baseline" variant; k = 1: none);
        # returns-to-go (gamma 1, no critic), whitened over the whole batch (all processes).
        rewards = -beta * kl_tokens
        rewards[torch.arange(n, device=parts.device), roll.lengths - 1] += rl_math.group_centred(
            roll.score, cfg.k
        )
        adv = rl_math.returns_to_go(rewards, roll.resp_mask)
        return rl_math.masked_whiten(adv, roll.resp_mask, reduce=reduce), None, None, baseline
    # Sequence-level reward with the KL penalty summed over the answer.
    seq_reward = roll.score - beta * kl_seq
    if cfg.algo in ("rloo", "trpo"):
        adv = rl_math.rloo_advantages(seq_reward, cfg.k)  # leave-one-out baseline
    elif cfg.algo in ("grpo", "dr_grpo"):
        # Group-relative: minus the group's mean, over its std (GRPO) or not (Dr. GRPO).
        adv = rl_math.group_advantages(seq_reward, cfg.k, scale=cfg.algo == "grpo")
    else:
        # REINFORCE with a moving-average baseline (of the KL-penalised reward), as in
        # Ahmadian et al. (2024); the first batch is its own baseline.
        batch_mean = float(reduce(seq_reward.sum().double())) / count
        b = batch_mean if baseline is None else baseline
        adv = seq_reward - b
        baseline = (
            batch_mean
            if baseline is None
            else cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * batch_mean
        )
    if cfg.whiten_advantages:
        ones = torch.ones_like(adv)
        adv = rl_math.masked_whiten(adv, ones, reduce=reduce)
    return adv, None, None, baseline


@dataclass
class UpdateResult:
    """Step 5's outcome: the sums of policy_run.UpdateSums (a float64 tensor in its field
    order, this process's), the gradient norms, a non-finite gradient norm when the update
    stopped on one (nothing applied), and any metrics of the algorithm's own."""

    sums: Any
    grad_norms: list[float]
    bad_grad_norm: float | None = None
    extra: dict = field(default_factory=dict)


def gradient_update(parts: StepParts, optimizer, params, roll: Rollout, adv, returns) -> UpdateResult:
    """Step 5: `epochs` passes, each over shuffled minibatches; one optimizer step each.
    Overlong filtering (--mask-truncated): a cut-off answer gives no gradient at all."""
    import torch

    from trainer import rl_math
    from trainer.policy_run import UpdateSums

    cfg, device, n, g_train, ppo = parts.cfg, parts.device, roll.n, parts.g_train, parts.ppo
    old_logp, old_values = roll.old_logp, roll.old_values
    keep = (roll.ended | (not cfg.mask_truncated)).float()
    loss_mask = roll.resp_mask * keep[:, None]
    if cfg.algo in TOKEN_ALGOS:
        # The GRPO family: a token-level clipped ratio, each token's advantage weighted so
        # that the loss is the chosen aggregation (rl_math.token_loss_weights).
        adv_tokens = adv if adv.dim() == 2 else adv[:, None].expand_as(loss_mask)
        adv_tokens = adv_tokens * rl_math.token_loss_weights(loss_mask, cfg.loss_agg, cfg.max_new_tokens)
    parts.net.train()
    acc = UpdateSums.zeros(device)
    grad_norms = []
    for _epoch in range(cfg.epochs):
        perm = unit_rows(torch.randperm(n // g_train, device=device), g_train)  # shuffled, groups intact
        micro_rows = max(1, cfg.micro_batch // g_train) * g_train
        for mb_start in range(0, n, parts.minibatch_rows):
            mb = perm[mb_start : mb_start + parts.minibatch_rows]
            mb_tokens = loss_mask[mb].sum().clamp(min=1)
            mb_answers = keep[mb].sum().clamp(min=1)
            micro = [mb[i : i + micro_rows] for i in range(0, len(mb), micro_rows)]
            for j, rows in enumerate(micro):
                sync = j == len(micro) - 1
                # Gradient accumulation: DDP all-reduces gradients only on the last micro-batch.
                with contextlib.nullcontext() if sync else parts.accelerator.no_sync(parts.ddp_net):
                    (logp, _, values), w = forward_rows(
                        parts.ddp_net, rows, *roll.tensors, with_values=ppo, group=g_train
                    )
                    m = loss_mask[rows, :w]
                    if ppo:
                        pg, clipped, approx_kl = rl_math.ppo_policy_loss(
                            logp, old_logp[rows, :w], adv[rows, :w], m, cfg.clip
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
                            logp, old_logp[rows, :w], adv[rows] * keep[rows], m, cfg.clip
                        )
                        with torch.no_grad():
                            approx_kl = rl_math.masked_sum(0.5 * (logp - old_logp[rows, :w]) ** 2, m)
                        vf = vclipped = torch.zeros((), device=device)
                        loss = pg / mb_answers  # mean over the minibatch's answers
                    loss.backward()
                # In UpdateSums' field order: pg, vf, clipped, vclipped, approx_kl, tokens, answers.
                acc += torch.stack(
                    [pg.detach(), vf.detach(), clipped, vclipped, approx_kl, m.sum(), keep[rows].sum()]
                ).double()
            # Gradient clipping by global norm. A NaN/inf loss makes the (all-reduced) gradient
            # non-finite on every process alike, so all of them stop here together.
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                parts.net.eval()
                return UpdateResult(acc, grad_norms, bad_grad_norm=float(grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            grad_norms.append(float(grad_norm))
    parts.net.eval()
    return UpdateResult(acc, grad_norms)
