"""The DPO trainer's settings, `DPOConfig`: the one place of each default, its --help text
and its check. `preflab train-dpo`'s flags are generated from it (trainer/config.py).

    cfg = DPOConfig(data="comparisons", model="tiny", beta=0.1)
    cfg, run_dir, resuming = resolve_config(cfg, explicit={"data", "model", "beta"})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import Config, ConfigError, model_problem, settings_for_run
from trainer.dpo_math import LOSSES
from trainer.errors import missing_extra
from trainer.judges import JUDGE_MODES, JUDGES_HELP
from trainer.reward_data import RewardDataError
from trainer.runs import Run
from trainer.store import DATA_HELP

# Settings that may change when a run is resumed (a lower --lr continues a run that hit a NaN).
RESUMABLE_OVERRIDES = (
    "epochs", "max_steps", "save_every", "progress", "device", "lr", "max_grad_norm", "micro_batch", "eval_batch_size",
)  # fmt: skip


class DPOConfigError(ConfigError, RewardDataError):
    """Settings the DPO trainer cannot run with; the message names the flag."""


@dataclass
class DPOConfig(Config):
    """The DPO trainer's settings: the one place of their defaults, --help text and checks."""

    data: str | None = field(
        default=None,
        metadata={
            "help": f"{DATA_HELP}; or a TRL-format .parquet/.jsonl (prompt, chosen, rejected); ties and "
            "both-bad votes are always left out (DPO needs a preferred answer); optional when resuming",
            "metavar": "STORE_OR_FILE",
            "label": "Data",
        },
    )
    model: str = field(
        default="smollm2",
        metadata={
            "help": "the policy to start from (also the reference): smollm2, tiny, a model dir or a cached HF id",
            "label": "Base model",
        },
    )
    run_dir: str | None = field(
        default=None, metadata={"help": "run directory; the same one again resumes the run"}
    )
    runs_dir: str = field(default="runs", metadata={"help": "parent of new run directories"})
    run_id: str | None = field(
        default=None, metadata={"help": "name of a new run directory (default: dpo-<time>)"}
    )
    loss: str = field(
        default="sigmoid",
        metadata={
            "help": "sigmoid: DPO (with --label-smoothing: conservative DPO); ipo: IPO",
            "choices": LOSSES,
            "label": "Loss",
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "strength of the pull towards the reference (DPO's beta, IPO's tau)",
            "label": "Beta",
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "sigmoid loss: the assumed share of flipped votes, in [0, 0.5)",
            "label": "Label smoothing",
        },
    )
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs", "label": "Epochs"})
    lr: float = field(default=5e-7, metadata={"help": "peak learning rate (AdamW)", "label": "Learning rate"})
    batch_size: int = field(
        default=8,
        metadata={"help": "pairs per optimizer step (2x sequences per forward)", "label": "Batch size"},
    )
    micro_batch: int = field(
        default=0,
        metadata={
            "help": "pairs per forward in training; a batch of more pairs accumulates the gradients "
            "of several forwards into one step (the same step, less memory); 0: the whole batch"
        },
    )
    eval_batch_size: int = field(default=16, metadata={"help": "pairs per forward when evaluating"})
    max_length: int = field(
        default=1024,
        metadata={
            "help": "tokens of prompt + answer; longer prompts are cut from the left, answers kept",
            "label": "Max length",
        },
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of pairs held out, by prompt"})
    seed: int = field(default=0, metadata={"help": "random seed (split, batch order, KL samples)"})
    warmup: float = field(
        default=0.1, metadata={"help": "warmup share of the steps (then linear decay to 0)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    kl_prompts: int = field(
        default=16,
        metadata={
            "help": "held-out prompts on which the reference samples one answer up front, to estimate "
            "KL(reference || policy) at each evaluation (0: no KL)"
        },
    )
    kl_tokens: int = field(default=48, metadata={"help": "most new tokens of each KL sample"})
    exclude_flagged: bool = field(
        default=True,
        metadata={
            "help": "keep the votes of annotators whose flag an admin confirmed (by default they are left out)",
            "flag": "--include-flagged",
        },
    )
    judges: str = field(
        default="exclude",
        metadata={"help": JUDGES_HELP, "choices": JUDGE_MODES},  # trainer/judges.py
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank (0: train all weights); the reference is the model with adapters disabled",
            "label": "LoRA rank",
        },
    )
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0: 2 * rank)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: each epoch)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: all epochs)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    error = DPOConfigError

    def problems(self):
        yield from (("model", True, why) for why in model_problem(self.model))
        yield "beta", not self.beta > 0, "must be positive"
        yield "label_smoothing", not 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"
        yield (
            "label_smoothing",
            self.loss != "sigmoid" and self.label_smoothing > 0,
            "only applies to --loss sigmoid",
        )
        yield "epochs", self.epochs < 1, "must be at least 1"
        yield "batch_size", self.batch_size < 1, "must be at least 1"
        yield "micro_batch", self.micro_batch < 0, "must be at least 0"
        yield "eval_batch_size", self.eval_batch_size < 1, "must be at least 1"
        yield "max_length", self.max_length < 8, "must be at least 8 tokens"
        yield "val_fraction", not 0 <= self.val_fraction < 1, "must be in [0, 1)"
        yield "warmup", not 0 <= self.warmup <= 1, "must be in [0, 1]"
        yield "lr", not self.lr > 0, "must be positive"
        yield "kl_prompts", self.kl_prompts < 0, "must be at least 0"
        yield (
            "kl_tokens",
            not 1 <= self.kl_tokens < self.max_length,
            "must be at least 1 and below --max-length",
        )
        yield "lora_r", self.lora_r < 0, "must be at least 0"
        # LoRA's package is an extra: said before any data or model loads, as the reward and
        # policy configs do.
        no_peft = self.lora_r > 0 and missing_extra("peft", "train")
        yield "lora_r", bool(no_peft), no_peft


def resolve_config(cfg: DPOConfig, explicit: set[str]) -> tuple[DPOConfig, Path, bool]:
    """(config to run, run dir, resuming?): a run with a checkpoint resumes with its own
    settings (but RESUMABLE_OVERRIDES); one without starts over with what was given."""
    path = Path(cfg.run_dir) if cfg.run_dir else None
    resuming = path is not None and Run(path).checkpoint() is not None
    cfg, path = settings_for_run(
        cfg, explicit, prefix="dpo", resumable=RESUMABLE_OVERRIDES, keep_saved=resuming
    )
    return cfg, path, resuming
