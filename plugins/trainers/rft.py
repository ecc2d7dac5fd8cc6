"""RFT: rejection-sampling fine-tuning (sample k per prompt from the start model, keep verified-correct
deduplicated samples, SFT on them)."""

from __future__ import annotations

from rlm.core.contracts import Trainer
from rlm.core.hookspecs import hookimpl
from rlm.core.train.config import RFTConfig


class RFT(Trainer):
    """Rejection-sampling fine-tuning: SFT on the start model's own verified-correct samples."""

    name = "rft"
    Config = RFTConfig

    def train(self, run):
        from rlm.core.train.rft import run_rft  # the engine loads when a run starts, not with the plugin

        return run_rft(self, run)


@hookimpl
def register_trainers(register):
    register(RFT)
