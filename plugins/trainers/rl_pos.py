"""RL-Pos (the paper's ablation): GRPO with every negative advantage set to 0; KL and sampling unchanged."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlm.core.hookspecs import hookimpl
from rlm.core.train.algorithms import dr_grpo_advantage, grpo_advantage, rloo_advantage
from rlm.core.train.config import RLConfig
from rlm.core.train.rl import RLTrainer


class RLPos(RLTrainer):
    """GRPO keeping only positive advantages (negatives set to 0); an all-correct group teaches nothing."""

    name = "rl_pos"
    aliases = ("rl-pos",)
    advantages = {"grpo": grpo_advantage, "dr_grpo": dr_grpo_advantage, "rloo": rloo_advantage}

    class Config(RLConfig):
        advantage: str = Field("grpo", description="advantage estimator: grpo, dr_grpo (Dr. GRPO) or rloo")
        positive_only: Literal[True] = True
        kl_in: Literal["loss", "none"] = "loss"


@hookimpl
def register_trainers(register):
    register(RLPos)
