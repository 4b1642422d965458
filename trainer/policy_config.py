"""The policy trainer's settings, `PolicyConfig`: the one place of each default, its
--help text and its check (TRL style: `field(metadata={"help": ...})`).

    cfg = PolicyConfig(reward="runs/rm-1", algo="rloo", steps=50)
    cfg.check()                                  # PolicyConfigError naming the flag
    cfg, run_dir = resolve_config(cfg, explicit={"reward", "algo", "steps"})

`preflab train-policy`'s flags are generated from it (trainer/config.py), and the Train
tab reads its defaults, choices and labels from it. `finalize_config` fills the
per-algorithm defaults (k, epochs, minibatches, whitening) so config.json shows what runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import Config, ConfigError, model_problem, settings_for_run
from trainer.errors import PolicyInputError, missing_extra
from trainer.prompts import DEFAULT_PROMPTS
from trainer.reward_blend import parse_reward_weights

ALGOS = ("ppo", "rloo", "reinforce", "grpo", "dr_grpo", "reinforce_pp", "trpo")
# Algorithms whose baseline is the other samples of the same prompt (k >= 2 needed).
GROUP_ALGOS = ("rloo", "grpo", "dr_grpo", "trpo")
# The GRPO family: a token-level clipped ratio without a value head, aggregated by --loss-agg.
TOKEN_ALGOS = ("grpo", "dr_grpo", "reinforce_pp")
# Each one's loss aggregation as its paper has it (trainer/rl_math.token_loss_weights).
DEFAULT_LOSS_AGG = {"grpo": "seq", "dr_grpo": "seq_sum", "reinforce_pp": "token"}
# Settings that may change when a run is resumed; the rest stay what the run began with.
RESUMABLE_OVERRIDES = (
    "steps",
    "save_every",
    "sample_every",
    "progress",
    "device",
    "lr",
    "max_grad_norm",
    "max_kl",
    "kl_coef",
    "reward_batch_size",
    "gen_batch",
    "compile_generation",
)


# Settings sized for a CPU: the Train tab's presets (annotate/web/policy_form.py), PPO on
# SmolLM2-135M against a SmolLM2 reward model. `took` is the CPU time of the whole run
# (loading, the steps, saving, the held-out evaluation) on the 2-core development machine
# with one torch thread: what it takes there on one free core; two free cores take less,
# a busy machine more (the ETA of a running run says how much). Measured with
# `OMP_NUM_THREADS=1 /usr/bin/time -v preflab train-policy --reward RM --model smollm2
# --steps S --batch-size B --max-new-tokens T --eval-prompts E --no-progress`:
#   quick: 4 steps, 165 s CPU (2 min 45 s); 7 min 48 s wall with the machine shared (load 8-12);
#   real: 3 of its 30 steps, 63 s CPU a step, 72 s for the rest; 30 steps: 72 + 30 x 63 =
#         1,970 s, about 33 min (3 steps took 10 min 35 s wall, load 6-9).
# docs/design.md, "Policy training on a CPU". The trainer's own defaults are for a GPU.
CPU_PRESETS = {
    "quick": {
        "name": "Quick look",
        "took": "about 3 min",
        "settings": {"algo": "ppo", "steps": 4, "batch_size": 4, "max_new_tokens": 32, "eval_prompts": 8},
    },
    "real": {
        "name": "Real run",
        "took": "about 35 min",
        "settings": {"algo": "ppo", "steps": 30, "batch_size": 8, "max_new_tokens": 48, "eval_prompts": 16},
    },
}


class PolicyConfigError(ConfigError, PolicyInputError):
    """Settings the policy trainer cannot run with; the message names the flag."""


@dataclass
class PolicyConfig(Config):
    """The policy trainer's settings: the one place of their defaults, --help text and checks."""

    reward: str | None = field(
        default=None,
        metadata={  # or the reward run's checkpoint dir
            "help": "reward model: the run directory of `preflab train-reward`",
            "label": "Reward model",
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={  # None: DEFAULT_PROMPTS
            "help": f"prompt pool file (.jsonl/.csv/.parquet) or a comparison store: a directory, "
            f"or postgresql://user@host:port/db "
            f"(default: the shipped pool, {DEFAULT_PROMPTS.name})",
            "label": "Prompts file",
        },
    )
    model: str = field(
        default="smollm2",
        metadata={
            "help": "starting policy: smollm2 (default), tiny, a model dir or a cached HF id",
            "label": "Base model",
        },
    )
    algo: str = field(
        default="ppo",
        metadata={
            "help": "ppo (value head + GAE), rloo (k samples, leave-one-out baseline), reinforce "
            "(moving-average baseline), grpo (k samples, advantage = reward minus the group mean over "
            "the group std), dr_grpo (the same without the std, and no length normalisation) or "
            "reinforce_pp (REINFORCE++: per-token KL reward, group-mean baseline, returns whitened "
            "over the batch) or trpo (rloo's advantages; one natural-gradient step a batch, solved by "
            "conjugate gradient in a KL trust region of --trust-kl, with a line search; no --lr)",
            "choices": ALGOS,
            "label": "Algorithm",
        },
    )
    run_dir: str | None = field(
        default=None, metadata={"help": "run directory; the same one again resumes the run"}
    )
    runs_dir: str = field(default="runs", metadata={"help": "parent of new run directories"})
    run_id: str | None = field(
        default=None, metadata={"help": "name of a new run directory (default: policy-<time>)"}
    )
    steps: int = field(default=100, metadata={"help": "rollout + update iterations", "label": "Steps"})
    batch_size: int = field(
        default=16, metadata={"help": "prompts per step (per process)", "label": "Batch size"}
    )
    k: int = field(
        default=0,
        metadata={"help": "samples per prompt (0: 4 for rloo, grpo, dr_grpo and reinforce_pp, 1 otherwise)"},
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "longest answer, in tokens", "label": "Max new tokens"}
    )
    max_prompt_length: int = field(default=512, metadata={"help": "longer prompts lose their oldest tokens"})
    temperature: float = field(
        default=0.7, metadata={"help": "sampling temperature (also applied to the log-probs)"}
    )
    lr: float = field(default=3e-6, metadata={"help": "learning rate (AdamW)", "label": "Learning rate"})
    anneal_lr: bool = field(default=False, metadata={"help": "decay the learning rate linearly to 0"})
    epochs: int = field(default=0, metadata={"help": "passes over each batch (0: 4 for ppo, 1 otherwise)"})
    minibatches: int = field(
        default=0, metadata={"help": "optimizer steps per pass (0: 2 for ppo, 1 otherwise)"}
    )
    micro_batch: int = field(
        default=8,
        metadata={  # gradient accumulation
            "help": "rows per forward/backward"
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "PPO discount"})
    lam: float = field(default=0.95, metadata={"help": "PPO GAE lambda"})
    clip: float = field(default=0.2, metadata={"help": "ratio clip range"})
    clip_value: float = field(default=0.2, metadata={"help": "PPO value clip range"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO value loss weight"})
    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "KL penalty coefficient beta (initial, with --kl-target)",
            "label": "KL coefficient",
        },
    )
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "the KL penalty in the reward: k1 = log(pi/ref) (can be < 0 per token) or "
            "k3 = (ref/pi - 1) - log(ref/pi) (always >= 0); the KL logged and shown is k3 either way",
            "choices": ("k1", "k3"),
        },
    )
    kl_target: float = field(
        default=0.0,
        metadata={"help": "adaptive KL: steer the KL per answer to this many nats (0: fixed coefficient)"},
    )
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL horizon, in answers"})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "PPO: scale per-token rewards to unit variance"}
    )
    whiten_advantages: bool | None = field(
        default=None,
        metadata={"help": "normalise advantages over the batch (default: on for ppo, off otherwise)"},
    )
    loss_agg: str = field(
        default="auto",
        metadata={
            "help": "grpo / dr_grpo / reinforce_pp: how token losses make the loss: token (a mean over "
            "all tokens, DAPO), seq (each answer's mean, then over answers, GRPO), seq_sum (each "
            "answer's sum over max_new_tokens, Dr. GRPO); auto: the algorithm's own (seq, seq_sum, token)",
            "choices": ("auto", "token", "seq", "seq_sum"),
        },
    )
    mask_truncated: bool = field(
        default=False,
        metadata={
            "help": "answers cut off at max_new_tokens give no gradient (DAPO's overlong filtering: "
            "a cut answer is not judged as if it were complete); they still count in the group baseline"
        },
    )
    missing_eos_penalty: float = field(
        default=1.0, metadata={"help": "subtracted from the score of an answer cut off without EOS"}
    )
    baseline_decay: float = field(default=0.9, metadata={"help": "reinforce: moving-average decay"})
    max_kl: float = field(
        default=50.0,
        metadata={
            "help": "fail when the mean KL per answer (k3, as shown) exceeds this many nats (0: never)"
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    trust_kl: float = field(
        default=0.01,
        metadata={
            "help": "trpo: the trust region (delta): the most mean KL(rollout policy || new policy) per "
            "answer token that one update may reach, measured exactly over the vocabulary",
            "label": "Trust region (trpo)",
        },
    )
    cg_iters: int = field(
        default=10, metadata={"help": "trpo: conjugate-gradient iterations solving F x = g (Fisher F)"}
    )
    cg_damping: float = field(
        default=0.1, metadata={"help": "trpo: damping added to the Fisher matrix, (F + d I) x = g"}
    )
    line_search_steps: int = field(
        default=10,
        metadata={
            "help": "trpo: step fractions tried (1, then shrinking); none that improves the surrogate "
            "within --trust-kl: no step this batch"
        },
    )
    line_search_shrink: float = field(
        default=0.5, metadata={"help": "trpo: each line-search try takes this fraction of the last"}
    )
    seed: int = field(default=0, metadata={"help": "random seed (held-out prompts, prompt order, sampling)"})
    lora_r: int = field(
        default=0,
        metadata={  # the reference is then the model with adapters off
            "help": "LoRA rank (0: train all weights)"
        },
    )
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0: 2 * rank)"})
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "trade compute for memory (big models)"}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto: fp32 weights, bf16 autocast on CUDA; bf16: bf16 weights too (less memory)",
            "choices": ("auto", "bf16"),
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    gen_batch: int = field(default=0, metadata={"help": "rows per generate call (0: all at once)"})
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "with k > 1: run each answer's prompt separately (default: once per prompt, KV cache shared)"
        },
    )
    compile_generation: bool | None = field(
        default=None,
        metadata={
            "help": "static KV cache + torch.compile'd decoding (default: on with CUDA; the first step compiles)"
        },
    )
    reward_weights: str | None = field(
        default=None,
        metadata={
            "help": "a multi-head reward model's (train-reward --criteria) heads weighed into one reward: "
            "the sum of weight x that head's normalised reward, e.g. overall=1,helpful=2 (heads not named "
            "weigh 0); default: the first head, the overall vote's",
            "metavar": "HEAD=W,...",
        },
    )
    reward_batch_size: int = field(default=32, metadata={"help": "answers per reward-model forward"})
    save_every: int = field(default=25, metadata={"help": "steps between checkpoints (0: at the end)"})
    sample_every: int = field(default=10, metadata={"help": "steps between logged samples (0: never)"})
    samples: int = field(default=3, metadata={"help": "samples logged each time"})
    eval_prompts: int = field(
        default=32,
        metadata={
            "help": "prompts held out of training (at most a fifth of the pool); at the end the policy and the "
            "reference answer them and the reward model's win rate goes to eval.json (0: none)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    error = PolicyConfigError

    def problems(self):
        """The rules besides `choices`, on the settings that run (finalize_config's):
        (field, is it bad, why)."""
        cfg = finalize_config(dataclasses.replace(self))
        rows = cfg.batch_size * cfg.k
        units = cfg.batch_size if cfg.k > 1 and cfg.share_prompt else rows  # what minibatches are cut from
        yield from (("model", True, why) for why in model_problem(cfg.model))
        yield (
            "prompts",
            cfg.prompts is not None and not _prompts_exist(cfg.prompts),
            f"{cfg.prompts} does not exist",
        )
        yield "steps", cfg.steps < 1, "must be at least 1"
        yield "batch_size", cfg.batch_size < 1, "must be at least 1"
        yield "k", cfg.k < 1, "must be at least 1"
        yield (
            "k",
            cfg.algo in GROUP_ALGOS and cfg.k < 2,
            f"must be at least 2 for {cfg.algo} (the baseline is the other samples of the prompt)",
        )
        yield (
            "loss_agg",
            self.loss_agg != "auto" and cfg.algo not in TOKEN_ALGOS,
            f"applies to {', '.join(TOKEN_ALGOS)} (ppo's loss is per token; rloo's and reinforce's "
            "per answer)",
        )
        yield "max_new_tokens", cfg.max_new_tokens < 1, "must be at least 1"
        yield "max_prompt_length", cfg.max_prompt_length < 1, "must be at least 1"
        yield (
            "temperature",
            not cfg.temperature > 0,
            "must be positive (the log-probabilities are those of sampling)",
        )
        yield "lr", not cfg.lr > 0, "must be positive"
        yield "epochs", cfg.epochs < 1, "must be at least 1"
        yield (
            "minibatches",
            not 1 <= cfg.minibatches <= units,
            (f"must be between 1 and {units} (the {'prompts' if units < rows else 'answers'} per step)"),
        )
        yield "micro_batch", cfg.micro_batch < 1, "must be at least 1"
        yield "gamma", not 0 <= cfg.gamma <= 1, "must be in [0, 1]"
        yield "lam", not 0 <= cfg.lam <= 1, "must be in [0, 1]"
        yield "clip", not cfg.clip > 0, "must be positive"
        yield "kl_coef", cfg.kl_coef < 0, "must be at least 0"
        yield "kl_target", cfg.kl_target < 0, "must be >= 0"
        yield "baseline_decay", not 0 <= cfg.baseline_decay < 1, "must be in [0, 1)"
        yield "max_kl", cfg.max_kl < 0, "must be >= 0 (0 turns the check off)"
        yield "trust_kl", not cfg.trust_kl > 0, "must be positive (the trust region's radius, in nats)"
        yield "cg_iters", cfg.cg_iters < 1, "must be at least 1"
        yield "cg_damping", cfg.cg_damping < 0, "must be >= 0"
        yield "line_search_steps", cfg.line_search_steps < 1, "must be at least 1"
        yield "line_search_shrink", not 0 < cfg.line_search_shrink < 1, "must be in (0, 1)"
        # LoRA's package is an extra: said here, before any model is loaded (on the command
        # line and in the Train tab alike), not when the adapters are added.
        no_peft = cfg.lora_r > 0 and missing_extra("peft", "train")
        yield "lora_r", bool(no_peft), no_peft
        try:
            parse_reward_weights(cfg.reward_weights)
        except PolicyInputError as e:
            yield "reward_weights", True, str(e).removeprefix("--reward-weights: ")


def _prompts_exist(prompts: str) -> bool:
    from trainer.store import is_database

    return is_database(prompts) or Path(prompts).expanduser().exists()


def finalize_config(cfg: PolicyConfig) -> PolicyConfig:
    """Fill the per-algorithm defaults (k, loss aggregation, epochs, minibatches, whitening), so that
    config.json shows what actually runs."""
    ppo = cfg.algo == "ppo"
    if not cfg.k:
        cfg.k = 4 if cfg.algo in GROUP_ALGOS or cfg.algo == "reinforce_pp" else 1
    if cfg.loss_agg == "auto" and cfg.algo in TOKEN_ALGOS:
        cfg.loss_agg = DEFAULT_LOSS_AGG[cfg.algo]
    if not cfg.epochs:
        cfg.epochs = 4 if ppo else 1
    if not cfg.minibatches:
        cfg.minibatches = 2 if ppo else 1
    if cfg.whiten_advantages is None:
        cfg.whiten_advantages = ppo
    return cfg


# --------------------------------------------------------------------------------------
# Run directory: the settings a run (or its resume) runs with
# --------------------------------------------------------------------------------------


def resolve_config(cfg: PolicyConfig, explicit: set[str]) -> tuple[PolicyConfig, Path]:
    """(config to run, run dir): `trainer.config.settings_for_run` (a run dir that already
    has a config is that run: its settings win, except the RESUMABLE_OVERRIDES given
    explicitly), then the per-algorithm defaults."""
    cfg, path = settings_for_run(cfg, explicit, prefix="policy", resumable=RESUMABLE_OVERRIDES)
    return finalize_config(cfg), path
