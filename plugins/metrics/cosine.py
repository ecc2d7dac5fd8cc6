"""``cosine``: cosine similarity ⟨τ_a, τ_b⟩ / (‖τ_a‖ ‖τ_b‖) for every pair."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from rlm.core.contracts import Metric, PluginConfig
from rlm.core.hookspecs import hookimpl


class Cosine(Metric):
    """Cosine similarity of two task vectors over all parameters (null when either is zero)."""

    name = "cosine"
    default = True
    scope = "pair"
    reads_deltas = False

    class Config(PluginConfig):
        pass

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._dot: dict[tuple[str, str], float] = defaultdict(float)
        self._ss: dict[str, float] = defaultdict(float)

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        from rlm.core.conflicts.chunk import Chunk

        ctx = context if context is not None else Chunk(tensor_name, deltas, numel=0)
        for n in ctx.names:
            self._ss[n] += ctx.sum_squares(n)
        for a, b in ctx.pairs:
            self._dot[(a, b)] += ctx.dot(a, b)

    def result(self) -> dict[str, Any]:
        from rlm.core.conflicts.stats import pair_key

        out = {}
        for (a, b), d in self._dot.items():
            den = math.sqrt(self._ss[a]) * math.sqrt(self._ss[b])
            out[pair_key(a, b)] = {"cosine": d / den if den > 0 else None}
        return {"pairs": out}


@hookimpl
def register_metrics(register):
    register(Cosine)
