"""SFT: supervised fine-tuning on the task's reference responses (token-mean NLL over response tokens)."""

from __future__ import annotations

from rlm.core.contracts import Trainer
from rlm.core.hookspecs import hookimpl
from rlm.core.train.session import SFTConfig, run_sft


class SFT(Trainer):
    """Supervised fine-tuning on reference responses (token-mean NLL over response tokens only)."""

    name = "sft"
    Config = SFTConfig

    def train(self, run):
        return run_sft(self, run)


@hookimpl
def register_trainers(register):
    register(SFT)
