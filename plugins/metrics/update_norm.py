"""``update_norm``: ‖τ‖₂ of every model, with per-layer and per-module-type breakdowns."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from rlm.core.contracts import Metric, PluginConfig
from rlm.core.hookspecs import hookimpl


class UpdateNorm(Metric):
    """L2 norm of each task vector, with per-layer and per-module-type breakdowns."""

    name = "update_norm"
    default = True
    reads_deltas = False

    class Config(PluginConfig):
        breakdown: bool = True

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._ss: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # model -> tensor -> Σ τ²

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        from rlm.core.conflicts.engine import sum_squares

        if context is None:
            for name, d in deltas.items():
                self._ss[name][tensor_name] += sum_squares(d)
            return
        for name in context.names:
            self._ss[name][tensor_name] += context.sum_squares(name)

    def result(self) -> dict[str, Any]:
        from rlm.core.conflicts.engine import layer_of, module_type_of

        models: dict[str, Any] = {}
        for name, per_tensor in self._ss.items():
            entry: dict[str, Any] = {"update_norm": math.sqrt(sum(per_tensor.values()))}
            if self.config.breakdown:
                for key, fn in (("update_norm_per_layer", layer_of), ("update_norm_per_module", module_type_of)):
                    groups: dict[str, float] = defaultdict(float)
                    for t, ss in per_tensor.items():
                        groups[fn(t)] += ss
                    entry[key] = {k: math.sqrt(v) for k, v in groups.items()}
            models[name] = entry
        return {"models": models}


@hookimpl
def register_metrics(register):
    register(UpdateNorm)
