"""Streaming task-vector statistics (``rlm conflicts``): :func:`compute_conflicts` chooses the engine, runs
it over the inputs and assembles the metrics' results into ``conflicts.json``'s data (:class:`ConflictsResult`).

Task vectors are ``τ_m = θ_m − θ_base`` for every model ``m``. Two engines feed the metric plugins
(:class:`rlm.core.contracts.Metric`) with the same statistics: the eager torch engine
(:mod:`rlm.core.conflicts.eager`, any input) and the fused engine (:mod:`rlm.core.conflicts.fused`, compiled
kernels for bf16/float32 safetensors). Every statistic is a sum over positions accumulated in float64 (counts
in int64), so blocks and tensors can come in any order and memory is bounded by one block per model, whatever
the model size. The definitions (top-k masks, magnitude bins, sign-conflict rates) are in
:mod:`rlm.core.conflicts.stats`. This is the only module that imports both engines.

Used by ``rlm conflicts`` (:mod:`rlm.core.cli.conflicts`), :mod:`rlm.core.conflicts.over_steps` and the
study's conflicts steps.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.passes import Progress
from rlm.core.conflicts.stats import pair_key
from rlm.core.errors import RlmError


@dataclass
class ConflictsResult:
    """What :func:`compute_conflicts` returns: the JSON-ready ``data`` plus facts for the manifest."""

    data: dict[str, Any]
    config: ConflictsConfig
    models: dict[str, str]
    base: str
    stats: dict[str, Any] = field(default_factory=dict)


def build_metrics(config: ConflictsConfig) -> list[Any]:
    """Instantiate the configured metric plugins through the plugin registry."""
    from rlm.core.config import validate
    from rlm.core.plugins import get_plugin

    unknown_cfg = [n for n in config.metric if n not in config.metrics]
    if unknown_cfg:
        raise RlmError(f"config for metric {unknown_cfg[0]!r}, which is not among the metrics to compute "
                       f"({', '.join(config.metrics)})")
    out = []
    for name in dict.fromkeys(config.metrics):
        cls = get_plugin("metric", name)
        cfg = validate(cls.Config, config.metric.get(name, {}), f"config of metric {name!r}")
        out.append(cls(cfg))
    return out


def _pair_metric_names(metrics: Sequence[Any]) -> list[str]:
    return [m.name for m in metrics if m.scope == "pair"]


def _check_names(names: Sequence[str], metrics: Sequence[Any]) -> None:
    if not names:
        raise RlmError("no models given: pass at least one model (two or more for pair statistics)")
    bad = [n for n in names if not n or "|" in n or "=" in n or "," in n]
    if bad:
        raise RlmError(f"model name {bad[0]!r} is not allowed (names must be non-empty, without '|', '=' or ',')")
    pair_metrics = _pair_metric_names(metrics)
    if pair_metrics and len(names) < 2:
        raise RlmError(f"pair statistics ({', '.join(pair_metrics)}) need at least two models, got one "
                       f"({names[0]}); add a model or choose per-model metrics only "
                       f"(--metrics update_norm,fraction_updated)")


def histogram_bits(config: ConflictsConfig, metrics: Sequence[Any], modes: Sequence[str]) -> int:
    """Bits of the magnitude bins the engines histogram: ``threshold_bits`` for top-k; without top-k only the
    metrics' histograms are wanted, binned as coarsely as they allow (cache-resident), at least 9 bits."""
    bits = config.threshold_bits
    hist_metrics = [m for m in metrics if not m.needs_topk and m.histogram_bits is not None]
    wanted = bits if modes else max([int(m.histogram_bits) for m in hist_metrics] or [bits])
    return min(max(wanted, 9), bits)


def compute_conflicts(base: str | Path, models: Mapping[str, str | Path], config: ConflictsConfig | None = None,
                      *, metrics: Sequence[Any] | None = None, progress: Progress | None = None
                      ) -> ConflictsResult:
    """Stream ``base`` and ``models`` (name -> HF directory or LoRA adapter) and compute the statistics.

    ``progress(phase, done, total)`` is called after each tensor (phase ``histogram`` or ``statistics``).
    Raises :class:`RlmError` (ModelError) for bad input, naming the model and tensor."""
    import torch

    from rlm.core.models.lora import open_source
    from rlm.core.models.reader import ModelReader

    config = config or ConflictsConfig()
    if config.threads is not None and config.threads != torch.get_num_threads():
        previous = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            return compute_conflicts(base, models, config, metrics=metrics, progress=progress)
        finally:
            torch.set_num_threads(previous)
    metrics = list(metrics) if metrics is not None else build_metrics(config)
    names = list(models)
    _check_names(names, metrics)
    base_reader = ModelReader(base)
    readers = {n: open_source(p, base=base_reader) for n, p in models.items()}
    try:
        return _run_engine(base, models, config, metrics, base_reader, readers, progress)
    finally:
        for reader in (*readers.values(), base_reader):
            reader.close()


def _run_engine(base: str | Path, models: Mapping[str, str | Path], config: ConflictsConfig, metrics: list[Any],
                base_reader: Any, readers: dict[str, Any], progress: Progress | None) -> ConflictsResult:
    """Validate the inputs, run the chosen engine and assemble the result (the readers stay open)."""
    from rlm.core.models.validate import validate_models

    plan = validate_models(base_reader, list(readers.values()), vocab="error")
    tensors = [t for t in plan.tensors if str(t.dtype).replace("torch.", "").startswith(("float", "bfloat"))]
    if not tensors:
        raise RlmError(f"base model {base} holds no floating-point tensors")
    total = sum(t.numel for t in tensors)
    modes = list(config.topk_modes) if any(m.needs_topk for m in metrics) else []
    hist_bits = histogram_bits(config, metrics, modes)
    reason = None
    if config.engine != "eager":
        from rlm.core.conflicts.fused import unavailable_reason

        reason = unavailable_reason(config, metrics, base_reader, readers, tensors, hist_bits)
        if reason is not None and config.engine == "fused":
            raise RlmError(f"engine 'fused' cannot run these inputs: {reason}")
    args = (config, metrics, base_reader, readers, tensors)
    options = {"modes": modes, "hist_bits": hist_bits, "total": total}
    if config.engine != "eager" and reason is None:
        from rlm.core.conflicts.fused import FusedPass

        runner: Any = FusedPass(*args, **options)
        engine = "fused"
    else:
        from rlm.core.conflicts.eager import EagerPass

        runner = EagerPass(*args, **options)
        engine = "eager"
    kept_actual, passes = runner.run(progress)
    zero = runner.zero_models()
    for n in zero:
        print(f"warning: model {n} ({readers[n].path}): its task vector is all zero (identical to the base "
              f"{base})", file=sys.stderr)
    data = assemble_data(config, metrics, list(readers), total, modes, kept_actual)
    stats = {"tensors": len(tensors), "parameters": total, "passes": passes, "engine": engine,
             "zero_task_vectors": zero}
    if reason is not None and config.engine == "auto":
        stats["eager_because"] = reason
    return ConflictsResult(data=_json_clean(data), config=config, models={k: str(v) for k, v in models.items()},
                           base=str(base), stats=stats)


def _threshold(metrics: Sequence[Any]) -> float | None:
    """``conflicts.json``'s top-level ``threshold``: the |τ| threshold of the first metric that ran with a
    ``threshold`` config field (among the built-ins, ``fraction_updated``), else ``None``."""
    for m in metrics:
        cfg = getattr(m, "config", None)  # None: a metric that skipped Plugin.__init__
        if cfg is not None and "threshold" in type(cfg).model_fields:
            return float(cfg.threshold)
    return None


def assemble_data(config: ConflictsConfig, metrics: Sequence[Any], names: Sequence[str], total: int,
                  modes: Sequence[str], kept_actual: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``conflicts.json``'s data: every metric's result merged per model and per pair (in the order the
    metrics ran), each model's parameter count and, with top-k metrics, the kept fractions actually used."""
    data: dict[str, Any] = {"threshold": _threshold(metrics), "models": {n: {} for n in names},
                            "pairs": {pair_key(a, b): {} for a, b in itertools.combinations(names, 2)}
                            if _pair_metric_names(metrics) else {}}
    for m in metrics:
        res = m.result()
        for n, vals in res.get("models", {}).items():
            data["models"][n].update(vals)
        for p, vals in res.get("pairs", {}).items():
            data["pairs"][p].update(vals)
    for n in names:
        data["models"][n]["num_params"] = total
        if modes:
            data["models"][n]["kept_fraction"] = {
                "kept_rate": list(config.kept_rates),
                **{mode: [int(c) / total for c in kept_actual[mode][n]] for mode in modes}}
    return data


def _json_clean(x: Any) -> Any:
    """NaN/Inf become None so the JSON is standard; tuples become lists."""
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
