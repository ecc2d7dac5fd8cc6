"""``conflict_norm``: ‖(τ_a ⊙ τ_b) · 1[τ_a ⊙ τ_b < 0]‖₂ for every pair (the paper's Eq. 10); its report cell
is headed "conflict norm"."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Mapping

from rlm.core.contracts import Metric, PluginConfig
from rlm.core.hookspecs import hookimpl


class ConflictNorm(Metric):
    """Norm of the element-wise product of two task vectors where their signs disagree (Eq. 10)."""

    name = "conflict_norm"
    default = True
    scope = "pair"
    reads_deltas = False

    class Config(PluginConfig):
        pass

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._acc: dict[str, float] = defaultdict(float)

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        from rlm.core.conflicts.chunk import Chunk
        from rlm.core.conflicts.stats import pair_key

        ctx = context if context is not None else Chunk(tensor_name, deltas, numel=0)
        for a, b in ctx.pairs:
            self._acc[pair_key(a, b)] += ctx.conflict_sum_squares(a, b)

    def result(self) -> dict[str, Any]:
        return {"pairs": {p: {"conflict_norm": math.sqrt(v)} for p, v in self._acc.items()}}

    def columns(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"conflict norm": entry["conflict_norm"]} if "conflict_norm" in entry else {}


@hookimpl
def register_metrics(register):
    register(ConflictNorm)
