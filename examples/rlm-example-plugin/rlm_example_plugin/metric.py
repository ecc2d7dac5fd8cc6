"""``max_update``: the largest single change |τ| = |θ_expert − θ_base| of each model and the tensor that holds
it, with its own section in ``report.md`` (a table and a bar chart).

It reads the task-vector blocks themselves (``reads_deltas = True``), so ``rlm conflicts`` runs its eager engine
when this metric is asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rlm.core.contracts import Metric, PluginConfig, ReportSection


class MaxUpdate(Metric):
    """Largest |τ| of each model over all parameters, and where it is."""

    name = "max_update"
    scope = "model"
    reads_deltas = True

    class Config(PluginConfig):
        pass

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._best: dict[str, tuple[float, str]] = {}  # model -> (largest |τ| so far, its tensor)

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        for model, block in deltas.items():
            if block.numel():
                value = float(block.abs().max())
                if value > self._best.get(model, (-1.0, ""))[0]:
                    self._best[model] = (value, tensor_name)

    def result(self) -> dict[str, Any]:
        return {"models": {m: {"max_update": v, "max_update_tensor": t} for m, (v, t) in self._best.items()}}

    def columns(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"max abs τ": entry["max_update"]} if "max_update" in entry else {}

    def section(self, data: Mapping[str, Any], out_dir: Path) -> ReportSection | None:
        rows = [(m, v["max_update"], v.get("max_update_tensor")) for m, v in data.get("models", {}).items()
                if "max_update" in v]
        if not rows:
            return None
        lines = ["The single largest change of each model and the tensor holding it.", "",
                 "| model | largest \\|τ\\| | tensor |", "|---|---:|---|"]
        lines += [f"| {m} | {v:.4g} | `{t}` |" for m, v, t in rows]
        from rlm.core.io.plots import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([m for m, _, _ in rows], [v for _, v, _ in rows])
        ax.set_ylabel("largest |τ|")
        ax.set_title("Largest single update")
        save_figure(fig, Path(out_dir) / "max_update.png")
        lines += ["", "![largest single update](max_update.png)"]
        return ReportSection("Largest single update", "\n".join(lines), ["max_update.png"])
