"""RL-Pos (the paper's ablation): GRPO with every negative advantage set to 0; KL and sampling unchanged."""

from __future__ import annotations

from typing import Literal

from rlm.core.contracts import Trainer
from rlm.core.hookspecs import hookimpl
from rlm.core.train.rl import RLConfig, run_rl


class RLPos(Trainer):
    """GRPO keeping only positive advantages (negatives set to 0); an all-correct group teaches nothing."""

    name = "rl_pos"
    aliases = ("rl-pos",)

    class Config(RLConfig):
        advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
        positive_only: Literal[True] = True
        kl_in: Literal["loss", "none"] = "loss"

    def train(self, run):
        return run_rl(self, run)


@hookimpl
def register_trainers(register):
    register(RLPos)
