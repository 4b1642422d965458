"""Fine-tune the policy against a trained reward model: PPO, RLOO or REINFORCE.

    preflab train-policy --reward runs/rm-1 --prompts data/prompts.jsonl --run-dir runs/pol-1
    python -m trainer.policy --reward runs/rm-1 --prompts comparisons/ --algo rloo --k 4
    accelerate launch -m trainer.policy --reward runs/rm-1 ...        # several GPUs (DDP)
    preflab serve --model runs/pol-1/policy                           # the result, in the arena

One file, read top to bottom (CleanRL style): every implementation detail is in the
training loop below with a comment naming it; the pure math (GAE, whitening, KL
estimators, the RLOO baseline, the clipped losses, the adaptive KL controller) is in
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
5. Update: `epochs` passes over the batch in `minibatches` shuffled minibatches, each
   an optimizer step (micro-batches of `micro_batch` rows accumulate its gradient).
   PPO: clipped token ratio + clipped value loss. RLOO / REINFORCE: the clipped ratio of
   the whole answer's probability (with one pass, this is exactly REINFORCE).
6. The adaptive KL coefficient (when `kl_target` > 0) moves toward the target KL.

A run directory (DESIGN.md) holds:
    config.json       the settings, what was read, the schedule
    status.json       {"state": queued|running|done|failed|cancelled, "progress": 0..1, "message"}
    metrics.jsonl     one {"kind": "train"} object per step (reward, KL, entropy, clip
                      fraction, approx KL, value loss, length, EOS rate, tokens/s, step
                      time...), {"kind": "samples"} every `sample_every` steps (prompt,
                      response, reward), {"kind": "resume"}, and a final {"kind": "summary"}
    checkpoint/       while the run can be resumed: the model (or LoRA adapter), the value
                      head, optimizer and step (training_state.pt)
    policy/           when done: a plain Hugging Face model directory with the tokenizer and
                      its chat template (LoRA merged in); `preflab serve --model` reads it
    heldout.jsonl     the `eval_prompts` prompts kept out of training
    eval.json         when done: the reward model's win rate of the policy over the
                      reference on those prompts (trainer/evaluate.py; the Leaderboard tab
                      shows it beside the human win rate)

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
import copy
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import Config, ConfigError, add_config_arguments, config_from_namespace, model_problem
from trainer.runs import CHECKPOINT, Run, read_json, supervise, write_json  # CHECKPOINT: resumable state, while the run is not done
from trainer.store.errors import StoreError

ALGOS = ("ppo", "rloo", "reinforce")
POLICY = "policy"                       # the result: a plain HF model directory
STATE_FILE = "training_state.pt"        # optimizer, step, KL coefficient, baseline
VALUE_HEAD_FILE = "value_head.pt"
META_FILE = "preflab_policy.json"       # provenance: base model, reward model, algorithm, step
DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts.jsonl"
# Settings that may change when a run is resumed; the rest stay what the run began with.
RESUMABLE_OVERRIDES = ("steps", "save_every", "sample_every", "progress", "device", "lr", "max_grad_norm",
                       "max_kl", "kl_coef", "reward_batch_size", "gen_batch", "compile_generation")


class PolicyInputError(ValueError):
    """Input a policy cannot be trained on. The message says what to change."""


class PolicyConfigError(ConfigError, PolicyInputError):
    """Settings the policy trainer cannot run with; the message names the flag."""


@dataclass
class PolicyConfig(Config):
    """The policy trainer's settings: the one place of their defaults, --help text and checks."""

    reward: str | None = field(default=None, metadata={   # or the reward run's checkpoint dir
        "help": "reward model: the run directory of `preflab train-reward`", "label": "Reward model"})
    prompts: str | None = field(default=None, metadata={   # None: DEFAULT_PROMPTS
        "help": f"prompt pool file (.jsonl/.csv/.parquet) or a comparison store: a directory, "
                f"or postgresql://user@host:port/db "
                f"(default: {DEFAULT_PROMPTS.relative_to(DEFAULT_PROMPTS.parents[1])})", "label": "Prompts file"})
    model: str = field(default="smollm2", metadata={
        "help": "starting policy: smollm2 (default), tiny, a model dir or a cached HF id", "label": "Base model"})
    algo: str = field(default="ppo", metadata={
        "help": "ppo (value head + GAE), rloo (k samples, leave-one-out baseline) or reinforce "
                "(moving-average baseline)", "choices": ALGOS, "label": "Algorithm"})
    run_dir: str | None = field(default=None, metadata={
        "help": "run directory; the same one again resumes the run"})
    runs_dir: str = field(default="runs", metadata={"help": "parent of new run directories"})
    run_id: str | None = field(default=None, metadata={
        "help": "name of a new run directory (default: policy-<time>)"})
    steps: int = field(default=100, metadata={"help": "rollout + update iterations", "label": "Steps"})
    batch_size: int = field(default=16, metadata={
        "help": "prompts per step (per process)", "label": "Batch size"})
    k: int = field(default=0, metadata={"help": "samples per prompt (0: 4 for rloo, 1 otherwise)"})
    max_new_tokens: int = field(default=64, metadata={
        "help": "longest answer, in tokens", "label": "Max new tokens"})
    max_prompt_length: int = field(default=512, metadata={"help": "longer prompts lose their oldest tokens"})
    temperature: float = field(default=0.7, metadata={
        "help": "sampling temperature (also applied to the log-probs)"})
    lr: float = field(default=3e-6, metadata={"help": "learning rate (AdamW)", "label": "Learning rate"})
    anneal_lr: bool = field(default=False, metadata={"help": "decay the learning rate linearly to 0"})
    epochs: int = field(default=0, metadata={"help": "passes over each batch (0: 4 for ppo, 1 otherwise)"})
    minibatches: int = field(default=0, metadata={
        "help": "optimizer steps per pass (0: 2 for ppo, 1 otherwise)"})
    micro_batch: int = field(default=8, metadata={   # gradient accumulation
        "help": "rows per forward/backward"})
    gamma: float = field(default=1.0, metadata={"help": "PPO discount"})
    lam: float = field(default=0.95, metadata={"help": "PPO GAE lambda"})
    clip: float = field(default=0.2, metadata={"help": "ratio clip range"})
    clip_value: float = field(default=0.2, metadata={"help": "PPO value clip range"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO value loss weight"})
    kl_coef: float = field(default=0.05, metadata={
        "help": "KL penalty coefficient beta (initial, with --kl-target)", "label": "KL coefficient"})
    kl_estimator: str = field(default="k1", metadata={
        "help": "k1 = log(pi/ref); k3 = (ref/pi - 1) - log(ref/pi), always >= 0", "choices": ("k1", "k3")})
    kl_target: float = field(default=0.0, metadata={
        "help": "adaptive KL: steer the KL per answer to this many nats (0: fixed coefficient)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL horizon, in answers"})
    whiten_rewards: bool = field(default=False, metadata={
        "help": "PPO: scale per-token rewards to unit variance"})
    whiten_advantages: bool | None = field(default=None, metadata={
        "help": "normalise advantages over the batch (default: on for ppo, off otherwise)"})
    missing_eos_penalty: float = field(default=1.0, metadata={
        "help": "subtracted from the score of an answer cut off without EOS"})
    baseline_decay: float = field(default=0.9, metadata={"help": "reinforce: moving-average decay"})
    max_kl: float = field(default=50.0, metadata={
        "help": "fail when the mean KL per answer exceeds this many nats (0: never)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    seed: int = field(default=0, metadata={"help": "random seed (held-out prompts, prompt order, sampling)"})
    lora_r: int = field(default=0, metadata={   # the reference is then the model with adapters off
        "help": "LoRA rank (0: train all weights)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0: 2 * rank)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (big models)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto: fp32 weights, bf16 autocast on CUDA; bf16: bf16 weights too (less memory)",
        "choices": ("auto", "bf16")})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    gen_batch: int = field(default=0, metadata={"help": "rows per generate call (0: all at once)"})
    share_prompt: bool = field(default=True, metadata={
        "help": "with k > 1: run each answer's prompt separately (default: once per prompt, KV cache shared)"})
    compile_generation: bool | None = field(default=None, metadata={
        "help": "static KV cache + torch.compile'd decoding (default: on with CUDA; the first step compiles)"})
    reward_batch_size: int = field(default=32, metadata={"help": "answers per reward-model forward"})
    save_every: int = field(default=25, metadata={"help": "steps between checkpoints (0: at the end)"})
    sample_every: int = field(default=10, metadata={"help": "steps between logged samples (0: never)"})
    samples: int = field(default=3, metadata={"help": "samples logged each time"})
    eval_prompts: int = field(default=32, metadata={
        "help": "prompts held out of training (at most a fifth of the pool); at the end the policy and the "
                "reference answer them and the reward model's win rate goes to eval.json (0: none)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    error = PolicyConfigError

    def problems(self):
        """The rules besides `choices`, on the settings that run (finalize_config's):
        (field, is it bad, why)."""
        cfg = finalize_config(dataclasses.replace(self))
        rows = cfg.batch_size * cfg.k
        units = cfg.batch_size if cfg.k > 1 and cfg.share_prompt else rows  # what minibatches are cut from
        yield from (("model", True, why) for why in model_problem(cfg.model))
        yield "prompts", cfg.prompts is not None and not _prompts_exist(cfg.prompts), f"{cfg.prompts} does not exist"
        yield "steps", cfg.steps < 1, "must be at least 1"
        yield "batch_size", cfg.batch_size < 1, "must be at least 1"
        yield "k", cfg.k < 1, "must be at least 1"
        yield "k", cfg.algo == "rloo" and cfg.k < 2, "must be at least 2 for RLOO (the baseline is the other samples)"
        yield "max_new_tokens", cfg.max_new_tokens < 1, "must be at least 1"
        yield "max_prompt_length", cfg.max_prompt_length < 1, "must be at least 1"
        yield "temperature", not cfg.temperature > 0, "must be positive (the log-probabilities are those of sampling)"
        yield "lr", not cfg.lr > 0, "must be positive"
        yield "epochs", cfg.epochs < 1, "must be at least 1"
        yield "minibatches", not 1 <= cfg.minibatches <= units, (
            f"must be between 1 and {units} (the {'prompts' if units < rows else 'answers'} per step)")
        yield "micro_batch", cfg.micro_batch < 1, "must be at least 1"
        yield "gamma", not 0 <= cfg.gamma <= 1, "must be in [0, 1]"
        yield "lam", not 0 <= cfg.lam <= 1, "must be in [0, 1]"
        yield "clip", not cfg.clip > 0, "must be positive"
        yield "kl_coef", cfg.kl_coef < 0, "must be at least 0"
        yield "kl_target", cfg.kl_target < 0, "must be >= 0"
        yield "baseline_decay", not 0 <= cfg.baseline_decay < 1, "must be in [0, 1)"
        yield "max_kl", cfg.max_kl < 0, "must be >= 0 (0 turns the check off)"


def _prompts_exist(prompts: str) -> bool:
    from trainer.store import is_database
    return is_database(prompts) or Path(prompts).expanduser().exists()


def finalize_config(cfg: PolicyConfig) -> PolicyConfig:
    """Fill the per-algorithm defaults (k, epochs, minibatches, whitening), so that
    config.json shows what actually runs."""
    ppo = cfg.algo == "ppo"
    if not cfg.k:
        cfg.k = 4 if cfg.algo == "rloo" else 1
    if not cfg.epochs:
        cfg.epochs = 4 if ppo else 1
    if not cfg.minibatches:
        cfg.minibatches = 2 if ppo else 1
    if cfg.whiten_advantages is None:
        cfg.whiten_advantages = ppo
    return cfg


def check_config(cfg: PolicyConfig) -> None:
    """PolicyConfigError (naming the flags) unless the settings can run: PolicyConfig.check."""
    cfg.check()


# --------------------------------------------------------------------------------------
# Inputs: prompts and the reward model
# --------------------------------------------------------------------------------------

def load_prompts(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Chat message lists from a prompt pool file (trainer.prompts) or from the prompts of a
    comparison store, a directory or a postgresql:// URL (its `prompt` column, each
    distinct prompt once). A store that cannot be read raises trainer.store.StoreError."""
    from trainer.prompts import PromptPoolError, load_prompt_pool
    from trainer.reward_data import as_messages
    from trainer.store import StoreError, describe, is_database
    database = is_database(path)
    if not database:
        path = Path(path)       # never a URL: Path would fold its "//"
    if database or path.is_dir():
        from trainer.store import read_comparisons
        try:
            table = read_comparisons(path, columns=["prompt"])
        except StoreError:      # names the store and what to do; the run's error as it is
            raise
        except Exception as e:  # not a store: say which
            raise PolicyInputError(f"{describe(path)}: cannot read it as a comparison store ({e})") from None
        distinct = list(dict.fromkeys(table.column("prompt").to_pylist())) if table.num_rows else []
        if not distinct:
            raise PolicyInputError(f"{describe(path)}: the comparison store holds no votes, so no prompts")
        return [as_messages(p) for p in distinct]
    try:
        return [p.messages for p in load_prompt_pool(path).prompts]
    except PromptPoolError as e:
        raise PolicyInputError(str(e)) from None


def reward_checkpoint(path: str | os.PathLike | None) -> Path:
    """The reward model's checkpoint dir, checked before any model is loaded."""
    if not path:
        raise PolicyInputError("no reward model: pass --reward RUN_DIR (a run of `preflab train-reward`)")
    path = Path(path)
    if (path / "checkpoint" / "config.json").is_file():
        return path / "checkpoint"
    if (path / "config.json").is_file() and (path / "preflab_reward.json").is_file():
        return path
    state = read_json(path / "status.json").get("state")
    why = f" (its state is {state!r})" if state else ""
    raise PolicyInputError(f"{path}: no trained reward model here{why}; pass the run directory of a "
                           f"finished `preflab train-reward`")


# --------------------------------------------------------------------------------------
# The model: causal LM + value head; log-probs of the sampled tokens in one forward
# --------------------------------------------------------------------------------------

def head_logits(inner, hidden):
    """The LM head on some hidden states, with the logit scaling / soft-capping that a few
    architectures apply in their own forward (Cohere, Gemma 2)."""
    import torch
    logits = inner.get_output_embeddings()(hidden)
    text = inner.config.get_text_config()
    if getattr(text, "logit_scale", None):
        logits = logits * text.logit_scale
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def policy_net(lm, value_head=None):
    """The module that training runs (and DDP wraps): the causal LM and, for PPO, a value
    head on its last hidden state."""
    import torch

    class PolicyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm                  # registered here so DDP and the optimizer see every parameter
            self.value_head = value_head

        @property
        def inner(self):
            # With LoRA the layers are patched in place: call the inner model, not the PeftModel.
            return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

        def forward(self, input_ids, attention_mask, position_ids, n_prompt: int, temperature: float,
                    with_values: bool = False, with_entropy: bool = False, group: int = 1):
            """Log-probs [rows, R] of the answer tokens input_ids[:, n_prompt:] (R of them)
            at sampling temperature, and optionally the entropy and the values there.
            group > 1: rows come in runs of `group` answers to one prompt (RLOO's k samples)."""
            inner = self.inner
            backbone = inner.base_model
            if group > 1:
                # Shared prompt: run each prompt once, copy its KV cache to its k answers, and
                # run only the answers on top: the prompt's share of the work drops k-fold.
                first = backbone(input_ids=input_ids[::group, :n_prompt],
                                 attention_mask=attention_mask[::group, :n_prompt],
                                 position_ids=position_ids[::group, :n_prompt], use_cache=True)
                cache = first.past_key_values
                cache.batch_repeat_interleave(group)
                rest = backbone(input_ids=input_ids[:, n_prompt:], attention_mask=attention_mask,
                                position_ids=position_ids[:, n_prompt:], past_key_values=cache,
                                use_cache=True).last_hidden_state
                last_prompt = first.last_hidden_state[:, -1:].repeat_interleave(group, dim=0)
                h = torch.cat([last_prompt, rest[:, :-1]], dim=1)
            else:
                hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
                # Position n_prompt - 1 + t has seen the prompt and answer[:t]: it predicts token t
                # (and is the state s_t the value head rates).
                h = hidden[:, n_prompt - 1:-1]
            # Logits only for the answer's positions, in fp32, divided by the sampling temperature.
            logits = head_logits(inner, h).float() / temperature
            lse = torch.logsumexp(logits, dim=-1)
            logp = logits.gather(-1, input_ids[:, n_prompt:, None]).squeeze(-1) - lse
            entropy = values = None
            if with_entropy:
                with torch.no_grad():  # a diagnostic: H = logsumexp - E_p[logit]
                    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
            if with_values:
                values = self.value_head(h).squeeze(-1).float()
            return logp, entropy, values

    return PolicyNet()


def disable_dropout(model) -> None:
    """Dropout off: with it, the log-probs of the rollout, of the reference and of the update
    would come from different random sub-networks, and the ratio would be noise."""
    import torch
    text = model.config.get_text_config()
    for key, value in text.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(text, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_causal_lm(source: str, dtype):
    import transformers
    from transformers import AutoModelForCausalLM
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    disable_dropout(lm)
    return lm


def merge_lora_in_fp32(peft_lm, base_source: str):
    """The trained adapters merged into a fresh fp32 copy of the base. With LoRA on CUDA the
    frozen base sits in bf16; merging into it would round every weight of the saved policy
    (the untouched ones too) to bf16."""
    import copy

    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    adapters = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(peft_lm).items()}
    fresh = get_peft_model(load_causal_lm(base_source, torch.float32), copy.deepcopy(peft_lm.peft_config["default"]))
    set_peft_model_state_dict(fresh, adapters)
    return fresh.merge_and_unload()


# --------------------------------------------------------------------------------------
# Run directory: config, checkpoints
# --------------------------------------------------------------------------------------

def resolve_config(cfg: PolicyConfig, explicit: set[str]) -> tuple[PolicyConfig, Path]:
    """(config to run, run dir). A run dir that already has a config is that run: its
    settings win, except the few RESUMABLE_OVERRIDES given explicitly."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        run_id = cfg.run_id or time.strftime("policy-%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"
        path = Path(cfg.runs_dir) / run_id
    saved = read_json(path / "config.json").get("config")
    if saved:
        merged = {**saved}
        for key in explicit:
            value = getattr(cfg, key)
            if key not in RESUMABLE_OVERRIDES and value != saved.get(key):
                if key not in ("run_dir", "runs_dir", "run_id"):
                    print(f"note: {key}={value!r} ignored: resuming {path}, which runs with "
                          f"{key}={saved.get(key)!r}", file=sys.stderr)
                continue
            merged[key] = value
        fields = {f.name for f in dataclasses.fields(PolicyConfig)}
        cfg = PolicyConfig(**{k: v for k, v in merged.items() if k in fields})
    cfg.run_dir = str(path)
    return finalize_config(cfg), path


def swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the fully written `tmp` with renames: the previous directory stays
    intact until the new one is complete (a kill mid-save loses nothing)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def seed_for(seed: int, step: int, rank: int) -> int:
    """Each step (and each process) samples from its own seed: a resumed run draws what an
    uninterrupted one would have, and DDP processes never draw the same answers."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)


def prompt_rows(step: int, rank: int, world: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """The prompts of one step on one process: consecutive slices of a seeded permutation of
    the pool, a fresh permutation each pass. A function of the step alone, so resume needs
    no sampler state."""
    import numpy as np
    out, perms = [], {}
    first = (step * world + rank) * batch_size
    for g in range(first, first + batch_size):
        epoch, i = divmod(g, n_prompts)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.append(int(perms[epoch][i]))
    return out


def _peak_memory_mb(device) -> float:
    import resource

    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


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
    cfg, run_path = resolve_config(cfg, explicit)

    return supervise(run_path, cfg.device, lambda: check_config(cfg),
                     lambda run, accelerator, stop: _train(cfg, run, accelerator, stop),
                     (PolicyInputError, StoreError))


def _train(cfg: PolicyConfig, run: Run, accelerator, stop: dict) -> int:
    t_start = time.time()
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    ckpt = run.checkpoint()
    resuming = ckpt is not None and (ckpt / STATE_FILE).exists()
    run.status("queued", 0.0, "reading the prompts")

    # ---- inputs, before any model is loaded: bad input fails in seconds -------------------
    import numpy as np
    from trainer.evaluate import write_heldout
    rm_path = reward_checkpoint(cfg.reward)
    prompts_path = cfg.prompts or str(DEFAULT_PROMPTS)
    conversations = load_prompts(prompts_path)
    # Held-out prompts: never trained on; the policy meets the reference on them at the end.
    # Seeded, so a resumed run holds out the same ones.
    n_heldout = min(cfg.eval_prompts, len(conversations) // 5)
    held = set(np.random.default_rng([cfg.seed, 1]).permutation(len(conversations))[:n_heldout].tolist())
    heldout = [c for i, c in enumerate(conversations) if i in held]
    conversations = [c for i, c in enumerate(conversations) if i not in held]
    if main and not resuming:
        write_json(run.path / "config.json", {"kind": "policy", "config": dataclasses.asdict(cfg),
                                              "created_at": time.time(),
                                              "prompts": {"source": str(prompts_path), "count": len(conversations),
                                                          "heldout": len(heldout)},
                                              "reward_model": str(rm_path)})
        write_heldout(run.path, heldout)
    accelerator.wait_for_everyone()

    # ---- models ----------------------------------------------------------------------------
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from trainer import rl_math
    from trainer.evaluate import evaluate_policy, write_eval
    from trainer.models import canonical_name, check_model, load_tokenizer, render_prompt
    from trainer.reward import RewardModel

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

    def autocast():
        # bf16 autocast on CUDA: matmuls on tensor cores, weights and optimizer state in fp32.
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    run.status("queued", 0.0, f"loading {cfg.model} and the reward model")
    base_source = check_model(cfg.model)  # resolves smollm2 / tiny (built once) / dirs / ids
    tokenizer = load_tokenizer(cfg.model)  # left padding; pad = EOS when the model has no pad
    pad_id = tokenizer.pad_token_id
    lm = load_causal_lm(str(ckpt) if resuming and not lora else base_source, weight_dtype)
    if cfg.grad_checkpointing:
        # Recompute activations in backward: memory per layer O(1), ~30% more compute.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, PeftModel, get_peft_model
        if resuming:
            lm = PeftModel.from_pretrained(lm, str(ckpt), is_trainable=True)
        else:
            lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r,
                                               lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                                               lora_dropout=0.0, target_modules="all-linear"))
    lm.to(device)
    inner = lm.get_base_model() if lora else lm
    hidden_size = inner.config.get_text_config().hidden_size

    # Reference: a frozen copy of the starting model; with LoRA none (adapters off instead).
    ref = None
    if not lora:
        ref = load_causal_lm(base_source, ref_dtype).to(device).eval().requires_grad_(False)

    # Value head (PPO): one linear layer on the last hidden state, initialised to zero, so
    # the first values are 0 and the first advantages are the rewards-to-go.
    value_head = None
    if ppo:
        value_head = torch.nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
        if resuming:
            value_head.load_state_dict(torch.load(ckpt / VALUE_HEAD_FILE, map_location=device))
    net = policy_net(lm, value_head)
    ref_net = policy_net(ref) if ref is not None else None

    # Generation copy (CUDA, full fine-tuning): bf16 weights, so that each decoding step reads
    # half the bytes and skips autocast's per-step weight casts. Refreshed after every update.
    gen_lm = lm
    if cuda and not lora and weight_dtype != torch.bfloat16:
        gen_lm = copy.deepcopy(lm).to(torch.bfloat16).eval().requires_grad_(False)

    def sync_gen_copy():
        if gen_lm is not lm:
            with torch.no_grad():
                for g, p in zip(gen_lm.parameters(), lm.parameters()):
                    g.copy_(p)

    reward_model = RewardModel.load(rm_path, device=device)

    # ---- prompts -> token ids (chat template, assistant turn opened; oldest tokens cut) -----
    texts = [render_prompt(tokenizer, c) for c in conversations]
    add_special = not getattr(tokenizer, "chat_template", None)
    full_ids = tokenizer(texts, add_special_tokens=add_special).input_ids
    prompts_cut = sum(len(ids) > cfg.max_prompt_length for ids in full_ids)
    prompt_ids = [ids[-cfg.max_prompt_length:] for ids in full_ids]

    # EOS: the tokenizer's and the generation config's (chat models often have two).
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = inner.generation_config.eos_token_id
    eos_ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos_ids.discard(None)
    eos_tensor = torch.tensor(sorted(eos_ids), device=device)
    # Pure sampling at temperature T: no top-k / top-p / repetition penalty, so that the
    # sampling distribution is exactly softmax(logits / T), the one the log-probs are of.
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                    max_new_tokens=cfg.max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad_id,
                    bos_token_id=tokenizer.bos_token_id, use_cache=True)
    gen_config = GenerationConfig(**sampling)
    # Compiled decoding (CUDA): a static KV cache lets transformers torch.compile the decoding
    # step (CUDA graphs: one launch per token instead of hundreds). Every generate call then
    # has one shape: prompts are left-padded to the pool's longest, so it compiles once.
    compile_gen = cfg.compile_generation if cfg.compile_generation is not None else gen_lm is not lm
    gen_width = max(len(ids) for ids in prompt_ids)
    if compile_gen:
        from transformers import CompileConfig
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # also on CPU, when asked for explicitly
        gen_config = GenerationConfig(**sampling, cache_implementation="static", compile_config=compile_config)

    # ---- optimizer -----------------------------------------------------------------------
    params = [p for p in net.parameters() if p.requires_grad]
    # eps 1e-5 (CleanRL / the PPO reference implementations); fused: one kernel for all tensors.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=1e-5, weight_decay=0.0,
                                  fused=device.type in ("cuda", "cpu"))
    kl_ctl = rl_math.AdaptiveKLController(cfg.kl_coef, cfg.kl_target or None, cfg.kl_horizon)
    step, baseline = 0, None
    totals = {"prompts": 0, "tokens": 0, "seconds": 0.0}
    if resuming:
        # weights_only=False: our own file, holding Python numbers next to the tensors.
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
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
    sync_gen_copy()

    def reduce_sum(t):
        return accelerator.reduce(t, reduction="sum") if world > 1 else t

    def meta() -> dict:
        return {"format": 1, "algo": cfg.algo, "base_model": cfg.model, "base_source": base_source,
                "reward_model": str(rm_path), "step": step, "lora": lora, "kl_coef": kl_ctl.value}

    def save(final: bool = False) -> None:
        """Checkpoint (resumable) or, at the end, the policy: a plain HF model directory."""
        if main:
            name = POLICY if final else CHECKPOINT
            tmp = run.path / (name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model = net.lm
            if final and lora:  # a plain model: loadable without peft
                model = model.merge_and_unload() if weight_dtype == torch.float32 \
                    else merge_lora_in_fp32(model, base_source)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)  # with the chat template: the arena renders prompts alike
            write_json(tmp / META_FILE, meta())
            if not final:
                if value_head is not None:
                    torch.save(value_head.state_dict(), tmp / VALUE_HEAD_FILE)
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "kl_coef": kl_ctl.value,
                            "kl_coef_setting": cfg.kl_coef, "baseline": baseline, "totals": totals},
                           tmp / STATE_FILE)
            swap_in(tmp, run.path / name)
            if final:  # the policy is the result; the resumable state is no longer needed
                shutil.rmtree(run.path / CHECKPOINT, ignore_errors=True)
                shutil.rmtree(run.path / (CHECKPOINT + ".old"), ignore_errors=True)
        accelerator.wait_for_everyone()

    def fail(message: str) -> int:
        kept = run.checkpoint()
        message = f"{message}. Last good checkpoint: {kept or 'none (no checkpoint was saved yet)'}"
        run.status("failed", step / cfg.steps, message, step=step, total_steps=cfg.steps)
        if main:
            tqdm.write(f"error: {message}", file=sys.stderr)
        return 1

    def finish_cancelled() -> int:
        save()
        msg = f"cancelled at step {step} of {cfg.steps}; run the same command again to resume"
        run.status("cancelled", step / cfg.steps, msg, step=step, total_steps=cfg.steps)
        if main:
            tqdm.write(msg, file=sys.stderr)
        return 128 + stop["signal"]

    rows_per_step = cfg.batch_size * cfg.k
    # Units of work: with k > 1 and prompt sharing, the k answers to one prompt always travel
    # together (one prompt forward for all of them); otherwise single answers.
    g_roll = cfg.k if cfg.k > 1 and cfg.share_prompt else 1
    g_train = g_roll if not cfg.grad_checkpointing else 1  # checkpointed layers run without a KV cache
    minibatch_rows = math.ceil(rows_per_step / g_train / cfg.minibatches) * g_train

    def unit_rows(units, g):
        """Row indices of some units (rows are prompt-major: row = prompt * k + sample)."""
        return (units[:, None] * g + torch.arange(g, device=units.device)).reshape(-1)
    config_record = read_json(run.path / "config.json")
    config_record.update(config=dataclasses.asdict(cfg), processes=world, device=str(device),
                         rows_per_step=rows_per_step * world, minibatch_rows=minibatch_rows,
                         shared_prompt_forward={"rollout": g_roll > 1, "update": g_train > 1},
                         optimizer_steps_per_step=cfg.epochs * cfg.minibatches,
                         reference="adapters off" if lora else "frozen copy",
                         generation=("bf16 copy" if gen_lm is not lm else "training weights")
                         + (", static cache, compiled" if compile_gen else ", dynamic cache"),
                         eos_token_ids=sorted(eos_ids))
    if main:
        if prompts_cut:
            config_record["prompts_cut"] = prompts_cut
        write_json(run.path / "config.json", config_record)
    run.status("running", step / cfg.steps, f"training: step {step} of {cfg.steps}", step=step, total_steps=cfg.steps)
    if stop:
        return finish_cancelled()

    def forward_rows(model, rows, query, query_mask, response, resp_mask, **kw):
        """One forward on some rows (whole groups of `group` answers to one prompt, when
        given), trimmed to their own longest prompt and answer. Returns log-probs (and
        entropy / values) of width = their longest answer."""
        qm = query_mask[rows]
        start = int((qm.sum(0) > 0).nonzero()[0])  # left padding: drop columns that are all pad
        width = int(resp_mask[rows].sum(1).max())
        ids = torch.cat([query[rows, start:], response[rows, :width]], dim=1)
        mask = torch.cat([qm[:, start:], resp_mask[rows, :width].long()], dim=1)
        # Positions count real tokens only, as in generation (exact for absolute-position models).
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        with autocast():
            return model(ids, mask, position_ids, query.shape[1] - start, cfg.temperature, **kw), width

    # ---- the loop --------------------------------------------------------------------------
    bar = tqdm(total=cfg.steps, initial=step, desc=f"policy ({cfg.algo})", unit="step",
               disable=not (cfg.progress and main), dynamic_ncols=True)
    lr_now = cfg.lr
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
            query[i, P - lengths_p[i]:] = torch.tensor(prompt_ids[p])
            query_mask[i, P - lengths_p[i]:] = 1
        query, query_mask = query.to(device), query_mask.to(device)

        gen_lm.eval()
        out = torch.full((n, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
        # Rows sorted by prompt length, so each generate call pads little (when cut in chunks).
        order = sorted(range(n), key=lambda i: lengths_p[i])
        chunk = cfg.gen_batch or n
        gq, gm, width = query, query_mask, P
        if compile_gen:  # one shape for every call: left-pad to the pool's longest prompt
            gq = torch.nn.functional.pad(query, (gen_width - P, 0), value=pad_id)
            gm = torch.nn.functional.pad(query_mask, (gen_width - P, 0), value=0)
            width = gen_width
        with torch.no_grad(), (contextlib.nullcontext() if gen_lm is not lm else autocast()):
            for c in range(0, n, chunk):
                rows = torch.tensor(order[c:c + chunk], device=device)
                start = 0 if compile_gen else width - max(lengths_p[i] for i in order[c:c + chunk])
                try:
                    seq = gen_lm.generate(input_ids=gq[rows, start:], attention_mask=gm[rows, start:],
                                          generation_config=gen_config)  # KV cache on
                except Exception as e:
                    if not compile_gen:
                        raise
                    # Compiled decoding is an optimisation: never let it cost the run.
                    tqdm.write(f"warning: compiled generation failed ({type(e).__name__}: {str(e)[:200]}); "
                               f"generating without it", file=sys.stderr)
                    compile_gen, gen_config = False, GenerationConfig(**sampling)
                    seq = gen_lm.generate(input_ids=gq[rows, start:], attention_mask=gm[rows, start:],
                                          generation_config=gen_config)
                new = seq[:, width - start:]
                out[rows, :new.shape[1]] = new
        # An answer ends at its first EOS (included: the policy chose to stop there); one
        # without EOS ran to max_new_tokens and was cut off.
        is_eos = torch.isin(out, eos_tensor)
        ended = is_eos.any(1)
        lengths = torch.where(ended, is_eos.int().argmax(1) + 1, torch.full_like(ended, cfg.max_new_tokens,
                                                                               dtype=torch.long))
        R = int(lengths.max())
        response = out[:, :R]
        positions = torch.arange(R, device=device)
        resp_mask = (positions[None, :] < lengths[:, None]).float()
        response = torch.where(resp_mask.bool(), response, torch.full_like(response, pad_id))
        t_gen = time.perf_counter() - t0

        # 2. Log-probs of the sampled tokens: policy (+ values, entropy) and reference, one
        #    batched forward each (in micro-batches of rows), no gradient.
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
                rows = unit_rows(by_length[c:c + fwd_units], g_roll)
                (lp, ent, val), w = forward_rows(net, rows, query, query_mask, response, resp_mask,
                                                 with_values=ppo, with_entropy=True, group=g_roll)
                old_logp[rows, :w], entropy[rows, :w] = lp, ent
                if ppo:
                    old_values[rows, :w] = val
                if ref_net is not None:
                    (lp, _, _), w = forward_rows(ref_net, rows, query, query_mask, response, resp_mask, group=g_roll)
                else:
                    with net.lm.disable_adapter():  # LoRA: the reference is the base, adapters off
                        (lp, _, _), w = forward_rows(net, rows, query, query_mask, response, resp_mask,
                                                     group=g_roll)
                ref_logp[rows, :w] = lp
        old_logp, ref_logp = old_logp * resp_mask, ref_logp * resp_mask

        # 3. Rewards: the reward model's normalised score of (prompt, decoded answer).
        t_score = time.perf_counter()
        answers = [t.strip() for t in tokenizer.batch_decode(
            [response[i, :int(lengths[i])].tolist() for i in range(n)], skip_special_tokens=True)]
        raw = torch.tensor(reward_model.score([conversations[p] for p in row_prompt], answers, normalize=True,
                                              batch_size=cfg.reward_batch_size), device=device, dtype=torch.float32)
        # Penalty for answers cut off without EOS: the reward model may like a long ramble;
        # the policy should still learn to finish.
        score = raw - cfg.missing_eos_penalty * (~ended).float()
        t_score = time.perf_counter() - t_score

        # Per-token KL to the reference, and its sum per answer.
        kl_tokens = rl_math.kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * resp_mask
        kl_seq = kl_tokens.sum(1)
        k1_seq = ((old_logp - ref_logp) * resp_mask).sum(1)  # logged: the usual "KL" of RLHF
        beta = kl_ctl.value
        stats = torch.stack([raw.sum(), (raw * raw).sum(), score.sum(), k1_seq.sum(), kl_seq.sum(),
                             (entropy * resp_mask).sum(), resp_mask.sum(), ended.float().sum(),
                             torch.tensor(float(n), device=device)]).double()
        g = reduce_sum(stats).tolist()
        count, tokens = g[8], g[6]
        reward_mean = g[0] / count
        reward_std = math.sqrt(max(g[1] / count - reward_mean ** 2, 0.0))
        kl_mean = g[3] / count

        # Guards: NaN in the rollout, or a policy that ran away from the reference.
        if not all(math.isfinite(x) for x in g):
            bar.close()
            return fail(f"non-finite values in the rollout at step {step + 1} (reward mean {reward_mean}, "
                        f"KL {kl_mean}); stopped. Try a lower --lr or --max-grad-norm")
        if cfg.max_kl and kl_mean > cfg.max_kl:
            bar.close()
            return fail(f"the KL to the reference exploded at step {step + 1}: {kl_mean:.2f} nats per answer "
                        f"> --max-kl {cfg.max_kl}; stopped. Try a lower --lr or a higher --kl-coef "
                        f"(now {beta:.4g}), or raise --max-kl if this KL is intended")

        # 4. Advantages.
        if ppo:
            # Per-token reward: -beta * KL_t everywhere, plus the score at the last token.
            rewards = -beta * kl_tokens
            rewards[torch.arange(n, device=device), lengths - 1] += score
            if cfg.whiten_rewards:
                rewards = rl_math.masked_whiten(rewards, resp_mask, shift_mean=False, reduce=reduce_sum)
            advantages, returns = rl_math.gae(rewards, old_values, resp_mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = rl_math.masked_whiten(advantages, resp_mask, reduce=reduce_sum)
        else:
            # Sequence-level reward with the KL penalty summed over the answer.
            seq_reward = score - beta * kl_seq
            if cfg.algo == "rloo":
                advantages = rl_math.rloo_advantages(seq_reward, cfg.k)  # leave-one-out baseline
            else:
                # REINFORCE with a moving-average baseline (of the KL-penalised reward), as in
                # Ahmadian et al. (2024); the first batch is its own baseline.
                batch_mean = float(reduce_sum(seq_reward.sum().double())) / count
                b = batch_mean if baseline is None else baseline
                advantages = seq_reward - b
                baseline = batch_mean if baseline is None else \
                    cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * batch_mean
            if cfg.whiten_advantages:
                ones = torch.ones_like(advantages)
                advantages = rl_math.masked_whiten(advantages, ones, reduce=reduce_sum)
            returns = None

        # 5. Update: `epochs` passes, each over shuffled minibatches; one optimizer step each.
        t_train = time.perf_counter()
        net.train()
        acc = torch.zeros(7, dtype=torch.float64, device=device)  # pg, vf, clipped, vclipped, approx_kl, tok, seqs
        grad_norms = []
        for epoch in range(cfg.epochs):
            perm = unit_rows(torch.randperm(n // g_train, device=device), g_train)  # shuffled, groups intact
            micro_rows = max(1, cfg.micro_batch // g_train) * g_train
            for mb_start in range(0, n, minibatch_rows):
                mb = perm[mb_start:mb_start + minibatch_rows]
                mb_tokens = resp_mask[mb].sum().clamp(min=1)
                micro = [mb[i:i + micro_rows] for i in range(0, len(mb), micro_rows)]
                for j, rows in enumerate(micro):
                    sync = j == len(micro) - 1
                    # Gradient accumulation: DDP all-reduces gradients only on the last micro-batch.
                    with contextlib.nullcontext() if sync else accelerator.no_sync(ddp_net):
                        (logp, _, values), w = forward_rows(ddp_net, rows, query, query_mask, response, resp_mask,
                                                            with_values=ppo, group=g_train)
                        m = resp_mask[rows, :w]
                        if ppo:
                            pg, clipped, approx_kl = rl_math.ppo_policy_loss(
                                logp, old_logp[rows, :w], advantages[rows, :w], m, cfg.clip)
                            vf, vclipped = rl_math.ppo_value_loss(
                                values, old_values[rows, :w], returns[rows, :w], m, cfg.clip_value)
                            # Token-level mean over the minibatch, however it is cut into micro-batches.
                            loss = (pg + cfg.vf_coef * vf) / mb_tokens
                        else:
                            pg, clipped = rl_math.sequence_policy_loss(
                                logp, old_logp[rows, :w], advantages[rows], m, cfg.clip)
                            with torch.no_grad():
                                approx_kl = rl_math.masked_sum(0.5 * (logp - old_logp[rows, :w]) ** 2, m)
                            vf = vclipped = torch.zeros((), device=device)
                            loss = pg / len(mb)  # mean over the minibatch's answers
                        loss.backward()
                    acc += torch.stack([pg.detach(), vf.detach(), clipped, vclipped, approx_kl, m.sum(),
                                        torch.tensor(float(len(rows)), device=device)]).double()
                # Gradient clipping by global norm. A NaN/inf loss makes the (all-reduced) gradient
                # non-finite on every process alike, so all of them stop here together.
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    bar.close()
                    return fail(f"the loss or its gradient became non-finite at step {step + 1} (grad norm "
                                f"{float(grad_norm)}); stopped without applying it. Try a lower --lr or "
                                f"--max-grad-norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                grad_norms.append(float(grad_norm))
        net.eval()
        sync_gen_copy()  # the next rollout samples from the updated weights
        t_train = time.perf_counter() - t_train

        # 6. Adaptive KL coefficient (no-op when fixed), from this batch's KL per answer.
        kl_ctl.update(kl_mean, int(count))

        # ---- bookkeeping: metrics, samples, status, checkpoint, stop -------------------------
        step += 1
        dt = time.perf_counter() - t0
        a = reduce_sum(acc).tolist()
        tok_updates, seq_updates = max(a[5], 1.0), max(a[6], 1.0)
        totals["prompts"] += int(count) // cfg.k
        totals["tokens"] += int(tokens)
        totals["seconds"] += dt
        record = {
            "kind": "train", "step": step,
            "reward_mean": reward_mean, "reward_std": reward_std,            # the reward model's normalised score
            "score_mean": g[2] / count,                                     # after the missing-EOS penalty
            "objective": g[2] / count - beta * g[4] / count,                # what is maximised: score - beta * KL
            "kl": kl_mean,                                                  # sum_t log pi/ref per answer (k1)
            "kl_penalty": g[4] / count,                                     # the estimator in use, per answer
            "kl_coef": beta,
            "entropy": g[5] / max(tokens, 1.0),                             # per token, at temperature T
            "clip_frac": a[2] / (tok_updates if ppo else seq_updates),
            "approx_kl": a[4] / tok_updates,                                # 0.5 E[(log pi/pi_old)^2] over updates
            "pg_loss": a[0] / (tok_updates if ppo else seq_updates),
            "value_loss": a[1] / tok_updates if ppo else None,
            "value_clip_frac": a[3] / tok_updates if ppo else None,
            "response_len": tokens / count, "eos_rate": g[7] / count,
            "gen_tokens": int(tokens), "prompts": int(count) // cfg.k, "rows": int(count),
            "tokens_per_s": round(tokens / dt, 2), "prompts_per_s": round(count / cfg.k / dt, 4),
            "step_s": round(dt, 4), "cpu_s": round(time.process_time() - c0, 4),
            "gen_s": round(t_gen, 4), "score_s": round(t_score, 4),
            "train_s": round(t_train, 4), "lr": lr_now, "grad_norm": float(np.mean(grad_norms)),
            "elapsed_s": round(time.time() - t_start, 2),
        }
        run.log(record)
        if cfg.sample_every and cfg.samples and (step == 1 or step % cfg.sample_every == 0):
            run.log({"kind": "samples", "step": step, "samples": [
                {"prompt": conversations[row_prompt[i]], "response": answers[i], "reward": float(raw[i]),
                 "eos": bool(ended[i])} for i in range(0, n, max(1, n // cfg.samples))[:cfg.samples]]})
        bar.update(1)
        bar.set_postfix(reward=f"{reward_mean:+.3f}", kl=f"{kl_mean:.3f}", len=f"{tokens / count:.1f}", refresh=False)
        run.status("running", step / cfg.steps, f"training: step {step} of {cfg.steps}, reward {reward_mean:+.3f}, "
                   f"KL {kl_mean:.3f}", throttle=True, step=step, total_steps=cfg.steps)
        # Every process must agree to stop (one small all-reduce).
        stop_now = reduce_sum(torch.tensor([float(bool(stop))], device=device)).item() > 0
        if stop_now and step < cfg.steps:
            bar.close()
            stop.setdefault("signal", signal.SIGTERM)
            return finish_cancelled()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save()
    bar.close()

    # ---- done: the policy directory, loadable by trainer.models.load_model ----------------------
    save(final=True)
    if main and heldout:
        run.status("running", 1.0, f"evaluating: policy against the reference on {len(heldout)} held-out prompts",
                   step=step, total_steps=cfg.steps)
        result = evaluate_policy(run.path / POLICY, base_source, reward_model, heldout,
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                 device=device)
        record = write_eval(run.path, reference_id=canonical_name(cfg.model), reward_run=str(cfg.reward),
                            result=result)
        run.log({"kind": "eval", "step": step, **{k: record[k] for k in
                 ("prompts", "rm_win_rate", "rm_win_rate_ci", "policy_reward_mean", "reference_reward_mean")}})
        tqdm.write(f"reward-model win rate over {record['reference']} on {record['prompts']} held-out prompts: "
                   f"{record['rm_win_rate']:.3f} (95% CI {record['rm_win_rate_ci'][0]:.3f}-"
                   f"{record['rm_win_rate_ci'][1]:.3f})", file=sys.stderr)
    summary = {"kind": "summary", "step": step, "prompts": totals["prompts"], "gen_tokens": totals["tokens"],
               "train_seconds": round(totals["seconds"], 3),
               "prompts_per_s": round(totals["prompts"] / totals["seconds"], 4) if totals["seconds"] else None,
               "tokens_per_s": round(totals["tokens"] / totals["seconds"], 2) if totals["seconds"] else None,
               "peak_memory_mb": round(_peak_memory_mb(device), 1), "wall_s": round(time.time() - t_start, 2)}
    run.log(summary)
    msg = f"done: {step} steps; policy in {run.path / POLICY}"
    run.status("done", 1.0, msg, step=step, total_steps=cfg.steps)
    if main:
        print(msg, file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PolicyConfig)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, explicit = config_from_namespace(PolicyConfig, args)
    if not cfg.reward and not (cfg.run_dir and (Path(cfg.run_dir) / "config.json").exists()):
        print("error: pass --reward RUN_DIR (a reward model from `preflab train-reward`), or --run-dir of a "
              "run to resume", file=sys.stderr)
        return 2
    return train(cfg, explicit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.policy", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ConfigError as e:    # a --config file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
