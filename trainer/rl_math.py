"""The pure math of policy-gradient RLHF, on tensors: no models, no I/O.

Shapes: token-level tensors are [rows, T] (one row per sampled answer, right-padded),
with a 0/1 `mask` that is 1 on the answer's tokens (up to and including its EOS).
Sequence-level tensors are [rows].

    masked_mean / masked_var / masked_whiten      statistics over the real tokens only
    kl_penalty(logp, ref_logp, "k1" | "k3")       per-token estimators of KL(policy || reference)
    kl_per_answer(logp, ref_logp, mask)           the KL a person reads: k3 summed over each answer
    gae(rewards, values, mask, gamma, lam)        generalised advantage estimation
    rloo_advantages(rewards, k)                   leave-one-out baseline over k samples of a prompt
    group_advantages(rewards, k, scale)           GRPO (scale by the group's std) / Dr. GRPO (not)
    group_centred(rewards, k)                     minus the mean of the prompt's k samples
    returns_to_go(rewards, mask)                  sum of the rewards from each token on (REINFORCE++)
    token_loss_weights(mask, mode, max_len)       loss aggregation: per token (DAPO), per answer
                                                  (GRPO), per answer over a constant (Dr. GRPO)
    ppo_policy_loss / ppo_value_loss              the clipped surrogate objectives
    sequence_policy_loss                          the same on whole answers (RLOO / REINFORCE)
    explained_variance(values, returns, mask)     how much of the returns the value head predicts
    AdaptiveKLController                          Ziegler et al. (2019): steer the KL to a target

References: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ziegler et al. 2019
(KL-penalised RLHF, adaptive coefficient), Schulman 2020 "Approximating KL divergence"
(k1/k3), Kool et al. 2019 and Ahmadian et al. 2024 (RLOO), Huang et al. 2024 "The N+
implementation details of RLHF with PPO", Shao et al. 2024 (GRPO), Liu et al. 2025
"Understanding R1-Zero-like training" (Dr. GRPO), Yu et al. 2025 (DAPO: token-level loss,
overlong filtering), Hu 2025 (REINFORCE++).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# A function that sums a tensor over all processes (DDP); None on one process.
Reduce = Callable[[torch.Tensor], torch.Tensor] | None


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (0 when there are none)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def _moments(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None):
    """(mean, unbiased variance) of the masked entries, pooled over processes when `reduce`
    is given: every process then whitens with the same, global statistics."""
    x, mask = x.double(), mask.double()
    stats = torch.stack([mask.sum(), (x * mask).sum(), (x * x * mask).sum()])
    if reduce is not None:
        stats = reduce(stats)
    n, s, ss = stats[0], stats[1], stats[2]
    mean = s / n.clamp(min=1)
    # Bessel's correction (n - 1): the unbiased estimate, as most RLHF code uses.
    var = (ss - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
    return mean, var


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None) -> torch.Tensor:
    return _moments(x, mask, reduce)[1].to(x.dtype)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: Reduce = None
) -> torch.Tensor:
    """(x - mean) / std over the masked entries. shift_mean=False only rescales (used for
    rewards: their sign carries meaning, their scale should not). Masked-out entries -> 0."""
    mean, var = _moments(x, mask, reduce)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from a token sampled from pi (Schulman 2020).

    k1 = log pi - log ref              unbiased, can be negative per token
    k3 = (r - 1) - log r, r = ref/pi   unbiased, always >= 0, lower variance
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # expm1 keeps precision when the ratio is close to 1 (the usual case).
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def kl_per_answer(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """KL(pi || ref) of each answer: the per-token estimate summed over its tokens, [rows].

    What is logged and shown as "KL" uses k3, not k1: both are unbiased, but k1 is
    negative on any answer the reference likes more than the policy does, so a batch
    mean near 0 comes out as e.g. -0.002, a "KL" no divergence can have. k3 is >= 0 on
    every token (x - 1 - log x >= 0), and has the lower variance where the two models are
    close, which is where a KL-penalised run stays. k2 = 0.5 (log r)^2 is also >= 0 but
    biased (it is KL only to second order), so it would misreport a run that drifts.
    """
    return (kl_penalty(logp, ref_logp, estimator) * mask).sum(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each answer (Schulman et al. 2016).

        delta_t = r_t + gamma * V_{t+1} - V_t           (V after the last token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                                  (the value head's targets)

    Positions after an answer's end (mask 0) get 0 and contribute nothing.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: rows are grouped k at a time (k samples of one prompt, in
    order); each sample's baseline is the mean reward of the other k - 1 samples.

        A_i = R_i - (sum_j R_j - R_i) / (k - 1)  =  k / (k - 1) * (R_i - mean_j R_j)
    """
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards are not a whole number of groups of {k}")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage: rows grouped k at a time (k samples of one prompt),

        A_i = (R_i - mean_g R) / (std_g R + eps)        (std with Bessel's correction, as TRL)

    Dr. GRPO (scale=False) keeps only R_i - mean_g R: dividing by the std weights up the
    prompts whose answers barely differ (all right or all wrong), a bias toward them."""
    if k < 2:
        raise ValueError("group advantages need at least 2 samples per prompt")
    centred = group_centred(rewards, k).view(-1, k)
    if scale:
        centred = centred / (rewards.view(-1, k).std(1, keepdim=True) + eps)
    return centred.view(-1)


def group_centred(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """R_i minus the mean R of its group of k (the prompt's samples); unchanged for k = 1."""
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards are not a whole number of groups of {k}")
    grouped = rewards.view(-1, k)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1) if k > 1 else rewards.clone()


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{s >= t} r_s over each answer's own tokens (gamma 1, no critic): the
    advantage of REINFORCE++ before its batch normalisation. Masked-out entries -> 0."""
    r = rewards * mask
    return r.flip(1).cumsum(1).flip(1) * mask


LOSS_AGGREGATIONS = ("token", "seq", "seq_sum")


def token_loss_weights(mask: torch.Tensor, mode: str, max_len: int) -> torch.Tensor:
    """Per-token weights w such that sum_t w_t * loss_t, divided by the minibatch's count
    (its tokens for "token", its answers otherwise), is the chosen aggregation:

        token    w = 1           DAPO: a mean over all tokens, so a long answer counts by its length
        seq      w = 1 / len_i   GRPO: each answer's mean token loss, every answer the same weight
                                 (so a long wrong answer is pushed down less per token: a length bias)
        seq_sum  w = 1 / max_len Dr. GRPO: each answer's token sum over one constant, no length bias

    The clipped surrogate is positively homogeneous in the advantage (max(-A r, -A c) scales
    with A > 0), so these weights can multiply the advantages themselves."""
    if mode == "token":
        return mask.clone()
    if mode == "seq":
        return mask / mask.sum(1, keepdim=True).clamp(min=1)
    if mode == "seq_sum":
        return mask / float(max_len)
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
):
    """Token-level clipped surrogate (PPO). Returns (loss summed over tokens, clipped
    token count, sum of the approx-KL terms 0.5 * (log ratio)^2): sums, so that the caller
    can divide by the tokens of a whole minibatch however it is cut into micro-batches."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(loss_unclipped, loss_clipped)  # pessimistic bound
    with torch.no_grad():
        clipped = masked_sum((loss_clipped > loss_unclipped).float(), mask)
        approx_kl = masked_sum(0.5 * log_ratio.detach() ** 2, mask)
    return masked_sum(loss, mask), clipped, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
):
    """Clipped value loss: the new prediction may move at most `clip` from the rollout's,
    and the worse of the clipped and unclipped squared errors counts. Returns (loss summed
    over tokens, clipped token count)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(err, err_clipped)
    with torch.no_grad():
        clipped = masked_sum((err_clipped > err).float(), mask)
    return masked_sum(loss, mask), clipped


def sequence_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
):
    """The clipped surrogate on whole answers (RLOO, REINFORCE): the ratio is that of the
    answer's probability, exp(sum_t log pi - log pi_old), and `advantages` is one number per
    answer. On-policy (one pass, ratio 1) its gradient is -A * grad log pi(answer): plain
    REINFORCE with a baseline. Returns (loss summed over answers, clipped answers)."""
    log_ratio = masked_sum(logp - old_logp, mask, dim=1)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    with torch.no_grad():
        clipped = (loss_clipped > loss_unclipped).float().sum()
    return loss.sum(), clipped


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = None
) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (pooled over processes
    when `reduce` is given), as CleanRL logs it: 1 when the value head predicts the returns
    exactly, 0 when it does no better than their mean, below 0 when worse. NaN when the
    returns do not vary (or there are fewer than two tokens): the ratio is undefined then."""
    _, var_returns = _moments(returns, mask, reduce)
    _, var_error = _moments(returns - values, mask, reduce)
    if not float(var_returns) > 0:
        return float("nan")
    return float(1.0 - var_error / var_returns)


class AdaptiveKLController:
    """Ziegler et al. (2019): after each batch, move the KL coefficient by a proportional
    controller so that the KL per answer tracks `target`:

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)           n = answers in the batch

    With target 0 (or None) the coefficient stays fixed."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(value), target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value
