"""SFT: supervised fine-tuning on the task's reference responses (token-mean NLL over response tokens)."""

from __future__ import annotations

from rlm.core.contracts import Trainer
from rlm.core.hookspecs import hookimpl
from rlm.core.train.config import SFTConfig


class SFT(Trainer):
    """Supervised fine-tuning on reference responses (token-mean NLL over response tokens only)."""

    name = "sft"
    Config = SFTConfig

    def train(self, run):
        from rlm.core.train.sft import run_sft  # the engine loads when a run starts, not with the plugin

        return run_sft(self, run)


@hookimpl
def register_trainers(register):
    register(SFT)
