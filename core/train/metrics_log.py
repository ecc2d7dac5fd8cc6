"""What a training run reports per step: ``metrics.jsonl`` (one strict-JSON object per step, the keys of
:data:`METRIC_KEYS` first, null where not applicable), the optional TensorBoard event files and the rich progress
line. Only the main process writes.

The session (:mod:`rlm.core.train.session`) holds one :class:`MetricsLog`. This module does not import torch or
rich at import time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError

METRIC_KEYS = ("step", "reward_mean", "accuracy", "adv_abs_mean", "adv_abs_mean_seq", "adv_min", "zero_std_frac",
               "kl", "clip_frac", "entropy", "grad_norm", "delta_norm", "tokens_per_s", "step_time")
METRICS_FILE = "metrics.jsonl"
# (metric key, label) shown on the progress line when the step logged a number for it
PROGRESS_FIELDS = [("loss", "loss"), ("reward_mean", "reward"), ("accuracy", "acc"), ("adv_abs_mean", "|A|"),
                   ("kl", "kl"), ("grad_norm", "gnorm"), ("delta_norm", "Δθ"), ("tokens_per_s", "tok/s")]


def require_tensorboard() -> None:
    """Fail early (before the run directory is touched) when ``--tensorboard`` cannot work."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise RlmError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


def truncate_metrics(out: Path, last_step: int) -> None:
    """Drop the rows of ``out/metrics.jsonl`` after ``last_step`` (a resumed run rewrites them), and a last
    line cut by a kill."""
    path = out / METRICS_FILE
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except ValueError:
            break  # a line cut by a kill
    from rlm.core.io.atomic import atomic_write_text

    atomic_write_text(path, "".join(x + "\n" for x in keep))


def metrics_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The row written for one step: every key of :data:`METRIC_KEYS` (None where missing), then the step's
    other keys; non-finite floats become None (strict JSON)."""
    row = {k: metrics.get(k) for k in METRIC_KEYS}
    row.update({k: v for k, v in metrics.items() if k not in row})
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            row[k] = None
    return row


class MetricsLog:
    """``metrics.jsonl``, TensorBoard (``tensorboard=True``) and the progress line (``progress=True``) of the
    run directory ``out``; a no-op where ``enabled`` is false (the processes other than the main one).
    :meth:`start` shows the progress line, :meth:`close` stops it and closes every file."""

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, progress: bool) -> None:
        self.out = out
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.show_progress = progress
        self._file: Any = None
        self._tb: Any = None
        self._progress: tuple[Any, Any] | None = None

    def start(self, title: str, total: int, completed: int) -> None:
        """Show the progress line ``title`` at ``completed`` of ``total`` steps."""
        if not (self.enabled and self.show_progress):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        prog = Progress(TextColumn(f"[bold]{title}[/bold]"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        transient=False)
        task = prog.add_task("train", total=total, completed=completed, info="")
        prog.start()
        self._progress = (prog, task)

    def write(self, metrics: dict[str, Any]) -> None:
        """Log one step (``metrics`` holds ``step``)."""
        if not self.enabled:
            return
        row = metrics_row(metrics)
        if self._file is None:
            self._file = open(self.out / METRICS_FILE, "a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tensorboard:
            self._write_tensorboard(row)
        if self._progress is not None:
            prog, task = self._progress
            info = "  ".join(f"{label} {row[k]:.4g}" for k, label in PROGRESS_FIELDS
                             if isinstance(row.get(k), (int, float)))
            prog.update(task, completed=row["step"], info=info)

    def _write_tensorboard(self, row: dict[str, Any]) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        """Stop the progress line and close the files."""
        if self._progress is not None:
            self._progress[0].stop()
            self._progress = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
