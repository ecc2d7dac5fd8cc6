"""``topk_overlap``: overlap (Jaccard index) of two models' top-k masks over a grid of kept rates k."""

from __future__ import annotations

from typing import Any

from rlm.core.conflicts.engine import PairTopkMetric, safe_ratio
from rlm.core.contracts import PluginConfig
from rlm.core.hookspecs import hookimpl


class TopkOverlap(PairTopkMetric):
    """Jaccard overlap |K_a ∩ K_b| / |K_a ∪ K_b| of two models' top-k masks, over a grid of k."""

    name = "topk_overlap"
    default = True

    class Config(PluginConfig):
        pass

    def entry(self, both_kept: list[int], union: list[int], conflicts: list[int]) -> dict[str, Any]:
        return {"jaccard": [safe_ratio(i, u) for i, u in zip(both_kept, union)], "intersection": both_kept,
                "union": union}


@hookimpl
def register_metrics(register):
    register(TopkOverlap)
