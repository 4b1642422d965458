"""DPO from the votes: the loss functions (trainer/dpo_math.py) and `preflab train-dpo`.

TRL 1.x computes its DPO losses inline in `DPOTrainer._compute_loss`, which needs a model
and a batch; there is no standalone loss function to call on fixed tensors, so the
losses here are checked against the formulas written out, not against TRL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys

import numpy as np
import pytest
import torch
from helpers import TINY, banana_rows, child_env, metric_records, preflab, sigterm_mid_run, write_jsonl

from trainer.config import flags_of
from trainer.dpo import answer_logps, train
from trainer.dpo_config import DPOConfig
from trainer.dpo_math import preference_losses
from trainer.runs import RunDir

DPO_TINY = {**TINY, "kl_prompts": 4, "kl_tokens": 16}

# Summed answer log-probs of three pairs, under the policy and under the reference.
PC = torch.tensor([-10.0, -20.0, -5.0])
PR = torch.tensor([-12.0, -18.0, -5.5])
RC = torch.tensor([-11.0, -19.0, -6.0])
RR = torch.tensor([-11.5, -19.5, -5.0])
TOKENS_C = torch.tensor([4.0, 8.0, 2.0])
TOKENS_R = torch.tensor([5.0, 6.0, 3.0])


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_loss_and_implicit_rewards_are_the_dpo_formula():
    beta = 0.1
    out = preference_losses(PC, PR, RC, RR, beta=beta)
    for i in range(3):
        d = (PC[i] - RC[i]).item() - (PR[i] - RR[i]).item()  # 1.5, -2.0, 1.5
        assert out.loss[i].item() == pytest.approx(-_logsigmoid(beta * d), rel=1e-6)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (PC[i] - RC[i]).item(), rel=1e-6)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (PR[i] - RR[i]).item(), rel=1e-6)
        assert out.margins[i].item() == pytest.approx(beta * d, rel=1e-6)
    assert out.accuracy.tolist() == [1.0, 0.0, 1.0]
    # beta scales the implicit rewards linearly
    assert torch.allclose(preference_losses(PC, PR, RC, RR, beta=0.5).margins, 5 * out.margins)


def test_label_smoothing_is_conservative_dpo_and_ipo_is_the_squared_per_token_gap():
    beta, eps = 0.2, 0.1
    out = preference_losses(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    plain = preference_losses(PC, PR, RC, RR, beta=beta)
    for i in range(3):
        d = beta * ((PC[i] - RC[i]) - (PR[i] - RR[i])).item()
        expected = -(1 - eps) * _logsigmoid(d) - eps * _logsigmoid(-d)
        assert out.loss[i].item() == pytest.approx(expected, rel=1e-6)
    # smoothing punishes a confident correct pair more and a confident wrong one less
    assert out.loss[0] > plain.loss[0] and out.loss[1] < plain.loss[1]

    ipo = preference_losses(
        PC, PR, RC, RR, beta=beta, loss="ipo", chosen_tokens=TOKENS_C, rejected_tokens=TOKENS_R
    )
    for i in range(3):
        d_avg = (PC[i] - RC[i]).item() / TOKENS_C[i].item() - (PR[i] - RR[i]).item() / TOKENS_R[i].item()
        assert ipo.loss[i].item() == pytest.approx((d_avg - 1 / (2 * beta)) ** 2, rel=1e-6)
    assert torch.allclose(ipo.margins, plain.margins)  # the implicit rewards do not depend on the loss
    with pytest.raises(ValueError, match="chosen_tokens"):
        preference_losses(PC, PR, RC, RR, beta=beta, loss="ipo")


def test_the_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    preference_losses(pc, pr, RC, RR, beta=0.1).loss.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log pi(chosen)


# ---- preflab train-dpo ------------------------------------------------------------------


def test_help_names_every_setting():
    done = preflab("train-dpo", "--help")
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())  # argparse wraps lines
    for f in dataclasses.fields(DPOConfig):
        assert flags_of(DPOConfig, f.name)[0] in out, f.name
    assert "cut from the left" in out and "adapters disabled" in out


def test_learns_the_hidden_rule_and_saves_a_servable_policy(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(320))
    run_dir = tmp_path / "runs" / "dpo"
    code = train(
        {**DPO_TINY, "data": str(data), "run_dir": str(run_dir), "epochs": 2, "lr": 3e-3, "batch_size": 16,
         "val_fraction": 0.2}
    )  # fmt: skip
    assert code == 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["kind"] == "policy" and config["algo"] == "dpo"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_steps] == list(range(1, config["total_steps"] + 1))
    first_eval, final = [r for r in records if r["kind"] == "eval"]
    # Held-out prompts: the implicit reward has learned the rule, well above chance (0.5).
    # (48 of 64 right by chance: p < 1e-4.)
    assert final["split"] == "val" and final["val_pairs"] == 64
    assert final["val_acc"] >= 0.75 and final["val_margin"] > 0, final
    assert math.isfinite(final["val_kl"]) and final["kl_samples"] == 4
    assert all(math.isfinite(r[k]) for r in train_steps for k in ("loss", "chosen_logps", "rejected_logps"))

    # The result is a plain causal LM where serve and the arena look for a policy run's ...
    policy = RunDir(run_dir).policy_model()
    assert policy is not None and not (run_dir / "checkpoint").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from annotate.arena import arena_name

    assert arena_name(str(policy)) == "dpo"  # serve --model runs/dpo/policy: a policy run
    lm = AutoModelForCausalLM.from_pretrained(policy).eval()
    tok = AutoTokenizer.from_pretrained(policy)
    # ... the trained model itself: its log-probs against the cached reference give the
    # logged held-out accuracy again. Computed here the plain way (full logits), which
    # also checks the trainer's LM-head-on-the-answer-only shortcut.
    import pyarrow.parquet as pq

    snap = pq.read_table(run_dir / "data.parquet").to_pylist()
    ref = torch.load(run_dir / "reference_logps.pt", weights_only=True)
    val = [i for i, r in enumerate(snap) if r["split"] == "val"]
    eos = tok.eos_token
    correct = 0
    with torch.no_grad():
        for i in val:
            prompt = tok.apply_chat_template(
                json.loads(snap[i]["prompt"]), tokenize=False, add_generation_prompt=True
            )
            p_ids = tok(prompt, add_special_tokens=False).input_ids
            logps = []
            for answer in (snap[i]["chosen"], snap[i]["rejected"]):
                a_ids = tok(answer + eos, add_special_tokens=False).input_ids
                ids = torch.tensor([p_ids + a_ids])
                lp = lm(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                logps.append(float(lp[len(p_ids) - 1 :].sum()))
            if i == val[0]:
                ours = answer_logps(lm, [p_ids + a_ids], [len(p_ids)], tok.pad_token_id, torch.device("cpu"),
                                    torch.no_grad)[0]  # fmt: skip
                assert float(ours[0]) == pytest.approx(logps[1], abs=1e-3)
            correct += (logps[0] - float(ref["chosen"][i])) > (logps[1] - float(ref["rejected"][i]))
    assert correct / len(val) == pytest.approx(final["val_acc"], abs=1.5 / len(val))


def test_lora_reference_is_the_base_and_the_policy_is_merged(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(48))
    run_dir = tmp_path / "lora"
    code = train(
        {**DPO_TINY, "data": str(data), "run_dir": str(run_dir), "lora_r": 4, "lr": 1e-2, "max_steps": 3}
    )
    assert code == 0
    policy = run_dir / "policy"
    assert (policy / "config.json").is_file() and not (policy / "adapter_config.json").exists()
    meta = json.loads((policy / "preflab_policy.json").read_text())
    assert meta["lora"] and meta["algo"] == "dpo" and meta["step"] == 3
    # The merged policy moved away from the base the reference came from.
    from transformers import AutoModelForCausalLM

    from trainer.models import check_model

    base = AutoModelForCausalLM.from_pretrained(check_model("tiny")).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    assert any(not torch.equal(base[k], merged[k]) for k in base if k.endswith("proj.weight"))


def test_micro_batches_take_the_same_step_as_the_whole_batch(tmp_path):
    # --micro-batch 3 of a batch of 8: forwards of 3, 3 and 2 pairs, one optimizer step.
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(48))
    runs = {}
    for micro in (0, 3):
        run_dir = tmp_path / f"micro-{micro}"
        settings = {**DPO_TINY, "kl_prompts": 0, "data": str(data), "run_dir": str(run_dir), "lr": 1e-3,
                    "batch_size": 8, "max_steps": 2, "micro_batch": micro}  # fmt: skip
        assert train(settings) == 0
        runs[micro] = run_dir
    whole, parts = (metric_records(runs[m]) for m in (0, 3))
    # fp32 on a CPU: the same up to rounding; CUDA's bf16 autocast pads 3 + 3 + 2 unlike 8.
    rel, atol = (1e-4, 1e-5) if TINY["device"] == "cpu" else (0.05, 1e-3)
    assert [r["pairs"] for r in parts] == [8, 8]
    for a, b in zip(whole, parts):
        for key in ("loss", "reward_acc", "reward_margin", "chosen_logps", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=atol), key
    from safetensors.torch import load_file

    from trainer.models import check_model

    base = load_file(f"{check_model('tiny')}/model.safetensors")
    w0, w3 = (load_file(runs[m] / "policy" / "model.safetensors") for m in (0, 3))
    moved = [k for k in w0 if not torch.equal(w0[k], base[k])]
    assert moved  # the steps changed the weights...
    for k in w0:  # ...and the same way
        assert torch.allclose(w0[k], w3[k], atol=atol), k
    assert json.loads((runs[3] / "config.json").read_text())["config"]["micro_batch"] == 3


def test_nan_loss_fails_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(64))
    run_dir = tmp_path / "nan"
    code = train(
        {**DPO_TINY, "kl_prompts": 0, "data": str(data), "run_dir": str(run_dir), "lr": 1e30, "warmup": 0.0,
         "batch_size": 8, "save_every": 1, "max_grad_norm": 1e30}
    )  # fmt: skip
    assert code == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "loss became" in status["message"]
    meta = json.loads((run_dir / "checkpoint" / "preflab_policy.json").read_text())
    assert 1 <= meta["step"] == status["step"]


def test_sigterm_saves_cancelled_and_rerun_resumes(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(400))
    run_dir = tmp_path / "runs" / "resume-me"
    cmd = [sys.executable, "-m", "trainer.dpo", "--data", str(data), "--model", "tiny", "--run-dir", str(run_dir),
           "--batch-size", "2", "--max-length", "64", "--lr", "1e-3", "--no-progress", "--save-every", "1000",
           "--kl-prompts", "2", "--kl-tokens", "8", "--device", TINY["device"]]  # fmt: skip
    code, out, status = sigterm_mid_run(cmd, child_env(), run_dir, lambda lines: len(lines) >= 3, timeout=240)
    assert code == 128 + signal.SIGTERM, out
    assert status["state"] == "cancelled", status
    saved = status["step"]
    assert 3 <= saved < status["total_steps"]
    assert json.loads((run_dir / "checkpoint" / "preflab_policy.json").read_text())["step"] == saved
    reference = (run_dir / "reference_logps.pt").stat().st_mtime_ns

    from annotate.cli import main as preflab_main

    argv = ["train-dpo", "--run-dir", str(run_dir), "--max-steps", str(saved + 2), "--no-progress"]
    assert preflab_main(argv) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = next(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert records[resume]["step"] == saved
    assert [r["step"] for r in records[resume:] if r["kind"] == "train"] == [saved + 1, saved + 2]
    assert [r["step"] for r in records[:resume] if r["kind"] == "train"] == list(range(1, saved + 1))
    assert (run_dir / "reference_logps.pt").stat().st_mtime_ns == reference  # not computed again
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert np.isfinite([r["loss"] for r in records if r["kind"] == "train"]).all()
