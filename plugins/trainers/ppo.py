"""PPO: a critic (value head on the policy's architecture), GAE advantages, clipped policy and value losses,
k1 KL in the token rewards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlm.core.hookspecs import hookimpl
from rlm.core.train.algorithms import gae_advantage
from rlm.core.train.config import RLConfig
from rlm.core.train.rl import RLTrainer


class PPO(RLTrainer):
    """Proximal Policy Optimization with a learned critic and GAE (gamma = lambda = 1 by default, as verl)."""

    name = "ppo"
    advantages = {"gae": gae_advantage}
    critic = True

    class Config(RLConfig):
        advantage: str = Field("gae", description="advantage estimator: gae (with the critic's values)")
        group_size: int = Field(1, ge=1, description="completions per prompt (PPO needs no group)")
        prompts_per_step: int = Field(32, ge=1)
        mini_batches: int = Field(2, ge=1, description="PPO updates per rollout batch")
        kl_in: Literal["reward", "loss", "none"] = "reward"
        kl_estimator: Literal["k1", "k2", "k3"] = "k1"


@hookimpl
def register_trainers(register):
    register(PPO)
