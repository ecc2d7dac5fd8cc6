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
        self._acc: dict[tuple[str, str, str], Any] = {}  # (a, b, mode) -> joint top-k counts (Chunk.pair_joint)
        self._rates: list[float] = []
        self._modes: list[str] = []

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        self._rates, self._modes = context.kept_rates, context.modes
        for a, b in context.pairs:
            for mode in context.modes:
                c = context.pair_joint(a, b, mode)
                self._acc[(a, b, mode)] = c + self._acc.get((a, b, mode), 0)

    def result(self) -> dict[str, Any]:
        from rlm.core.analysis import joint_counts, pair_key, safe_ratio

        pairs: dict[str, Any] = {}
        for (a, b, mode), c in self._acc.items():
            both, uni, _ = joint_counts(c, len(self._rates))
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
