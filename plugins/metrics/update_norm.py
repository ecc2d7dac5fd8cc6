"""``update_norm``: ‖τ‖₂ of every model, with per-layer and per-module-type breakdowns; its report cell is
the norm and its report section the per-layer norm figure ``layer_norms.png``."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

from rlm.core.contracts import Metric, PluginConfig, ReportSection
from rlm.core.hookspecs import hookimpl

COLUMN = "update norm ‖τ‖₂"
FIGURE = "layer_norms.png"


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
        from rlm.core.conflicts.stats import sum_squares

        if context is None:
            for name, d in deltas.items():
                self._ss[name][tensor_name] += sum_squares(d)
            return
        for name in context.names:
            self._ss[name][tensor_name] += context.sum_squares(name)

    def result(self) -> dict[str, Any]:
        from rlm.core.conflicts.stats import layer_of, module_type_of

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

    def columns(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {COLUMN: entry["update_norm"]} if "update_norm" in entry else {}

    def section(self, data: Mapping[str, Any], out_dir: Path) -> ReportSection | None:
        if not any("update_norm_per_layer" in v for v in data.get("models", {}).values()):
            return None
        plot_layer_norms(data, Path(out_dir) / FIGURE)
        return ReportSection(title="Per-layer update norms",
                             markdown="Update norm ‖τ‖₂ of each transformer layer (other tensors left out).",
                             figures=[FIGURE])


def plot_layer_norms(data: Mapping[str, Any], path: str | Path) -> Path:
    """Update norm of each transformer layer for every model (non-layer tensors are left out)."""
    from rlm.core.io.plots import line_plot

    series = {}
    for name, v in data.get("models", {}).items():
        per_layer = v.get("update_norm_per_layer") or {}
        keys = sorted((k for k in per_layer if k.isdigit()), key=int)
        series[name] = ([int(k) for k in keys], [per_layer[k] for k in keys])
    return line_plot(series, path, xlabel="layer", ylabel="update norm ‖τ‖₂ of the layer",
                     title="Per-layer update norms")


@hookimpl
def register_metrics(register):
    register(UpdateNorm)
