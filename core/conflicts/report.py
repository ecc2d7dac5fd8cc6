"""Reports of ``rlm conflicts``: ``conflicts.json``, the Markdown ``report.md`` built from the metrics that ran
(their :meth:`~rlm.core.contracts.Metric.columns` and :meth:`~rlm.core.contracts.Metric.section`), and the
over-steps files (``over_steps.json``, ``report.md``, the norm and conflict-norm against step plots).

Used by ``rlm conflicts`` (:mod:`rlm.core.cli.conflicts`), the study's conflicts steps and report
(:func:`summary_rows`, :func:`format_value`), and by metric plugins whose sections print tables
(:func:`format_value`, :func:`pair_label`). matplotlib is imported inside the plotting functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from rlm.core.contracts import ReportSection

PARAMETERS = "parameters"  # the Models table's column of parameter counts


def format_value(value: Any, digits: int = 4) -> str:
    """How a table cell is printed: ``None`` as "–", floats with ``digits`` decimals (scientific notation below
    1e-3 or from 1e5 on, with ``digits - 1``), anything else as ``str``."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def pair_label(pair: str) -> str:
    """``"A|B"`` (a pair key of ``conflicts.json``) as a table label, ``"A vs B"``."""
    return pair.replace("|", " vs ")


def summary_rows(data: Mapping[str, Any], metrics: Sequence[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The cells of the summary tables: ``{"models": {model: {column: value}}, "pairs": {pair: {column:
    value}}}``, from :meth:`Metric.columns` of the model-scope metrics (then the parameter count, column
    ``"parameters"``) and of the pair-scope metrics, in the order the metrics ran."""
    model_metrics = [m for m in metrics if m.scope == "model"]
    pair_metrics = [m for m in metrics if m.scope == "pair"]
    models: dict[str, dict[str, Any]] = {}
    for name, entry in data.get("models", {}).items():
        row: dict[str, Any] = {}
        for m in model_metrics:
            row.update(m.columns(entry))
        row[PARAMETERS] = entry.get("num_params")
        models[name] = row
    pairs: dict[str, dict[str, Any]] = {}
    for pair, entry in data.get("pairs", {}).items():
        row = {}
        for m in pair_metrics:
            row.update(m.columns(entry))
        pairs[pair] = row
    return {"models": models, "pairs": pairs}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(label: str, rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A Markdown table with one row per ``rows`` key (first column ``label``) and one column per header met
    in the rows (in order of appearance); missing cells print as "–"."""
    headers = list(dict.fromkeys(h for row in rows.values() for h in row))
    lines = [f"| {label} | " + " | ".join(_cell(h) for h in headers) + " |", "|---|" + "---:|" * len(headers)]
    for key, row in rows.items():
        lines.append(f"| {_cell(key)} | " + " | ".join(_cell(format_value(row.get(h))) for h in headers) + " |")
    return lines


def section_lines(section: ReportSection) -> list[str]:
    """A metric's section as Markdown lines: its heading, its body and a link to each of its figures that the
    body does not show already."""
    lines = [f"## {section.title}", ""]
    if section.markdown.strip():
        lines += [section.markdown.strip("\n"), ""]
    for fig in section.figures:
        if f"]({fig})" not in section.markdown:
            lines += [f"![{Path(fig).stem}]({fig})", ""]
    return lines[:-1]


def markdown_report(data: Mapping[str, Any], metrics: Sequence[Any],
                    sections: Sequence[ReportSection] = ()) -> str:
    """The Markdown report: a Models table and a Pairs table from :func:`summary_rows`, then ``sections``."""
    rows = summary_rows(data, metrics)
    lines = ["# Task-conflict statistics", "", "## Models", "", *markdown_table("model", rows["models"])]
    pairs = {pair_label(p): row for p, row in rows["pairs"].items()}
    if pairs and any(pairs.values()):
        lines += ["", "## Pairs", "", *markdown_table("pair", pairs)]
    for section in sections:
        lines += ["", *section_lines(section)]
    return "\n".join(lines) + "\n"


def write_conflicts(out_dir: str | Path, data: Mapping[str, Any], metrics: Sequence[Any]) -> list[str]:
    """Write ``conflicts.json``, the figures of the metrics' sections and ``report.md`` into ``out_dir``;
    ``metrics`` are the metric instances that ran. Returns the file names (``conflicts.json``, ``report.md``,
    then the figures in the order the metrics ran)."""
    from rlm.core.io.atomic import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    atomic_write_json(out / "conflicts.json", data)
    sections = [s for s in (m.section(data, out) for m in metrics) if s is not None]
    atomic_write_text(out / "report.md", markdown_report(data, metrics, sections))
    return ["conflicts.json", "report.md", *(f for s in sections for f in s.figures)]


# -- over training steps ----------------------------------------------------------------------------------

def plot_vs_step(steps: Sequence[int], series: Mapping[str, Sequence[Any]], ylabel: str, path: str | Path) -> Path:
    """Values against training step, one line per label (the paper's Figs. 5 and 6)."""
    from rlm.core.io.plots import line_plot

    return line_plot({k: (list(steps), list(v)) for k, v in series.items()}, path, xlabel="training step",
                     ylabel=ylabel, title=f"{ylabel} over training")


def markdown_over_steps(data: Mapping[str, Any]) -> str:
    """The over-steps report: update norms and conflict norms against step."""
    steps = data["steps"]
    lines = ["# Task-conflict statistics over training steps", "", "## Update norm ‖τ‖₂", "",
             "| step | " + " | ".join(data["models"]) + " |", "|---:|" + "---:|" * len(data["models"])]
    for i, s in enumerate(steps):
        lines.append(f"| {s} | " + " | ".join(format_value(v.get("update_norm", [None] * len(steps))[i])
                                             for v in data["models"].values()) + " |")
    lines += ["", "## Conflict norm", "", "| step | " + " | ".join(pair_label(p) for p in data["pairs"])
              + " |", "|---:|" + "---:|" * len(data["pairs"])]
    for i, s in enumerate(steps):
        lines.append(f"| {s} | " + " | ".join(format_value(v.get("conflict_norm", [None] * len(steps))[i])
                                             for v in data["pairs"].values()) + " |")
    return "\n".join(lines) + "\n"


def write_over_steps(out_dir: str | Path, data: Mapping[str, Any]) -> list[str]:
    """Write ``over_steps.json``, ``report.md`` and the norm / conflict-norm vs step plots."""
    from rlm.core.io.atomic import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    atomic_write_json(out / "over_steps.json", data)
    atomic_write_text(out / "report.md", markdown_over_steps(data))
    steps = data["steps"]
    plot_vs_step(steps, {n: v.get("update_norm", []) for n, v in data["models"].items()},
                 "update norm ‖τ‖₂", out / "norm_vs_step.png")
    plot_vs_step(steps, {pair_label(p): v.get("conflict_norm", []) for p, v in data["pairs"].items()},
                 "conflict norm", out / "conflict_norm_vs_step.png")
    return ["over_steps.json", "report.md", "norm_vs_step.png", "conflict_norm_vs_step.png"]
