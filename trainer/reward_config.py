"""The reward trainer's settings, `RewardConfig`: the one place of each default, its
--help text and its check (TRL style: `field(metadata={"help": ...})`).

    cfg = RewardConfig(data="comparisons", epochs=2)
    cfg.check()                                  # RewardConfigError naming the flag
    cfg, run_dir, resuming = resolve_config(cfg, explicit={"data", "epochs"})

`preflab train-reward`'s flags are generated from it (trainer/config.py), and the Train
tab reads its defaults, choices and labels from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.annotator_quality import WEIGHT_MODES
from trainer.config import Config, ConfigError, model_problem, settings_for_run
from trainer.criteria import CriteriaError, parse_criteria
from trainer.errors import missing_extra
from trainer.judges import JUDGE_MODES, JUDGES_HELP
from trainer.reward_data import RewardDataError
from trainer.runs import Run
from trainer.store import DATA_HELP

# Settings that may change when a run is resumed; the rest must stay what the run began with.
# (A lower --lr or --max-grad-norm is how one continues a run that stopped on a NaN.)
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "save_every", "progress", "device", "lr", "max_grad_norm")


class RewardConfigError(ConfigError, RewardDataError):
    """Settings the reward trainer cannot run with; the message names the flag."""


@dataclass
class RewardConfig(Config):
    """The reward trainer's settings: the one place of their defaults, --help text and checks."""

    data: str | None = field(
        default=None,
        metadata={
            "help": f"{DATA_HELP}; or a TRL-format .parquet/.jsonl (prompt, chosen, rejected[, margin]); "
            "optional when resuming",
            "metavar": "STORE_OR_FILE",
            "label": "Data",
        },
    )
    model: str = field(
        default="smollm2",
        metadata={
            "help": "backbone: smollm2 (default), tiny, a model dir or a cached HF id",
            "label": "Base model",
        },
    )
    run_dir: str | None = field(
        default=None, metadata={"help": "run directory; the same one again resumes the run"}
    )
    runs_dir: str = field(default="runs", metadata={"help": "parent of new run directories"})
    run_id: str | None = field(
        default=None, metadata={"help": "name of a new run directory (default: reward-<time>)"}
    )
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs", "label": "Epochs"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)", "label": "Learning rate"})
    batch_size: int = field(
        default=8,
        metadata={  # 2x sequences per forward: chosen + rejected
            "help": "pairs per forward",
            "label": "Batch size",
        },
    )
    grad_accum: int = field(default=1, metadata={"help": "forwards per optimizer step"})
    eval_batch_size: int = field(default=16, metadata={"help": "pairs per forward when evaluating"})
    max_length: int = field(
        default=1024,
        metadata={
            "help": "tokens of prompt + answer; longer prompts are cut from the left",
            "label": "Max length",
        },
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of pairs held out, by prompt"})
    seed: int = field(default=0, metadata={"help": "random seed (split, head initialisation, batch order)"})
    warmup: float = field(
        default=0.1, metadata={"help": "warmup share of the steps (then linear decay to 0)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    margin: bool = field(
        default=False,
        metadata={  # or the file's margin column
            "help": "ask for a reward gap of the vote's strength (1 or 2)"
        },
    )
    margin_scale: float = field(default=1.0, metadata={"help": "multiplies the margin"})
    ties: str = field(
        default="exclude",
        metadata={
            "help": "ties: left out, or soft label 0.5",
            "choices": ("exclude", "include"),
            "label": "Ties",
        },
    )
    both_bad: str = field(
        default="exclude",
        metadata={
            "help": "both-bad votes: left out, or soft label 0.5",
            "choices": ("exclude", "include"),
            "label": "Both-bad votes",
        },
    )
    weights: str = field(
        default="none",
        metadata={
            "help": "per-vote weights in the loss (a weighted mean), from all the store's standing "
            "votes before the split: none; gold: the annotator's gold accuracy, shrunk towards the "
            "team's when they have few gold checks; competence: their Dawid-Skene competence from "
            "overlapping votes, chance-corrected (a random or adversarial annotator gets 0). "
            "Validation stays unweighted. Needs a comparison store (see `preflab annotators`)",
            "choices": WEIGHT_MODES,
            "label": "Vote weights",
        },
    )
    exclude_flagged: bool = field(
        default=True,
        metadata={  # trainer/flags.py: an admin's flag_confirm event in the store
            "help": "keep the votes of annotators whose flag an admin confirmed (by default they "
            "are left out: exclude-flagged)",
            "flag": "--include-flagged",  # the same switch as `preflab export`'s
        },
    )
    judges: str = field(
        default="exclude",
        metadata={"help": JUDGES_HELP, "choices": JUDGE_MODES},  # trainer/judges.py
    )
    criteria: str | None = field(
        default=None,
        metadata={
            "help": "one reward head per rubric criterion (serve --rubric), comma-separated, beside the "
            "overall vote's head on one backbone: heads overall,A,B. Each pair trains its own head: a "
            "vote's overall choice the overall head, its judgment of A head A (a tie as --ties says; a "
            "scale criterion as the preference its two scores imply). Needs a comparison store",
            "metavar": "A,B,...",
        },
    )
    center: float = field(
        default=0.0,
        metadata={  # Eisenstein et al.
            "help": "reward-centering coefficient (e.g. 0.01)"
        },
    )
    style_penalty: float = field(
        default=0.0,
        metadata={
            "help": "debias against style: add this times the sum over style features (length in "
            "tokens, markdown headers, list items, bold) of the squared correlation, within each "
            "micro-batch, between the reward gap r_chosen - r_rejected and the answers' feature "
            "difference (a - b) / (a + b + 1); 0: off. Needs micro-batches of 3 pairs or more",
            "label": "Style penalty",
        },
    )
    pack: bool = field(
        default=True,
        metadata={  # shared-prompt packing needs a causal backbone
            "help": "plain right padding instead of shared-prompt packing"
        },
    )
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "trade compute for memory (big backbones)"}
    )
    lora_r: int = field(
        default=0,
        metadata={  # >0: LoRA adapters (peft) + the head only
            "help": "LoRA rank (0: train all weights)",
            "label": "LoRA rank",
        },
    )
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0: 2 * rank)"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto: mixed on CUDA (autocast with LoRA), fp32 on a CPU; mixed: bf16 weights for "
            "forward/backward + fp32 master weights for the optimizer (fastest); autocast: fp32 "
            "weights + bf16 autocast on CUDA; bf16: bf16 weights only (least memory; small "
            "updates round away)",
            "choices": ("auto", "mixed", "autocast", "bf16"),
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: each epoch)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: all epochs)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    error = RewardConfigError

    def problems(self):
        """The rules besides `choices`: (field, is it bad, why)."""
        yield from (("model", True, why) for why in model_problem(self.model))
        yield "epochs", self.epochs < 1, "must be at least 1"
        yield "batch_size", self.batch_size < 1, "must be at least 1"
        yield "grad_accum", self.grad_accum < 1, "must be at least 1"
        yield "eval_batch_size", self.eval_batch_size < 1, "must be at least 1"
        yield "max_length", self.max_length < 8, "must be at least 8 tokens"
        yield "val_fraction", not 0 <= self.val_fraction < 1, "must be in [0, 1)"
        yield "warmup", not 0 <= self.warmup <= 1, "must be in [0, 1]"
        yield "lr", not self.lr > 0, "must be positive"
        try:
            parse_criteria(self.criteria)
        except CriteriaError as e:
            yield "criteria", True, str(e).removeprefix("--criteria: ")
        yield "lora_r", self.lora_r < 0, "must be at least 0"
        # LoRA's package is an extra: said here, before any data or model is loaded (on the
        # command line and in the Train tab alike), not when the model is built.
        no_peft = self.lora_r > 0 and missing_extra("peft", "train")
        yield "lora_r", bool(no_peft), no_peft
        yield "style_penalty", not self.style_penalty >= 0, "must be 0 (off) or more"
        yield (
            "style_penalty",
            self.style_penalty > 0 and self.batch_size < 3,
            (
                "needs --batch-size 3 or more: a correlation within a micro-batch of fewer pairs is meaningless"
            ),
        )


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def resolve_config(cfg: RewardConfig, explicit: set[str]) -> tuple[RewardConfig, Path, bool]:
    """(config to run, run dir, resuming?): `trainer.config.settings_for_run`. A run with a
    checkpoint resumes with its own settings (but RESUMABLE_OVERRIDES); one without
    starts over with what was given."""
    path = Path(cfg.run_dir) if cfg.run_dir else None
    resuming = path is not None and Run(path).checkpoint() is not None
    cfg, path = settings_for_run(
        cfg, explicit, prefix="reward", resumable=RESUMABLE_OVERRIDES, keep_saved=resuming
    )
    return cfg, path, resuming
