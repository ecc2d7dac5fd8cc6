"""``median_rl``: an RL trainer whose advantage is the reward minus the median reward of its group.

It declares the estimator it offers on the RL trainer contract (``advantages``; ``config.advantage`` picks
one), keeps rlm's default policy loss (PPO clip with dual clip) and needs no critic; rlm's shared RL loop does
sampling, rewards, the KL term, updates, checkpoints and ``metrics.jsonl``."""

from __future__ import annotations

from typing import Any, Sequence

from rlm.core.train.config import RLConfig
from rlm.core.train.rl import RLTrainer


def median_baseline(*, rewards: Any, mask: Any, index: Sequence[Any] | Any, **_: Any) -> tuple[Any, Any]:
    """``A_i = r_i − median of r over the group of i`` (for an even group size the lower of the two middle
    values, as ``torch.median``), the same value on every response token; returns are the advantages."""
    ids = index.tolist() if hasattr(index, "tolist") else list(index)
    groups: dict[Any, list[int]] = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    baseline = rewards.clone()
    for members in groups.values():
        baseline[members] = rewards[members].median()
    adv = (rewards - baseline).unsqueeze(-1) * mask.to(rewards.dtype)
    return adv, adv


class MedianRL(RLTrainer):
    """On-policy RL with a group-median baseline (sparse advantages: half of each group gets none)."""

    name = "median_rl"
    advantages = {"median_baseline": median_baseline}

    class Config(RLConfig):
        advantage: str = "median_baseline"
