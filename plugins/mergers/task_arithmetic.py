"""``task_arithmetic``: θ_b + λ Σ w_i τ_i (mergekit semantics; ``normalize`` divides by Σ w_i)."""

from __future__ import annotations

from rlm.core.contracts import MergeMethod
from rlm.core.hookspecs import hookimpl
from rlm.core.merge.params import TaskArithmeticConfig


class TaskArithmetic(MergeMethod):
    """Task arithmetic: base plus λ times the weighted sum of task vectors."""

    name = "task_arithmetic"
    default = True  # one of the paper's four methods (rlm merge-eval --methods)

    Config = TaskArithmeticConfig
    presets = {"paper": {"params": {"lambda": 0.7}, "model_params": {"weight": 1.0}}}

    def merge(self, base, deltas, params, *, context=None):
        from rlm.core.merge.ops import combine

        return combine(base, deltas, params, lam=self.config.lambda_, normalize=self.config.normalize)


@hookimpl
def register_merge_methods(register):
    register(TaskArithmetic)
