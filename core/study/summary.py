"""``report/summary.json``, the study's results in one machine-readable file, and the facts about saved
weights the report states (:func:`saved_weights`).

Shape (keys may be added, never renamed; ``null`` where a value is undefined, e.g. a relative change against
an unmerged score of 0 or an interval without per-example scores)::

    {"preset": str, "elapsed_s": float,
     "start":   {TASK: {"score": float, "n": int}},
     "experts": {GROUP: {TASK: {"score": float, "n": int, "delta_vs_start": float, "delta_ci": [lo, hi]}}},
     "table1":  {GROUP: {METHOD: {TASK: {"score": float, "relative_change": float, "ci": [lo, hi]}}}},
     "table2":  {"GROUP/TASK": {"update_norm": float, "fraction_updated": float}}}

Scores are fractions in [0, 1] (the report's tables show them × ``report.scale``); ``delta_vs_start`` and its
``delta_ci`` are in score units; Table 1's ``relative_change`` and its ``ci`` are in percent, as in Table 1
(``units`` says so in the file). ``elapsed_s`` is the sum of the seconds every step the report depends on took
when it ran (each step's ``step.json``; a rerun that reuses finished steps reports the same sum). Table 2's
``update_norm`` and ``fraction_updated`` are the conflicts step's, on the saved checkpoints; each entry also has
``saved_dtype`` and, from the expert's training run, the master weights' statistics. Added keys: ``units``,
``precision`` (saved dtypes of θ0 and the experts), ``table1_average``, ``bootstrap``, ``steps``,
``cpu_numerics`` (the study's ``cpu_capability``, torch's kernel capabilities and the CPUs that trained the
experts: the same seeds give the same numbers only on the same code paths), ``decoding`` (``{"temperature":
0.0}`` for greedy evaluation, else the temperature, top_p, samples per example ``n`` and seed); ``start``
entries add ``n_prompts`` (the different prompts among the ``n`` examples; the bootstrap draws prompts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

SUMMARY_FILE = "summary.json"
UNITS = {"score": "fraction in [0, 1]", "delta_vs_start": "score units: expert score - θ0 score",
         "delta_ci": "score units", "relative_change": "percent: (merged - unmerged) / unmerged * 100",
         "ci": "percent, as relative_change", "update_norm": "L2 norm of τ = θ_expert - θ0 as saved",
         "fraction_updated": "fraction in [0, 1] of the parameters with |τ| above the threshold"}


def weights_dtype(model_dir: str | Path) -> str | None:
    """The dtype of the floating-point weights stored in ``model_dir`` (a LoRA output: its merged model;
    ``"mixed: a, b"`` when they differ; None when the directory cannot be read as a model)."""
    from rlm.core.errors import RlmError
    from rlm.core.models.reader import ModelReader, full_model_dir, is_float

    try:  # a LoRA run's final/ holds the merged model in merged/
        with ModelReader(full_model_dir(Path(model_dir)), check_config=False) as reader:
            names = {str(reader.dtype(n)).removeprefix("torch.") for n in reader.tensor_names()
                     if is_float(reader.dtype(n))}
    except (RlmError, OSError, ValueError):  # an adapter-only or foreign directory: the report says "unknown"
        return None
    if not names:
        return None
    return names.pop() if len(names) == 1 else "mixed: " + ", ".join(sorted(names))


def run_precision(run_dir: Path) -> dict[str, Any]:
    """``precision``, ``master_dtype``, ``compute_dtype`` and ``save_dtype`` of a training run (its manifest;
    empty when absent)."""
    try:
        data = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: data[k] for k in ("precision", "master_dtype", "compute_dtype", "save_dtype", "cpu_numerics")
            if k in data}


def cpu_numerics_summary(capability: str | None, experts: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json's ``cpu_numerics``: the study's ``cpu_capability`` and, from the experts' run manifests,
    the kernel capabilities torch used and the CPU models that trained them (sorted, distinct)."""
    runs = [e["cpu_numerics"] for e in experts.values() if isinstance(e.get("cpu_numerics"), dict)]
    return {"cpu_capability": capability,
            "torch_capability": sorted({r["torch_capability"] for r in runs if r.get("torch_capability")}),
            "cpu": sorted({r["cpu"] for r in runs if r.get("cpu")})}


def steps_seconds(run_dir: Path, dirs: list[Path]) -> tuple[float, int]:
    """(sum of ``seconds``, number of steps) over the step directories ``dirs`` and all their ancestors, read
    from each ``step.json`` (whose ``inputs`` name the dependencies' directories)."""
    seen: dict[Path, float] = {}
    stack = list(dirs)
    while stack:
        d = stack.pop()
        d = d if d.is_absolute() else run_dir / d
        if d in seen:
            continue
        try:
            rec = json.loads((d / "step.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            seen[d] = 0.0
            continue
        seen[d] = float(rec.get("seconds") or 0.0)
        stack += [Path(i["dir"]) for i in (rec.get("inputs") or {}).values() if i.get("dir")]
    return sum(seen.values()), len(seen)


def saved_weights(start: tuple[str, Path] | None, experts: Mapping[str, Any]) -> dict[str, Any]:
    """What the report states about the saved weights: ``{"start": {"step", "dtype"}, "experts": {"GROUP/TASK"
    or "GROUP/TASK/sSEED": {"dtype", "precision", "master_dtype", ..., "final_metrics"}}}``, from θ0's step
    (name, model directory) and ``experts`` (the same key -> (model directory, run directory or None, the run's
    last metrics or None))."""
    out: dict[str, Any] = {"start": None, "experts": {}}
    if start is not None:
        out["start"] = {"step": start[0], "dtype": weights_dtype(start[1])}
    for key, (model_dir, run_dir, final) in experts.items():
        entry = {"dtype": weights_dtype(model_dir), **(run_precision(run_dir) if run_dir else {})}
        entry["final_metrics"] = {k: (final or {}).get(k) for k in ("delta_norm", "changed_frac",
                                                                    "saved_changed_frac")}
        out["experts"][key] = entry
    return out


def _pair(lo: Any, hi: Any) -> list[float] | None:
    return None if lo is None or hi is None else [float(lo), float(hi)]


def table1_part(t1: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``table1``: group -> method -> task -> cell, ``table1_average``: group -> method -> the Average cell)
    from a :class:`rlm.core.study.tables.Table1`."""
    from rlm.core.study.tables import AVERAGE

    cells: dict[str, Any] = {}
    average: dict[str, Any] = {}
    for (g, m, t), c in t1.cells.items():
        if c.score is None:
            continue
        entry = {"score": c.score, "relative_change": c.rel_change, "ci": _pair(c.ci_low, c.ci_high),
                 "unmerged": c.unmerged, "n": c.n_examples, "partners": list(c.partners)}
        target = average if t == AVERAGE else cells
        target.setdefault(g, {}).setdefault(m, {})[t if t != AVERAGE else "Average"] = entry
    return cells, {g: {m: v["Average"] for m, v in ms.items()} for g, ms in average.items()}


def decoding_text(decoding: Mapping[str, Any] | None) -> str:
    """How the evaluation generated, in words: ``greedy`` or ``sampled at temperature 0.7, top-p 1, 2 samples
    per example, an example scoring their mean (pass@1 estimated from samples); seed 0 for every model``."""
    if not decoding or not float(decoding.get("temperature", 0.0)):
        return "greedy"
    n = int(decoding.get("n", 1))
    return (f"sampled at temperature {float(decoding['temperature']):g}, top-p {float(decoding.get('top_p', 1.0)):g}, "
            + (f"{n} samples per example, an example scoring their mean" if n > 1 else "1 sample per example")
            + f" (pass@1 estimated from samples); seed {decoding.get('seed', 0)} for every model")


def build_summary(*, preset: str, elapsed_s: float, steps: int, start: Mapping[str, Any],
                  experts: Mapping[str, Mapping[str, Any]], t1: Any, table2: Mapping[str, Any],
                  precision: Mapping[str, Any], bootstrap: Mapping[str, Any],
                  cpu: Mapping[str, Any] | None = None, decoding: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary (the module docstring's shape). ``start``: task -> Score; ``experts``: group -> task ->
    ``{"score", "n", "delta", "ci_low", "ci_high", "paired"}``; ``t1``: the Table1 (or None); ``table2``:
    "GROUP/TASK" -> its entry."""
    from rlm.core.study.tables import _json_safe

    table1, table1_average = table1_part(t1) if t1 is not None else ({}, {})
    return _json_safe({
        "preset": preset, "elapsed_s": round(float(elapsed_s), 3), "steps": steps, "units": UNITS,
        "precision": dict(precision), "bootstrap": dict(bootstrap), "cpu_numerics": dict(cpu or {}),
        "decoding": dict(decoding or {"temperature": 0.0}),
        "start": {t: {"score": s.value, "n": s.n, **({} if s.n_prompts is None else {"n_prompts": s.n_prompts})}
                  for t, s in start.items()},
        "experts": {g: {t: {"score": e["score"], "n": e["n"], "delta_vs_start": e.get("delta"),
                            "delta_ci": _pair(e.get("ci_low"), e.get("ci_high")), "paired": e.get("paired")}
                        for t, e in tasks.items()} for g, tasks in experts.items()},
        "table1": table1, "table1_average": table1_average, "table2": dict(table2)})
