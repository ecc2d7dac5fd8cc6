"""``topk_overlap``: overlap (Jaccard index) of two models' top-k masks over a grid of kept rates k; its
report section is the Jaccard table over kept rates."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rlm.core.conflicts.pair_topk import PairTopkMetric
from rlm.core.conflicts.stats import safe_ratio
from rlm.core.contracts import PluginConfig, ReportSection
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

    def section(self, data: Mapping[str, Any], out_dir: Path) -> ReportSection | None:
        entries = self.entries(data)
        if not entries:
            return None
        topk = next(iter(entries.values())).get("topk", "")
        return ReportSection(title=f"Top-k mask overlap (Jaccard, top-k: {topk})",
                             markdown=self.kept_rate_table(entries, "jaccard"))


@hookimpl
def register_metrics(register):
    register(TopkOverlap)
