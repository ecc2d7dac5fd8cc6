"""GRPO: group-normalised advantages, PPO clip with dual clip, k3 KL in the loss (verl defaults)."""

from __future__ import annotations

from typing import Literal

from rlm.core.contracts import Trainer
from rlm.core.hookspecs import hookimpl
from rlm.core.train.rl import RLConfig, run_rl


class GRPO(Trainer):
    """Group Relative Policy Optimization (A = (r - mean_g) / (std_g + eps); advantage=dr_grpo for Dr. GRPO)."""

    name = "grpo"

    class Config(RLConfig):
        advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
        kl_in: Literal["loss", "none"] = "loss"
        kl_estimator: Literal["k1", "k2", "k3"] = "k3"

    def train(self, run):
        return run_rl(self, run)


@hookimpl
def register_trainers(register):
    register(GRPO)
