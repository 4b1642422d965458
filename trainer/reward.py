"""Fit a Bradley-Terry reward model to the votes.

    preflab train-reward --data comparisons/ --run-dir runs/rm-1
    python -m trainer.reward --data prefs.parquet --model tiny --epochs 2
    accelerate launch -m trainer.reward --data comparisons/ ...   # several GPUs (DDP)

    from trainer.reward import RewardModel
    rm = RewardModel.load("runs/rm-1")
    rm.score(["How do I boil an egg?"] * 2, ["Boil it for 8 minutes.", "No idea."])  # normalised

The model: a causal LM (or sequence-classification) backbone with a scalar head
`score` read at the last real token of prompt + answer + EOS. It is saved as a
`*ForSequenceClassification` checkpoint with a pad token that is not the EOS, so the plain
Hugging Face forward reads the very same token and `from_pretrained` gives the same rewards.

The loss, for a pair with rewards r_c (chosen) and r_r (rejected), label y (1 = a vote,
0.5 = a tie or both-bad vote) and margin m (vote strength, when asked for):

    d    = r_c - r_r - m
    loss = -[y log sigmoid(d) + (1 - y) log sigmoid(-d)] + center * (r_c + r_r)^2

With y = 1 this is TRL's RewardTrainer loss exactly (tests check it numerically).

Where the speed comes from (see bench/reward_vs_trl.py):
  * shared-prompt packing (reward_data.pack): each pair is one segment
    [prompt | chosen | rejected] with an attention mask that hides chosen from rejected
    and position ids that restart after the prompt: the prompt runs once, not twice, and
    the shorter answer is never padded to the longer one. Exact: the same numbers as
    scoring each prompt + answer on its own (tested);
  * batches grouped by length, so rows are nearly full (~5% padding);
  * the head on the 2B read-out vectors only; fused AdamW; bf16 autocast + TF32 on CUDA.

A run directory (DESIGN.md) holds:
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
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.config import Config, ConfigError, add_config_arguments, config_from_namespace, model_problem
from trainer.runs import CHECKPOINT, Run, read_json, supervise, write_json
from trainer.store import DATA_HELP
from trainer.store.errors import StoreError
from trainer.reward_data import (RewardDataError, as_messages, as_response, collate, encode_pairs,
                                 encode_texts, length_grouped_batches, load_snapshot, pack, read_pairs,
                                 save_snapshot, split_by_prompt)

STATES = ("queued", "running", "done", "failed", "cancelled")
META_FILE = "preflab_reward.json"      # gain/bias of the normalisation, max_length, provenance
STATE_FILE = "training_state.pt"       # what a resume needs besides the weights
# Settings that may change when a run is resumed; the rest must stay what the run began with.
# (A lower --lr or --max-grad-norm is how one continues a run that stopped on a NaN.)
RESUMABLE_OVERRIDES = ("epochs", "max_steps", "save_every", "progress", "device", "lr", "max_grad_norm")


class RewardConfigError(ConfigError, RewardDataError):
    """Settings the reward trainer cannot run with; the message names the flag."""


@dataclass
class RewardConfig(Config):
    """The reward trainer's settings: the one place of their defaults, --help text and checks."""

    data: str | None = field(default=None, metadata={
        "help": f"{DATA_HELP}; or a TRL-format .parquet/.jsonl (prompt, chosen, rejected[, margin]); "
                "optional when resuming", "metavar": "STORE_OR_FILE", "label": "Data"})
    model: str = field(default="smollm2", metadata={
        "help": "backbone: smollm2 (default), tiny, a model dir or a cached HF id", "label": "Base model"})
    run_dir: str | None = field(default=None, metadata={
        "help": "run directory; the same one again resumes the run"})
    runs_dir: str = field(default="runs", metadata={"help": "parent of new run directories"})
    run_id: str | None = field(default=None, metadata={
        "help": "name of a new run directory (default: reward-<time>)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs", "label": "Epochs"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)", "label": "Learning rate"})
    batch_size: int = field(default=8, metadata={   # 2x sequences per forward: chosen + rejected
        "help": "pairs per forward", "label": "Batch size"})
    grad_accum: int = field(default=1, metadata={"help": "forwards per optimizer step"})
    eval_batch_size: int = field(default=16, metadata={"help": "pairs per forward when evaluating"})
    max_length: int = field(default=1024, metadata={
        "help": "tokens of prompt + answer; longer prompts are cut from the left", "label": "Max length"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of pairs held out, by prompt"})
    seed: int = field(default=0, metadata={"help": "random seed (split, head initialisation, batch order)"})
    warmup: float = field(default=0.1, metadata={
        "help": "warmup share of the steps (then linear decay to 0)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    margin: bool = field(default=False, metadata={   # or the file's margin column
        "help": "ask for a reward gap of the vote's strength (1 or 2)"})
    margin_scale: float = field(default=1.0, metadata={"help": "multiplies the margin"})
    ties: str = field(default="exclude", metadata={
        "help": "ties: left out, or soft label 0.5", "choices": ("exclude", "include"), "label": "Ties"})
    both_bad: str = field(default="exclude", metadata={
        "help": "both-bad votes: left out, or soft label 0.5", "choices": ("exclude", "include"),
        "label": "Both-bad votes"})
    center: float = field(default=0.0, metadata={   # Eisenstein et al.
        "help": "reward-centering coefficient (e.g. 0.01)"})
    pack: bool = field(default=True, metadata={    # shared-prompt packing needs a causal backbone
        "help": "plain right padding instead of shared-prompt packing"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "trade compute for memory (big backbones)"})
    lora_r: int = field(default=0, metadata={   # >0: LoRA adapters (peft) + the head only
        "help": "LoRA rank (0: train all weights)", "label": "LoRA rank"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0: 2 * rank)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto: mixed on CUDA (autocast with LoRA), fp32 on a CPU; mixed: bf16 weights for "
                "forward/backward + fp32 master weights for the optimizer (fastest); autocast: fp32 "
                "weights + bf16 autocast on CUDA; bf16: bf16 weights only (least memory; small "
                "updates round away)", "choices": ("auto", "mixed", "autocast", "bf16")})
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
        yield "lora_r", self.lora_r < 0, "must be at least 0"


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------

def preference_loss(r_chosen, r_rejected, label=None, margin=None, center: float = 0.0):
    """Per-pair Bradley-Terry loss (a tensor of shape [pairs]); see the module docstring.
    The caller sums and divides by the pairs in the optimizer step, so that gradient
    accumulation gives the same update as one big batch."""
    import torch.nn.functional as F
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin  # ask for a gap of at least `margin` (a clear preference: wider)
    if label is None:
        loss = -F.logsigmoid(d)
    else:
        # Soft label: a tie (y = 0.5) is minimised at d = 0, i.e. equal rewards.
        loss = -(label * F.logsigmoid(d) + (1 - label) * F.logsigmoid(-d))
    if center:
        # Reward centering: keeps rewards near 0 without changing what is preferred.
        loss = loss + center * (r_chosen + r_rejected) ** 2
    return loss


def expected_calibration_error(p_chosen: np.ndarray, bins: int = 10) -> float:
    """ECE of P(chosen beats rejected) = sigmoid(r_c - r_r) on votes: confidence is
    max(p, 1 - p), correct is p > 0.5; the bin-weighted gap between the two."""
    if len(p_chosen) == 0:
        return float("nan")
    conf = np.maximum(p_chosen, 1 - p_chosen)
    correct = (p_chosen > 0.5).astype(np.float64)
    which = np.minimum(((conf - 0.5) * 2 * bins).astype(np.int64), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


# --------------------------------------------------------------------------------------
# The model: backbone + scalar head, read at the last real token
# --------------------------------------------------------------------------------------

def reward_net(seqcls, causal: bool):
    """The module that training runs (and DDP wraps): rewards for a right-padded batch."""
    import torch

    class RewardNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seqcls = seqcls  # registered here so DDP and the optimizer see every parameter
            self.causal = causal

        @property
        def inner(self):
            # With LoRA the layers are patched in place: call the inner model, not the PeftModel.
            s = self.seqcls
            return s.get_base_model() if hasattr(s, "get_base_model") else s

        def forward(self, input_ids, read_row, read_col, attention_mask=None, position_ids=None,
                    segment=None, branch=None):
            """Rewards read at (read_row, read_col): for a pair batch, B chosen then B rejected."""
            if segment is not None:  # shared-prompt packing (reward_data.pack)
                mask = packed_attention_mask(segment, branch, eager=self.eager)
            elif self.causal:
                # Causal backbone + right padding: real tokens never attend to the pads
                # after them, so no mask is needed; attention then takes its plain causal
                # path (flash / is_causal kernels) instead of a materialised [T, T] mask.
                mask = None
            else:
                mask = attention_mask
            hidden = self.inner.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                           use_cache=False).last_hidden_state
            # Each reward is read at its answer's EOS, a token that has seen prompt and answer;
            # the head runs on those vectors only, not on every position (as the HF forward does).
            h = hidden[read_row, read_col]
            head = self.inner.score
            # The head in its own precision (fp32), outside autocast: bf16 keeps ~3 significant
            # digits, too coarse for rewards whose differences drive the loss and, later, the
            # policy gradient.
            with torch.autocast(h.device.type, enabled=False):
                return head(h.to(next(head.parameters()).dtype)).squeeze(-1).float()

        @property
        def eager(self):
            return self.inner.config._attn_implementation == "eager"

        @property
        def can_pack(self):
            # Packing needs a causal model and an attention that takes a custom 4-D mask.
            return self.causal and self.inner.config._attn_implementation in ("sdpa", "eager")

    return RewardNet()


def packed_attention_mask(segment, branch, eager: bool = False):
    """[rows, 1, W, W] mask for shared-prompt packing: query q may attend key k when both
    belong to one pair (segment), k is not after q (causal), and q is not in the rejected
    answer looking at the chosen one (a sibling branch, not its past). Boolean for SDPA;
    additive (0 / -inf) for eager attention, which adds the mask to its scores."""
    import torch
    idx = torch.arange(segment.shape[1], device=segment.device)
    causal = idx[:, None] >= idx[None, :]
    same_pair = segment[:, :, None] == segment[:, None, :]
    sibling = (branch[:, :, None] == 2) & (branch[:, None, :] == 1)
    mask = (same_pair & causal & ~sibling)[:, None]
    if eager:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


GQA_SDPA = "preflab_gqa_sdpa"


def gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA that keeps grouped-query attention native under a custom mask. (Transformers'
    own SDPA path copies K and V once per query head whenever a mask is given: a copy in
    forward and a sum in backward, ~20% of the attention time on a CPU.) Registered with
    transformers' AttentionInterface and used only for the packed layout."""
    import torch.nn.functional as F
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=attention_mask is None and query.shape[2] > 1,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def choose_pad_token(tokenizer) -> None:
    """Pad with a token that is not the EOS (here the reward is read at the EOS): then the
    saved checkpoint's own HF forward, which reads the last non-pad token, reads the EOS too."""
    eos = tokenizer.eos_token
    for candidate in (tokenizer.pad_token, tokenizer.unk_token, "<|endoftext|>", "<pad>"):
        if candidate and candidate != eos and candidate in tokenizer.get_vocab():
            tokenizer.pad_token = candidate
            break
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos
    tokenizer.padding_side = "right"


def is_causal(backbone, device) -> bool:
    """Whether position i ignores positions > i. Tested, not guessed from the model's
    name: the mask-free trick above is exact only for causal backbones."""
    import torch
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 10]], device=device)
    with torch.no_grad():
        h = backbone(input_ids=ids, use_cache=False).last_hidden_state.float()
    return bool(torch.allclose(h[0, :2], h[1, :2], atol=1e-4))


def load_backbone(source: str, tokenizer, dtype, *, init_head: bool):
    """A *ForSequenceClassification model with one output, dropout off."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(source, num_labels=1)
    text = config.get_text_config()
    # Dropout off: with it on, chosen and rejected would be scored by different random
    # sub-networks and the difference r_c - r_r would be mostly noise.
    for key, value in text.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(text, key, 0.0)
    text.pad_token_id = tokenizer.pad_token_id
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialised" is expected
    try:
        seqcls = AutoModelForSequenceClassification.from_pretrained(source, config=config, dtype=dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    for module in seqcls.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if init_head:
        # Head init N(0, 1/(d+1)) (Stiennon et al. 2020): initial rewards have unit scale
        # whatever the hidden size, instead of the ~0.02 * sqrt(d) of the default init.
        d = seqcls.score.weight.shape[1]
        torch.nn.init.normal_(seqcls.score.weight, mean=0.0, std=1.0 / math.sqrt(d + 1))
        if getattr(seqcls.score, "bias", None) is not None:
            torch.nn.init.zeros_(seqcls.score.bias)
    return seqcls


def has_trained_head(source: str) -> bool:
    """A sequence-classification checkpoint with one label already has a reward head."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(source)
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels == 1


# --------------------------------------------------------------------------------------
# Run directory: status, metrics, checkpoints
# --------------------------------------------------------------------------------------

def save_checkpoint(run: Run, model, tokenizer, meta: dict, training_state: dict | None) -> None:
    """Write into a temp dir, then swap it in with renames: the previous checkpoint stays
    intact until the new one is complete (a kill mid-save loses nothing)."""
    import torch
    if not run.main:
        return
    tmp, final, old = run.path / (CHECKPOINT + ".tmp"), run.path / CHECKPOINT, run.path / (CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / META_FILE, meta)
    if training_state is not None:
        torch.save(training_state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    import torch
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

def to_device(batch: dict, device) -> dict:
    """The model's inputs from a pack()/collate() batch, on the device."""
    keys = ("input_ids", "read_row", "read_col", "attention_mask", "position_ids", "segment", "branch")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def predict(net, enc, idx, batch_size: int, pad_id: int, device, autocast, accelerator=None, packed=True):
    """Rewards (r_chosen, r_rejected) for the pairs `idx`, in that order. Pairs are run
    longest first in length-sorted batches (little padding); under DDP each process scores
    every world-size-th batch and the results are gathered."""
    import torch
    idx = np.asarray(idx, dtype=np.int64)
    layout = pack if packed else collate
    order = idx[np.argsort(-enc.lengths(packed)[idx], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    row_of = np.zeros(len(enc), dtype=np.int64)
    row_of[idx] = np.arange(len(idx))  # pair index -> its row in the result
    rc = np.full(len(idx), np.nan, dtype=np.float64)
    rr = np.full(len(idx), np.nan, dtype=np.float64)
    with torch.inference_mode(), autocast():
        for b in batches[rank::world]:
            r = net(**to_device(layout(enc, b, pad_id), device))
            c, j = r.chunk(2)
            rc[row_of[b]], rr[row_of[b]] = c.cpu().numpy(), j.cpu().numpy()
    if world > 1:
        # Each process filled its own rows (NaN elsewhere); gather and take the filled value.
        both = torch.tensor(np.stack([rc, rr]), device=device)
        gathered = accelerator.gather(both[None]).cpu().numpy()  # [world, 2, pairs]
        filled = ~np.isnan(gathered)
        merged = np.where(filled, gathered, 0.0).sum(axis=0)
        rc, rr = merged[0], merged[1]
    return rc, rr


def evaluate(net, enc, idx, cfg: RewardConfig, pad_id, device, autocast, accelerator=None,
             packed: bool = True) -> dict:
    """Validation metrics: loss (as trained), accuracy and calibration on votes, reward
    scale, and length bias (does the reward just count tokens?)."""
    import torch
    if len(idx) == 0:
        return {}
    net.eval()
    rc, rr = predict(net, enc, idx, cfg.eval_batch_size, pad_id, device, autocast, accelerator, packed)
    net.train()
    label, margin = enc.label[idx], enc.margin[idx]
    loss = preference_loss(torch.tensor(rc), torch.tensor(rr), torch.tensor(label, dtype=torch.float64),
                           torch.tensor(margin, dtype=torch.float64) if cfg.margin else None, cfg.center)
    votes = label == 1.0  # accuracy and calibration are about votes; ties have no right answer
    p = 1.0 / (1.0 + np.exp(-(rc - rr)))
    rewards = np.concatenate([rc, rr])
    lengths = np.concatenate([enc.chosen_len[idx], enc.rejected_len[idx]]).astype(np.float64)
    longer_wins = np.where(enc.chosen_len[idx] >= enc.rejected_len[idx], rc > rr, rr > rc)
    return {
        "val_pairs": int(len(idx)),
        "val_loss": float(loss.mean()),
        "val_acc": float((rc[votes] > rr[votes]).mean()) if votes.any() else float("nan"),
        "val_ece": expected_calibration_error(p[votes]),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "length_corr": pearson(rewards, lengths),          # reward vs answer length in tokens
        "longer_preferred": float(longer_wins.mean()),      # how often the longer answer scores higher
        "_rewards": rewards,                                # for the normalisation (not logged)
    }


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def resolve_config(cfg: RewardConfig, explicit: set[str]) -> tuple[RewardConfig, Path, bool]:
    """(config to run, run dir, resuming?). A run dir that already has a config is that
    run: its settings win, except the few RESUMABLE_OVERRIDES given explicitly."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        run_id = cfg.run_id or time.strftime("reward-%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"
        path = Path(cfg.runs_dir) / run_id
    saved = read_json(path / "config.json").get("config")
    resuming = Run(path).checkpoint() is not None
    if saved:
        merged = {**saved}
        for key in explicit:
            value = getattr(cfg, key)
            if resuming and key not in RESUMABLE_OVERRIDES and value != saved.get(key):
                print(f"note: {key}={value!r} ignored: resuming {path}, which runs with "
                      f"{key}={saved.get(key)!r}", file=sys.stderr)
                continue
            merged[key] = value
        fields = {f.name for f in dataclasses.fields(RewardConfig)}
        cfg = RewardConfig(**{k: v for k, v in merged.items() if k in fields})
    cfg.run_dir = str(path)
    return cfg, path, resuming


def check_config(cfg: RewardConfig) -> None:
    """RewardConfigError (naming the flags) unless the settings can run: RewardConfig.check."""
    cfg.check()


def train(cfg: RewardConfig | dict, explicit: set[str] | None = None) -> int:
    """Run (or resume) one reward-model training. Returns the process exit code:
    0 done, 1 failed, 2 bad input, 128 + signal when cancelled."""
    if isinstance(cfg, dict):
        explicit = set(cfg) if explicit is None else explicit
        cfg = RewardConfig(**cfg)
    explicit = {f.name for f in dataclasses.fields(RewardConfig)} if explicit is None else explicit
    cfg, run_path, resuming = resolve_config(cfg, explicit)

    def train_without_cudnn_attention(run, accelerator, stop):
        # cuDNN's attention kernels build an execution plan for every new input shape (about
        # 0.1 s of CPU each), and length-grouped batches bring a new shape nearly every step:
        # on an H100 that doubled the step time of SmolLM2-135M. Flash and memory-efficient
        # attention need no plan. Process-wide, so restored afterwards.
        import torch
        cudnn = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            return _train(cfg, run, accelerator, resuming, stop)
        finally:
            torch.backends.cuda.enable_cudnn_sdp(cudnn)

    # A store that cannot be read (missing, database down) is bad input too: its message
    # names the store and says what to do, as the run's status and one line of the log.
    return supervise(run_path, cfg.device, lambda: check_config(cfg), train_without_cudnn_attention,
                     (RewardDataError, StoreError))


def _train(cfg: RewardConfig, run: Run, accelerator, resuming: bool, stop: dict) -> int:
    t_start = time.time()
    main = accelerator.is_main_process
    snapshot = run.path / "data.parquet"
    ckpt = run.checkpoint()
    resuming = resuming and ckpt is not None and (ckpt / STATE_FILE).exists()
    run.status("queued", 0.0, "reading the data")

    # ---- data, before any model is loaded: bad input fails in seconds -------------------
    if not (resuming and snapshot.exists()):
        if not cfg.data:
            raise RewardDataError("no data: pass --data (a comparison store or a preference file)")
        pairs = read_pairs(cfg.data, ties=cfg.ties, both_bad=cfg.both_bad, margin=cfg.margin,
                           margin_scale=cfg.margin_scale)
        train_idx, val_idx = split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
        summary = pairs.summary
        if main:
            save_snapshot(pairs, train_idx, val_idx, snapshot)
            # A database password never goes to disk: the saved --data has it taken out (a
            # resume gets it from PGPASSWORD or ~/.pgpass, as libpq does).
            from trainer.store import without_password
            saved = {**dataclasses.asdict(cfg), "data": without_password(cfg.data)[0] if cfg.data else cfg.data}
            write_json(run.path / "config.json", {"kind": "reward", "config": saved,
                                                  "data": summary, "created_at": time.time()})
    accelerator.wait_for_everyone()
    summary = read_json(run.path / "config.json").get("data", {})
    # Every process (and every resume) trains on the snapshot: the same pairs, the same split.
    pairs, train_idx, val_idx = load_snapshot(snapshot, summary)
    if len(val_idx) == 0 and main:
        print("warning: no validation pairs (one prompt only, or --val-fraction 0): "
              "metrics and normalisation use the training pairs", file=sys.stderr)

    # ---- model ---------------------------------------------------------------------------
    import torch
    from transformers import AutoTokenizer
    from trainer.models import check_model, load_tokenizer

    device = accelerator.device  # cuda:<local rank> under `accelerate launch`, else cuda or cpu
    cuda = device.type == "cuda"
    if cuda:
        # TF32 matmuls for whatever still runs in fp32 (the head, the loss, the optimizer).
        torch.set_float32_matmul_precision("high")
    weight_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    lora = cfg.lora_r > 0
    # Mixed precision with fp32 master weights (as Megatron and DeepSpeed do it in bf16): the
    # model holds bf16 weights that forward and backward run on, the optimizer steps fp32
    # copies and writes them back once a step. bf16 autocast instead re-casts every weight in
    # every forward and again in backward; on SmolLM2-135M on an H100 (a launch-bound step)
    # that cost 2.3x in step time. Plain bf16 weights are no substitute: at learning rates
    # ~1e-5 most updates round away (validation accuracy 0.59 against 1.00, same run).
    mixed = not lora and (cfg.dtype == "mixed" or (cfg.dtype == "auto" and cuda))
    precision = ("bf16 weights + fp32 master weights" if mixed else "bf16 weights" if cfg.dtype == "bf16"
                 else "fp32 weights + bf16 autocast" if cuda else "fp32")

    def autocast():
        # LoRA and fp32 runs on CUDA: bf16 autocast (matmuls on tensor cores, weights in fp32).
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not mixed and cfg.dtype != "bf16" \
            else contextlib.nullcontext()

    run.status("queued", 0.0, f"loading {cfg.model}")
    base_source = check_model(cfg.model)  # resolves smollm2 / tiny (built once) / dirs / ids
    if resuming:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    else:
        tokenizer = load_tokenizer(cfg.model)
    choose_pad_token(tokenizer)
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.seed)  # the head init (and nothing else random) depends on it
    if resuming and not lora:
        seqcls = load_backbone(str(ckpt), tokenizer, weight_dtype, init_head=False)
    else:
        seqcls = load_backbone(base_source, tokenizer, weight_dtype, init_head=not has_trained_head(base_source))
    if cfg.grad_checkpointing:
        # Recompute activations in backward: memory O(layers) -> O(1) per layer, ~30% more compute.
        # (newer transformers call it activation checkpointing; older ones, gradient checkpointing.)
        enable = getattr(seqcls, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            seqcls.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model
        if resuming:
            seqcls = PeftModel.from_pretrained(seqcls, str(ckpt), is_trainable=True)
        else:
            # SEQ_CLS task: peft also trains (and saves) the `score` head in full.
            seqcls = get_peft_model(seqcls, LoraConfig(
                task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                lora_dropout=0.0, target_modules="all-linear"))
    seqcls.to(device)
    inner = seqcls.get_base_model() if lora else seqcls
    causal = is_causal(inner.base_model, device)
    net = reward_net(seqcls, causal)
    net.train()
    packed = cfg.pack and net.can_pack
    layout = pack if packed else collate
    if packed and inner.config._attn_implementation == "sdpa":
        from transformers import AttentionInterface
        AttentionInterface.register(GQA_SDPA, gqa_sdpa)
        inner.set_attn_implementation(GQA_SDPA)  # not saved: the checkpoint says sdpa as before
    if cfg.pack and not packed and accelerator.is_main_process:
        print(f"note: shared-prompt packing needs a causal backbone with sdpa or eager attention "
              f"(this one: causal={causal}, {inner.config._attn_implementation}); using plain padding",
              file=sys.stderr)

    # ---- tokens --------------------------------------------------------------------------
    max_length = min(cfg.max_length, getattr(inner.config.get_text_config(), "max_position_embeddings", None)
                     or cfg.max_length)
    enc = encode_pairs(pairs, tokenizer, max_length)
    cut_note = (f"{enc.prompts_cut} of {len(pairs)} pairs had their prompt cut from the left (both answers "
                f"keep the same prompt tail); {enc.responses_cut} answers were longer than --max-length "
                f"{max_length} by themselves and were cut at their end")
    if main:
        s = summary
        votes = (f"; of {s['votes']} votes, {s['ties']} ties were {s['ties_mode']}d and "
                 f"{s['both_bad']} both-bad {s['both_bad_mode']}d") if s.get("kind") == "store" else ""
        print(f"data: {len(pairs)} pairs ({len(train_idx)} train / {len(val_idx)} val, split by prompt) "
              f"from {s.get('source')}{votes}", file=sys.stderr)
        print(f"truncation: {cut_note}", file=sys.stderr)

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
    master = params  # what the optimizer steps
    if mixed:
        master = [p.detach().clone() for p in params]  # fp32: loaded (or resumed) in full precision
        head = {id(p) for p in inner.score.parameters()}
        for p in params:  # the same Parameter objects, now holding bf16; the head and buffers stay fp32
            if id(p) not in head:  # (module.to(bf16) would also round the rotary inv_freq buffer)
                p.data = p.data.to(torch.bfloat16)
    # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts.
    groups = [{"params": [p for p in master if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in master if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one kernel (CUDA) / one vectorised loop (CPU) over all parameters at once.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  fused=device.type in ("cuda", "cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    step, train_seconds, train_cpu_seconds, pairs_seen = 0, 0.0, 0.0, 0
    norm, last_eval = {"gain": 1.0, "bias": 0.0}, {}
    if resuming:
        # weights_only=False: our own file, holding Python RNG state next to the tensors.
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.lr_lambdas[0] = lr_factor  # the schedule follows the (maybe longer) run
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)  # and a new --lr, if given
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(state["step"])
        set_rng_state(state["rng"])
        step, train_seconds, pairs_seen = state["step"], state["train_seconds"], state["pairs_seen"]
        train_cpu_seconds = state.get("train_cpu_seconds", 0.0)
        norm, last_eval = state.get("norm", norm), state.get("last_eval", {})
        run.truncate_metrics(step)
        run.log({"kind": "resume", "step": step, "from": str(ckpt), "time": time.time()})
        if main:
            print(f"resuming {run.path} from step {step} of {total_steps}", file=sys.stderr)
    net = accelerator.prepare_model(net)  # DDP under `accelerate launch`; unchanged otherwise
    unwrapped = accelerator.unwrap_model(net)

    def meta() -> dict:
        return {"format": 1, **norm, "max_length": max_length, "base_model": cfg.model,
                "base_source": base_source, "step": step, "lora": lora, "causal": causal,
                "val": {k: v for k, v in last_eval.items() if not k.startswith("_")}}

    def save(final: bool = False) -> None:
        model = unwrapped.seqcls
        if final and lora:
            model = model.merge_and_unload()  # a plain model: loadable without peft
        model.config.get_text_config().pad_token_id = pad_id
        training_state = None if final else {
            "step": step, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
            "pairs_seen": pairs_seen, "norm": norm,
            "last_eval": {k: v for k, v in last_eval.items() if not k.startswith("_")},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        compute = [p.data for p in params]
        if mixed:  # save the fp32 masters: point the Parameters at them for the write (no copy)
            for p, m in zip(params, master):
                p.data = m
        try:
            save_checkpoint(run, model, tokenizer, meta(), training_state)
        finally:
            for p, c in zip(params, compute):
                p.data = c
        accelerator.wait_for_everyone()

    def do_eval(epoch: float) -> dict:
        nonlocal norm, last_eval
        idx = val_idx if len(val_idx) else train_idx
        # The unwrapped module: evaluation is forward-only, no DDP gradient bookkeeping.
        last_eval = {**evaluate(unwrapped, enc, idx, cfg, pad_id, device, autocast, accelerator, packed),
                     "step": step}
        rewards = last_eval["_rewards"]
        # Normalisation: gain and bias so that validation rewards have mean 0 and std 1;
        # scores from different runs then share one scale (the policy trainer and the UI).
        std = float(rewards.std()) or 1.0
        norm = {"gain": 1.0 / std, "bias": -float(rewards.mean()) / std}
        record = {"kind": "eval", **{k: v for k, v in last_eval.items() if not k.startswith("_")},
                  "epoch": round(epoch, 4), "split": "val" if len(val_idx) else "train", **norm}
        run.log(record)
        if main:
            tqdm.write(f"eval @ step {step}: acc {record['val_acc']:.3f}  loss {record['val_loss']:.4f}  "
                       f"ece {record['val_ece']:.3f}  reward {record['reward_mean']:+.3f}±{record['reward_std']:.3f}  "
                       f"length corr {record['length_corr']:+.2f}", file=sys.stderr)
        return record

    def finish_cancelled() -> int:
        save()
        msg = f"cancelled at step {step} of {total_steps}; run the same command again to resume"
        run.status("cancelled", step / total_steps, msg, step=step, total_steps=total_steps)
        if main:
            tqdm.write(msg, file=sys.stderr)
        return 128 + stop["signal"]

    from tqdm.auto import tqdm
    config_record = read_json(run.path / "config.json")
    config_record.update(total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps,
                         effective_batch=cfg.batch_size * cfg.grad_accum * world, processes=world,
                         device=str(device), max_length=max_length, truncation=cut_note,
                         prompts_cut=enc.prompts_cut, responses_cut=enc.responses_cut, causal_backbone=causal,
                         layout="packed" if packed else "padded", precision=precision)
    if main:
        write_json(run.path / "config.json", config_record)
    run.status("running", step / total_steps, f"training: step {step} of {total_steps}",
               step=step, total_steps=total_steps)
    if stop:
        return finish_cancelled()

    # ---- the loop ------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, desc="reward model", unit="step",
               disable=not (cfg.progress and main), dynamic_ncols=True)
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        batches = epoch_batches(epoch)
        # On resume: skip the micro-batches this epoch already trained on (same seed, same order).
        first = (step - epoch * steps_per_epoch) * cfg.grad_accum
        for g in range(first, len(batches), cfg.grad_accum):
            if step >= total_steps:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            group = batches[g:g + cfg.grad_accum]
            n_pairs = sum(len(b) for b in group)
            stats = torch.zeros(5, dtype=torch.float64, device=device)  # loss, correct, votes, pairs, gap
            tokens = slots = 0
            for j, b in enumerate(group):
                batch = layout(enc, b, pad_id)
                inputs = to_device(batch, device)
                label, margin = batch["label"].to(device), batch["margin"].to(device)
                tokens, slots = tokens + batch["tokens"], slots + batch["slots"]
                # Gradient accumulation: DDP all-reduces gradients only on the last micro-batch.
                sync = j == len(group) - 1
                with (contextlib.nullcontext() if sync else accelerator.no_sync(net)):
                    with autocast():
                        rewards = net(**inputs)  # chosen and rejected in one forward
                    r_c, r_r = rewards.chunk(2)
                    per_pair = preference_loss(r_c, r_r, label, margin if cfg.margin else None, cfg.center)
                    # Sum / pairs-in-step: equal weight per pair however the step is cut up.
                    (per_pair.sum() / n_pairs).backward()
                with torch.no_grad():
                    votes = label == 1.0
                    stats += torch.stack([per_pair.sum().double(), ((r_c > r_r) & votes).sum().double(),
                                          votes.sum().double(), torch.tensor(len(b), device=device, dtype=torch.float64),
                                          (r_c - r_r).sum().double()])
            if mixed:  # bf16 gradients (summed over the step's micro-batches) -> fp32 masters
                for p, m in zip(params, master):
                    m.grad, p.grad = (p.grad.float() if p.grad is not None else None), None
            grad_norm = torch.nn.utils.clip_grad_norm_(master, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            # One small all-reduce: global numbers for the log, and every process agrees to stop.
            stats = torch.cat([stats, torch.tensor([float(bool(stop))], device=device, dtype=torch.float64)])
            stats = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
            loss_sum, correct, votes_n, pairs_n, gap_sum, stop_n = stats.tolist()
            loss = loss_sum / max(pairs_n, 1)
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                # NaN/inf: do not step, do not save; the last good checkpoint stays as it is.
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                kept = run.checkpoint()
                msg = (f"loss became {loss} (grad norm {float(grad_norm)}) at step {step + 1}; stopped. "
                       f"Last good checkpoint: {kept or 'none (no checkpoint was saved yet)'}. "
                       f"Try a lower --lr or --max-grad-norm.")
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
            record = {"kind": "train", "step": step, "epoch": round(epoch + (g + len(group)) / len(batches), 4),
                      "loss": loss, "acc": correct / votes_n if votes_n else None, "reward_gap": gap_sum / pairs_n,
                      "lr": lr, "grad_norm": float(grad_norm), "pairs": int(pairs_n),
                      "tokens": tokens * world, "padding": round(1 - tokens / slots, 4),  # this process's
                      "step_s": round(dt, 4), "pairs_per_s": round(pairs_n / dt, 3),
                      "elapsed_s": round(time.time() - t_start, 2)}
            run.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{record['acc'] or 0:.2f}", refresh=False)
            run.status("running", step / total_steps, f"training: step {step} of {total_steps}, loss {loss:.4f}",
                       throttle=True, step=step, total_steps=total_steps)
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
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss()) / 2**20
    final = {k: v for k, v in last_eval.items() if not k.startswith("_")}
    run.log({"kind": "summary", "step": step, "train_pairs": pairs_seen, "train_seconds": round(train_seconds, 3),
             "train_pairs_per_s": round(pairs_seen / train_seconds, 3) if train_seconds else None,
             "train_cpu_seconds": round(train_cpu_seconds, 3),
             "peak_memory_mb": round(peak, 1), "prompts_cut": enc.prompts_cut,
             "responses_cut": enc.responses_cut, **final, **norm, "wall_s": round(time.time() - t_start, 2)})
    msg = (f"done: {step} steps, validation accuracy {final.get('val_acc', float('nan')):.3f}; "
           f"checkpoint in {run.path / CHECKPOINT}")
    run.status("done", 1.0, msg, step=step, total_steps=total_steps)
    if main:
        print(msg, file=sys.stderr)
    return 0


def _peak_rss() -> float:
    """Peak resident memory of this process in bytes (Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


# --------------------------------------------------------------------------------------
# Using a trained reward model
# --------------------------------------------------------------------------------------

class RewardModel:
    """A trained reward model: `RewardModel.load(run_or_checkpoint_dir).score(prompts, responses)`.

    Prompts are chat message lists, strings (one user message, or an HH transcript), or the
    store's JSON spelling; responses are strings. Scores are normalised (mean 0, std 1 on the
    run's validation set) unless `normalize=False`. Inputs are formatted and truncated exactly
    as in training.
    """

    def __init__(self, seqcls, tokenizer, meta: dict, device, path: Path | None = None):
        import torch
        self.tokenizer, self.meta, self.device, self.path = tokenizer, meta, device, path
        self.gain, self.bias = float(meta.get("gain", 1.0)), float(meta.get("bias", 0.0))
        self.max_length = int(meta.get("max_length", 1024))
        self.model = seqcls.to(device).eval()
        self.model.score.float()  # a bf16 backbone is fine for scoring; the head's output keeps fp32 digits
        causal = meta.get("causal")
        self.net = reward_net(self.model, is_causal(self.model.base_model, device) if causal is None else causal)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
            else contextlib.nullcontext

    @classmethod
    def load(cls, path, device=None, dtype=None) -> "RewardModel":
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from trainer.models import pick_device, pick_dtype
        path = Path(path)
        if (path / CHECKPOINT).is_dir():  # a run directory: its checkpoint
            path = path / CHECKPOINT
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no reward model here (a run directory or a checkpoint)")
        device = pick_device(device)
        meta = read_json(path / META_FILE)
        tokenizer = AutoTokenizer.from_pretrained(path)
        choose_pad_token(tokenizer)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=pick_dtype(device, dtype))
        return cls(model, tokenizer, meta, device, path)

    def encode(self, prompts, responses) -> tuple[list[list[int]], int]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts] * len(responses)  # one prompt, several answers
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        messages = [as_messages(p) for p in prompts]
        answers = [as_response(r) for r in responses]
        ids, _, _ = encode_texts(self.tokenizer, messages, answers, self.max_length)
        return ids, self.tokenizer.pad_token_id

    def score(self, prompts, responses, *, normalize: bool = True, batch_size: int = 16) -> list[float]:
        """One reward per (prompt, response); normalised unless normalize=False."""
        import torch
        ids, pad_id = self.encode(prompts, responses)
        out = np.zeros(len(ids), dtype=np.float64)
        order = np.argsort([-len(s) for s in ids], kind="stable")  # similar lengths together
        with torch.inference_mode(), self.autocast():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(ids[i]) for i in rows)
                x = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(x)
                for k, i in enumerate(rows):
                    x[k, :len(ids[i])] = torch.tensor(ids[i])
                    mask[k, :len(ids[i])] = 1
                last = mask.sum(1) - 1  # right padding: the last real token (the answer's EOS)
                r = self.net(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                             read_row=torch.arange(len(rows), device=self.device), read_col=last.to(self.device))
                out[rows] = r.cpu().numpy()
        if normalize:
            out = self.gain * out + self.bias
        return out.tolist()


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, RewardConfig)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, explicit = config_from_namespace(RewardConfig, args)
    if not cfg.data and not cfg.run_dir:
        print("error: pass --data (a comparison store or a preference file), or --run-dir to resume",
              file=sys.stderr)
        return 2
    return train(cfg, explicit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.reward", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ConfigError as e:    # a --config file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
