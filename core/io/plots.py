"""Shared matplotlib helpers (Agg backend, imported inside functions so the CLI stays fast).

Every function writes one PNG atomically (temporary file beside the target, then rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically and close it."""
    from rlm.core.io.atomic import _umask

    plt = pyplot()
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
    plt = pyplot()
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
