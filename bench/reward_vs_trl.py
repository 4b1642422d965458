"""Benchmark: our reward-model trainer against TRL's RewardTrainer, in one job.

    .venv/bin/python bench/reward_vs_trl.py                                   # SmolLM2-135M
    .venv/bin/python bench/reward_vs_trl.py --pairs 256 --max-length 256      # a few minutes on a CPU
    .venv/bin/python bench/reward_vs_trl.py --config 1b --pairs 4096          # random-init 1B, GPU

Both trainers get the same backbone, the same pairs (token for token: TRL is handed our
tokenization, since TRL drops over-long pairs where we cut the prompt), the same split,
effective batch, max length, learning rate, epochs, warmup/decay, gradient clipping,
precision (bf16 autocast on CUDA, fp32 on CPU) and no gradient checkpointing (TRL turns it
on by default; that would only slow TRL down). Everything else is each trainer's own
default: TRL batches in random order, we group batches by length.

The pairs: prompts from trainer/data/prompts.jsonl; answers of a realistic (log-normal) spread of
lengths built from English sentences. Simulated annotators prefer the fluent answer: the
rejected one has some of its sentences scrambled (the two answers' lengths are drawn
independently, so length says nothing about the label).

Measured: train pairs/s (pairs x epochs / seconds spent in training steps, data
feeding included, evaluation and saving excluded), peak memory (CUDA: max allocated;
CPU: peak RSS of the process during that trainer's phase, sampled), validation
accuracy (reward of chosen > rejected on the held-out prompts). The last line printed
is one JSON object.

Reading the numbers on a CPU: whichever trainer runs first pays the allocator's warm-up
(gigabytes of activations faulted in), so the default order (ours first) is the
conservative one for the ratio; `--order trl-first` shows the other side. Peak RSS is a
process-wide high-water mark, so only the first trainer's memory figure is clean. Wall
time on a shared machine moves with other jobs: `ratio_cpu_time` (process CPU seconds)
is the steadier cross-check; when the two ratios disagree, the machine was busy.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Larger random-initialised Llama shapes for GPU runs (`--config NAME`, or a JSON object).
PRESETS = {
    "360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def shipped_prompts() -> list[list[dict[str, str]]]:
    """The shipped prompt pool as chat messages (some have a system turn or several turns)."""
    from trainer.prompts import load_prompt_pool

    return [p.messages for p in load_prompt_pool(ROOT / "trainer" / "data" / "prompts.jsonl")]


def sentence_pool() -> list[str]:
    """English sentences from the shipped prompts and annotator guidelines."""
    text = " ".join(m["content"] for prompt in shipped_prompts() for m in prompt)
    text += " " + re.sub(r"[#*>`|_-]+", " ", (ROOT / "trainer" / "data" / "guidelines.md").read_text())
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", " ".join(text.split()))]
    return [s for s in sentences if 4 <= len(s.split()) <= 40]


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    prompts = shipped_prompts()
    pool = sentence_pool()

    def answer(scramble: float) -> str:
        # Log-normal length in words (median ~70, long tail to 600): like real chat answers.
        target = int(min(600, max(4, rng.lognormvariate(math.log(70), 0.9))))
        out, words = [], 0
        while words < target:
            s = rng.choice(pool).split()
            if rng.random() < scramble:
                rng.shuffle(s)  # a garbled sentence: what the annotators penalise
            out.append(" ".join(s))
            words += len(s)
        return " ".join(out)

    return [
        {
            "prompt": prompts[i % len(prompts)],
            "chosen": [{"role": "assistant", "content": answer(0.0)}],
            "rejected": [{"role": "assistant", "content": answer(0.5)}],
        }
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


class PeakMemory:
    """Peak CUDA memory allocated, or peak resident memory sampled every 20 ms on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0, threading.Event()

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.02)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


# --------------------------------------------------------------------------------------
# The two trainers
# --------------------------------------------------------------------------------------


def run_ours(args, data_path: Path, model: str, work: Path, cuda: bool) -> dict:
    from trainer.reward import train

    run_dir = work / "ours"
    with PeakMemory(cuda) as mem:
        code = train(
            {
                "data": str(data_path),
                "model": model,
                "run_dir": str(run_dir),
                "epochs": args.epochs,
                "lr": args.lr,
                "batch_size": args.batch_size,
                "grad_accum": args.grad_accum,
                "max_length": args.max_length,
                "val_fraction": args.val_fraction,
                "seed": args.seed,
                "warmup": args.warmup,
                "max_grad_norm": 1.0,
                "eval_batch_size": args.batch_size * 2,
                "progress": not args.quiet,
            }
        )
    if code != 0:
        raise SystemExit(f"our trainer failed with exit code {code}; see {run_dir}/status.json")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    return {
        "pairs_per_s": summary["train_pairs_per_s"],
        "train_s": summary["train_seconds"],
        "cpu_s": summary["train_cpu_seconds"],
        "val_acc": summary["val_acc"],
        "peak_mb": mem.mb,
        "run_dir": run_dir,
        "padding": float(np.mean([r["padding"] for r in records if r["kind"] == "train"])),
    }


def run_trl(args, run_dir: Path, model_source: str, work: Path, cuda: bool) -> dict:
    """TRL's RewardTrainer on our run's exact token ids and split."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from trainer.pair_snapshot import load_snapshot
    from trainer.reward_batches import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "checkpoint")  # pad = <|endoftext|>, as ours
    config = json.loads((run_dir / "config.json").read_text())
    pairs, train_idx, val_idx = load_snapshot(run_dir / "data.parquet")
    enc = encode_pairs(pairs, tokenizer, config["max_length"])
    train_ds = Dataset.from_dict(
        {
            "chosen_ids": [enc.chosen[i] for i in train_idx],
            "rejected_ids": [enc.rejected[i] for i in train_idx],
        }
    )
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(
        model_source, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    trl_args = RewardConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=cuda,
        use_cpu=not cuda,
        max_length=None,
        seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=args.quiet,
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=trl_args, train_dataset=train_ds, processing_class=tokenizer)
    with PeakMemory(cuda) as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    # Validation accuracy with TRL's own model and its own read-out (the HF forward).
    model = trainer.model.eval()
    device = next(model.parameters()).device
    correct = 0
    with (
        torch.inference_mode(),
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False),
    ):
        for s in range(0, len(val_idx), args.batch_size):
            b = val_idx[s : s + args.batch_size]
            batch = tokenizer.pad(
                {"input_ids": [enc.chosen[i] for i in b] + [enc.rejected[i] for i in b]}, return_tensors="pt"
            )
            r = model(**{k: v.to(device) for k, v in batch.items()}).logits.squeeze(-1).float()
            rc, rr = r.chunk(2)
            correct += int((rc > rr).sum())
    return {
        "pairs_per_s": round(len(train_idx) * args.epochs / seconds, 3),
        "train_s": round(seconds, 3),
        "cpu_s": round(cpu_seconds, 3),
        "val_acc": correct / len(val_idx),
        "peak_mb": mem.mb,
    }


def prepare_split(args, data_path: Path, model: str, work: Path) -> Path:
    """Write what run_trl reads (the split snapshot, config, tokenizer) without training:
    the same split and tokenizer set-up our trainer makes."""
    from trainer.models import load_tokenizer
    from trainer.pair_snapshot import save_snapshot
    from trainer.reward_data import read_pairs, split_by_prompt
    from trainer.reward_model import choose_pad_token
    from trainer.runs import write_json

    run_dir = work / "split"
    (run_dir / "checkpoint").mkdir(parents=True)
    pairs = read_pairs(data_path)
    train_idx, val_idx = split_by_prompt(pairs, args.val_fraction, args.seed)
    save_snapshot(pairs, train_idx, val_idx, run_dir / "data.parquet")
    write_json(run_dir / "config.json", {"max_length": args.max_length})
    tokenizer = load_tokenizer(model)
    choose_pad_token(tokenizer)
    tokenizer.save_pretrained(run_dir / "checkpoint")
    return run_dir


def free(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def random_model(spec: str, work: Path) -> str:
    """A random-initialised Llama of a preset (or JSON) shape with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.models import check_model, load_tokenizer

    shape = PRESETS.get(spec) or json.loads(spec)
    base = check_model("smollm2")
    config = AutoConfig.from_pretrained(base)
    for k, v in shape.items():
        setattr(config, k, v)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = work / f"random-{spec if spec in PRESETS else 'custom'}"
    model.save_pretrained(out)
    load_tokenizer("smollm2").save_pretrained(out)
    print(
        f"random-initialised model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters",
        file=sys.stderr,
    )
    del model
    return str(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="backbone for both (trainer.models name or dir)")
    p.add_argument(
        "--config", default=None, help=f"random-initialised Llama instead: {', '.join(PRESETS)} or JSON"
    )
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--order",
        choices=("ours-first", "trl-first"),
        default="ours-first",
        help="which trainer runs first (TRL needs our run's tokenization, made either way)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    import torch
    import trl

    from trainer.models import check_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = (
        torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        work = Path(tmp)
        model = random_model(args.config, work) if args.config else args.model
        source = model if args.config else check_model(model)
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(args.pairs, args.seed)))

        if args.order == "trl-first":
            # Our run's data snapshot and tokenizer, without training: a zero-step dry run.
            split_dir = prepare_split(args, data, model, work)
            theirs = run_trl(args, split_dir, source, work, cuda)
            free(cuda)
            ours = run_ours(args, data, model, work, cuda)
        else:
            ours = run_ours(args, data, model, work, cuda)
            free(cuda)
            theirs = run_trl(args, ours["run_dir"], source, work, cuda)

    ratio = ours["pairs_per_s"] / theirs["pairs_per_s"]
    result = {
        "bench": "reward_vs_trl",
        "model": args.config or args.model,
        "pairs": args.pairs,
        "max_length": args.max_length,
        "effective_batch": args.batch_size * args.grad_accum,
        "epochs": args.epochs,
        "lr": args.lr,
        "ours_pairs_per_s": ours["pairs_per_s"],
        "trl_pairs_per_s": theirs["pairs_per_s"],
        "ratio": round(ratio, 3),
        "peer_pairs_per_s": theirs["pairs_per_s"],
        "ours_train_s": ours["train_s"],
        "trl_train_s": theirs["train_s"],
        # Process CPU seconds of the same phases: on a shared CPU box, less sensitive to
        # other jobs than wall time (on a GPU, wall time is what counts).
        "ours_cpu_s": ours["cpu_s"],
        "trl_cpu_s": theirs["cpu_s"],
        "ratio_cpu_time": round(theirs["cpu_s"] / ours["cpu_s"], 3),  # same pairs: CPU s per pair
        "ours_val_acc": round(ours["val_acc"], 4),
        "trl_val_acc": round(theirs["val_acc"], 4),
        "ours_peak_mem_mb": ours["peak_mb"],
        "trl_peak_mem_mb": theirs["peak_mb"],
        "memory": "cuda max allocated" if cuda else "peak process RSS during the phase",
        "ours_padding": round(ours["padding"], 4),
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "device": device,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
