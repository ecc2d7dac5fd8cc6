"""The run config of ``rlm conflicts`` (:class:`ConflictsConfig`) and its constants.

Used by the engines (:mod:`rlm.core.conflicts.engine`, ``eager``, ``fused``), by ``rlm conflicts``
(:mod:`rlm.core.cli.conflicts`) and by the study's conflicts steps. Imports nothing heavy: the command line
loads it to validate flags.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from rlm.core.contracts import PluginConfig

DEFAULT_KEPT_RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TOPK_MODES = ("global", "per_tensor")


def default_metrics() -> list[str]:
    """The metric plugins that declare themselves default (``Metric.default``), in the registry's order."""
    from rlm.core.plugins import registry

    return registry("metric").defaults()


class ConflictsConfig(PluginConfig):
    """Run config of ``rlm conflicts`` (``--config FILE``, ``--set key=value``)."""

    metrics: list[str] = Field(default_factory=default_metrics,
                               description="Metric plugins to compute, by registered name (default: the metrics "
                                           "that declare themselves default).")
    metric: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                              description="Per-metric config, e.g. metric.fraction_updated.threshold.")
    kept_rates: list[float] = Field(default_factory=lambda: list(DEFAULT_KEPT_RATES),
                                    description="Grid of kept rates k for the top-k statistics.")
    topk_modes: list[Literal["global", "per_tensor"]] = Field(
        default_factory=lambda: list(TOPK_MODES),
        description="Top-k scopes to compute; the first one is reported as 'rate'.")
    threshold_bits: int = Field(20, ge=9, le=24, description="Float32 bits kept when binning |τ| for top-k.")
    chunk_elements: int = Field(1 << 18, ge=1, description="Elements per model processed at once.")
    delta_dtype: Literal["auto", "float64", "float32"] = Field(
        "auto", description="dtype of τ: 'auto' forms τ in float32 when base and model are bf16/fp16 (exact but "
                            "for values 2^15 apart) and in float64 otherwise; sums are float64 in every case.")
    check_finite: bool = True
    engine: Literal["auto", "fused", "eager"] = Field(
        "auto", description="'fused': compiled kernels that read bf16/float32 safetensors straight from the files and "
                            "compute every sum of a block in one loop per model and pair, tensors spread over "
                            "`workers` threads; 'eager': torch, block by block, for any input; 'auto': fused "
                            "where it applies (every input a safetensors model, each tensor bf16 or float32 in all of them, every metric fed by the "
                            "engine's sums, the extension built), else eager.")
    workers: int | None = Field(None, ge=1, description="Threads of the fused engine (None: the CPUs this "
                                                        "process may use).")
    fused_block_elements: int = Field(1 << 22, ge=1, description="Elements per model the fused engine hands "
                                                                 "to one kernel call.")
    threads: int | None = Field(1, ge=1, description="torch intra-op threads of the eager engine (None: leave "
                                                     "torch's setting); 1 is fastest on a shared machine.")

    @field_validator("kept_rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one kept rate is needed")
        if any(not (0.0 < k <= 1.0) for k in v):
            raise ValueError("kept rates must lie in (0, 1]")
        return sorted(set(float(k) for k in v))

    @field_validator("topk_modes")
    @classmethod
    def _modes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one top-k mode is needed")
        return list(dict.fromkeys(v))
