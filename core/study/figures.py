"""The study report's figures: the number-of-merged-models curve (:func:`plot_num_models_curve`, the paper's
appendix D.2), the landscape heat-map (:func:`plot_landscape`, the paper's Fig. 4) and the training curves
(:func:`plot_training_curves`, from each run's ``metrics.jsonl`` read by :func:`read_metrics_jsonl`).
matplotlib (Agg) is imported inside the functions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rlm.core.io.plots import pyplot, save_figure
from rlm.core.study.tables import ReportError


def plot_num_models_curve(series: Mapping[str, Mapping[int, Any]], out: str | Path, *,
                          ylabel: str = "mean score over the merged experts' tasks",
                          title: str = "Merging more experts", dpi: int = 120) -> Path:
    """Score against the number of merged experts N, one line per series (e.g. ``"sft/ties"``). A value is a
    number or a list of numbers (several N-subsets): the line goes through their mean, a bar spans min..max."""
    if not series:
        raise ReportError("number-of-models curve: no series to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    try:
        for label, points in series.items():
            if not points:
                raise ReportError(f"number-of-models curve: series {label!r} has no points")
            ns = sorted(int(n) for n in points)
            vals = [np.atleast_1d(np.asarray(points[n] if n in points else points[str(n)], dtype=np.float64))
                    for n in ns]
            mean = np.array([v.mean() for v in vals])
            lo = mean - np.array([v.min() for v in vals])
            hi = np.array([v.max() for v in vals]) - mean
            ax.errorbar(ns, mean, yerr=[lo, hi], marker="o", capsize=3, label=str(label))
        ax.set_xlabel("number of merged experts N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return save_figure(fig, out, dpi)
    finally:
        plt.close(fig)


def plot_landscape(alphas: Sequence[float], betas: Sequence[float], values: Any, out: str | Path, *,
                   title: str = "f(α, β) = score(θ_a + α Δθ + β r)", label: str = "score",
                   points: Mapping[str, tuple[float, float]] | None = None, dpi: int = 120) -> Path:
    """Heat-map of ``values[i][j] = f(alphas[i], betas[j])`` (α on the x axis, β on the y axis), with marked
    points (default: the expert at (0, 0) and the merged model at (1, 0))."""
    a = np.asarray(alphas, dtype=np.float64)
    b = np.asarray(betas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (a.size, b.size):
        raise ReportError(f"landscape: values have shape {v.shape}, expected ({a.size}, {b.size}) = (alphas, betas)")
    if a.size < 1 or b.size < 1:
        raise ReportError("landscape: need at least one alpha and one beta")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    try:
        def edges(x: np.ndarray) -> np.ndarray:
            if x.size == 1:
                return np.array([x[0] - 0.5, x[0] + 0.5])
            mid = (x[1:] + x[:-1]) / 2
            return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])

        mesh = ax.pcolormesh(edges(a), edges(b), v.T, shading="flat", cmap="viridis")
        fig.colorbar(mesh, ax=ax, label=label)
        for name, (x, y) in (points if points is not None else {"expert": (0.0, 0.0), "merged": (1.0, 0.0)}).items():
            ax.plot([x], [y], marker="*", markersize=12, color="white", markeredgecolor="black")
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8, color="white")
        ax.set_xlabel("α (towards the merged model)")
        ax.set_ylabel("β (random direction)")
        ax.set_title(title, fontsize=10)
        return save_figure(fig, out, dpi)
    finally:
        plt.close(fig)


TRAINING_CURVE_KEYS = ("reward_mean", "adv_abs_mean", "delta_norm")
_CURVE_LABELS = {"reward_mean": "mean reward", "adv_abs_mean": "mean |advantage|", "delta_norm": "‖θ − θ0‖₂",
                 "kl": "KL", "accuracy": "accuracy", "entropy": "entropy", "grad_norm": "grad norm"}


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a training run's ``metrics.jsonl`` (blank lines skipped; a bad line is an
    error naming the file and line)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ReportError(f"{path}:{i}: not a JSON object ({exc})") from None
            if not isinstance(row, dict):
                raise ReportError(f"{path}:{i}: not a JSON object")
            rows.append(row)
    return rows


def plot_training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path, *,
                         keys: Sequence[str] = TRAINING_CURVE_KEYS, dpi: int = 120) -> Path:
    """One panel per metric key (default: mean reward, mean |advantage|, ‖θ − θ0‖₂) against ``step``, one line
    per run (e.g. ``"grpo/math"``). Records where a key is missing or null are skipped; a panel no run has
    data for says so."""
    if not runs:
        raise ReportError("training curves: no runs to plot")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    try:
        for ax, key in zip(axes[0], keys):
            drawn = False
            for label, rows in runs.items():
                pts = [(r["step"], r[key]) for r in rows
                       if r.get(key) is not None and r.get("step") is not None
                       and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=str(label), linewidth=1.2)
                    drawn = True
            ax.set_title(_CURVE_LABELS.get(key, key), fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return save_figure(fig, out, dpi)
    finally:
        plt.close(fig)
