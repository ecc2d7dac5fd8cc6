"""``fraction_updated``: share of parameters with |τ| above a threshold (exact, float64), and a histogram of
log10|τ| with ``2**sub_bits`` bins per power of two (exact float32 intervals, see
``rlm.core.conflicts.stats.octave_histogram``). Its report cell is the share in percent, as a string
("12.34 %")."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field

from rlm.core.contracts import Metric, PluginConfig
from rlm.core.hookspecs import hookimpl


class FractionUpdated(Metric):
    """Share of parameters with |τ| > threshold (default 1e-5), with a histogram of log10|τ|."""

    name = "fraction_updated"
    default = True
    reads_deltas = False

    class Config(PluginConfig):
        threshold: float = Field(1e-5, ge=0.0)
        sub_bits: int = Field(2, ge=0, le=6)  # histogram bins per power of two: 2**sub_bits

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._acc: dict[str, dict[str, Any]] = {}

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        import torch

        from rlm.core.conflicts.stats import count_above, octave_bins, octave_histogram

        sub = self.config.sub_bits
        engine_hist = context is not None and context.engine_histograms and context.bits >= 9 + sub
        for name in (context.names if context is not None else deltas):
            a = self._acc.setdefault(name, {"n": 0, "above": 0, "hist": 0})
            if context is not None:
                a["n"] += context.size
                a["above"] += context.count_above(name, self.config.threshold)
            else:
                a["n"] += deltas[name].numel()
                a["above"] += count_above(deltas[name], self.config.threshold)
            if engine_hist:
                continue  # the engine calls update_histogram with the whole tensor's magnitude bins
            if context is not None and context.bits >= 9 + sub:  # reuse the engine's magnitude bins
                h = torch.bincount(context.bins(name) >> (context.bits - 9 - sub), minlength=octave_bins(sub))
            else:
                h = octave_histogram(context.deltas[name] if context is not None else deltas[name], sub)
            a["hist"] = h + a["hist"]

    @property
    def count_thresholds(self) -> list[float]:
        """Thresholds whose counts ``context.count_above`` must answer (the fused engine counts only these)."""
        return [self.config.threshold]

    @property
    def histogram_bits(self) -> int:
        """Magnitude-bin resolution the log10 histogram needs (engine bins of this many bits suffice)."""
        return 9 + self.config.sub_bits

    def update_histogram(self, tensor_name: str, hists: dict[str, Any], bits: int) -> None:
        """Fold one tensor's histograms of ``bits``-bit magnitude bins (``rlm.core.conflicts.stats.magnitude_bins``)
        into the log10 histogram: its bins are the top ``9 + sub_bits`` bits of the same bit pattern. The engine
        may hand the histograms of several tensors at once (the fused engine: all of them, as ``"*"``)."""
        import torch

        from rlm.core.conflicts.stats import octave_bins

        sub = self.config.sub_bits
        if bits < 9 + sub:
            return  # too coarse: update() histograms each block itself
        for name, h in hists.items():
            a = self._acc.setdefault(name, {"n": 0, "above": 0, "hist": 0})
            folded = h.view(-1, 1 << (bits - 9 - sub)).sum(dim=1, dtype=torch.int64)[:octave_bins(sub)]
            a["hist"] = folded + a["hist"]

    def result(self) -> dict[str, Any]:
        from rlm.core.conflicts.stats import octave_edges_log10

        lo = octave_edges_log10(self.config.sub_bits).tolist()
        models = {}
        for name, a in self._acc.items():
            hist = a["hist"].tolist()
            used = [i for i, c in enumerate(hist) if c and i > 0]
            first, last = (used[0], used[-1]) if used else (1, 0)
            models[name] = {
                "fraction_updated": a["above"] / a["n"] if a["n"] else None,
                "num_updated": a["above"],
                # non-empty range only: counts[i] holds log10|τ| in [edges[i], edges[i+1])
                "log10_abs_histogram": {"edges": lo[first:last + 2], "counts": hist[first:last + 1],
                                        "zeros": hist[0]},
            }
        return {"models": models}

    def columns(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """``{"fraction updated (|τ| > t)": "12.34 %"}`` (``None`` when the model has no parameters)."""
        if "fraction_updated" not in entry:
            return {}
        fu = entry["fraction_updated"]
        return {f"fraction updated (|τ| > {self.config.threshold:g})": None if fu is None else f"{100 * fu:.2f} %"}


@hookimpl
def register_metrics(register):
    register(FractionUpdated)
