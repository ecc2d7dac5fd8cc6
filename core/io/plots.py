"""Shared matplotlib helpers (Agg backend, imported inside functions so the CLI stays fast).

Every function writes one PNG atomically (temporary file beside the target, then rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    from rlm.core.io.atomic import _umask

    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


def _none_to_nan(values: Sequence[Any]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def line_plot(series: Mapping[str, tuple[Sequence[Any], Sequence[Any]]], path: str | Path, *, xlabel: str,
              ylabel: str, title: str = "", logx: bool = False, logy: bool | None = None,
              styles: Mapping[str, str] | None = None) -> Path:
    """One line per ``label -> (x, y)``; ``None`` values leave gaps. ``logy=None`` picks a log y axis when
    the positive values span more than two orders of magnitude."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y) in series.items():
        ax.plot(_none_to_nan(x), _none_to_nan(y), (styles or {}).get(label, "-o"), label=label, markersize=3)
    if logx:
        ax.set_xscale("log")
    if logy is None:
        pos = [float(v) for _, y in series.values() for v in y if v is not None and float(v) > 0]
        logy = bool(pos) and max(pos) / min(pos) > 100
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_sign_conflict(data: Mapping[str, Any], path: str | Path) -> Path:
    """Sign-conflict rate against kept rate for every pair (the paper's Fig. 8); other top-k modes dashed."""
    series: dict[str, tuple[Sequence[Any], Sequence[Any]]] = {}
    styles: dict[str, str] = {}
    for pair, v in data.get("pairs", {}).items():
        sc = v.get("sign_conflict")
        if not sc:
            continue
        label = pair.replace("|", " vs ")
        series[f"{label} ({sc.get('topk', '')})"] = (sc["kept_rate"], sc["rate"])
        for mode, extra in sc.items():
            if isinstance(extra, dict) and "rate" in extra:
                series[f"{label} ({mode})"] = (sc["kept_rate"], extra["rate"])
                styles[f"{label} ({mode})"] = "--x"
    return line_plot(series, path, xlabel="kept rate k (top-k fraction by |τ|)",
                     ylabel="sign-conflict rate (of positions kept by both)", title="Sign conflicts", logx=True,
                     logy=False, styles=styles)


def plot_layer_norms(data: Mapping[str, Any], path: str | Path) -> Path:
    """Update norm of each transformer layer for every model (non-layer tensors are left out)."""
    series = {}
    for name, v in data.get("models", {}).items():
        per_layer = v.get("update_norm_per_layer") or {}
        keys = sorted((k for k in per_layer if k.isdigit()), key=int)
        series[name] = ([int(k) for k in keys], [per_layer[k] for k in keys])
    return line_plot(series, path, xlabel="layer", ylabel="update norm ‖τ‖₂ of the layer",
                     title="Per-layer update norms")


def plot_vs_step(steps: Sequence[int], series: Mapping[str, Sequence[Any]], ylabel: str, path: str | Path) -> Path:
    """Values against training step, one line per label (the paper's Figs. 5 and 6)."""
    return line_plot({k: (list(steps), list(v)) for k, v in series.items()}, path, xlabel="training step",
                     ylabel=ylabel, title=f"{ylabel} over training")
