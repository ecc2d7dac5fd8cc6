"""``sign_conflict``: sign-conflict rate against kept rate k (the paper's Fig. 8).

Each model keeps its top-k fraction of positions by |τ| (global or per-tensor top-k, see
``rlm.core.conflicts.engine``); the rate is the share of positions kept by *both* models whose signs are opposite.
"""

from __future__ import annotations

from typing import Any

from rlm.core.conflicts.engine import PairTopkMetric, safe_ratio
from rlm.core.contracts import PluginConfig
from rlm.core.hookspecs import hookimpl


class SignConflict(PairTopkMetric):
    """Share of positions kept by both models' top-k masks whose signs disagree, over a grid of k."""

    name = "sign_conflict"
    default = True

    class Config(PluginConfig):
        pass

    def entry(self, both_kept: list[int], union: list[int], conflicts: list[int]) -> dict[str, Any]:
        return {"rate": [safe_ratio(c, n) for c, n in zip(conflicts, both_kept)], "both_kept": both_kept,
                "conflicts": conflicts}


@hookimpl
def register_metrics(register):
    register(SignConflict)
