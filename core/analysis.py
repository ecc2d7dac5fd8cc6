"""Streaming task-vector statistics (``rlm conflicts``): the engine that drives Metric plugins.

Task vectors are ``τ_m = θ_m − θ_base`` for every model ``m``. The engine reads the base and every model one
tensor at a time (in blocks of rows for large tensors) through :mod:`rlm.core.safetensors_io`, forms τ in
float64 (``delta_dtype``), and hands each block to every metric as a :class:`Chunk`, which caches the derived
quantities that several metrics share (|τ|, magnitude bins, top-k levels, sign conflicts). Every statistic is
a sum over positions, accumulated in float64 (counts in int64), so blocks and tensors can come in any order
and memory is bounded by one block per model, whatever the model size.

Top-k masks ("keep each model's top-k fraction by |τ|", used by ``sign_conflict`` and ``topk_overlap``):

* ``n_keep(k, N) = max(1, floor(k·N + 1/2))`` where ``N`` counts every parameter of the scope (all parameters
  for ``global``, the tensor for ``per_tensor``), zeros included.
* Magnitudes are binned by the top ``threshold_bits`` bits of their float32 bit pattern (monotone in |τ|;
  the default 20 bits keep 11 mantissa bits, bins 2^-11 ≈ 0.05 % wide in relative terms). The threshold bin
  of ``k`` is the bin holding the ``n_keep``-th largest |τ|; a position is kept when its bin is at or above
  the threshold bin and above bin 0 (zeros, and |τ| below about 6e-42, are never kept). So exact ties are
  always kept together, and the kept set can exceed ``n_keep`` only by positions within one bin (relative
  2^-11) of the exact threshold: the kept fraction actually used is reported per model (``kept_fraction``).
  Global thresholds need the whole model, so the engine runs one histogram pre-pass over all tensors first
  (only when a top-k metric is requested; it yields the per-tensor thresholds too); per-tensor thresholds
  alone need only a histogram sweep over each tensor before its statistics.
* Sign-conflict rate at ``k``: among positions kept by both models, the fraction with opposite signs
  (denominator = |K_a(k) ∩ K_b(k)|; ``null`` when that set is empty).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import Field, field_validator

from .contracts import PluginConfig
from .errors import RlmError

DEFAULT_KEPT_RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ALL_METRICS = ("update_norm", "fraction_updated", "conflict_norm", "cosine", "sign_conflict", "topk_overlap")
TOPK_MODES = ("global", "per_tensor")


class ConflictsConfig(PluginConfig):
    """Run config of ``rlm conflicts`` (``--config FILE``, ``--set key=value``)."""

    metrics: list[str] = Field(default_factory=lambda: list(ALL_METRICS),
                               description="Metric plugins to compute, by registered name.")
    metric: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                              description="Per-metric config, e.g. metric.fraction_updated.threshold.")
    kept_rates: list[float] = Field(default_factory=lambda: list(DEFAULT_KEPT_RATES),
                                    description="Grid of kept rates k for the top-k statistics.")
    topk_modes: list[Literal["global", "per_tensor"]] = Field(
        default_factory=lambda: ["global", "per_tensor"],
        description="Top-k scopes to compute; the first one is reported as 'rate'.")
    threshold_bits: int = Field(20, ge=9, le=24, description="Float32 bits kept when binning |τ| for top-k.")
    chunk_elements: int = Field(1 << 18, ge=1, description="Elements per model processed at once.")
    delta_dtype: Literal["float64", "float32"] = "float64"
    check_finite: bool = True
    threads: int | None = Field(1, ge=1, description="torch intra-op threads while computing (None: leave "
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


def _torch():
    import torch

    return torch


# ------------------------------------------------------------------------------------------------------
# pure statistics: tensors in, float64 / int64 sums out
# ------------------------------------------------------------------------------------------------------

def sum_squares(x: Any) -> float:
    """Σ x² accumulated in float64."""
    torch = _torch()
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64)) ** 2


def dot(a: Any, b: Any) -> float:
    """Σ a·b accumulated in float64."""
    torch = _torch()
    return float(torch.dot(a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)))


def conflict_mask(a: Any, b: Any) -> Any:
    """Positions where a and b are both non-zero with opposite signs (a·b < 0, without underflow)."""
    torch = _torch()
    return (torch.signbit(a) ^ torch.signbit(b)) & (a != 0) & (b != 0)


def conflict_sum_squares(a: Any, b: Any, mask: Any = None) -> float:
    """Σ (a·b)² over positions with a·b < 0 (the square of the paper's conflict norm, Eq. 10), in float64."""
    torch = _torch()
    if mask is None:
        mask = conflict_mask(a, b)
    p = a.reshape(-1)[mask.reshape(-1)].to(torch.float64) * b.reshape(-1)[mask.reshape(-1)].to(torch.float64)
    return float(torch.dot(p, p))


def count_above(x: Any, threshold: float) -> int:
    """Number of positions with |x| > threshold."""
    return int(_torch().count_nonzero(x.abs() > threshold))


def magnitude_bins(x: Any, bits: int) -> Any:
    """Bin index of |x|: the top ``bits`` bits of the float32 bit pattern of |x| (the sign bit is 0), an int32
    tensor in ``[0, 2**(bits-1))`` that is monotone non-decreasing in |x|. Bin 0 holds zero (and float32
    magnitudes below 2**(bits-157), about 6e-42 at 20 bits)."""
    torch = _torch()
    return (x.reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF) >> (32 - bits)


def n_bins(bits: int) -> int:
    return 1 << (bits - 1)


def bin_histogram(bins: Any, bits: int) -> Any:
    return _torch().bincount(bins, minlength=n_bins(bits))


def octave_histogram(x: Any, sub_bits: int = 2) -> Any:
    """Histogram of float32 |x| with ``2**sub_bits`` bins per power of two, read off the exponent and top
    mantissa bits (exact float32 intervals ``[2**e (1 + j/2**sub_bits), 2**e (1 + (j+1)/2**sub_bits))``);
    bin 0 holds zeros (and the smallest float32 subnormals). Returns int64 counts of length
    ``255 * 2**sub_bits + 1``."""
    torch = _torch()
    codes = (x.reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF) >> (23 - sub_bits)
    return torch.bincount(codes, minlength=octave_bins(sub_bits))


def octave_bins(sub_bits: int) -> int:
    return (255 << sub_bits) + 1


def octave_edges_log10(sub_bits: int) -> Any:
    """log10 of the lower edge of every bin of :func:`octave_histogram`, plus the upper edge of the last
    (bin 0: -inf)."""
    torch = _torch()
    codes = (torch.arange(octave_bins(sub_bits) + 1, dtype=torch.int64) << (23 - sub_bits)).to(torch.int32)
    return torch.log10(codes.view(torch.float32).to(torch.float64))


def n_keep(k: float, total: int) -> int:
    """Number of positions a kept rate ``k`` asks for out of ``total`` (at least one)."""
    return max(1, int(math.floor(k * total + 0.5)))


def threshold_bins(hist: Any, total: int, kept_rates: Sequence[float]) -> Any:
    """For each k, the bin holding the ``n_keep(k, total)``-th largest magnitude (0 when it falls among the
    zeros); non-increasing in k. ``hist`` counts every position, zeros included."""
    torch = _torch()
    # at_or_above[j] = #positions in bins >= (nbins - 1 - j): non-decreasing in j
    at_or_above = torch.cumsum(torch.flip(hist.to(torch.int64), [0]), 0)
    need = torch.tensor([n_keep(k, total) for k in kept_rates], dtype=torch.int64)
    # the threshold bin is the largest b with #positions in bins >= b reaching n_keep
    j = torch.searchsorted(at_or_above, need, right=False)
    return (len(hist) - 1 - j).clamp_(min=0)


def first_kept_table(thresholds: Any, bits: int) -> Any:
    """Lookup table bin -> index of the first grid point at which that bin is kept (``len(thresholds)`` when
    never): kept at g iff bin >= thresholds[g] and bin > 0 (zeros are never kept)."""
    torch = _torch()
    g = len(thresholds)
    marks = torch.zeros(n_bins(bits), dtype=torch.int32)
    marks.index_add_(0, thresholds.to(torch.int64), torch.ones(g, dtype=torch.int32))
    table = g - torch.cumsum(marks, 0, dtype=torch.int32)  # g - #{g': thresholds[g'] <= bin}
    table[0] = g
    return table


def first_kept(bins: Any, thresholds: Any, bits: int, table: Any = None) -> Any:
    """Index of the first grid point at which each position is kept (int32; ``len(thresholds)`` = never).
    Small blocks use a binary search, large ones the lookup table of :func:`first_kept_table`."""
    torch = _torch()
    if table is None and bins.numel() * 4 < n_bins(bits):
        g = len(thresholds)
        asc = torch.flip(thresholds, [0]).to(torch.int32).contiguous()
        first = (g - torch.searchsorted(asc, bins, right=True)).to(torch.int32)
        return first.masked_fill_(bins == 0, g)
    if table is None:
        table = first_kept_table(thresholds, bits)
    return table[bins]


class Thresholds:
    """Threshold bins of one model (and scope) for every kept rate, with a lazily built lookup table."""

    def __init__(self, bins: Any, bits: int) -> None:
        self.bins = bins
        self.bits = bits
        self._table: Any = None

    def first_kept(self, block_bins: Any) -> Any:
        if self._table is None and block_bins.numel() * 4 >= n_bins(self.bits):
            self._table = first_kept_table(self.bins, self.bits)
        return first_kept(block_bins, self.bins, self.bits, self._table)


def kept_counts(first: Any, g: int) -> Any:
    """Number of kept positions at each grid point (int64, length g)."""
    torch = _torch()
    return torch.cumsum(torch.bincount(first, minlength=g + 1)[:g], 0)


def pair_counts(first_a: Any, first_b: Any, conflict: Any, g: int) -> tuple[Any, Any, Any]:
    """``(both, union, conflicts)`` at each grid point: positions kept by both models, by either, and those
    kept by both whose signs are opposite (one bincount over (max, min, conflict) codes)."""
    torch = _torch()
    hi = torch.maximum(first_a, first_b)
    lo = torch.minimum(first_a, first_b)
    code = (hi * (g + 1) + lo) * 2 + conflict.reshape(-1).to(hi.dtype)
    c = torch.bincount(code, minlength=2 * (g + 1) ** 2).reshape(g + 1, g + 1, 2)
    both = torch.cumsum(c.sum(dim=(1, 2))[:g], 0)
    union = torch.cumsum(c.sum(dim=(0, 2))[:g], 0)
    conf = torch.cumsum(c[:, :, 1].sum(dim=1)[:g], 0)
    return both, union, conf


def kept_from_histogram(hist: Any, thresholds: Any) -> Any:
    """Kept positions at each grid point from a magnitude-bin histogram: bins >= threshold, bin 0 excluded."""
    torch = _torch()
    from_top = torch.flip(torch.cumsum(torch.flip(hist.to(torch.int64), [0]), 0), [0])
    from_top = torch.cat([from_top, torch.zeros(1, dtype=torch.int64)])
    return from_top[thresholds.clamp(min=1)]


def safe_ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


# ------------------------------------------------------------------------------------------------------
# name helpers for the breakdowns
# ------------------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> str:
    """Layer index of a tensor name (``model.layers.3.mlp.up_proj.weight`` -> ``3``), else the module name
    (``model.embed_tokens``, ``lm_head``, ``model.norm``)."""
    m = _LAYER_RE.search(name)
    if m:
        return m.group(1)
    return re.sub(r"\.(weight|bias)$", "", name)


def module_type_of(name: str) -> str:
    """Module type of a tensor name (``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj``)."""
    m = _LAYER_RE.search(name)
    rest = name[m.end():] if m else re.sub(r"^model\.", "", name)
    return re.sub(r"\.(weight|bias)$", "", rest)


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


# ------------------------------------------------------------------------------------------------------
# the chunk handed to metrics
# ------------------------------------------------------------------------------------------------------

class Chunk:
    """A block of one tensor for every model: ``deltas[name]`` is the flat τ block. Derived quantities are
    computed once and shared by every metric that asks for them."""

    def __init__(self, tensor_name: str, deltas: dict[str, Any], *, numel: int,
                 kept_rates: Sequence[float] = DEFAULT_KEPT_RATES, bits: int = 20,
                 thresholds: Mapping[str, Mapping[str, Any]] | None = None,
                 modes: Sequence[str] | None = None) -> None:
        self.tensor_name = tensor_name
        self.deltas = deltas
        self.names = list(deltas)
        self.pairs = list(itertools.combinations(self.names, 2))
        self.numel = numel  # elements of the whole tensor (the block may be smaller)
        self.kept_rates = list(kept_rates)
        self.bits = bits
        self.thresholds = dict(thresholds or {})  # mode -> model -> threshold bins
        self.modes = list(modes) if modes is not None else list(self.thresholds)  # first = reported mode
        self._cache: dict[tuple, Any] = {}

    def _cached(self, key: tuple, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def sum_squares(self, name: str) -> float:
        return self._cached(("ss", name), lambda: sum_squares(self.deltas[name]))

    def product(self, a: str, b: str) -> Any:
        """τ_a ⊙ τ_b in float64 (no underflow for float32/bf16 inputs)."""
        torch = _torch()
        return self._cached(("prod", a, b), lambda: self.deltas[a].to(torch.float64) * self.deltas[b].to(torch.float64))

    def dot(self, a: str, b: str) -> float:
        return self._cached(("dot", a, b), lambda: float(self.product(a, b).sum()))

    def conflict(self, a: str, b: str) -> Any:
        """τ_a ⊙ τ_b < 0 (from the float64 product: no float32 underflow)."""
        return self._cached(("conflict", a, b), lambda: self.product(a, b) < 0)

    def conflict_sum_squares(self, a: str, b: str) -> float:
        def compute() -> float:
            torch = _torch()
            w = torch.where(self.conflict(a, b), self.product(a, b), 0.0)
            return float(torch.dot(w, w))

        return self._cached(("css", a, b), compute)

    def bins(self, name: str) -> Any:
        return self._cached(("bins", name), lambda: magnitude_bins(self.deltas[name], self.bits))

    def bin_histogram(self, name: str) -> Any:
        return self._cached(("hist", name), lambda: bin_histogram(self.bins(name), self.bits))

    def first_kept(self, name: str, mode: str) -> Any:
        def compute() -> Any:
            thr = self.thresholds.get(mode, {}).get(name)
            if thr is None:
                raise RlmError(f"top-k mode {mode!r} has no thresholds for model {name} (the engine computes "
                               f"only the modes in topk_modes)")
            if not isinstance(thr, Thresholds):
                thr = Thresholds(thr, self.bits)
            return thr.first_kept(self.bins(name))

        return self._cached(("first", name, mode), compute)

    def kept_counts(self, name: str, mode: str) -> Any:
        return self._cached(("kept", name, mode), lambda: kept_counts(self.first_kept(name, mode),
                                                                      len(self.kept_rates)))

    def pair_counts(self, a: str, b: str, mode: str) -> tuple[Any, Any, Any]:
        """``(both, union, conflicts)`` of this block (see :func:`pair_counts`)."""
        return self._cached(("pair", a, b, mode), lambda: pair_counts(
            self.first_kept(a, mode), self.first_kept(b, mode), self.conflict(a, b), len(self.kept_rates)))


# ------------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------------

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
    from .config import validate
    from .plugins import get_plugin

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


def _needs_pairs(metrics: Sequence[Any]) -> list[str]:
    return [m.name for m in metrics if getattr(m, "scope", "model") == "pair"]


def compute_conflicts(base: str | Path, models: Mapping[str, str | Path], config: ConflictsConfig | None = None,
                      *, metrics: Sequence[Any] | None = None, progress: Callable[[str, int, int], None] | None = None
                      ) -> ConflictsResult:
    """Stream ``base`` and ``models`` (name -> HF directory or LoRA adapter) and compute the statistics.

    ``progress(phase, done, total)`` is called after each tensor (phase ``histogram`` or ``statistics``).
    Raises :class:`RlmError` (ModelError) for bad input, naming the model and tensor."""
    from .errors import ModelError
    from .safetensors_io import ModelReader, check_finite, open_source, validate_models

    torch = _torch()
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
    if not names:
        raise RlmError("no models given: pass at least one model (two or more for pair statistics)")
    bad = [n for n in names if not n or "|" in n or "=" in n or "," in n]
    if bad:
        raise RlmError(f"model name {bad[0]!r} is not allowed (names must be non-empty, without '|', '=' or ',')")
    pair_metrics = _needs_pairs(metrics)
    if pair_metrics and len(names) < 2:
        raise RlmError(f"pair statistics ({', '.join(pair_metrics)}) need at least two models, got one "
                       f"({names[0]}); add a model or choose per-model metrics only "
                       f"(--metrics update_norm,fraction_updated)")
    base_reader = ModelReader(base)
    readers = {n: open_source(p, base=base_reader) for n, p in models.items()}
    plan = validate_models(base_reader, list(readers.values()), vocab="error")
    tensors = [t for t in plan.tensors if str(t.dtype).replace("torch.", "").startswith(("float", "bfloat"))]
    if not tensors:
        raise RlmError(f"base model {base} holds no floating-point tensors")
    total = sum(t.numel for t in tensors)
    dtype = getattr(torch, config.delta_dtype)
    needs_topk = any(getattr(m, "needs_topk", False) for m in metrics)
    modes = list(config.topk_modes) if needs_topk else []
    bits = config.threshold_bits
    g = len(config.kept_rates)

    def blocks(t: Any) -> list[tuple[int, int] | None]:
        if not t.shape:
            return [None]
        row = max(1, t.numel // max(1, t.shape[0]))
        step = max(1, config.chunk_elements // row)
        return [(s, min(s + step, t.shape[0])) for s in range(0, t.shape[0], step)] or [None]

    # non-finite values are checked in whichever pass reads the data first
    check_pass = "global" if "global" in modes else ("per_tensor" if "per_tensor" in modes else "main")

    def read_block(t: Any, rows: tuple[int, int] | None, check: bool) -> dict[str, Any]:
        check = check and config.check_finite
        raw = base_reader.get(t.name, rows)
        b = raw.to(dtype)
        out = {}
        for n, r in readers.items():
            if isinstance(r, ModelReader):
                x = r.get(t.name, rows)
                d = x.to(dtype, copy=True)
                d -= b
            else:
                x = None
                d = r.delta(t.name, b.to(torch.float32), rows).to(dtype)
            if check and not math.isfinite(float(d.sum())):  # NaN/Inf anywhere in the block reaches the sum
                check_finite(raw, base_reader.path, t.name)
                check_finite(x if x is not None else d, r.path, t.name)
                raise ModelError(f"model {r.path}: tensor {t.name}: the task vector overflows")
            out[n] = d.reshape(-1)
        return out

    thresholds: dict[str, dict[str, Any]] = {}
    kept_actual: dict[str, dict[str, Any]] = {m: {n: torch.zeros(g, dtype=torch.int64) for n in names}
                                              for m in modes}
    per_tensor_thr: dict[str, dict[str, Thresholds]] = {}  # filled by the global pre-pass
    trim = _trim_heap()
    if "global" in modes:
        hists = {n: torch.zeros(n_bins(bits), dtype=torch.int64) for n in names}
        for i, t in enumerate(tensors):
            th: dict[str, Any] = {}
            for rows in blocks(t):
                deltas = read_block(t, rows, check_pass == "global")
                for n, d in deltas.items():
                    h = bin_histogram(magnitude_bins(d, bits), bits)
                    th[n] = h if n not in th else th[n] + h
            for n, h in th.items():
                hists[n] += h
            if "per_tensor" in modes:
                per_tensor_thr[t.name] = {}
                for n, h in th.items():
                    thr = threshold_bins(h, t.numel, config.kept_rates)
                    per_tensor_thr[t.name][n] = Thresholds(thr, bits)
                    kept_actual["per_tensor"][n] += kept_from_histogram(h, thr)
            if i % 16 == 15:
                trim()
            if progress:
                progress("histogram", i + 1, len(tensors))
        thresholds["global"] = {}
        for n, h in hists.items():
            thr = threshold_bins(h, total, config.kept_rates)
            thresholds["global"][n] = Thresholds(thr, bits)
            kept_actual["global"][n] += kept_from_histogram(h, thr)
        del hists

    def make_chunk(t: Any, deltas: dict[str, Any]) -> Chunk:
        return Chunk(t.name, deltas, numel=t.numel, kept_rates=config.kept_rates, bits=bits,
                     thresholds=thresholds, modes=modes)

    for i, t in enumerate(tensors):
        bl = blocks(t)
        first: Chunk | None = None
        if t.name in per_tensor_thr:
            thresholds["per_tensor"] = per_tensor_thr.pop(t.name)
        elif "per_tensor" in modes:
            t_hists: dict[str, Any] = {}
            for rows in bl:
                chunk = make_chunk(t, read_block(t, rows, check_pass == "per_tensor"))
                for n in names:
                    h = chunk.bin_histogram(n)
                    t_hists[n] = h if n not in t_hists else t_hists[n] + h
            thresholds["per_tensor"] = {}
            for n, h in t_hists.items():
                thr = threshold_bins(h, t.numel, config.kept_rates)
                thresholds["per_tensor"][n] = Thresholds(thr, bits)
                kept_actual["per_tensor"][n] += kept_from_histogram(h, thr)
            if len(bl) == 1:
                first = chunk  # one block: keep its τ and bins instead of reading it again
                first.thresholds = dict(thresholds)
        for rows in bl:
            chunk = first if first is not None else make_chunk(t, read_block(t, rows, check_pass == "main"))
            for m in metrics:
                m.update(t.name, chunk.deltas, context=chunk)
        if i % 16 == 15:
            trim()
        if progress:
            progress("statistics", i + 1, len(tensors))

    fu = next((m for m in metrics if m.name == "fraction_updated"), None)
    threshold = float(getattr(fu.config, "threshold")) if fu is not None else None
    data: dict[str, Any] = {"threshold": threshold, "models": {n: {} for n in names},
                            "pairs": {pair_key(a, b): {} for a, b in itertools.combinations(names, 2)}
                            if pair_metrics else {}}
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
    stats = {"tensors": len(tensors), "parameters": total, "passes": 1 + ("global" in modes)}
    return ConflictsResult(data=_json_clean(data), config=config, models={k: str(v) for k, v in models.items()},
                           base=str(base), stats=stats)


def _trim_heap() -> Callable[[], Any]:
    """``malloc_trim(0)`` where glibc provides it: many short-lived multi-MB blocks otherwise leave freed heap
    pages resident, so RSS would creep up with the number of tensors (a no-op elsewhere)."""
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6").malloc_trim
        return lambda: fn(0)
    except (OSError, AttributeError):
        return lambda: None


def _json_clean(x: Any) -> Any:
    """NaN/Inf become None so the JSON is standard; tuples become lists."""
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ------------------------------------------------------------------------------------------------------
# over training steps
# ------------------------------------------------------------------------------------------------------

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
    config = (config or ConflictsConfig()).model_copy()
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


# ------------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return str(x)


def markdown_report(data: Mapping[str, Any]) -> str:
    """The Markdown report: a Table-2-like model table, a pair table and the sign-conflict curves."""
    lines = ["# Task-conflict statistics", ""]
    thr = data.get("threshold")
    models = data.get("models", {})
    lines += ["## Models", "",
              f"| model | update norm ‖τ‖₂ | fraction updated (\\|τ\\| > {'–' if thr is None else f'{thr:g}'}) "
              f"| parameters |",
              "|---|---:|---:|---:|"]
    for n, v in models.items():
        fu = v.get("fraction_updated")
        lines.append(f"| {n} | {_fmt(v.get('update_norm'))} | "
                     f"{'–' if fu is None else f'{100 * fu:.2f} %'} | {v.get('num_params', '–')} |")
    pairs = data.get("pairs", {})
    if pairs:
        lines += ["", "## Pairs", "", "| pair | conflict norm | cosine |", "|---|---:|---:|"]
        for p, v in pairs.items():
            lines.append(f"| {p.replace('|', ' vs ')} | {_fmt(v.get('conflict_norm'))} | {_fmt(v.get('cosine'))} |")
        sc = {p: v["sign_conflict"] for p, v in pairs.items() if "sign_conflict" in v}
        if sc:
            first = next(iter(sc.values()))
            ks = first["kept_rate"]
            lines += ["", f"## Sign-conflict rate against kept rate (top-k: {first.get('topk', '')})", "",
                      "Rate = positions with opposite signs / positions kept by both models.", "",
                      "| pair | " + " | ".join(f"k={k:g}" for k in ks) + " |",
                      "|---|" + "---:|" * len(ks)]
            for p, v in sc.items():
                lines.append(f"| {p.replace('|', ' vs ')} | "
                             + " | ".join(_fmt(r, 3) if r is not None else "–" for r in v["rate"]) + " |")
        ov = {p: v["topk_overlap"] for p, v in pairs.items() if "topk_overlap" in v}
        if ov:
            first = next(iter(ov.values()))
            ks = first["kept_rate"]
            lines += ["", f"## Top-k mask overlap (Jaccard, top-k: {first.get('topk', '')})", "",
                      "| pair | " + " | ".join(f"k={k:g}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
            for p, v in ov.items():
                lines.append(f"| {p.replace('|', ' vs ')} | "
                             + " | ".join(_fmt(r, 3) if r is not None else "–" for r in v["jaccard"]) + " |")
    return "\n".join(lines) + "\n"


def markdown_over_steps(data: Mapping[str, Any]) -> str:
    steps = data["steps"]
    lines = ["# Task-conflict statistics over training steps", "", "## Update norm ‖τ‖₂", "",
             "| step | " + " | ".join(data["models"]) + " |", "|---:|" + "---:|" * len(data["models"])]
    for i, s in enumerate(steps):
        lines.append(f"| {s} | " + " | ".join(_fmt(v.get("update_norm", [None] * len(steps))[i])
                                             for v in data["models"].values()) + " |")
    lines += ["", "## Conflict norm", "", "| step | " + " | ".join(p.replace("|", " vs ") for p in data["pairs"])
              + " |", "|---:|" + "---:|" * len(data["pairs"])]
    for i, s in enumerate(steps):
        lines.append(f"| {s} | " + " | ".join(_fmt(v.get("conflict_norm", [None] * len(steps))[i])
                                             for v in data["pairs"].values()) + " |")
    return "\n".join(lines) + "\n"


def write_conflicts(out_dir: str | Path, data: Mapping[str, Any]) -> list[str]:
    """Write ``conflicts.json``, ``report.md`` and the PNG plots into ``out_dir``; returns the file names."""
    from . import plots
    from .io import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    atomic_write_json(out / "conflicts.json", data)
    atomic_write_text(out / "report.md", markdown_report(data))
    files = ["conflicts.json", "report.md"]
    if any("sign_conflict" in v for v in data.get("pairs", {}).values()):
        plots.plot_sign_conflict(data, out / "sign_conflict.png")
        files.append("sign_conflict.png")
    if any("update_norm_per_layer" in v for v in data.get("models", {}).values()):
        plots.plot_layer_norms(data, out / "layer_norms.png")
        files.append("layer_norms.png")
    return files


def write_over_steps(out_dir: str | Path, data: Mapping[str, Any]) -> list[str]:
    """Write ``over_steps.json``, ``report.md`` and the norm / conflict-norm vs step plots."""
    from . import plots
    from .io import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    atomic_write_json(out / "over_steps.json", data)
    atomic_write_text(out / "report.md", markdown_over_steps(data))
    steps = data["steps"]
    plots.plot_vs_step(steps, {n: v.get("update_norm", []) for n, v in data["models"].items()},
                       "update norm ‖τ‖₂", out / "norm_vs_step.png")
    plots.plot_vs_step(steps, {p.replace("|", " vs "): v.get("conflict_norm", []) for p, v in data["pairs"].items()},
                       "conflict norm", out / "conflict_norm_vs_step.png")
    return ["over_steps.json", "report.md", "norm_vs_step.png", "conflict_norm_vs_step.png"]
