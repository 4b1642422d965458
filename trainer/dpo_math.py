"""The DPO family's losses as pure functions of sequence log-probs: no model, no batches.

    out = preference_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                            beta=0.1, loss="sigmoid", label_smoothing=0.0)
    out.loss            per pair (the trainer takes the mean)
    out.chosen_rewards  beta * (log pi(chosen) - log ref(chosen)): DPO's implicit reward
    out.rejected_rewards, out.margins (chosen - rejected), out.accuracy (margins > 0, as 0/1)

Losses (Rafailov et al. 2023; Azar et al. 2023; Mitchell 2023):
    sigmoid   -log sigmoid(beta * d), d = (log pi - log ref)(chosen) - (same)(rejected)
              with label_smoothing e (conservative DPO, cDPO): the vote is taken to be
              flipped with probability e, -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)
    ipo       (d_avg - 1 / (2 beta))^2, where d_avg uses log-ratios averaged over each
              answer's tokens (as TRL does, with the IPO authors' agreement: a token-summed
              d makes the squared loss grow with answer length); needs the token counts

torch is imported inside the functions.
"""

from __future__ import annotations

from typing import NamedTuple

LOSSES = ("sigmoid", "ipo")


class PreferenceLoss(NamedTuple):
    loss: object  # (pairs,) tensors, all of them
    chosen_rewards: object
    rejected_rewards: object
    margins: object
    accuracy: object


def preference_losses(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens=None,
    rejected_tokens=None,
) -> PreferenceLoss:
    """Per-pair loss and implicit rewards from summed answer log-probs (each a (pairs,)
    tensor). `chosen_tokens` / `rejected_tokens`: answer lengths in tokens, for ipo."""
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss == "sigmoid":
        d = beta * (chosen_ratio - rejected_ratio)
        per_pair = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens (answer lengths)")
        d_avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        per_pair = (d_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss {loss!r}: one of {', '.join(LOSSES)}")
    # The implicit rewards are metrics: detached, so that logging them costs no graph.
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    margins = chosen_rewards - rejected_rewards
    return PreferenceLoss(per_pair, chosen_rewards, rejected_rewards, margins, (margins > 0).float())
