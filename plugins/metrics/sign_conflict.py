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
        self._acc: dict[tuple[str, str, str], list[Any]] = {}  # (a, b, mode) -> [both, conflicts]
        self._rates: list[float] = []
        self._modes: list[str] = []

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        self._rates, self._modes = context.kept_rates, context.modes
        for a, b in context.pairs:
            for mode in context.modes:
                both, _, conf = context.pair_counts(a, b, mode)
                acc = self._acc.setdefault((a, b, mode), [0, 0])
                acc[0] = both + acc[0]
                acc[1] = conf + acc[1]

    def result(self) -> dict[str, Any]:
        from rlm.core.analysis import pair_key, safe_ratio

        pairs: dict[str, Any] = {}
        for (a, b, mode), (both, conf) in self._acc.items():
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
