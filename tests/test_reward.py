"""The reward model trainer (trainer/reward.py, trainer/reward_data.py).

Models are the tiny random Llama with the real SmolLM2 tokenizer ("tiny"), so the whole
file runs in well under two minutes on a laptop CPU.
"""

import json
import math
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    TINY,
    TRAIN_DEVICE,
    banana_rows,
    preflab,
    retraction,
    sigterm_mid_run,
    vote_record,
    write_jsonl,
    write_store,
)

from trainer.reward import train
from trainer.reward_batches import encode_pairs, fit, length_grouped_batches
from trainer.reward_data import RewardDataError, read_pairs, split_by_prompt, text_to_messages
from trainer.reward_metrics import expected_calibration_error, preference_loss
from trainer.reward_model import RewardModel
from trainer.store import messages_to_json

# Simulated annotators with a hidden rule (helpers.banana_rows): they prefer the answer
# that mentions "banana". TINY: the reward trainer's settings for the tiny model.


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------

RC = torch.tensor([1.5, -0.3, 0.2, 2.0, -1.0])
RR = torch.tensor([0.5, 0.4, 0.2, -1.0, 1.0])
MARGIN = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0])


def test_loss_is_the_bradley_terry_formula():
    loss = preference_loss(RC, RR)
    expected = [-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(RC.tolist(), RR.tolist())]
    assert torch.allclose(loss, torch.tensor(expected), atol=1e-6)
    with_margin = preference_loss(RC, RR, margin=MARGIN)
    expected_m = [
        -math.log(1 / (1 + math.exp(-(c - r - m))))
        for c, r, m in zip(RC.tolist(), RR.tolist(), MARGIN.tolist())
    ]
    assert torch.allclose(with_margin, torch.tensor(expected_m), atol=1e-6)
    centered = preference_loss(RC, RR, center=0.01)
    assert torch.allclose(centered, loss + 0.01 * (RC + RR) ** 2, atol=1e-6)
    # A label of 1 is the same as no label.
    assert torch.allclose(preference_loss(RC, RR, label=torch.ones(5)), loss, atol=1e-6)


def test_loss_equals_trl_reward_trainer_loss():
    """TRL 1.16's RewardTrainer.compute_loss run on the same rewards (its model, trainer
    state and accelerator stubbed out): the numbers must agree."""
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    def trl_loss(margin=None, center=None):
        stub = SimpleNamespace(
            model=SimpleNamespace(training=True),
            args=SimpleNamespace(center_rewards_coefficient=center),
            accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )
        inputs = {"input_ids": torch.zeros(10, 3, dtype=torch.long), "attention_mask": torch.ones(10, 3)}
        if margin is not None:
            inputs["margin"] = margin
        # TRL puts chosen rows first, rejected second, in one batch of logits [2B, 1].
        model = lambda **kw: SimpleNamespace(logits=torch.cat([RC, RR])[:, None])  # noqa: E731
        return RewardTrainer.compute_loss(stub, model, inputs).item()

    assert preference_loss(RC, RR).mean().item() == pytest.approx(trl_loss(), abs=1e-6)
    assert preference_loss(RC, RR, margin=MARGIN).mean().item() == pytest.approx(trl_loss(MARGIN), abs=1e-6)
    assert preference_loss(RC, RR, center=0.01).mean().item() == pytest.approx(
        trl_loss(center=0.01), abs=1e-6
    )


def test_ties_and_margins_change_the_loss_as_they_should():
    d = torch.linspace(-3, 3, 61, requires_grad=True)
    zero = torch.zeros(61)
    tie = preference_loss(d, zero, label=torch.full((61,), 0.5))
    # A tie is best when the two rewards are equal, and symmetric around it.
    assert d[tie.argmin()].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(tie, tie.flip(0), atol=1e-6)
    tie.sum().backward()
    assert d.grad[30].item() == pytest.approx(0.0, abs=1e-6)
    # A vote keeps pushing the gap up; a margin makes the same gap cost more.
    vote_loss = preference_loss(d.detach(), zero)
    assert torch.all(vote_loss[1:] < vote_loss[:-1])
    assert torch.all(preference_loss(d.detach(), zero, margin=torch.ones(61)) > vote_loss)
    # For a pair with a gap, the tie loss is above the vote loss (it pulls the gap back).
    assert tie[50].item() > vote_loss[50].item()


def test_calibration_error():
    assert expected_calibration_error(np.array([0.95, 0.95, 0.95, 0.95])) == pytest.approx(0.05)
    # Confident and half wrong: badly calibrated.
    assert expected_calibration_error(np.array([0.99, 0.01, 0.99, 0.01])) == pytest.approx(0.49)


# --------------------------------------------------------------------------------------
# Data: votes -> pairs, files, split, truncation, batches
# --------------------------------------------------------------------------------------


def test_votes_become_oriented_pairs_with_ties_and_margins(tmp_path):
    records = [
        vote_record("q1", "A1", "B1", "a", 2),
        vote_record("q1", "A2", "B2", "b", 1),
        vote_record("q2", "A3", "B3", "tie"),
        vote_record("q2", "A4", "B4", "both_bad"),
        vote_record("q3", "A5", "B5", "a"),
    ]
    retract_me = vote_record("q3", "A6", "B6", "b", 2)
    retract = retraction(retract_me)
    store = write_store(tmp_path / "store", records + [retract_me, retract])

    pairs = read_pairs(store)
    assert sorted(zip(pairs.chosen, pairs.rejected)) == [("A1", "B1"), ("A5", "B5"), ("B2", "A2")]
    assert pairs.label == [1.0, 1.0, 1.0] and pairs.margin == [0.0, 0.0, 0.0]
    assert pairs.summary["ties"] == 1 and pairs.summary["both_bad"] == 1 and pairs.summary["votes"] == 5

    pairs = read_pairs(store, ties="include", margin=True)
    got = {
        (c, r): (label, m) for c, r, label, m in zip(pairs.chosen, pairs.rejected, pairs.label, pairs.margin)
    }
    assert got == {
        ("A1", "B1"): (1.0, 2.0),
        ("B2", "A2"): (1.0, 1.0),
        ("A3", "B3"): (0.5, 0.0),
        ("A5", "B5"): (1.0, 0.0),
    }
    pairs = read_pairs(store, ties="include", both_bad="include")
    assert sorted(pairs.label) == [0.5, 0.5, 1.0, 1.0, 1.0]
    assert pairs.prompts[0] == [{"role": "user", "content": "q1"}]


def test_trl_files_standard_and_conversational(tmp_path):
    conv = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
            "margin": 2.0,
        }
    ]
    path = tmp_path / "conv.parquet"
    pq.write_table(__import__("pyarrow").Table.from_pylist(conv), path)
    pairs = read_pairs(path, margin=True)
    assert pairs.prompts[0][0] == {"role": "system", "content": "Be brief."}
    assert (pairs.chosen[0], pairs.rejected[0], pairs.margin[0]) == ("Hello.", "Go away.", 2.0)
    assert read_pairs(path).margin == [0.0]  # the column is only used when asked for

    # The HH transcript that `preflab export` writes for multi-turn prompts is split back.
    hh = "\n\nSystem: Be brief.\n\nHuman: Hi?\n\nAssistant: Yo.\n\nHuman: And?\n\nAssistant:"
    messages, transcript = text_to_messages(hh)
    assert transcript and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    pairs = read_pairs(
        write_jsonl(tmp_path / "hh.jsonl", [{"prompt": hh, "chosen": " Fine.", "rejected": " No."}])
    )
    assert pairs.prompts[0][-1] == {"role": "user", "content": "And?"} and pairs.chosen == ["Fine."]


def test_split_is_by_prompt_and_seeded():
    rows = banana_rows(300, prompts_per_topic=20)
    from trainer.reward_data import Pairs

    pairs = Pairs()
    for r in rows:
        pairs.add(text_to_messages(r["prompt"])[0], r["chosen"], r["rejected"])
    train_idx, val_idx = split_by_prompt(pairs, 0.2, seed=1)
    keys = pairs.prompt_keys()
    assert not {keys[i] for i in train_idx} & {keys[i] for i in val_idx}  # no prompt on both sides
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(300))
    assert 0.15 <= len(val_idx) / 300 <= 0.3
    again, _ = split_by_prompt(pairs, 0.2, seed=1)
    other, _ = split_by_prompt(pairs, 0.2, seed=2)
    assert np.array_equal(train_idx, again) and not np.array_equal(train_idx, other)


def test_long_prompts_are_cut_from_the_left_and_counted():
    assert fit([1, 2, 3], [7, 8, 9], 10) == ([1, 2, 3, 7, 8, 9], 0)
    assert fit([1, 2, 3, 4, 5], [7, 8, 9], 5) == ([4, 5, 7, 8, 9], 1)  # answer kept whole
    assert fit([1, 2], [7, 8, 9, 10, 11, 99], 4) == ([7, 8, 9, 99], 2)  # answer head + its EOS

    from trainer.models import load_tokenizer
    from trainer.reward_model import choose_pad_token

    tok = load_tokenizer("tiny")
    choose_pad_token(tok)
    from trainer.reward_data import Pairs

    pairs = Pairs()
    pairs.add([{"role": "user", "content": "word " * 200}], "short answer", "another short answer")
    pairs.add([{"role": "user", "content": "hi"}], "ok", "fine")
    pairs.add([{"role": "user", "content": "hi"}], "word " * 60, "ok")
    enc = encode_pairs(pairs, tok, max_length=40)
    assert max(len(s) for s in enc.chosen + enc.rejected) <= 40
    assert enc.prompts_cut == 2 and enc.responses_cut == 1
    # The answers and their EOS are intact at the end; the longer side is exactly 40 tokens,
    # and both sides keep the same prompt tail (what the annotator saw them against).
    for text, seq in (("short answer", enc.chosen[0]), ("another short answer", enc.rejected[0])):
        answer = tok(text + tok.eos_token, add_special_tokens=False).input_ids
        assert seq[-len(answer) :] == answer
    longer = tok("another short answer" + tok.eos_token, add_special_tokens=False).input_ids
    assert len(enc.rejected[0]) == 40 and enc.shared[0] == 40 - len(longer)
    assert enc.chosen[0][: enc.shared[0]] == enc.rejected[0][: enc.shared[0]]
    # An answer too long by itself: its head and its EOS, and no room left for the prompt.
    assert len(enc.chosen[2]) == 40 and enc.chosen[2][-1] == tok.eos_token_id
    assert enc.rejected[2] == tok("ok" + tok.eos_token, add_special_tokens=False).input_ids


def test_length_grouped_batches_cover_everything_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(4, 0.8, size=1000).astype(int) + 5
    batches = length_grouped_batches(lengths, 8, seed=3, epoch=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert lengths[batches[0]].max() == lengths.max()  # the longest batch first
    assert all(np.array_equal(a, b) for a, b in zip(batches, length_grouped_batches(lengths, 8, 3, 0)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, length_grouped_batches(lengths, 8, 3, 1)))

    def padding(bs):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in bs) / sum(
            len(b) * lengths[b].max() for b in bs
        )

    random_batches = np.array_split(rng.permutation(1000), 125)
    assert padding(batches) < 0.1 < padding(random_batches)


def test_packed_layout_computes_what_separate_sequences_do():
    """Shared-prompt packing (prompt once, rejected masked from chosen, positions restarted)
    must give the rewards of scoring each prompt + answer on its own, padded."""
    from trainer.models import check_model, load_tokenizer
    from trainer.reward_batches import collate, pack
    from trainer.reward_data import Pairs
    from trainer.reward_model import choose_pad_token, load_backbone, reward_net

    tok = load_tokenizer("tiny")
    choose_pad_token(tok)
    torch.manual_seed(0)
    net = reward_net(
        load_backbone(check_model("tiny"), tok, torch.float32, init_head=True), causal=True
    ).eval()
    assert net.can_pack
    pairs = Pairs()
    rows = banana_rows(12, seed=5)
    for r in rows:
        pairs.add(text_to_messages(r["prompt"])[0], r["chosen"], r["rejected"])
    pairs.add([{"role": "user", "content": "same"}], "identical answer", "identical answer")
    pairs.add([{"role": "user", "content": "word " * 80}], "a long-ish answer " * 3, "short")  # cut prompts
    for k in range(4):
        pairs.add([{"role": "user", "content": "hi"}], f"yes {k}", "no")  # short pairs share a row
    enc = encode_pairs(pairs, tok, max_length=48)
    assert enc.prompts_cut > 0 and (enc.shared < [len(c) for c in enc.chosen]).all()
    batch = np.arange(len(pairs))
    packed = pack(enc, batch, tok.pad_token_id)
    assert packed["tokens"] < collate(enc, batch, tok.pad_token_id)["tokens"]  # the prompt runs once
    assert packed["input_ids"].shape[0] < len(pairs)  # short pairs share rows
    keys = ("input_ids", "read_row", "read_col", "attention_mask", "position_ids", "segment", "branch")
    with torch.no_grad():
        a = net(**{k: v for k, v in packed.items() if k in keys})
        b = net(**{k: v for k, v in collate(enc, batch, tok.pad_token_id).items() if k in keys})
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    same = 12  # the pair with identical answers gets identical rewards
    assert a[same].item() == pytest.approx(a[len(pairs) + same].item(), abs=1e-5)


# --------------------------------------------------------------------------------------
# Bad input: a clear error before any model is loaded
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    import trainer.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded for input that cannot be trained on")

    monkeypatch.setattr(trainer.models, "check_model", refuse)
    monkeypatch.setattr(trainer.models, "load_tokenizer", refuse)


@pytest.mark.parametrize("case", ["empty_store", "only_ties", "missing_columns", "no_such_path"])
def test_bad_input_fails_clearly_before_loading_a_model(tmp_path, case, no_model_loading, capsys):
    if case == "empty_store":
        data, expect = write_store(tmp_path / "s", []), "no standing votes"
    elif case == "only_ties":
        data = write_store(
            tmp_path / "s", [vote_record("q", "a", "b", "tie"), vote_record("q", "c", "d", "both_bad")]
        )
        expect = "none of the 2 votes prefers one answer"
    elif case == "missing_columns":
        data = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "chosen": "a", "answer": "b"}])
        expect = "missing prompt, rejected"
    else:
        data, expect = tmp_path / "nothing.parquet", "no such comparison store or preference file"
    with pytest.raises(RewardDataError, match=expect):
        read_pairs(data)
    run_dir = tmp_path / "run"
    assert train({**TINY, "data": str(data), "run_dir": str(run_dir)}) == 2
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and expect in status["message"]
    assert expect in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Training: learning, the run directory, the scoring API
# --------------------------------------------------------------------------------------


def test_learns_the_hidden_rule_and_scores_normalised(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(320))
    run_dir = tmp_path / "runs" / "rm"
    code = train(
        {
            **TINY,
            "data": str(data),
            "run_dir": str(run_dir),
            "epochs": 2,
            "lr": 3e-3,
            "batch_size": 16,
            "val_fraction": 0.2,
            "center": 0.01,
        }
    )
    assert code == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["progress"] == 1.0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["lr"] == 3e-3 and config["total_steps"] == 32
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 33))  # one JSON object per optimizer step
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [1.0, 2.0]
    final = evals[-1]
    assert final["val_acc"] >= 0.9, final
    for key in (
        "val_loss",
        "val_ece",
        "reward_mean",
        "reward_std",
        "length_corr",
        "headers_corr",
        "bold_corr",
    ):
        assert math.isfinite(final[key])
    assert records[-1]["kind"] == "summary" and records[-1]["train_pairs"] == 2 * 256

    # The checkpoint: a plain HF model that computes our raw rewards itself...
    rm = RewardModel.load(run_dir, device=TRAIN_DEVICE)  # on CUDA: a bf16 backbone, an fp32 head
    exact = rm.device.type == "cpu"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "checkpoint").eval()
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "checkpoint")
    prompt = [{"role": "user", "content": "Question 3 about sleep: what should I do?"}]
    answers = ["you can banana the water", "you can the water", "banana"]
    ids, _ = rm.encode(prompt, answers)
    with torch.no_grad():
        hf_raw = hf(**hf_tok.pad({"input_ids": ids}, return_tensors="pt")).logits.squeeze(-1)
    raw = rm.score(prompt, answers, normalize=False)
    assert np.allclose(raw, hf_raw.numpy(), atol=1e-4 if exact else 0.05 * float(hf_raw.abs().max()))
    # ... and normalised scores: mean 0, std 1 on the validation set; the rule is learned.
    snap = pq.read_table(run_dir / "data.parquet").to_pylist()
    val = [r for r in snap if r["split"] == "val"]
    prompts = [json.loads(r["prompt"]) for r in val] * 2
    scores = np.array(rm.score(prompts, [r["chosen"] for r in val] + [r["rejected"] for r in val]))
    assert abs(scores.mean()) < (1e-3 if exact else 0.05) and scores.std() == pytest.approx(
        1.0, abs=1e-3 if exact else 0.05
    )
    assert (scores[: len(val)] > scores[len(val) :]).mean() >= 0.9
    # Strings, chat messages and the store's JSON spelling of a prompt all score the same.
    text = "Question 3 about sleep: what should I do?"
    assert np.allclose(rm.score(text, answers), rm.score([prompt] * 3, answers))
    assert np.allclose(rm.score(messages_to_json(prompt), answers), rm.score(prompt, answers))


def test_lora_and_gradient_checkpointing_give_a_plain_checkpoint(tmp_path):
    pytest.importorskip("peft")
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(48))
    run_dir = tmp_path / "lora"
    assert (
        train(
            {
                **TINY,
                "data": str(data),
                "run_dir": str(run_dir),
                "lr": 1e-3,
                "batch_size": 8,
                "lora_r": 4,
                "grad_checkpointing": True,
            }
        )
        == 0
    )
    ckpt = run_dir / "checkpoint"
    assert not (ckpt / "adapter_config.json").exists()  # adapters merged: loadable without peft
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    from transformers import AutoModelForCausalLM

    from trainer.models import check_model

    base = AutoModelForCausalLM.from_pretrained(check_model("tiny"))
    rm = RewardModel.load(run_dir, device="cpu")
    # LoRA changed the backbone's projections (merged in), and the head was trained.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(rm.model.state_dict()[q], base.state_dict()[q])
    assert len(rm.score("hi", ["a", "b banana"])) == 2


def test_mixed_precision_learns_and_saves_the_fp32_master_weights(tmp_path):
    # The CUDA default (bf16 weights for forward/backward, fp32 master weights in the
    # optimizer), forced on the CPU so that it is tested everywhere.
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(160))
    run_dir = tmp_path / "mixed"
    assert (
        train(
            {
                **TINY,
                "data": str(data),
                "run_dir": str(run_dir),
                "epochs": 2,
                "lr": 3e-3,
                "batch_size": 16,
                "val_fraction": 0.2,
                "dtype": "mixed",
            }
        )
        == 0
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["precision"] == "bf16 weights + fp32 master weights"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["val_acc"] >= 0.85, evals[-1]
    # The checkpoint holds the fp32 masters, not their bf16 working copies: many of its
    # weights are not representable in bf16.
    from safetensors.torch import load_file

    weights = load_file(run_dir / "checkpoint" / "model.safetensors")
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.float32 and (w != w.bfloat16().float()).float().mean() > 0.5
    from trainer.models import check_model

    base = load_file(Path(check_model("tiny")) / "model.safetensors")
    assert not torch.equal(w, base["model.layers.0.self_attn.q_proj.weight"])  # and they were trained


def test_nan_loss_fails_and_keeps_the_last_good_checkpoint(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(64))
    run_dir = tmp_path / "nan"
    code = train(
        {
            **TINY,
            "data": str(data),
            "run_dir": str(run_dir),
            "lr": 1e30,
            "warmup": 0.0,
            "batch_size": 8,
            "save_every": 1,
            "max_grad_norm": 1e30,
        }
    )
    assert code == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "loss became" in status["message"]
    meta = json.loads((run_dir / "checkpoint" / "preflab_reward.json").read_text())
    assert 1 <= meta["step"] == status["step"]  # the checkpoint of the last finite step


def test_sigterm_saves_cancelled_and_rerun_resumes(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(1600))  # ~700 steps: SIGTERM lands mid-run
    run_dir = tmp_path / "runs" / "resume-me"
    cmd = [
        sys.executable,
        "-m",
        "trainer.reward",
        "--data",
        str(data),
        "--model",
        "tiny",
        "--run-dir",
        str(run_dir),
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--lr",
        "1e-3",
        "--no-progress",
        "--save-every",
        "1000",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    metrics = run_dir / "metrics.jsonl"
    code, out, status = sigterm_mid_run(cmd, env, run_dir, lambda lines: len(lines) >= 3, timeout=90)
    assert code == 128 + signal.SIGTERM, out
    assert status["state"] == "cancelled", status
    saved = status["step"]
    assert 3 <= saved < status["total_steps"]
    assert json.loads((run_dir / "checkpoint" / "preflab_reward.json").read_text())["step"] == saved

    # The same command again (here through `preflab train-reward`) resumes from the saved step.
    from annotate.cli import main as preflab

    assert (
        preflab(["train-reward", "--run-dir", str(run_dir), "--max-steps", str(saved + 3), "--no-progress"])
        == 0
    )
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    resume = next(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert records[resume]["step"] == saved
    after = [r["step"] for r in records[resume:] if r["kind"] == "train"]
    assert after == [saved + 1, saved + 2, saved + 3]  # not from 0
    before = [r["step"] for r in records[:resume] if r["kind"] == "train"]
    assert before == list(range(1, saved + 1))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == saved + 3
    # A finished run is not trained again.
    assert preflab(["train-reward", "--run-dir", str(run_dir), "--no-progress"]) == 0


def test_a_command_that_fails_on_its_input_leaves_no_run_directory(tmp_path):
    # No --run-dir: the run would have been runs/reward-<time>. Bad input removes it (and
    # the runs directory this command created); a named --run-dir keeps the failure
    # (test_bad_input_fails_clearly_before_loading_a_model).
    r = preflab(
        "train-reward", "--data", tmp_path / "nothing", "--model", "tiny", "--runs-dir", tmp_path / "runs"
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_a_small_run_says_how_little_its_accuracy_means(tmp_path, val_fraction, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", banana_rows(24, prompts_per_topic=8))
    run_dir = tmp_path / "run"
    code = train(
        {**TINY, "data": str(data), "run_dir": str(run_dir), "val_fraction": val_fraction, "epochs": 1}
    )
    assert code == 0
    message = json.loads((run_dir / "status.json").read_text())["message"]
    summary = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    if val_fraction == 0:
        assert "no validation pairs, so no validation accuracy" in message, message
        assert "warning: no validation pairs (--val-fraction 0)" in capsys.readouterr().err
        assert summary["split"] == "train"
    else:
        n = summary["val_pairs"]
        assert 0 < n < 50 and summary["split"] == "val"
        assert f"95% CI {summary['val_acc_low']:.2f}-{summary['val_acc_high']:.2f}, {n} pairs" in message
        assert "fewer than 50 validation pairs" in message, message
        assert (
            summary["val_acc_low"] < summary["val_acc"] <= summary["val_acc_high"] or summary["val_acc"] == 0
        )


# --------------------------------------------------------------------------------------
# Resume state: data, never code
# --------------------------------------------------------------------------------------


class _Planted:
    """What an attacker could put in a run directory: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_training_state_is_loaded_as_data_and_a_planted_pickle_runs_nothing(tmp_path):
    import random

    import numpy as np

    from trainer.checkpoints import CheckpointError, load_training_state, rng_state, set_rng_state

    state = {"step": 3, "baseline": 0.25, "rng": rng_state(), "weights": torch.ones(2)}
    torch.save(state, tmp_path / "training_state.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_training_state(tmp_path / "training_state.pt")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected  # the same draws

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "rng": _Planted(marker)}, tmp_path / "planted.pt")
    with pytest.raises(CheckpointError, match="not plain training state"):
        load_training_state(tmp_path / "planted.pt")
    assert not marker.exists()


def test_a_training_state_saved_by_an_earlier_version_still_resumes(tmp_path):
    import numpy as np

    from trainer.checkpoints import load_training_state, set_rng_state

    old = {
        "python": __import__("random").getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save({"step": 2, "rng": old}, tmp_path / "training_state.pt")  # numpy's key as an array
    expected = float(np.random.rand())
    set_rng_state(load_training_state(tmp_path / "training_state.pt")["rng"])
    assert float(np.random.rand()) == expected
