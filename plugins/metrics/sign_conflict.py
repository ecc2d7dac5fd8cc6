"""``sign_conflict``: sign-conflict rate against kept rate k (the paper's Fig. 8).

Each model keeps its top-k fraction of positions by |τ| (global or per-tensor top-k, see
``rlm.core.analysis``); the rate is the share of positions kept by *both* models whose signs are opposite.
"""

from __future__ import annotations

from typing import Any

from rlm.core.contracts import Metric, PluginConfig
from rlm.core.hookspecs import hookimpl


class SignConflict(Metric):
    """Share of positions kept by both models' top-k masks whose signs disagree, over a grid of k."""

    name = "sign_conflict"
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
            both, _, conf = joint_counts(c, len(self._rates))
            both_l, conf_l = [int(x) for x in both], [int(x) for x in conf]
            entry = {"rate": [safe_ratio(c, n) for c, n in zip(conf_l, both_l)], "both_kept": both_l,
                     "conflicts": conf_l}
            out = pairs.setdefault(pair_key(a, b), {"kept_rate": list(self._rates), "topk": self._modes[0]})
            if mode == self._modes[0]:
                out.update(entry)
            else:
                out[mode] = entry
        return {"pairs": {p: {"sign_conflict": v} for p, v in pairs.items()}}


@hookimpl
def register_metrics(register):
    register(SignConflict)
