"""``averaging`` (mergekit ``linear``): Σ w_i θ_i / Σ w_i, or Σ w_i θ_i with ``normalize=false``."""

from __future__ import annotations

from rlm.core.contracts import MergeMethod, PluginConfig
from rlm.core.hookspecs import hookimpl


class Averaging(MergeMethod):
    """Weighted average of the models: Σ w_i θ_i / Σ w_i."""

    name = "averaging"
    default = True  # one of the paper's four methods (rlm merge-eval --methods)
    aliases = ("linear",)

    class Config(PluginConfig):
        normalize: bool = True

    presets = {"paper": {"params": {}, "model_params": {"weight": 1.0}}}

    def check(self, params):
        from rlm.core.errors import ConfigError

        if self.config.normalize and sum(p.weight for p in params) == 0:
            raise ConfigError("averaging: the weights sum to 0; set other weights or normalize=false")

    def merge(self, base, deltas, params, *, context=None):
        from rlm.core.merge.ops import weights_of

        # Σ w_i θ_i = (Σ w_i) θ_b + Σ w_i τ_i, computed from the task vectors
        w = weights_of(params, deltas)
        total = float(w.sum())
        mixed = (deltas * w).sum(dim=0)
        if self.config.normalize:
            return base + mixed / total
        return base * total + mixed


@hookimpl
def register_merge_methods(register):
    register(Averaging)
