"""REINFORCE++: per-token reward -beta*k1 plus the outcome at the last token, return-to-go, batch whitening;
the KL lives in the reward, not the loss. ``advantage=reinforce_pp_baseline`` subtracts the group mean first."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlm.core.hookspecs import hookimpl
from rlm.core.train.algorithms import reinforce_pp_advantage, reinforce_pp_baseline_advantage
from rlm.core.train.config import RLConfig
from rlm.core.train.rl import RLTrainer


class ReinforcePP(RLTrainer):
    """REINFORCE++ (KL in the reward, whitened return-to-go advantages), optionally with a group baseline."""

    name = "reinforce_pp"
    aliases = ("reinforce++",)
    advantages = {"reinforce_pp": reinforce_pp_advantage, "reinforce_pp_baseline": reinforce_pp_baseline_advantage}

    class Config(RLConfig):
        advantage: str = Field("reinforce_pp", description="advantage estimator: reinforce_pp or "
                                                           "reinforce_pp_baseline")
        kl_in: Literal["reward", "none"] = "reward"
        kl_estimator: Literal["k1", "k2", "k3"] = "k1"
        kl_coef: float = Field(1e-3, ge=0)


@hookimpl
def register_trainers(register):
    register(ReinforcePP)
