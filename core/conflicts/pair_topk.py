"""``PairTopkMetric``: the shared skeleton of pair metrics built on joint top-k counts.

Used by the ``sign_conflict`` and ``topk_overlap`` metric plugins (``rlm.plugins.metrics``) and open to
third-party metrics of the same shape; it lives in core because more than one plugin builds on it.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

from rlm.core.conflicts.report import format_value, pair_label
from rlm.core.conflicts.stats import joint_counts, pair_key
from rlm.core.contracts import Metric


class PairTopkMetric(Metric):
    """Shared skeleton of the pair metrics built on joint top-k counts (``sign_conflict``, ``topk_overlap``):
    sums :meth:`Chunk.pair_joint` per (pair, top-k scope) over blocks, then turns the totals into one entry per
    pair with :meth:`entry`. The first top-k scope fills the entry; other scopes go under their own name."""

    scope = "pair"
    needs_topk = True
    reads_deltas = False

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._acc: dict[tuple[str, str, str], Any] = {}  # (a, b, mode) -> joint top-k counts
        self._rates: list[float] = []
        self._modes: list[str] = []

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        self._rates, self._modes = context.kept_rates, context.modes
        for a, b in context.pairs:
            for mode in context.modes:
                self._acc[(a, b, mode)] = context.pair_joint(a, b, mode) + self._acc.get((a, b, mode), 0)

    @abc.abstractmethod
    def entry(self, both_kept: list[int], union: list[int], conflicts: list[int]) -> dict[str, Any]:
        """The JSON entry of one pair and scope from its per-kept-rate counts."""

    def result(self) -> dict[str, Any]:
        pairs: dict[str, Any] = {}
        for (a, b, mode), c in self._acc.items():
            both, union, conflicts = (list(map(int, x)) for x in joint_counts(c, len(self._rates)))
            entry = self.entry(both, union, conflicts)
            out = pairs.setdefault(pair_key(a, b), {"kept_rate": list(self._rates), "topk": self._modes[0]})
            if mode == self._modes[0]:
                out.update(entry)
            else:
                out[mode] = entry
        return {"pairs": {p: {self.name: v} for p, v in pairs.items()}}

    def entries(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """This metric's entry of every pair in ``conflicts.json``'s data that has one."""
        return {p: v[self.name] for p, v in data.get("pairs", {}).items() if self.name in v}

    @staticmethod
    def kept_rate_table(entries: Mapping[str, Any], key: str) -> str:
        """A Markdown table of the per-kept-rate list ``key`` of each pair's entry, one column per kept rate."""
        ks = next(iter(entries.values()))["kept_rate"]
        lines = ["| pair | " + " | ".join(f"k={k:g}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for p, v in entries.items():
            lines.append(f"| {pair_label(p)} | " + " | ".join(format_value(r, 3) for r in v[key]) + " |")
        return "\n".join(lines)
