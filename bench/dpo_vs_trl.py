"""Benchmark: our DPO trainer (trainer/dpo.py) against TRL's DPOTrainer.

    .venv/bin/python bench/dpo_vs_trl.py --model tiny --pairs 96 --max-length 96   # minutes on a CPU
    .venv/bin/python bench/dpo_vs_trl.py --model smollm2 --pairs 1024               # GPU-sized

Both get the same model (fp32 weights; bf16 autocast on CUDA for ours, bf16=True for
TRL), the same hidden-rule pairs (tests/helpers.banana_rows: the chosen answer mentions
"banana") and the same train/val split (ours, by prompt), batch size, learning rate,
beta, sigmoid loss, epochs and max length, one optimizer step per batch, no gradient
checkpointing. TRL runs with its defaults otherwise: a reference copy of the model and
its forward at every step (precompute_ref_log_probs off), where ours computes the
reference log-probs once up front.

Measured: pairs/s = training pairs x epochs / seconds, where seconds are ours: the
reference pass + the training steps (from the run's summary); TRL: `trainer.train()`.
Model loading and evaluation are left out of both. Accuracy: the held-out implicit-reward
accuracy, beta * (log pi - log ref)(chosen) > (same)(rejected) on our validation pairs,
for TRL's trained model computed here with our log-prob code and the untrained model as
reference. Peak memory over the same span as the seconds, by bench/reward_vs_trl.py's
PeakMemory (CUDA: max allocated; CPU: the process's peak RSS, sampled; one process runs
both, so TRL's CPU figure starts from what ours left resident). The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_ours(args, data: Path, work: Path, device: str) -> dict:
    from bench.reward_vs_trl import PeakMemory
    from trainer.dpo import train

    run_dir = work / "ours"
    with PeakMemory(device == "cuda") as mem:
        code = train(
            {
                "data": str(data),
                "model": args.model,
                "run_dir": str(run_dir),
                "epochs": args.epochs,
                "lr": args.lr,
                "beta": args.beta,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "val_fraction": args.val_fraction,
                "warmup": 0.0,
                "kl_prompts": 0,  # TRL samples nothing: neither do we here
                "seed": args.seed,
                "progress": False,
                "device": device,
            }
        )
    if code != 0:
        raise SystemExit(f"our trainer failed with exit code {code}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    seconds = summary["train_seconds"] + summary["reference_s"]
    return {
        "run_dir": run_dir,
        "pairs_per_s": round(summary["train_pairs"] * args.epochs / seconds, 3),
        "seconds": round(seconds, 3),
        "peak_mb": mem.mb,
        "val_acc": summary["final_eval"]["val_acc"],
    }


def run_trl(args, run_dir: Path, work: Path, cuda: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from bench.reward_vs_trl import PeakMemory
    from trainer.dpo import encode, pair_logps
    from trainer.models import check_model, load_tokenizer
    from trainer.pair_snapshot import load_snapshot
    from trainer.policy_model import autocast_for
    from trainer.sampling import render_prompt

    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "right"
    pairs, train_idx, val_idx = load_snapshot(run_dir / "data.parquet")
    # Standard format with the prompt already rendered by the chat template, as ours renders it.
    train_ds = Dataset.from_dict(
        {
            "prompt": [render_prompt(tokenizer, pairs.prompts[i]) for i in train_idx],
            "chosen": [pairs.chosen[i] for i in train_idx],
            "rejected": [pairs.rejected[i] for i in train_idx],
        }
    )
    source = check_model(args.model)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    trl_args = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        truncation_mode="keep_end",  # ours cuts the prompt from the left and keeps the answers
        gradient_checkpointing=False,
        bf16=cuda,
        use_cpu=not cuda,
        seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=trl_args, train_dataset=train_ds, processing_class=tokenizer)
    with PeakMemory(cuda) as mem:
        t0 = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0

    # Held-out implicit-reward accuracy of TRL's model, against the untrained model.
    device = next(trainer.model.parameters()).device
    autocast = autocast_for(device)
    enc = encode(pairs, tokenizer, args.max_length)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    policy = trainer.model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(val_idx), 16):
            b = np.asarray(val_idx[s : s + 16])
            pc, pr, _, _ = pair_logps(policy, enc, b, tokenizer.pad_token_id, device, autocast)
            rc, rr, _, _ = pair_logps(base, enc, b, tokenizer.pad_token_id, device, autocast)
            correct += int(((pc - rc) > (pr - rr)).sum())
    return {
        "pairs_per_s": round(len(train_idx) * args.epochs / seconds, 3),
        "seconds": round(seconds, 3),
        "peak_mb": mem.mb,
        "val_acc": correct / len(val_idx),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="policy for both (a trainer.models name or a dir)")
    p.add_argument("--pairs", type=int, default=96, help="hidden-rule pairs (train + val)")
    p.add_argument("--max-length", type=int, default=96, help="tokens of prompt + answer")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (linear decay, no warmup)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    p.add_argument("--val-fraction", type=float, default=0.25, help="held out, by prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)

    import torch
    import trl
    from helpers import banana_rows

    cuda = torch.cuda.is_available()
    device = (
        torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        work = Path(tmp)
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in banana_rows(args.pairs, args.seed)))
        ours = run_ours(args, data, work, "cuda" if cuda else "cpu")
        theirs = run_trl(args, ours["run_dir"], work, cuda)
    result = {
        "bench": "dpo_vs_trl",
        "model": args.model,
        "pairs": args.pairs,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "ours_seconds": ours["seconds"],
        "trl_seconds": theirs["seconds"],
        "ours_pairs_per_s": ours["pairs_per_s"],
        "trl_pairs_per_s": theirs["pairs_per_s"],
        "ratio": round(ours["pairs_per_s"] / theirs["pairs_per_s"], 3),
        "ours_acc": round(ours["val_acc"], 4),
        "trl_acc": round(theirs["val_acc"], 4),
        "ours_peak_mem_mb": ours["peak_mb"],
        "trl_peak_mem_mb": theirs["peak_mb"],
        "memory": "cuda max allocated" if cuda else "peak process RSS during the phase",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "device": device,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
