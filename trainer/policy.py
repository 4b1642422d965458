"""Fine-tune the policy against a trained reward model: PPO, RLOO, REINFORCE, or the GRPO
family (GRPO, Dr. GRPO, REINFORCE++).

    preflab train-policy --reward runs/rm-1 --prompts trainer/data/prompts.jsonl --run-dir runs/pol-1
    python -m trainer.policy --reward runs/rm-1 --prompts comparisons/ --algo rloo --k 4
    accelerate launch -m trainer.policy --reward runs/rm-1 ...        # several GPUs (DDP)
    preflab serve --model runs/pol-1/policy                           # the result, in the arena

The training loop, read top to bottom (CleanRL style). The settings (PolicyConfig:
defaults, --help, checks, resume rules) are in trainer/policy_config.py; the model side
(causal LM + value head, log-probs of the sampled tokens, sampling, LoRA, the reward
scorer, saving) in trainer/policy_model.py; a run's bookkeeping (config.json, named
statistics, logged samples, checkpoints, the final save, the held-out evaluation, the
summary) in trainer/policy_run.py; the pure math (GAE, whitening, KL estimators, the RLOO
baseline, the clipped losses, explained variance, the adaptive KL controller) in
trainer/rl_math.py.

One step: rollout (k answers to each of `batch_size` prompts, their log-probs under the
policy and the reference, the reward model's scores), advantages, update, the adaptive KL
coefficient. Steps 1-5 are trainer/policy_step.py (the trpo update:
trainer/natural_gradient.py), which says what each does; the loop, its guards and its
bookkeeping are here.

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
from trainer.policy_config import DEFAULT_PROMPTS, PolicyConfig, resolve_config
from trainer.policy_model import (
    Sampler,
    add_lora,
    autocast_for,
    eos_token_ids,
    load_causal_lm,
    load_reward_scorer,
    make_value_head,
    policy_net,
    reward_model_dir,
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
    train_record,
    write_start_config,
)
from trainer.policy_step import StepParts, advantages, gradient_update, rollout
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
    from trainer.models import check_model, load_tokenizer
    from trainer.sampling import render_prompt

    device = accelerator.device  # cuda:<local rank> under `accelerate launch`, else cuda or cpu
    cuda = device.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for what still runs in fp32
    lora = cfg.lora_r > 0
    ppo = cfg.algo == "ppo"
    # Master weights in fp32 (RL learning rates are ~1e-6: a bf16 weight would round most
    # updates away). With LoRA the base is frozen, so it can sit in bf16 on CUDA.
    weight_dtype = torch.bfloat16 if cfg.dtype == "bf16" or (lora and cuda) else torch.float32
    ref_dtype = torch.bfloat16 if cuda else torch.float32
    autocast = autocast_for(device)
    reduce = partial(reduce_sum, accelerator)

    run.status("queued", 0.0, f"loading {cfg.model} and the reward model")
    base_source = check_model(cfg.model)  # resolves smollm2 / tiny (built once) / dirs / ids
    tokenizer = load_tokenizer(cfg.model)  # left padding; pad = EOS when the model has no pad
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
    parts = StepParts(
        cfg,
        net,
        ddp_net,
        ref_net,
        sampler,
        tokenizer,
        reward_model,
        prompt_ids,
        conversations,
        eos_tensor,
        device,
        autocast,
        accelerator,
        reduce,
        g_roll,
        g_train,
        minibatch_rows,
    )
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

        # 1-3. Rollout: batch_size prompts x k samples, their log-probs and scores (policy_step).
        chosen = prompt_rows(step, rank, world, cfg.batch_size, len(conversations), cfg.seed)
        ro = rollout(parts, chosen)
        n, resp_mask, old_logp, ref_logp = ro.n, ro.resp_mask, ro.old_logp, ro.ref_logp
        raw, score, entropy, ended, answers = ro.raw, ro.score, ro.entropy, ro.ended, ro.answers
        t_gen, t_score = ro.t_gen, ro.t_score

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

        # 4. Advantages (policy_step.advantages).
        adv, returns, explained_var, baseline = advantages(
            parts, ro, kl_tokens, kl_seq, beta, count, baseline
        )

        # 5. Update: AdamW steps on the clipped surrogate (policy_step.gradient_update), or for
        #    trpo one natural-gradient step in a KL trust region (trainer/natural_gradient.py).
        t_train = time.perf_counter()
        if cfg.algo == "trpo":
            from trainer.natural_gradient import trpo_update

            result = trpo_update(parts, params, ro, adv)
        else:
            result = gradient_update(parts, optimizer, params, ro, adv, returns)
        if result.bad_grad_norm is not None:
            bar.close()
            return fail(
                run,
                f"the loss or its gradient became non-finite at step {step + 1} (grad norm "
                f"{result.bad_grad_norm}); stopped without applying it. Try a lower --lr or "
                f"--max-grad-norm",
                step,
                cfg.steps,
            )
        acc, grad_norms = result.sums, result.grad_norms
        sampler.sync()  # the next rollout samples from the updated weights
        t_train = time.perf_counter() - t_train

        # 6. Adaptive KL coefficient (no-op when fixed), from this batch's KL per answer (k1,
        #    as in Ziegler et al.: the same KL in expectation, and runs behave as they did).
        kl_ctl.update(roll.kl_k1 / count, int(count))

        # ---- bookkeeping: metrics, samples, status, checkpoint, stop -------------------------
        step += 1
        dt = time.perf_counter() - t0
        upd = UpdateSums(*reduce(acc).tolist())
        totals["prompts"] += int(count) // cfg.k
        totals["tokens"] += int(tokens)
        totals["seconds"] += dt
        record = train_record(
            cfg,
            step,
            roll,
            upd,
            beta=beta,
            explained_var=explained_var,
            lr=lr_now,
            grad_norms=grad_norms,
            seconds={
                "step_s": dt,
                "cpu_s": time.process_time() - c0,
                "gen_s": t_gen,
                "score_s": t_score,
                "train_s": t_train,
                "elapsed_s": time.time() - t_start,
            },
            extra=result.extra,  # trpo: the trust region's own (natural_gradient.trpo_update)
        )
        run.log(record)
        clock.add(record)
        eta = clock.eta(cfg.steps - step)
        if main:  # one line a step in the log (the Train tab's log pane; above the bar in a terminal)
            tqdm.write(step_line(step, cfg.steps, record, clock.step_s, eta), file=sys.stderr)
        if cfg.sample_every and cfg.samples and (step == 1 or step % cfg.sample_every == 0):
            run.log(samples_record(step, conversations, ro.row_prompt, answers, raw, ended, cfg.samples))
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
