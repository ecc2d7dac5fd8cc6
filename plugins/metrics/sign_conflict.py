"""``sign_conflict``: sign-conflict rate against kept rate k (the paper's Fig. 8).

Each model keeps its top-k fraction of positions by |τ| (global or per-tensor top-k, see
``rlm.core.conflicts.stats``); the rate is the share of positions kept by *both* models whose signs are
opposite. Its report section is the rate table over kept rates and the ``sign_conflict.png`` figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from rlm.core.conflicts.pair_topk import PairTopkMetric
from rlm.core.conflicts.stats import safe_ratio
from rlm.core.contracts import PluginConfig, ReportSection
from rlm.core.hookspecs import hookimpl

FIGURE = "sign_conflict.png"


class SignConflict(PairTopkMetric):
    """Share of positions kept by both models' top-k masks whose signs disagree, over a grid of k."""

    name = "sign_conflict"
    default = True

    class Config(PluginConfig):
        pass

    def entry(self, both_kept: list[int], union: list[int], conflicts: list[int]) -> dict[str, Any]:
        return {"rate": [safe_ratio(c, n) for c, n in zip(conflicts, both_kept)], "both_kept": both_kept,
                "conflicts": conflicts}

    def section(self, data: Mapping[str, Any], out_dir: Path) -> ReportSection | None:
        entries = self.entries(data)
        if not entries:
            return None
        plot_sign_conflict(entries, Path(out_dir) / FIGURE)
        topk = next(iter(entries.values())).get("topk", "")
        return ReportSection(title=f"Sign-conflict rate against kept rate (top-k: {topk})",
                             markdown="Rate = positions with opposite signs / positions kept by both models.\n\n"
                                      + self.kept_rate_table(entries, "rate"),
                             figures=[FIGURE])


def plot_sign_conflict(entries: Mapping[str, Any], path: str | Path) -> Path:
    """Sign-conflict rate against kept rate for every pair (``{"A|B": sign_conflict entry}``); the other
    top-k scopes dashed."""
    from rlm.core.conflicts.report import pair_label
    from rlm.core.io.plots import line_plot

    series: dict[str, tuple[Sequence[Any], Sequence[Any]]] = {}
    styles: dict[str, str] = {}
    for pair, sc in entries.items():
        if not sc:
            continue
        label = pair_label(pair)
        series[f"{label} ({sc.get('topk', '')})"] = (sc["kept_rate"], sc["rate"])
        for mode, extra in sc.items():
            if isinstance(extra, dict) and "rate" in extra:
                series[f"{label} ({mode})"] = (sc["kept_rate"], extra["rate"])
                styles[f"{label} ({mode})"] = "--x"
    return line_plot(series, path, xlabel="kept rate k (top-k fraction by |τ|)",
                     ylabel="sign-conflict rate (of positions kept by both)", title="Sign conflicts", logx=True,
                     logy=False, styles=styles)


@hookimpl
def register_metrics(register):
    register(SignConflict)
