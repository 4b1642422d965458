"""The Bradley-Terry loss of a reward model and its validation metrics.

    per_pair = preference_loss(r_chosen, r_rejected, label, margin, center)
    metrics = evaluate(net, enc, val_idx, cfg, pad_id, device, autocast)   # val_loss, val_acc, val_ece...

For a pair with rewards r_c (chosen) and r_r (rejected), label y (1 = a vote, 0.5 = a tie
or both-bad vote) and margin m (vote strength, when asked for):

    d    = r_c - r_r - m
    loss = -[y log sigmoid(d) + (1 - y) log sigmoid(-d)] + center * (r_c + r_r)^2

With y = 1 this is TRL's RewardTrainer loss exactly (tests check it numerically).
Used by the training script (trainer/reward.py). torch is imported inside functions.
"""

from __future__ import annotations

import numpy as np

from trainer.evaluate import wilson_interval
from trainer.reward_batches import collate, pack
from trainer.style_features import FEATURES, MARKDOWN_FEATURES


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


def own_head(rewards, head):
    """Each sequence's reward from its pair's own head: rewards [2B, heads] (B chosen then
    B rejected), head [B] -> [2B]. One head: rewards are already [2B], returned as they are."""
    if rewards.dim() == 1:
        return rewards
    return rewards.gather(1, head.to(rewards.device).repeat(2)[:, None]).squeeze(1)


def style_penalty(r_chosen, r_rejected, style_diff):
    """Sum over style features of corr(r_chosen - r_rejected, style_diff[:, f])^2 over a
    micro-batch (a torch scalar, differentiable in the rewards). style_diff: (pairs, F),
    the answers' (chosen - rejected) / (chosen + rejected + 1) per feature
    (trainer.style_features). Squared, so that a reward that prefers the shorter answer is
    penalised like one that prefers the longer; a correlation, so that it does not care
    how large the rewards are, only whether their gap follows style. A feature the batch's
    pairs do not differ in adds nothing; fewer than 3 pairs give 0."""
    import torch

    d = (r_chosen - r_rejected).float()
    s = style_diff.to(d.device, torch.float32)
    if len(d) < 3:
        return d.sum() * 0.0
    d = d - d.mean()
    s = s - s.mean(dim=0)
    s_norm = s.norm(dim=0)
    varies = s_norm > 1e-6
    if not bool(varies.any()):
        return d.sum() * 0.0
    corr = (d @ s[:, varies]) / (d.norm() * s_norm[varies] + 1e-8)
    return (corr * corr).sum()


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


def markdown_bias(rewards: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Does the reward follow markdown? Per feature (headers, lists, bold: the style
    features of the style-controlled leaderboard, trainer/style_features.py) the Pearson
    correlation of the rewards with the answers' counts, as `length_corr` is with their
    length: `headers_corr`, `lists_corr`, `bold_corr`. 0 where no answer varies in it.
    rewards (m,), counts (m, 3), the same answers in the same order."""
    counts = np.asarray(counts, np.float64)
    return {f"{name}_corr": pearson(rewards, counts[:, k]) for k, name in enumerate(MARKDOWN_FEATURES)}


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def to_device(batch: dict, device) -> dict:
    """The model's inputs from a pack()/collate() batch, on the device."""
    keys = ("input_ids", "read_row", "read_col", "attention_mask", "position_ids", "segment", "branch")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def predict(net, enc, idx, batch_size: int, pad_id: int, device, autocast, accelerator=None, packed=True):
    """Rewards (r_chosen, r_rejected) for the pairs `idx`, in that order, each [pairs] (one
    head) or [pairs, heads] (every head's reward of each answer). Pairs are run
    longest first in length-sorted batches (little padding); under DDP each process scores
    every world-size-th batch and the results are gathered."""
    import torch

    idx = np.asarray(idx, dtype=np.int64)
    layout = pack if packed else collate
    order = idx[np.argsort(-enc.lengths(packed)[idx], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    row_of = np.zeros(len(enc), dtype=np.int64)
    row_of[idx] = np.arange(len(idx))  # pair index -> its row in the result
    heads = net.inner.config.num_labels
    rc = np.full((len(idx), heads), np.nan, dtype=np.float64)
    rr = np.full((len(idx), heads), np.nan, dtype=np.float64)
    with torch.inference_mode(), autocast():
        for b in batches[rank::world]:
            r = net(**to_device(layout(enc, b, pad_id), device))
            c, j = r.reshape(len(r), heads).chunk(2)
            rc[row_of[b]], rr[row_of[b]] = c.cpu().numpy(), j.cpu().numpy()
    if world > 1:
        # Each process filled its own rows (NaN elsewhere); gather and take the filled value.
        both = torch.tensor(np.stack([rc, rr]), device=device)
        gathered = accelerator.gather(both[None]).cpu().numpy()  # [world, 2, pairs]
        filled = ~np.isnan(gathered)
        merged = np.where(filled, gathered, 0.0).sum(axis=0)
        rc, rr = merged[0], merged[1]
    return (rc[:, 0], rr[:, 0]) if heads == 1 else (rc, rr)


def evaluate(net, enc, idx, cfg, pad_id, device, autocast, accelerator=None, packed: bool = True) -> dict:
    """Validation metrics: loss (as trained), accuracy and calibration on votes, reward
    scale, and length and markdown bias (does the reward just count tokens, headers,
    list items, bold?). `cfg`: the run's
    RewardConfig (its eval_batch_size, margin and center)."""
    import torch

    if len(idx) == 0:
        return {}
    net.eval()
    rc, rr = predict(net, enc, idx, cfg.eval_batch_size, pad_id, device, autocast, accelerator, packed)
    net.train()
    label, margin = enc.label[idx], enc.margin[idx]
    per_head = {}
    if rc.ndim == 2:  # several heads: each pair judged by its own head, and each head alone
        all_c, all_r, head = rc, rr, enc.head[idx]
        rc, rr = all_c[np.arange(len(idx)), head], all_r[np.arange(len(idx)), head]
        for h in range(all_c.shape[1]):
            mine = (head == h) & (label == 1.0)
            per_head[h] = {
                "val_pairs": int((head == h).sum()),
                "val_acc": float((rc[mine] > rr[mine]).mean()) if mine.any() else float("nan"),
                "_rewards": np.concatenate([all_c[:, h], all_r[:, h]]),  # every answer, for its norm
            }
    loss = preference_loss(
        torch.tensor(rc),
        torch.tensor(rr),
        torch.tensor(label, dtype=torch.float64),
        torch.tensor(margin, dtype=torch.float64) if cfg.margin else None,
        cfg.center,
    )
    votes = label == 1.0  # accuracy and calibration are about votes; ties have no right answer
    p = 1.0 / (1.0 + np.exp(-(rc - rr)))
    rewards = np.concatenate([rc, rr])
    lengths = np.concatenate([enc.chosen_len[idx], enc.rejected_len[idx]]).astype(np.float64)
    longer_wins = np.where(enc.chosen_len[idx] >= enc.rejected_len[idx], rc > rr, rr > rc)
    right = int((rc[votes] > rr[votes]).sum())
    # The accuracy's 95% Wilson interval: on a few pairs "1.000" is 3 of 3, which says little.
    low, high = wilson_interval(right, int(votes.sum()))
    return {
        "val_pairs": int(len(idx)),
        "val_loss": float(loss.mean()),
        "val_acc": right / int(votes.sum()) if votes.any() else float("nan"),
        "val_acc_low": low,
        "val_acc_high": high,
        "val_ece": expected_calibration_error(p[votes]),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "length_corr": pearson(rewards, lengths),  # reward vs answer length in tokens
        "longer_preferred": float(longer_wins.mean()),  # how often the longer answer scores higher
        **(
            markdown_bias(rewards, np.concatenate([enc.chosen_markdown[idx], enc.rejected_markdown[idx]]))
            if enc.chosen_markdown is not None
            else {}
        ),
        # what --style-penalty works on: the reward gap against each feature's difference
        **(
            {
                f"{name}_gap_corr": pearson(rc - rr, gaps[:, k])
                for gaps in [enc.style_differences(idx)]
                for k, name in enumerate(FEATURES)
            }
            if enc.chosen_markdown is not None
            else {}
        ),
        "_rewards": rewards,  # for the normalisation (not logged)
        **({"_heads": per_head} if per_head else {}),
    }


def normalisation(rewards: np.ndarray) -> dict[str, float]:
    """Gain and bias that give these rewards mean 0 and std 1: scores from different runs
    (and different heads) then share one scale (the policy trainer and the UI)."""
    std = float(rewards.std()) or 1.0
    return {"gain": 1.0 / std, "bias": -float(rewards.mean()) / std}


def head_norms(metrics: dict, names: list[str]) -> dict[str, dict]:
    """A multi-head evaluation's per-head numbers by head name: validation pairs and accuracy
    on that head's own pairs, and its gain / bias from its rewards of every validation answer
    (the same answers for every head, so that their normalised rewards can be added)."""
    return {
        names[h]: {
            **{k: v for k, v in m.items() if not k.startswith("_")},
            **normalisation(m["_rewards"]),
        }
        for h, m in metrics["_heads"].items()
    }
