"""DPO from the votes: the loss functions (trainer/dpo_math.py) and `preflab train-dpo`.

TRL 1.x computes its DPO losses inline in `DPOTrainer._compute_loss`, which needs a model
and a batch; there is no standalone loss function to call on fixed tensors, so the
losses here are checked against the formulas written out, not against TRL.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.dpo_math import preference_losses

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
