"""The policy trainer (trainer/policy.py) and its math (trainer/rl_math.py).

The learning tests use a world small enough for a CPU:
- simulated annotators with a hidden rule (they prefer answers that say "banana"), and a
  tiny reward model fitted to their votes with trainer.reward;
- a tiny policy that answers in words: a tiny random Llama (the real SmolLM2 tokenizer)
  whose output layer is set by hand so that it says a few short words from a 36-word
  list (banana rarely) and then EOS. RL has to find out that banana pays.
(conftest.policy_world builds both, once per session; helpers.word_policy the policy.)
"""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    POLICY_PROMPTS,
    REPO,
    TRAIN_DEVICE,
    banana_rate,
    metric_records,
    sigterm_mid_run,
    vote_record,
    write_store,
)

from trainer import rl_math
from trainer.errors import PolicyInputError
from trainer.policy import train
from trainer.policy_run import prompt_rows
from trainer.prompts import load_prompts


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one intra-op thread is several times faster
    than two fighting the other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# The math, against values computed by hand
# --------------------------------------------------------------------------------------


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.1, -0.2, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended after 2 tokens
    adv, ret = rl_math.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 1: delta = [0 + .2 - .5, 0 + .4 - .2, 1 + 0 - .4] = [-.3, .2, .6];
    #        A_2 = .6, A_1 = .2 + .95 * .6 = .77, A_0 = -.3 + .95 * .77 = .4315
    # Row 2: what lies after the end (reward 5, value 9) counts for nothing:
    #        A_1 = -.2 + 0 - .1 = -.3, A_0 = (.1 + .1 - .3) + .95 * -.3 = -.385
    assert torch.allclose(adv, torch.tensor([[0.4315, 0.77, 0.6], [-0.385, -0.3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.9315, 0.97, 1.0], [-0.085, -0.2, 0.0]]), atol=1e-6)
    # gamma and lambda both matter: gamma .5, lambda 1 on row 1:
    # delta = [.5*.2 - .5, .5*.4 - .2, .6] = [-.4, 0, .6]; A = [-.4 + .5*.3, 0 + .5*.6, .6]
    adv, _ = rl_math.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[-0.25, 0.3, 0.6]]), atol=1e-6)
    # lambda 0 is one-step TD: A_t = delta_t.
    adv, _ = rl_math.gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[-0.3, 0.2, 0.6]]), atol=1e-6)


def test_whitening_by_hand():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 4, unbiased variance (4 + 0 + 4) / 2 = 4, std 2; the masked 100 is ignored.
    assert torch.allclose(rl_math.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    # shift_mean=False rescales but keeps the mean (for rewards, whose sign means something).
    assert torch.allclose(
        rl_math.masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]]), atol=1e-6
    )
    assert rl_math.masked_mean(x, mask).item() == pytest.approx(4.0)
    assert rl_math.masked_var(x, mask).item() == pytest.approx(4.0)
    # Pooled over "processes": two halves reduced together give the statistics of the whole.
    halves = [(x[:, :2], mask[:, :2]), (x[:, 2:], mask[:, 2:])]
    total = sum(
        torch.stack([m.double().sum(), (v * m).double().sum(), (v * v * m).double().sum()]) for v, m in halves
    )
    pooled = rl_math.masked_whiten(x[:, :2], mask[:, :2], reduce=lambda _: total)
    assert torch.allclose(pooled, torch.tensor([[-1.0, 0.0]]), atol=1e-6)


def test_kl_estimators_by_hand_and_unbiased():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert torch.allclose(rl_math.kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    # k3 = (r - 1) - log r with r = ref/pi = [e^-0.5, e^1]
    k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1])
    assert torch.allclose(rl_math.kl_penalty(logp, ref, "k3"), k3, atol=1e-6)
    with pytest.raises(ValueError):
        rl_math.kl_penalty(logp, ref, "k2")
    # Both estimate KL(p || q) without bias from samples of p; k3 is never negative.
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    k1 = rl_math.kl_penalty(p.log()[x], q.log()[x], "k1")
    k3 = rl_math.kl_penalty(p.log()[x], q.log()[x], "k3")
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert k3.var() < k1.var()


def test_the_kl_shown_is_k3_per_answer_and_never_negative():
    """What the metrics and the Train tab call "KL": k3 = (r - 1) - log r, r = ref/pi, summed
    over each answer's tokens (padding excluded), >= 0 where k1 is negative."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = (ref - logp).exp()
    by_formula = (((r - 1) - r.log()) * mask).sum(1)
    shown = rl_math.kl_per_answer(logp, ref, mask)
    assert torch.allclose(shown, by_formula, atol=1e-6)
    # by hand: answer 1 tokens r = e^-0.5, e^1, 1; answer 2 r = e^-0.1, e^2 (the third is padding)
    by_hand = [
        math.exp(-0.5) - 1 + 0.5 + math.e - 1 - 1 + 0.0,
        math.exp(-0.1) - 1 + 0.1 + math.exp(2) - 1 - 2,
    ]
    assert shown.tolist() == pytest.approx(by_hand, abs=1e-5)
    k1 = rl_math.kl_per_answer(logp, ref, mask, "k1")
    assert k1[0] < 0 < shown[0]  # the reference likes this answer more: k1 says "negative KL"
    # Never negative, however far apart the two models are; 0 where they agree.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 20, generator=gen) * 5, torch.randn(64, 20, generator=gen) * 5
    assert (rl_math.kl_per_answer(a, b, torch.ones(64, 20)) >= 0).all()
    assert rl_math.kl_per_answer(a, a, torch.ones(64, 20)).abs().max() == 0


def test_step_clock_and_the_time_left():
    from trainer.policy_run import StepClock, format_duration, step_line

    clock = StepClock(rows_per_step=4, heldout=8, window=2)
    assert clock.step_s is None and clock.eta(10) is None
    for step_s in (30.0, 10.0, 20.0):  # the last two count
        clock.add({"step_s": step_s, "gen_s": 3.0, "score_s": 1.0})
    assert clock.step_s == 15.0
    # 5 steps left at 15 s, and the held-out evaluation: 2 x 8 prompts / 4 rows x (3 + 1) s
    assert clock.eta(5) == 5 * 15.0 + 16.0
    assert [format_duration(s) for s in (None, 0.4, 45, 290, 600, 4320)] == [
        "unknown",
        "0 s",
        "45 s",
        "4 min 50 s",
        "10 min",
        "1 h 12 min",
    ]
    record = {"reward_mean": 0.1234, "kl": 0.001234, "loss": -0.03456}
    assert (
        step_line(3, 10, record, 41.23, 290)
        == "step 3/10 | reward +0.123 | KL 0.00123 | loss -0.03456 | 41.2 s/step | ETA 4 min 50 s"
    )


def test_rloo_baseline_by_hand():
    # Group [1, 2, 3, 6]: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3.
    adv = rl_math.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), k=4)
    assert torch.allclose(adv, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]), atol=1e-6)
    # Rows are grouped k at a time, in order: [5, 1] and [0, 0] are separate prompts.
    adv = rl_math.rloo_advantages(torch.tensor([5.0, 1.0, 0.0, 0.0]), k=2)
    assert torch.allclose(adv, torch.tensor([4.0, -4.0, 0.0, 0.0]))
    # A group of equal rewards teaches nothing.
    assert torch.allclose(rl_math.rloo_advantages(torch.full((6,), 0.7), k=3), torch.zeros(6), atol=1e-6)
    with pytest.raises(ValueError):
        rl_math.rloo_advantages(torch.ones(5), k=2)
    with pytest.raises(ValueError):
        rl_math.rloo_advantages(torch.ones(4), k=1)


def test_group_advantages_by_hand():
    # Group [1, 2, 3]: mean 2, std (Bessel) 1; group [0, 0, 0] teaches nothing.
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    grpo = rl_math.group_advantages(rewards, k=3)
    assert torch.allclose(grpo, torch.tensor([-1, 0, 1, 0, 0, 0]) / (1 + 1e-4), atol=1e-6)
    # Dr. GRPO: no division by the std, so a group that barely varies is not blown up.
    small = torch.tensor([0.50, 0.51, 5.0, 1.0])
    assert torch.allclose(
        rl_math.group_advantages(small, k=2, scale=False), torch.tensor([-0.005, 0.005, 2.0, -2.0])
    )
    assert rl_math.group_advantages(small, k=2)[1] == pytest.approx(0.005 / (0.01 / 2**0.5 + 1e-4), rel=1e-4)
    assert torch.equal(rl_math.group_centred(rewards, k=1), rewards)  # k = 1: no baseline
    with pytest.raises(ValueError):
        rl_math.group_advantages(torch.ones(4), k=1)
    with pytest.raises(ValueError):
        rl_math.group_centred(torch.ones(5), k=2)


def test_returns_to_go_and_loss_aggregation_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(rl_math.returns_to_go(rewards, mask), torch.tensor([[6.0, 5, 3, 0], [9, 5, 0, 0]]))
    w = rl_math.token_loss_weights
    assert torch.equal(w(mask, "token", 4), mask)
    assert torch.allclose(w(mask, "seq", 4), torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0], [0.5, 0.5, 0, 0]]))
    assert torch.equal(w(mask, "seq_sum", 4), mask / 4)
    with pytest.raises(ValueError, match="loss aggregation"):
        w(mask, "mean", 4)
    # On-policy (ratio 1) each token's loss is -A: with the weights on the advantages, the
    # clipped surrogate's sum is the aggregation itself.
    adv = torch.tensor([[2.0, 2.0, 2.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    logp = torch.zeros(2, 4)
    per_answer_mean = ((-2.0 * 3) / 3 + (1.0 * 2) / 2) / 2  # GRPO: each answer's mean, then over answers
    loss, _, _ = rl_math.ppo_policy_loss(logp, logp, adv * w(mask, "seq", 4), mask)
    assert float(loss) / 2 == pytest.approx(per_answer_mean)
    loss, _, _ = rl_math.ppo_policy_loss(logp, logp, adv * w(mask, "token", 4), mask)
    assert float(loss) / 5 == pytest.approx((-2.0 * 3 + 1.0 * 2) / 5)  # DAPO: over all 5 tokens
    loss, _, _ = rl_math.ppo_policy_loss(logp, logp, adv * w(mask, "seq_sum", 4), mask)
    assert float(loss) / 2 == pytest.approx((-6.0 / 4 + 2.0 / 4) / 2)  # Dr. GRPO: sums over max_len


def test_clipped_losses_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1]))  # ratios 1.5, 0.5, 0.5, 1.1
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last token is padding
    loss, clipped, approx_kl = rl_math.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): [-1.2 (clipped), -0.5, 0.8 (clipped)]
    assert loss.item() == pytest.approx(-1.2 - 0.5 + 0.8, abs=1e-6)
    assert clipped.item() == 2
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2), abs=1e-6)

    values, old_values = torch.tensor([1.0, 0.5]), torch.zeros(2)
    returns = torch.tensor([0.5, 1.0])
    vf, vclipped = rl_math.ppo_value_loss(values, old_values, returns, torch.ones(2), clip=0.2)
    # Row 1: clipped value .2: max((1-.5)^2, (.2-.5)^2) = .25; row 2: max(.25, (.2-1)^2 = .64).
    assert vf.item() == pytest.approx(0.5 * (0.25 + 0.64), abs=1e-6)
    assert vclipped.item() == 1

    # Whole-answer ratio (RLOO): on-policy its gradient is REINFORCE's, -A * grad log pi(answer).
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([2.0, -0.5])
    loss, clipped = rl_math.sequence_policy_loss(logp, logp.detach(), adv, mask, clip=0.2)
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask)
    assert loss.item() == pytest.approx(-(2.0 - 0.5)) and clipped.item() == 0


def test_adaptive_kl_controller():
    fixed = rl_math.AdaptiveKLController(0.1, target=None)
    assert fixed.update(50.0, 256) == 0.1
    ctl = rl_math.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL twice the target: error clipped to +0.2 -> beta * (1 + 0.2 * 256 / 10000).
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * 1.00512)
    # KL at the target: unchanged; below: down.
    assert ctl.update(6.0, 256) == pytest.approx(0.1 * 1.00512)
    assert ctl.update(5.4, 1000) == pytest.approx(0.1 * 1.00512 * (1 - 0.1 * 0.1))


def test_explained_variance_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    returns = torch.tensor([[1.0, 3.0, 5.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding: its 9 and -7 count for nothing
    # returns [1, 3, 5]: Var 8/3; returns - values [0, 1, 2]: Var 2/3 -> 1 - (2/3) / (8/3) = 0.75
    # (the same with n - 1 in both variances: the ratio does not depend on it).
    assert rl_math.explained_variance(values, returns, mask) == pytest.approx(0.75)
    assert rl_math.explained_variance(returns, returns, mask) == pytest.approx(1.0)  # a perfect value head
    assert rl_math.explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(
        0.0
    )  # PPO's first step
    assert rl_math.explained_variance(-returns, returns, mask) == pytest.approx(-3.0)  # worse than the mean
    # Returns that do not vary (or a single token): undefined, NaN rather than a division by zero.
    assert math.isnan(rl_math.explained_variance(values, torch.full((1, 4), 2.0), mask))
    assert math.isnan(rl_math.explained_variance(values, returns, torch.tensor([[1.0, 0.0, 0.0, 0.0]])))
    # Pooled over "processes": the halves reduced together give the whole's value.
    halves = [(values[:, :2], returns[:, :2], mask[:, :2]), (values[:, 2:], returns[:, 2:], mask[:, 2:])]
    sums = {}
    for name, x in (("returns", lambda v, r: r), ("error", lambda v, r: r - v)):
        sums[name] = sum(
            torch.stack([m.double().sum(), (x(v, r) * m).double().sum(), (x(v, r) ** 2 * m).double().sum()])
            for v, r, m in halves
        )
    pooled = iter([sums["returns"], sums["error"]])
    assert rl_math.explained_variance(
        values[:, :2], returns[:, :2], mask[:, :2], reduce=lambda _: next(pooled)
    ) == pytest.approx(0.75)


def test_prompt_schedule_covers_the_pool_once_per_pass():
    seen = [p for step in range(4) for p in prompt_rows(step, 0, 1, batch_size=5, n_prompts=10, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a fresh order each pass
    # Two DDP processes get different prompts at one step.
    assert set(prompt_rows(7, 0, 2, 5, 10, 3)).isdisjoint(prompt_rows(7, 1, 2, 5, 10, 3))


def test_shared_prompt_forward_computes_what_separate_rows_do():
    """k answers to one prompt: running the prompt once and its KV cache under all k answers
    gives the log-probs, entropies, values and gradients of k separate rows."""
    from trainer.models import build_tiny_model
    from trainer.policy_model import load_causal_lm, policy_net

    lm = load_causal_lm(str(build_tiny_model()), torch.float32)
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight)
    net = policy_net(lm, head)
    gen = torch.Generator().manual_seed(0)
    k, prompts, P, R = 3, 2, 7, 5
    query = torch.randint(10, 1000, (prompts, P), generator=gen).repeat_interleave(k, 0)
    query_mask = torch.ones_like(query)
    query_mask[:k, :2] = 0  # the first prompt is left-padded
    response = torch.randint(10, 1000, (prompts * k, R), generator=gen)
    resp_mask = torch.ones_like(response)
    resp_mask[1, 3:] = 0  # answers of different lengths
    resp_mask[4, 1:] = 0
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, resp_mask], 1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    results = []
    for group in (1, k):
        net.zero_grad()
        logp, entropy, values = net(
            ids, mask, position_ids, P, 0.7, with_values=True, with_entropy=True, group=group
        )
        ((logp * resp_mask).sum() + (values * resp_mask).sum()).backward()
        results.append(
            [
                logp * resp_mask,
                entropy * resp_mask,
                values * resp_mask,
                lm.model.layers[0].self_attn.q_proj.weight.grad.clone(),
                head.weight.grad.clone(),
            ]
        )
    for separate, shared in zip(*results):
        assert torch.allclose(separate, shared, atol=1e-5), (separate - shared).abs().max()


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def test_prompts_from_a_pool_or_a_store(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "one"}\n{"messages": [{"role": "user", "content": "two"}]}\nnot json\n')
    assert load_prompts(pool) == [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    store = write_store(
        tmp_path / "store",
        [vote_record("q1", "a", "b"), vote_record("q2", "c", "d"), vote_record("q1", "e", "f")],
    )
    assert load_prompts(store) == [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    with pytest.raises(PolicyInputError, match="no such prompt pool"):
        load_prompts(tmp_path / "missing.jsonl")


def test_bad_input_fails_before_loading_a_model(tmp_path, monkeypatch, capsys):
    import trainer.models

    monkeypatch.setattr(trainer.models, "check_model", lambda *a, **k: pytest.fail("a model was loaded"))
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"prompt": "hello"}\n')
    cases = [
        ({"reward": str(tmp_path / "nothing")}, "no trained reward model here"),
        ({"reward": None}, "no reward model"),
        ({"reward": str(tmp_path), "algo": "rloo", "k": 1}, "--k must be at least 2"),
        ({"reward": str(tmp_path), "algo": "a2c"}, "--algo must be one of"),
        ({"reward": str(tmp_path), "algo": "grpo", "k": 1}, "--k must be at least 2 for grpo"),
        ({"reward": str(tmp_path), "algo": "ppo", "loss_agg": "seq"}, "--loss-agg applies to grpo"),
    ]
    for i, (extra, expect) in enumerate(cases):
        run_dir = tmp_path / f"bad{i}"
        assert (
            train(
                {"model": "tiny", "prompts": str(pool), "run_dir": str(run_dir), "progress": False, **extra}
            )
            == 2
        )
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "failed" and expect in status["message"], status
        assert expect in capsys.readouterr().err


def test_ppo_learns_the_hidden_rule_with_bounded_kl(policy_world, tmp_path):
    rm, policy, prompts = policy_world
    run_dir = tmp_path / "ppo"
    code = train(
        {
            "model": str(policy),
            "reward": str(rm),
            "prompts": str(prompts),
            "run_dir": str(run_dir),
            "algo": "ppo",
            "steps": 25,
            "batch_size": 16,
            "max_new_tokens": 12,
            "temperature": 1.0,
            "lr": 5e-4,
            "sample_every": 10,
            "device": TRAIN_DEVICE,
            "progress": False,
            "seed": 0,
        }
    )
    assert code == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["progress"] == 1.0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["epochs"] == 4 and config["config"]["minibatches"] == 2  # the PPO defaults
    train_records = metric_records(run_dir)
    assert [r["step"] for r in train_records] == list(range(1, 26))
    for key in (
        "reward_mean",
        "reward_std",
        "kl",
        "kl_k1",
        "loss",
        "kl_coef",
        "entropy",
        "clip_frac",
        "approx_kl",
        "value_loss",
        "pg_loss",
        "response_len",
        "eos_rate",
        "tokens_per_s",
        "step_s",
        "gen_s",
        "grad_norm",
    ):
        assert all(r[key] is not None and math.isfinite(r[key]) for r in train_records), key
    # The value head's explained variance: 0 at step 1 (it starts at zero), logged every step.
    assert train_records[0]["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["explained_variance"] is None or -50 < r["explained_variance"] <= 1 for r in train_records)
    first = sum(r["reward_mean"] for r in train_records[:3]) / 3
    last = sum(r["reward_mean"] for r in train_records[-5:]) / 5
    assert last > first + 0.6, (first, last)  # the reward rises clearly...
    assert max(r["kl"] for r in train_records) < 20.0  # ...while the KL stays bounded
    assert all(r["kl"] >= 0 for r in train_records)  # the KL shown (k3) is never negative
    # step 1: policy == reference, up to rounding summed over the tokens of an answer (fp32 on
    # a CPU; on CUDA the reference is kept in bf16 and the policy runs under bf16 autocast)
    assert train_records[0]["kl"] == pytest.approx(0.0, abs=2e-3 if TRAIN_DEVICE == "cpu" else 2e-2)
    samples = metric_records(run_dir, "samples")
    assert [s["step"] for s in samples] == [1, 10, 20]
    assert {"prompt", "response", "reward"} <= set(samples[0]["samples"][0])
    summary = metric_records(run_dir, "summary")[0]
    assert summary["step"] == 25 and summary["prompts"] == 25 * 16

    # The result: a plain HF model dir (tokenizer, chat template) that trainer.models loads,
    # and that says "banana" far more often than the policy it started from.
    out = run_dir / "policy"
    assert (out / "config.json").exists() and (out / "chat_template.jinja").exists()
    assert not (run_dir / "checkpoint").exists()  # the resumable state is gone once done
    meta = json.loads((out / "preflab_policy.json").read_text())
    assert meta["algo"] == "ppo" and meta["step"] == 25
    before, after = banana_rate(policy), banana_rate(out)
    assert after > before + 0.3, (before, after)

    # Held-out prompts (a fifth of 16): never trained on, and the policy met the reference on
    # them at the end; eval.json is what the Leaderboard tab shows beside the human votes.
    from trainer.evaluate import read_heldout

    heldout = read_heldout(run_dir)
    assert config["prompts"] == {"source": str(prompts), "count": 13, "heldout": 3} and len(heldout) == 3
    trained_on = {json.dumps(x["prompt"]) for s in samples for x in s["samples"]}
    assert not trained_on & {json.dumps(h) for h in heldout}
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["policy"] == "ppo" and ev["reference"] == str(policy) and ev["prompts"] == 3
    assert metric_records(run_dir, "eval")[0]["rm_win_rate"] == ev["rm_win_rate"]
    # `preflab eval-policy` on the whole pool: the policy that learned the rule wins clearly
    from annotate.cli import main as cli

    assert cli(["eval-policy", "--policy", str(run_dir), "--prompts", str(prompts)]) == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    lo, hi = ev["rm_win_rate_ci"]
    assert ev["prompts"] == 16 and ev["rm_win_rate"] >= 0.75 and lo <= ev["rm_win_rate"] <= hi, ev
    assert ev["policy_reward_mean"] > ev["reference_reward_mean"]


def test_rloo_learns_too(policy_world, tmp_path):
    rm, policy, prompts = policy_world
    run_dir = tmp_path / "rloo"
    code = train(
        {
            "model": str(policy),
            "reward": str(rm),
            "prompts": str(prompts),
            "run_dir": str(run_dir),
            "algo": "rloo",
            "k": 4,
            "steps": 25,
            "batch_size": 4,
            "max_new_tokens": 12,
            "temperature": 1.0,
            "lr": 5e-4,
            "kl_estimator": "k3",
            "device": TRAIN_DEVICE,
            "progress": False,
            "seed": 0,
        }
    )
    assert code == 0
    records = metric_records(run_dir)
    first = sum(r["reward_mean"] for r in records[:3]) / 3
    last = sum(r["reward_mean"] for r in records[-5:]) / 5
    assert last > first + 0.4, (first, last)
    assert all(r["value_loss"] is None and r["explained_variance"] is None for r in records)  # no value head
    assert records[-1]["prompts"] == 4 and records[-1]["rows"] == 16


def test_grpo_with_token_loss_and_overlong_filtering_learns(policy_world, tmp_path):
    """GRPO's group advantages with DAPO's token-level loss and overlong filtering: the
    reward still rises, and the run's config says what ran."""
    rm, policy, prompts = policy_world
    run_dir = tmp_path / "grpo"
    settings = {
        "model": str(policy),
        "reward": str(rm),
        "prompts": str(prompts),
        "run_dir": str(run_dir),
        "algo": "grpo",
        "loss_agg": "token",
        "mask_truncated": True,
        "steps": 25,
        "batch_size": 4,
        "max_new_tokens": 12,
        "temperature": 1.0,
        "lr": 5e-4,
        "device": TRAIN_DEVICE,
        "progress": False,
        "seed": 0,
    }
    assert train(settings) == 0
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["k"] == 4 and config["loss_agg"] == "token" and config["mask_truncated"] is True
    records = metric_records(run_dir)
    first = sum(r["reward_mean"] for r in records[:3]) / 3
    last = sum(r["reward_mean"] for r in records[-5:]) / 5
    assert last > first + 0.4, (first, last)
    assert all(r["value_loss"] is None and math.isfinite(r["loss"]) for r in records)  # no value head


@pytest.mark.parametrize("algo", ["dr_grpo", "reinforce_pp"])
def test_the_other_grpo_family_members_run_with_their_own_defaults(policy_world, tmp_path, algo):
    rm, policy, prompts = policy_world
    run_dir = tmp_path / algo
    settings = {
        "model": str(policy),
        "reward": str(rm),
        "prompts": str(prompts),
        "run_dir": str(run_dir),
        "algo": algo,
        "steps": 2,
        "batch_size": 2,
        "max_new_tokens": 8,
        "eval_prompts": 0,
        "device": TRAIN_DEVICE,
        "progress": False,
    }
    assert train(settings) == 0
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["k"] == 4 and config["loss_agg"] == {"dr_grpo": "seq_sum", "reinforce_pp": "token"}[algo]
    for r in metric_records(run_dir):
        assert all(
            math.isfinite(r[key]) for key in ("loss", "pg_loss", "clip_frac", "approx_kl", "grad_norm")
        )


@pytest.mark.parametrize("dtype", ["auto", "bf16"])  # bf16: the frozen base in bf16, as with LoRA on CUDA
def test_lora_policy_is_merged_into_a_plain_model(policy_world, tmp_path, dtype):
    rm, policy, prompts = policy_world
    run_dir = tmp_path / "lora"
    assert (
        train(
            {
                "model": str(policy),
                "reward": str(rm),
                "prompts": str(prompts),
                "run_dir": str(run_dir),
                "algo": "reinforce",
                "steps": 3,
                "batch_size": 4,
                "max_new_tokens": 6,
                "temperature": 1.0,
                "lr": 1e-2,
                "lora_r": 4,
                "dtype": dtype,
                "device": TRAIN_DEVICE,
                "progress": False,
            }
        )
        == 0
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["reference"] == "adapters off"
    out = run_dir / "policy"
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    from trainer.models import load_model

    base, _ = load_model(str(policy), device="cpu")
    tuned, _ = load_model(str(out), device="cpu")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.state_dict()[q], tuned.state_dict()[q])  # the adapters, merged in
    assert torch.equal(
        base.state_dict()["lm_head.weight"], tuned.state_dict()["lm_head.weight"]
    )  # untouched, bit for bit


def test_nan_and_exploding_kl_fail_clearly(policy_world, tmp_path, monkeypatch):
    rm, policy, prompts = policy_world
    common = {
        "model": str(policy),
        "reward": str(rm),
        "prompts": str(prompts),
        "batch_size": 4,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "device": TRAIN_DEVICE,
        "progress": False,
    }
    # A policy that runs away: a huge learning rate, and a KL budget of 1 nat.
    run_dir = tmp_path / "kl"
    assert (
        train(
            {
                **common,
                "run_dir": str(run_dir),
                "steps": 10,
                "lr": 0.05,
                "max_kl": 1.0,
                "kl_coef": 0.0,
                "save_every": 1,
            }
        )
        == 1
    )
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "KL to the reference exploded" in status["message"], status
    assert "--max-kl 1.0" in status["message"] and 1 <= status["step"] < 10
    # The checkpoint of the last good step is kept.
    state = torch.load(run_dir / "checkpoint" / "training_state.pt", weights_only=False)
    assert state["step"] == status["step"]

    # A reward model that answers NaN.
    from trainer.reward_model import RewardModel

    monkeypatch.setattr(RewardModel, "score", lambda self, p, r, **kw: [float("nan")] * len(r))
    run_dir = tmp_path / "nan"
    assert train({**common, "run_dir": str(run_dir), "steps": 3, "lr": 1e-4}) == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite" in status["message"], status
    assert not (run_dir / "policy").exists()


def test_each_step_writes_a_line_to_the_log(policy_world, tmp_path):
    """The trainer as the Train tab starts it (--no-progress, stdout and stderr into
    log.txt): one line a step with step/total, reward, KL, loss, s/step and the time left;
    status.json has the measured step time and the time left too."""
    import re

    rm, policy, prompts = policy_world
    run_dir = tmp_path / "two-steps"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "trainer.policy", "--model", str(policy), "--reward", str(rm)]
    cmd += ["--prompts", str(prompts), "--run-dir", str(run_dir), "--steps", "2", "--batch-size", "2"]
    cmd += ["--max-new-tokens", "4", "--device", TRAIN_DEVICE, "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(run_dir / "log.txt", "wb") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    text = (run_dir / "log.txt").read_text()
    assert code.returncode == 0, text
    number = r"[-+]?\d+(\.\d+)?(e[-+]\d+)?"
    line = (
        rf"step (\d)/2 \| reward {number} \| KL (?P<kl>{number}) \| loss {number} \| "
        rf"\d+\.\d s/step \| ETA \d+ (s|min)"
    )
    found = [m for m in map(re.compile(line).match, text.splitlines()) if m]
    assert [m.group(1) for m in found] == ["1", "2"], text
    records = metric_records(run_dir)
    assert [float(m.group("kl")) for m in found] == pytest.approx(
        [r["kl"] for r in records], rel=1e-2, abs=1e-6
    )
    assert all(r["kl"] >= 0 and "kl_k1" in r and math.isfinite(r["loss"]) for r in records)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


def test_sigterm_saves_cancelled_and_rerun_resumes(policy_world, tmp_path):
    rm, policy, prompts = policy_world
    run_dir = tmp_path / "runs" / "resume-me"
    cmd = [
        sys.executable,
        "-m",
        "trainer.policy",
        "--model",
        str(policy),
        "--reward",
        str(rm),
        "--prompts",
        str(prompts),
        "--run-dir",
        str(run_dir),
        "--steps",
        "500",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-4",
        "--temperature",
        "1.0",
        "--device",
        TRAIN_DEVICE,
        "--save-every",
        "1000",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    metrics = run_dir / "metrics.jsonl"
    code, out, status = sigterm_mid_run(
        cmd, env, run_dir, lambda lines: sum('"train"' in line for line in lines) >= 2
    )
    assert code == 128 + signal.SIGTERM, out
    assert status["state"] == "cancelled", status
    saved = status["step"]
    assert 2 <= saved < 500
    state = torch.load(run_dir / "checkpoint" / "training_state.pt", weights_only=False)
    assert state["step"] == saved

    # The same run dir again (here through `preflab train-policy`) resumes from the saved step.
    from annotate.cli import main as preflab

    assert (
        preflab(["train-policy", "--run-dir", str(run_dir), "--steps", str(saved + 2), "--no-progress"]) == 0
    )
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    resume = next(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert records[resume]["step"] == saved
    assert [r["step"] for r in records[resume:] if r["kind"] == "train"] == [saved + 1, saved + 2]
    assert [r["step"] for r in records[:resume] if r["kind"] == "train"] == list(range(1, saved + 1))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == saved + 2
    # A finished run is not trained again.
    assert preflab(["train-policy", "--run-dir", str(run_dir), "--no-progress"]) == 0

    # The policy loads as any model does, and answers; the arena's `serve` takes it as --model.
    from trainer.models import load_model
    from trainer.sampling import generate

    model, tok = load_model(str(run_dir / "policy"), device="cpu")
    assert tok.chat_template and tok.padding_side == "left"
    assert (
        len(
            generate(
                model,
                tok,
                [POLICY_PROMPTS[1]],
                n=2,
                max_new_tokens=6,
                progress=False,
            )[0]
        )
        == 2
    )
    help_out = subprocess.run(
        [sys.executable, "-m", "annotate.cli", "serve", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_out.returncode == 0 and "--model" in help_out.stdout
