"""``topk_overlap``: overlap (Jaccard index) of two models' top-k masks over a grid of kept rates k."""

from __future__ import annotations

from typing import Any

from rlm.core.contracts import Metric, PluginConfig
from rlm.core.hookspecs import hookimpl


class TopkOverlap(Metric):
    """Jaccard overlap |K_a ∩ K_b| / |K_a ∪ K_b| of two models' top-k masks, over a grid of k."""

    name = "topk_overlap"
    scope = "pair"
    needs_topk = True

    class Config(PluginConfig):
        pass

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._acc: dict[tuple[str, str, str], list[Any]] = {}  # (a, b, mode) -> [|Ka ∩ Kb|, |Ka ∪ Kb|]
        self._rates: list[float] = []
        self._modes: list[str] = []

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        self._rates, self._modes = context.kept_rates, context.modes
        for a, b in context.pairs:
            for mode in context.modes:
                both, union, _ = context.pair_counts(a, b, mode)
                acc = self._acc.setdefault((a, b, mode), [0, 0])
                acc[0] = both + acc[0]
                acc[1] = union + acc[1]

    def result(self) -> dict[str, Any]:
        from rlm.core.analysis import pair_key, safe_ratio

        pairs: dict[str, Any] = {}
        for (a, b, mode), (both, uni) in self._acc.items():
            inter = [int(x) for x in both]
            union = [int(x) for x in uni]
            entry = {"jaccard": [safe_ratio(i, u) for i, u in zip(inter, union)], "intersection": inter,
                     "union": union}
            out = pairs.setdefault(pair_key(a, b), {"kept_rate": list(self._rates), "topk": self._modes[0]})
            if mode == self._modes[0]:
                out.update(entry)
            else:
                out[mode] = entry
        return {"pairs": {p: {"topk_overlap": v} for p, v in pairs.items()}}


@hookimpl
def register_metrics(register):
    register(TopkOverlap)
