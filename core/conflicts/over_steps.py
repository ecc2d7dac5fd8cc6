"""Task-vector statistics over training steps (``rlm conflicts --over-steps``): norms and conflict norms of
every run's ``checkpoints/step-N`` at each step all runs share.

Used by ``rlm conflicts`` (:mod:`rlm.core.cli.conflicts`) and the study's conflicts steps; the report is
written by :func:`rlm.core.conflicts.report.write_over_steps`.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.engine import compute_conflicts
from rlm.core.conflicts.stats import pair_key
from rlm.core.errors import RlmError

_STEP_RE = re.compile(r"^step-(\d+)$")


def run_steps(run: str | Path) -> dict[int, Path]:
    """``{step: dir}`` for the ``RUN/checkpoints/step-N`` directories of a training run."""
    run = Path(run)
    ck = run / "checkpoints"
    if not run.is_dir():
        raise RlmError(f"run directory {run} does not exist")
    if not ck.is_dir():
        raise RlmError(f"run {run} has no checkpoints/ directory (expected {ck}/step-N)")
    steps = {}
    for p in ck.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            steps[int(m.group(1))] = p
    if not steps:
        raise RlmError(f"run {run} has no step checkpoints under {ck} (expected step-N directories)")
    return dict(sorted(steps.items()))


def compute_over_steps(base: str | Path, runs: Mapping[str, str | Path], config: ConflictsConfig | None = None,
                       *, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Norm (and fraction updated) of every run's checkpoints and conflict norm of every pair of runs at
    each step that all runs share. Returns ``{"threshold", "steps", "models": {run: {"update_norm": [...],
    "fraction_updated": [...]}}, "pairs": {"A|B": {"conflict_norm": [...]}}}``."""
    names = list(runs)
    if len(names) < 2:
        raise RlmError(f"--over-steps compares runs pairwise and needs at least two runs, got {len(names)}")
    config = config or ConflictsConfig()
    wanted = [m for m in config.metrics if m in ("update_norm", "fraction_updated", "conflict_norm")]
    config = ConflictsConfig.model_validate({**config.model_dump(), "metrics": wanted or ["update_norm",
                                                                                           "conflict_norm"],
                                             "metric": {k: v for k, v in config.metric.items() if k in wanted}})
    per_run = {n: run_steps(p) for n, p in runs.items()}
    common = sorted(set.intersection(*(set(s) for s in per_run.values())))
    if not common:
        listing = "; ".join(f"{n}: {sorted(s)}" for n, s in per_run.items())
        raise RlmError(f"the runs share no checkpoint step ({listing})")
    out: dict[str, Any] = {"threshold": None, "steps": common,
                           "models": {n: {} for n in names},
                           "pairs": {pair_key(a, b): {} for a, b in itertools.combinations(names, 2)}}
    for i, step in enumerate(common):
        res = compute_conflicts(base, {n: per_run[n][step] for n in names}, config)
        out["threshold"] = res.data["threshold"]
        for n, vals in res.data["models"].items():
            for key in ("update_norm", "fraction_updated"):
                if key in vals:
                    out["models"][n].setdefault(key, []).append(vals[key])
        for p, vals in res.data["pairs"].items():
            for key in ("conflict_norm",):
                if key in vals:
                    out["pairs"][p].setdefault(key, []).append(vals[key])
        if progress:
            progress("steps", i + 1, len(common))
    return out
