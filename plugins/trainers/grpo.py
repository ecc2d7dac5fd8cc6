"""GRPO: group-normalised advantages, PPO clip with dual clip, k3 KL in the loss (verl defaults)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlm.core.hookspecs import hookimpl
from rlm.core.train.algorithms import dr_grpo_advantage, grpo_advantage, rloo_advantage
from rlm.core.train.config import RLConfig
from rlm.core.train.rl import RLTrainer


class GRPO(RLTrainer):
    """Group Relative Policy Optimization (A = (r - mean_g) / (std_g + eps); advantage=dr_grpo for Dr. GRPO)."""

    name = "grpo"
    advantages = {"grpo": grpo_advantage, "dr_grpo": dr_grpo_advantage, "rloo": rloo_advantage}

    class Config(RLConfig):
        advantage: str = Field("grpo", description="advantage estimator: grpo, dr_grpo (Dr. GRPO) or rloo")
        kl_in: Literal["loss", "none"] = "loss"
        kl_estimator: Literal["k1", "k2", "k3"] = "k3"


@hookimpl
def register_trainers(register):
    register(GRPO)
