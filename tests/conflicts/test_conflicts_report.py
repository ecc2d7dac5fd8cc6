"""Reports of ``rlm conflicts`` from the metrics that ran: the summary tables from ``Metric.columns``, the
sections from ``Metric.section``, a third-party metric plugin reaching report.md like a built-in one (and the
default metric selection coming from the registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_conflicts import make_expert

from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.report import format_value, markdown_report, summary_rows, write_conflicts
from rlm.core.conflicts.stats import pair_key
from rlm.core.contracts import Metric, ReportSection
from rlm.core.hookspecs import hookimpl
from rlm.core.plugins import PluginSystem, reset_system
from rlm.plugins.metrics.conflict_norm import ConflictNorm
from rlm.plugins.metrics.cosine import Cosine
from rlm.plugins.metrics.fraction_updated import FractionUpdated
from rlm.plugins.metrics.sign_conflict import SignConflict
from rlm.plugins.metrics.topk_overlap import TopkOverlap
from rlm.plugins.metrics.update_norm import UpdateNorm


class ParamCount(Metric):
    """A third-party model metric fed by the engine's sums only: the number of positions of each model."""

    name = "param_count"
    default = True
    reads_deltas = False

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.counts: dict[str, int] = {}

    def update(self, tensor_name, deltas, context=None):
        for n in context.names:
            self.counts[n] = self.counts.get(n, 0) + context.size

    def result(self):
        return {"models": {n: {"param_count": c} for n, c in self.counts.items()}}

    def section(self, data, out_dir):
        total = sum(v["param_count"] for v in data["models"].values())
        return ReportSection("Parameter counts of the third party", f"All models together: {total} positions.")


class PairDot(Metric):
    """A third-party pair metric with the default ``columns`` and no section."""

    name = "pair_dot"
    default = True
    scope = "pair"
    reads_deltas = False

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.dots: dict[str, float] = {}

    def update(self, tensor_name, deltas, context=None):
        for a, b in context.pairs:
            self.dots[pair_key(a, b)] = self.dots.get(pair_key(a, b), 0.0) + context.dot(a, b)

    def result(self):
        return {"pairs": {p: {"pair_dot": v} for p, v in self.dots.items()}}


class ThirdParty:
    @hookimpl
    def register_metrics(self, register):
        register(ParamCount)
        register(PairDot)


@pytest.fixture(scope="module")
def two_experts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-experts")
    return {"sft": make_expert(tiny_model_dir, root / "sft", 1, scale=3e-3, zero_frac=0.2),
            "rl": make_expert(tiny_model_dir, root / "rl", 2, scale=1e-4, zero_frac=0.8)}


@pytest.fixture
def third_party():
    """The process-wide plugin system with the built-ins and the third-party metrics."""
    system = PluginSystem()
    system.add_plugin(ThirdParty(), name="third-party-metrics", distribution="rlm-third-party", version="0.1")
    reset_system(system)
    try:
        yield system
    finally:
        reset_system(None)


@pytest.mark.parametrize("engine", ["auto", "eager"])
def test_third_party_metric_reaches_report_by_default(third_party, tiny_model_dir, two_experts, tmp_path, engine):
    from rlm.core.cli import main

    defaults = third_party.registry("metric").defaults()
    assert {"param_count", "pair_dot", "update_norm", "sign_conflict"} <= set(defaults)
    assert ConflictsConfig().metrics == defaults  # the default selection is the registry's
    out = tmp_path / "conf"
    models = ",".join(f"{n}={p}" for n, p in two_experts.items())
    assert main(["conflicts", "--base", str(tiny_model_dir), "--models", models, "--out", str(out),
                 "--set", f"engine={engine}"]) == 0
    data = json.loads((out / "conflicts.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["engine"] == ("fused" if engine == "auto" else "eager")
    n = data["models"]["sft"]["num_params"]
    assert data["models"]["sft"]["param_count"] == data["models"]["rl"]["param_count"] == n
    report = (out / "report.md").read_text()
    models_table = report.split("## Models")[1].split("## Pairs")[0]
    assert "| param_count |" in models_table and f"| {n} | {n} |" in models_table  # its cell, then parameters
    pairs_table = report.split("## Pairs")[1].split("\n## ")[0]
    assert "| pair_dot |" in pairs_table
    assert format_value(data["pairs"]["sft|rl"]["pair_dot"]) in pairs_table
    assert "## Parameter counts of the third party" in report
    assert f"All models together: {2 * n} positions." in report
    # the built-in metrics' cells and sections are there too
    for text in ("update norm ‖τ‖₂", "fraction updated (\\|τ\\| > 1e-05)", "conflict norm", "cosine",
                 "## Sign-conflict rate against kept rate (top-k: global)", "## Top-k mask overlap",
                 "![sign_conflict](sign_conflict.png)", "![layer_norms](layer_norms.png)"):
        assert text in report, text


def _data() -> dict:
    """A hand-made conflicts.json with every built-in metric's fields."""
    sc = {"kept_rate": [0.1, 1.0], "topk": "global", "rate": [0.25, None], "both_kept": [4, 0],
          "conflicts": [1, 0], "per_tensor": {"rate": [0.5, 0.5], "both_kept": [2, 2], "conflicts": [1, 1]}}
    ov = {"kept_rate": [0.1, 1.0], "topk": "global", "jaccard": [0.125, 1.0], "intersection": [1, 8],
          "union": [8, 8]}
    model = {"update_norm_per_layer": {"0": 1.0, "1": 2.0, "model.embed_tokens": 3.0}, "num_params": 1000}
    return {"threshold": 1e-05,
            "models": {"a": {"update_norm": 2.5, "fraction_updated": 0.123456, **model},
                       "b": {"update_norm": 1.5e-05, "fraction_updated": None, **model}},
            "pairs": {"a|b": {"conflict_norm": 0.0123, "cosine": -0.5, "sign_conflict": sc, "topk_overlap": ov}}}


def test_summary_rows_and_report_keep_the_tables_look(tmp_path):
    metrics = [UpdateNorm(), FractionUpdated(), ConflictNorm(), Cosine(), SignConflict(), TopkOverlap()]
    data = _data()
    rows = summary_rows(data, metrics)
    assert rows == {
        "models": {"a": {"update norm ‖τ‖₂": 2.5, "fraction updated (|τ| > 1e-05)": "12.35 %", "parameters": 1000},
                   "b": {"update norm ‖τ‖₂": 1.5e-05, "fraction updated (|τ| > 1e-05)": None, "parameters": 1000}},
        "pairs": {"a|b": {"conflict norm": 0.0123, "cosine": -0.5}}}
    assert [format_value(v) for v in (2.5, 1.5e-05, None, 1000, "x")] == ["2.5000", "1.500e-05", "–", "1000", "x"]
    files = write_conflicts(tmp_path, data, metrics)
    assert files == ["conflicts.json", "report.md", "layer_norms.png", "sign_conflict.png"]  # in metric order
    assert json.loads((tmp_path / "conflicts.json").read_text()) == data
    for png in files[2:]:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.md").read_text() == "\n".join([
        "# Task-conflict statistics", "",
        "## Models", "",
        "| model | update norm ‖τ‖₂ | fraction updated (\\|τ\\| > 1e-05) | parameters |",
        "|---|---:|---:|---:|",
        "| a | 2.5000 | 12.35 % | 1000 |",
        "| b | 1.500e-05 | – | 1000 |", "",
        "## Pairs", "",
        "| pair | conflict norm | cosine |",
        "|---|---:|---:|",
        "| a vs b | 0.0123 | -0.5000 |", "",
        "## Per-layer update norms", "",
        "Update norm ‖τ‖₂ of each transformer layer (other tensors left out).", "",
        "![layer_norms](layer_norms.png)", "",
        "## Sign-conflict rate against kept rate (top-k: global)", "",
        "Rate = positions with opposite signs / positions kept by both models.", "",
        "| pair | k=0.1 | k=1 |",
        "|---|---:|---:|",
        "| a vs b | 0.250 | – |", "",
        "![sign_conflict](sign_conflict.png)", "",
        "## Top-k mask overlap (Jaccard, top-k: global)", "",
        "| pair | k=0.1 | k=1 |",
        "|---|---:|---:|",
        "| a vs b | 0.125 | 1.000 |", ""])


def test_report_holds_only_the_metrics_that_ran(tmp_path):
    data = _data()
    for v in data["pairs"].values():
        del v["sign_conflict"], v["topk_overlap"]
    metrics = [Cosine(), UpdateNorm(breakdown=False)]
    for v in data["models"].values():
        del v["fraction_updated"], v["update_norm_per_layer"]
    report = markdown_report(data, metrics, [m.section(data, tmp_path) for m in metrics if m.section(data, tmp_path)])
    assert "fraction updated" not in report and "conflict norm" not in report and "Sign-conflict" not in report
    assert "| pair | cosine |" in report and "| model | update norm ‖τ‖₂ | parameters |" in report
    assert not list(Path(tmp_path).iterdir())  # no figure without per-layer norms


def test_a_figure_the_section_shows_itself_is_linked_once():
    shown = ReportSection("Curve", "Text.\n\n![my curve](curve.png)", ["curve.png", "other.png"])
    report = markdown_report({"models": {}}, [], [shown])
    assert report.count("(curve.png)") == 1 and "![other](other.png)" in report
