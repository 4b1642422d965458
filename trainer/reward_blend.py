"""`train-policy --reward-weights overall=1,x=2`: the policy's reward as a weighted sum of
a multi-head reward model's normalised heads (`train-reward --criteria`).

    weights = parse_reward_weights("overall=1,x=2")      # {"overall": 1.0, "x": 2.0}, or PolicyInputError
    check_reward_weights(rm_path, weights)              # every name a head of that model, before loading it
    scorer = WeightedReward(RewardModel.load(rm_path), weights)
    scorer.score(prompts, answers)                      # sum_h w_h * normalised reward of head h

Each head is normalised on its own (mean 0, std 1 over the reward run's validation
answers: preflab_reward.json's head_norm), so a weight says how much a head counts in
units of its own spread. Heads not named weigh 0. Without --reward-weights the policy
trains on the first head (the overall vote's), as before.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from trainer.criteria import OVERALL
from trainer.errors import PolicyInputError
from trainer.runs import REWARD_META_FILE, read_json


def parse_reward_weights(text: str | None) -> dict[str, float]:
    """{head: weight} from "a=1,b=2" ({} for none); PolicyInputError naming the bad item."""
    if not text or not text.strip():
        return {}
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, number = (s.strip() for s in item.partition("="))
        if not sep or not name:
            raise PolicyInputError(
                f"--reward-weights: {item.strip()[:40]!r} is not HEAD=WEIGHT (e.g. overall=1,x=2)"
            )
        try:
            weight = float(number)
        except ValueError:
            raise PolicyInputError(
                f"--reward-weights: {name}={number[:20]!r}: the weight is not a number"
            ) from None
        if not math.isfinite(weight):
            raise PolicyInputError(f"--reward-weights: {name}={number[:20]}: the weight must be finite")
        if name in out:
            raise PolicyInputError(f"--reward-weights: {name!r} is given twice")
        out[name] = weight
    if not any(out.values()):
        raise PolicyInputError("--reward-weights: every weight is 0; the reward would be 0 for every answer")
    return out


def reward_heads(rm_path: Path) -> list[str]:
    """The heads a reward model has, from its preflab_reward.json (no model loaded)."""
    meta = read_json(Path(rm_path) / REWARD_META_FILE)
    return list(meta.get("heads") or [OVERALL])


def check_reward_weights(rm_path: Path, weights: dict[str, float]) -> None:
    """Every weighted head is one of the reward model's; else PolicyInputError listing them."""
    heads = reward_heads(rm_path)
    unknown = [h for h in weights if h not in heads]
    if unknown:
        raise PolicyInputError(
            f"--reward-weights: the reward model {rm_path} has no head {unknown[0][:40]!r}; "
            f"its heads: {', '.join(heads)}"
        )


class WeightedReward:
    """A RewardModel's heads, normalised and summed with `weights`: what the policy trainer
    and its held-out evaluation score answers with (the same `score` call as RewardModel)."""

    def __init__(self, reward_model, weights: dict[str, float]):
        self.reward_model, self.weights = reward_model, dict(weights)
        self.vector = np.array([self.weights.get(h, 0.0) for h in reward_model.heads])

    def score(self, prompts, responses, *, normalize: bool = True, batch_size: int = 16) -> list[float]:
        if not normalize:
            raise ValueError("a weighted sum of heads is defined on their normalised rewards only")
        heads = self.reward_model.score_heads(prompts, responses, normalize=True, batch_size=batch_size)
        return (heads @ self.vector).tolist()


def scorer_for(reward_model, weights: dict[str, float]):
    """The reward model itself (no weights: its first head) or its weighted heads."""
    return WeightedReward(reward_model, weights) if weights else reward_model
