"""Streaming task-vector statistics (``rlm conflicts``): the engine that drives Metric plugins.

Task vectors are ``τ_m = θ_m − θ_base`` for every model ``m``. The engine reads the base and every model one
tensor at a time (in blocks of rows for large tensors) through :mod:`rlm.core.models.reader`, forms τ
(``delta_dtype``: ``auto`` = float32 for bf16/fp16 inputs, where the conversion and the difference are exact
but for values more than 2^15 apart, float64 otherwise) in reused buffers, and hands each block to every
metric as a :class:`Chunk`, which computes the shared quantities once (squares, products τ_a·τ_b, sign bits,
|τ| bit patterns, magnitude bins, top-k codes). Every statistic is a sum over positions accumulated in float64
(counts in int64; float32 blocks whose sums would underflow or overflow are redone in float64), so blocks and
tensors can come in any order and memory is bounded by one block per model, whatever the model size.

Passes: the first pass computes every statistic that needs no top-k threshold and the magnitude histograms
(per tensor and per model); top-k statistics follow in a second pass over the tensors whose thresholds were
not known while they were read (all of them for global top-k; multi-block tensors for per-tensor top-k).

Top-k masks ("keep each model's top-k fraction by |τ|", used by ``sign_conflict`` and ``topk_overlap``):

* ``n_keep(k, N) = max(1, floor(k·N + 1/2))`` where ``N`` counts every parameter of the scope (all parameters
  for ``global``, the tensor for ``per_tensor``), zeros included.
* Magnitudes are binned by the top ``threshold_bits`` bits of their float32 bit pattern (monotone in |τ|;
  the default 20 bits keep 11 mantissa bits, bins 2^-11 ≈ 0.05 % wide in relative terms). The threshold bin
  of ``k`` is the bin holding the ``n_keep``-th largest |τ|; a position is kept when its bin is at or above
  the threshold bin and above bin 0 (zeros, and |τ| below about 6e-42, are never kept). So exact ties are
  always kept together, and the kept set can exceed ``n_keep`` only by positions within one bin (relative
  2^-11) of the exact threshold: the kept fraction actually used is reported per model (``kept_fraction``).
  Global thresholds need the whole model, hence the second pass (only when a top-k metric is requested; the
  first pass yields the per-tensor thresholds too).
* Sign-conflict rate at ``k``: among positions kept by both models, the fraction with opposite signs
  (denominator = |K_a(k) ∩ K_b(k)|; ``null`` when that set is empty).
"""

from __future__ import annotations

import abc
import functools
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import Field, field_validator

from rlm.core.contracts import Metric, PluginConfig
from rlm.core.errors import RlmError

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


def threshold_bins(hist: Any, total: int, kept_rates: Sequence[float], cum: Any = None) -> Any:
    """For each k, the bin holding the ``n_keep(k, total)``-th largest magnitude (0 when it falls among the
    zeros); non-increasing in k. ``hist`` counts every position, zeros included; ``cum`` is its cumulative
    sum (``hist.cumsum(0)``) when the caller has it."""
    torch = _torch()
    if cum is None:
        cum = hist.to(torch.int64).cumsum(0)
    # #positions in bins >= b is total - cum[b-1]; the threshold bin is the largest b where that reaches
    # n_keep, i.e. the number of indices j with cum[j] <= total - n_keep (cum is non-decreasing)
    n = int(cum[-1])
    limit = torch.tensor([n - n_keep(k, total) for k in kept_rates], dtype=cum.dtype)
    return torch.searchsorted(cum, limit, right=True).clamp_(min=0, max=len(hist) - 1)


def first_kept_table(thresholds: Any, bits: int, scale: int = 1) -> Any:
    """Lookup table bin -> ``scale`` × index of the first grid point at which that bin is kept
    (``len(thresholds)`` when never): kept at g iff bin >= thresholds[g] and bin > 0 (zeros are never kept).
    ``thresholds`` is non-increasing, so the table is a step function filled segment by segment."""
    torch = _torch()
    thr = [int(x) for x in thresholds]
    g = len(thr)
    table = torch.empty(n_bins(bits), dtype=torch.int32)
    hi = n_bins(bits)
    for k in range(g):  # bins in [thr[k], previous threshold) are first kept at grid point k
        lo = max(thr[k], 0)
        if lo < hi:
            table[lo:hi] = k * scale
            hi = lo
    table[:hi] = g * scale
    table[0] = g * scale
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
    """Threshold bins of one model (and scope) for every kept rate, with lazily built lookup tables."""

    def __init__(self, bins: Any, bits: int) -> None:
        self.bins = bins
        self.bits = bits
        self._table: Any = None
        self._scaled: dict[int, Any] = {}

    def _use_table(self, block_bins: Any) -> bool:
        return bool(self._table is not None or self._scaled or block_bins.numel() * 4 >= n_bins(self.bits))

    def first_kept(self, block_bins: Any) -> Any:
        if self._table is None and self._use_table(block_bins):
            self._table = first_kept_table(self.bins, self.bits)
        return first_kept(block_bins, self.bins, self.bits, self._table)

    def codes(self, block_bins: Any, scale: int, out: Any, scope_numel: int = 0) -> Any:
        """``first_kept(block_bins) * scale`` written into ``out`` (int32): one table lookup per position.
        The table is built once per threshold set, worth it when the scope (``scope_numel`` positions, e.g.
        the whole tensor) is large, whatever the block size."""
        torch = _torch()
        if not (self._use_table(block_bins) or scope_numel * 4 >= n_bins(self.bits)):
            return torch.mul(self.first_kept(block_bins), scale, out=out)
        if scale not in self._scaled:
            self._scaled[scale] = first_kept_table(self.bins, self.bits, scale)
        return torch.index_select(self._scaled[scale], 0, block_bins, out=out)


def joint_counts(c: Any, g: int) -> tuple[Any, Any, Any]:
    """``(both, union, conflicts)`` at grid points 0..g-1 from ``c[first_a, first_b, opposite]`` counts:
    both(k) = #{first_a <= k and first_b <= k}, union(k) = #{first_a <= k or first_b <= k}, conflicts(k) =
    those of both(k) with opposite signs (int64)."""
    torch = _torch()
    c = c.to(torch.int64)
    joint = c.sum(dim=2)
    cum = joint.cumsum(0).cumsum(1)
    conf_cum = c[:, :, 1].cumsum(0).cumsum(1)
    idx = torch.arange(g)
    both = cum[idx, idx]
    rows = joint.sum(dim=1).cumsum(0)[:g]  # first_a <= k
    cols = joint.sum(dim=0).cumsum(0)[:g]  # first_b <= k
    return both, rows + cols - both, conf_cum[idx, idx]


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


def kept_from_histogram(hist: Any, thresholds: Any, cum: Any = None) -> Any:
    """Kept positions at each grid point from a magnitude-bin histogram: bins >= threshold, bin 0 excluded.
    ``cum``: ``hist.cumsum(0)`` when the caller has it."""
    torch = _torch()
    if cum is None:
        cum = hist.to(torch.int64).cumsum(0)
    return cum[-1] - cum[thresholds.clamp(min=1) - 1]


def histogram_thresholds(hist: Any, total: int, kept_rates: Sequence[float], block: int = 512) -> tuple[Any, Any]:
    """``(threshold_bins(hist, total, kept_rates), kept_from_histogram(hist, thresholds))`` without a
    cumulative sum over every bin: cumulative sums of ``block``-bin sums locate the block holding each
    threshold, then only that block is summed bin by bin (the histograms have 2^19 bins, most of them empty)."""
    import numpy as np

    torch = _torch()
    h = hist.numpy() if hasattr(hist, "numpy") else np.asarray(hist)
    nb = h.shape[0]
    if nb % block:
        cum = torch.from_numpy(np.cumsum(h, dtype=np.int64))
        thr = threshold_bins(hist, total, kept_rates, cum)
        return thr, kept_from_histogram(hist, thr, cum)
    ccum = np.cumsum(h.reshape(-1, block).sum(axis=1, dtype=np.int64))
    n = int(ccum[-1])

    def cum_at(i: int) -> int:  # Σ h[0..i]
        b = i // block
        return (int(ccum[b - 1]) if b else 0) + int(h[b * block:i + 1].sum(dtype=np.int64))

    thr, kept = [], []
    for k in kept_rates:
        limit = n - n_keep(k, total)
        cb = int(np.searchsorted(ccum, limit, side="right"))  # blocks whose cumulative sum stays <= limit
        if cb >= len(ccum):
            t = nb - 1
        else:
            start = int(ccum[cb - 1]) if cb else 0
            fine = np.cumsum(h[cb * block:(cb + 1) * block], dtype=np.int64) + start
            t = min(cb * block + int(np.searchsorted(fine, limit, side="right")), nb - 1)
        thr.append(t)
        kept.append(n - cum_at(max(t, 1) - 1))
    return torch.tensor(thr, dtype=torch.int64), torch.tensor(kept, dtype=torch.int64)


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

class PairTopkMetric(Metric):
    """Shared skeleton of the pair metrics built on joint top-k counts (``sign_conflict``, ``topk_overlap``):
    sums :meth:`Chunk.pair_joint` per (pair, top-k scope) over blocks, then turns the totals into one entry per
    pair with :meth:`entry`. The first top-k scope fills the entry; other scopes go under their own name."""

    scope = "pair"
    needs_topk = True
    reads_deltas = False

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._acc: dict[tuple[str, str, str], Any] = {}  # (a, b, mode) -> joint top-k counts
        self._rates: list[float] = []
        self._modes: list[str] = []

    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        self._rates, self._modes = context.kept_rates, context.modes
        for a, b in context.pairs:
            for mode in context.modes:
                self._acc[(a, b, mode)] = context.pair_joint(a, b, mode) + self._acc.get((a, b, mode), 0)

    @abc.abstractmethod
    def entry(self, both_kept: list[int], union: list[int], conflicts: list[int]) -> dict[str, Any]:
        """The JSON entry of one pair and scope from its per-kept-rate counts."""

    def result(self) -> dict[str, Any]:
        pairs: dict[str, Any] = {}
        for (a, b, mode), c in self._acc.items():
            both, union, conflicts = (list(map(int, x)) for x in joint_counts(c, len(self._rates)))
            entry = self.entry(both, union, conflicts)
            out = pairs.setdefault(pair_key(a, b), {"kept_rate": list(self._rates), "topk": self._modes[0]})
            if mode == self._modes[0]:
                out.update(entry)
            else:
                out[mode] = entry
        return {"pairs": {p: {self.name: v} for p, v in pairs.items()}}


class Workspace:
    """Scratch buffers reused from block to block (no allocation, hence no page faults, per block)."""

    def __init__(self) -> None:
        self._bufs: dict[Any, Any] = {}

    def get(self, key: Any, n: int, dtype: Any) -> Any:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = _torch().empty(n, dtype=dtype)
            self._bufs[key] = buf
        return buf[:n]

    def ones(self, n: int, dtype: Any) -> Any:
        buf = self._bufs.get(("ones", dtype))
        if buf is None or buf.numel() < n:
            buf = _torch().ones(n, dtype=dtype)
            self._bufs[("ones", dtype)] = buf
        return buf[:n]


# float32 block sums below this (or non-finite) are recomputed in float64: squares and products of float32
# values below ~1e-19 underflow, those above ~1e19 overflow
_F32_TINY = 2.0 ** -100
_F32_HUGE = 2.0 ** 100


def _sum64(x: Any) -> float:
    """Σ x accumulated in float64 (x may be float32)."""
    torch = _torch()
    return float(torch.sum(x, dtype=torch.float64))


@functools.lru_cache(maxsize=64)
def float32_floor_bits(threshold: float) -> int:
    """Bit pattern (as int32) of the largest float32 <= ``threshold`` (>= 0): for a float32 v,
    |v| > threshold  <=>  bits(|v|) > float32_floor_bits(threshold)."""
    import numpy as np

    f = np.float32(threshold)
    if float(f) > threshold:
        f = np.nextafter(f, np.float32(0))
    return int(np.array(f, dtype=np.float32).view(np.int32))


class Chunk:
    """A block of one tensor for every model: ``deltas[name]`` is the flat τ block (float32 or float64).
    Derived quantities (squares, products τ_a·τ_b, sign conflicts, |τ| bit patterns, magnitude bins, top-k
    codes) are computed once, into reusable buffers of ``workspace``, and shared by every metric that asks.

    Float32 blocks: elementwise work in float32, every sum accumulated in float64; a block whose float32 sums
    are tiny (< 2^-100) or non-finite is recomputed in float64, so underflow of squares/products of tiny τ
    cannot zero a statistic. Float64 blocks: float64 throughout.

    In the engine, ``deltas`` and every derived array are views of buffers reused by the next block: a metric
    must not keep them beyond its ``update`` call (it keeps sums)."""

    def __init__(self, tensor_name: str, deltas: dict[str, Any], *, numel: int,
                 kept_rates: Sequence[float] = DEFAULT_KEPT_RATES, bits: int = 20,
                 thresholds: Mapping[str, Mapping[str, Any]] | None = None,
                 modes: Sequence[str] | None = None, workspace: Workspace | None = None) -> None:
        self.tensor_name = tensor_name
        self.deltas = {n: d.reshape(-1) for n, d in deltas.items()}
        self.names = list(deltas)
        self.pairs = list(itertools.combinations(self.names, 2))
        self.numel = numel  # elements of the whole tensor (the block may be smaller)
        self.kept_rates = list(kept_rates)
        self.bits = bits
        self.thresholds = dict(thresholds or {})  # mode -> model -> threshold bins
        self.modes = list(modes) if modes is not None else list(self.thresholds)  # first = reported mode
        self.ws = workspace if workspace is not None else Workspace()
        self.size = next(iter(self.deltas.values())).numel() if self.deltas else 0
        self._cache: dict[tuple, Any] = {}

    def _cached(self, key: tuple, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def _buf(self, key: Any, dtype: Any) -> Any:
        return self.ws.get(key, self.size, dtype)

    def _is32(self, name: str) -> bool:
        return self.deltas[name].dtype == _torch().float32

    def _f64(self, name: str) -> Any:
        return self._cached(("f64", name), lambda: self.deltas[name].to(_torch().float64))

    def _suspect(self, name: str) -> bool:
        """Float32 sums of this model's block cannot be trusted (tiny non-zero or huge values)."""
        def compute() -> bool:
            ss = self._ss32(name)
            if math.isfinite(ss) and _F32_TINY <= ss < _F32_HUGE:
                return False
            return ss != 0.0 or bool(self.deltas[name].any())

        return self._cached(("suspect", name), compute)

    def _ss32(self, name: str) -> float:
        torch = _torch()

        def compute() -> float:
            d = self.deltas[name]
            return _sum64(torch.mul(d, d, out=self._buf(("sq", name), torch.float32)))

        return self._cached(("ss32", name), compute)

    def sum_squares(self, name: str) -> float:
        def compute() -> float:
            if self._is32(name) and not self._suspect(name):
                return self._ss32(name)
            return sum_squares(self.deltas[name] if not self._is32(name) else self._f64(name))

        return self._cached(("ss", name), compute)

    def _exact(self, a: str, b: str) -> bool:
        """Whether pair sums of (a, b) are formed in float32 (else float64)."""
        return self._is32(a) and self._is32(b) and not (self._suspect(a) or self._suspect(b))

    def product(self, a: str, b: str) -> Any:
        """τ_a ⊙ τ_b in the blocks' dtype (float32 or float64); see :meth:`dot` for how sums are formed."""
        torch = _torch()

        def compute() -> Any:
            da, db = self.deltas[a], self.deltas[b]
            if da.dtype != db.dtype:
                da, db = self._f64(a), self._f64(b)
            return torch.mul(da, db, out=self._buf(("prod", a, b), da.dtype))

        return self._cached(("prod", a, b), compute)

    def _product64(self, a: str, b: str) -> Any:
        return self._cached(("prod64", a, b), lambda: self._f64(a) * self._f64(b))

    def dot(self, a: str, b: str) -> float:
        def compute() -> float:
            p = self.product(a, b) if (self._exact(a, b) or not (self._is32(a) or self._is32(b))) \
                else self._product64(a, b)
            return _sum64(p)

        return self._cached(("dot", a, b), compute)

    def conflict(self, a: str, b: str) -> Any:
        """τ_a ⊙ τ_b < 0: opposite signs, both non-zero (no underflow)."""
        return self._cached(("conflict", a, b), lambda: conflict_mask(self.deltas[a], self.deltas[b]))

    def conflict_sum_squares(self, a: str, b: str) -> float:
        """Σ (τ_a·τ_b)² over positions with τ_a·τ_b < 0 (Eq. 10 squared), summed in float64."""
        torch = _torch()

        def compute() -> float:
            p = self.product(a, b) if (self._exact(a, b) or not (self._is32(a) or self._is32(b))) \
                else self._product64(a, b)
            if p.dtype == torch.float32:
                m = torch.clamp(p, max=0.0, out=self._buf(("neg", a, b), torch.float32))
            else:
                m = torch.clamp(p, max=0.0)
            return _sum64(m.mul_(m))

        return self._cached(("css", a, b), compute)

    def abs_bits(self, name: str) -> Any:
        """int32 bit pattern of float32 |τ| (monotone in |τ|)."""
        torch = _torch()

        def compute() -> Any:
            d = self.deltas[name]
            if d.dtype != torch.float32:
                d = d.to(torch.float32)
            return torch.bitwise_and(d.view(torch.int32), 0x7FFFFFFF, out=self._buf(("abs", name), torch.int32))

        return self._cached(("absbits", name), compute)

    def count_above(self, name: str, threshold: float) -> int:
        """#positions with |τ| > threshold (exact: float32 blocks compare bit patterns)."""
        def compute() -> int:
            if self._is32(name):
                return int(_torch().count_nonzero(self.abs_bits(name) > float32_floor_bits(threshold)))
            return count_above(self.deltas[name], threshold)

        return self._cached(("above", name, threshold), compute)

    def bins(self, name: str) -> Any:
        torch = _torch()
        return self._cached(("bins", name), lambda: torch.bitwise_right_shift(
            self.abs_bits(name), 32 - self.bits, out=self._buf(("bins", name), torch.int32)))

    def bin_histogram(self, name: str) -> Any:
        return self._cached(("hist", name), lambda: bin_histogram(self.bins(name), self.bits))

    def add_bin_histogram(self, name: str, hist: Any, bits: int | None = None) -> None:
        """hist += this block's histogram of ``bits``-bit magnitude bins (default: the chunk's ``bits``), in
        place; coarser bins keep the histogram cache-resident."""
        torch = _torch()
        if bits is None or bits == self.bits:
            idx = self.bins(name)
        else:
            idx = torch.bitwise_right_shift(self.abs_bits(name), 32 - bits,
                                            out=self._buf(("cbins", name), torch.int32))
        if hist.numel() <= 4096:  # small histograms: bincount is faster, large ones: index_add_
            hist.add_(torch.bincount(idx, minlength=hist.numel()).to(hist.dtype))
        else:
            hist.index_add_(0, idx, self.ws.ones(self.size, hist.dtype))

    def first_kept(self, name: str, mode: str) -> Any:
        return self._thresholds(name, mode).first_kept(self.bins(name))

    def _thresholds(self, name: str, mode: str) -> "Thresholds":
        thr = self.thresholds.get(mode, {}).get(name)
        if thr is None:
            raise RlmError(f"top-k mode {mode!r} has no thresholds for model {name} (the engine computes "
                           f"only the modes in topk_modes)")
        if not isinstance(thr, Thresholds):
            thr = Thresholds(thr, self.bits)
            self.thresholds.setdefault(mode, {})
            self.thresholds[mode] = {**self.thresholds[mode], name: thr}
        return thr

    def kept_counts(self, name: str, mode: str) -> Any:
        return self._cached(("kept", name, mode), lambda: kept_counts(self.first_kept(name, mode),
                                                                      len(self.kept_rates)))

    def _sign_xor(self, a: str, b: str) -> Any:
        """1 where τ_a and τ_b have opposite sign bits (int32; zeros are sorted out by the top-k codes)."""
        torch = _torch()

        def compute() -> Any:
            da, db = self.deltas[a], self.deltas[b]
            if da.dtype == torch.float32 and db.dtype == torch.float32:
                x = torch.bitwise_xor(da.view(torch.int32), db.view(torch.int32),
                                      out=self._buf(("xor", a, b), torch.int32))
                return x.bitwise_right_shift_(31).neg_()  # arithmetic shift: -1 / 0 -> 1 / 0
            return (torch.signbit(da) ^ torch.signbit(db)).to(torch.int32)

        return self._cached(("xor", a, b), compute)

    def pair_joint(self, a: str, b: str, mode: str) -> Any:
        """Counts ``c[first_a, first_b, opposite_signs]`` of this block (int64, shape (g+1, g+1, 2)): one
        bincount of the codes ``(first_a·(g+1) + first_b)·2 + opposite_signs``. Zeros are never kept, so the
        sign bit only matters where both are kept. Sums of these over blocks give every top-k pair count
        (:func:`joint_counts`)."""
        torch = _torch()

        def compute() -> Any:
            g = len(self.kept_rates)
            scope = self.numel if mode == "per_tensor" else 1 << 62
            ta = self._thresholds(a, mode).codes(self.bins(a), 2 * (g + 1),
                                                 self._buf(("code", a, mode, 0), torch.int32), scope)
            tb = self._thresholds(b, mode).codes(self.bins(b), 2, self._buf(("code", b, mode, 1), torch.int32),
                                                 scope)
            code = ta.add_(tb).add_(self._sign_xor(a, b))
            return torch.bincount(code, minlength=2 * (g + 1) ** 2).reshape(g + 1, g + 1, 2)

        return self._cached(("joint", a, b, mode), compute)

    def pair_counts(self, a: str, b: str, mode: str) -> tuple[Any, Any, Any]:
        """``(both, union, conflicts)`` of this block at each grid point (see :func:`pair_counts`)."""
        return self._cached(("pair", a, b, mode),
                            lambda: joint_counts(self.pair_joint(a, b, mode), len(self.kept_rates)))


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


def _needs_pairs(metrics: Sequence[Any]) -> list[str]:
    return [m.name for m in metrics if getattr(m, "scope", "model") == "pair"]


def compute_conflicts(base: str | Path, models: Mapping[str, str | Path], config: ConflictsConfig | None = None,
                      *, metrics: Sequence[Any] | None = None, progress: Callable[[str, int, int], None] | None = None
                      ) -> ConflictsResult:
    """Stream ``base`` and ``models`` (name -> HF directory or LoRA adapter) and compute the statistics.

    ``progress(phase, done, total)`` is called after each tensor (phase ``histogram`` or ``statistics``).
    Raises :class:`RlmError` (ModelError) for bad input, naming the model and tensor."""
    from rlm.core.errors import ModelError
    from rlm.core.models.lora import open_source
    from rlm.core.models.reader import ModelReader, check_finite
    from rlm.core.models.validate import validate_models

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
    try:
        plan = validate_models(base_reader, list(readers.values()), vocab="error")
        tensors = [t for t in plan.tensors if str(t.dtype).replace("torch.", "").startswith(("float", "bfloat"))]
        if not tensors:
            raise RlmError(f"base model {base} holds no floating-point tensors")
        total = sum(t.numel for t in tensors)
        auto = config.delta_dtype == "auto"
        dtype = torch.float64 if auto else getattr(torch, config.delta_dtype)
        half = (torch.bfloat16, torch.float16)
        topk_metrics = [m for m in metrics if getattr(m, "needs_topk", False)]
        plain_metrics = [m for m in metrics if not getattr(m, "needs_topk", False)]
        hist_metrics = [m for m in plain_metrics if m.histogram_bits is not None]
        modes = list(config.topk_modes) if topk_metrics else []
        bits = config.threshold_bits
        g = len(config.kept_rates)
        nb = n_bins(bits)
        need_hist = bool(modes) or bool(hist_metrics)
        # without top-k only the log10 histograms are wanted: bin as coarsely as they allow (cache-resident)
        hist_bits = bits if modes else max([int(getattr(m, "histogram_bits", bits)) for m in hist_metrics] or [bits])
        hist_bits = min(max(hist_bits, 9), bits)
        ws = Workspace()

        def blocks(t: Any) -> list[tuple[int, int] | None]:
            from rlm.core.models.reader import row_blocks

            return (row_blocks(t.shape, t.numel, config.chunk_elements) or [None]) if t.shape else [None]

        def read_block(t: Any, rows: tuple[int, int] | None, check: bool) -> dict[str, Any]:
            """τ of every model for one block. 16-bit inputs (with ``delta_dtype: auto``) give float32 τ formed
            in reused buffers: bf16/fp16 → float32 is exact and so is the difference, except where one value is
            over 2^15 times the other (then rounded to float32)."""
            check = check and config.check_finite
            raw = base_reader.get(t.name, rows)
            xs = {n: r.get(t.name, rows) if isinstance(r, ModelReader) else None for n, r in readers.items()}
            fast = auto and raw.dtype in half and all(x is not None and x.dtype in half for x in xs.values())
            n_el = raw.numel()
            if fast:
                b = ws.get("base", n_el, torch.float32)
                b.copy_(raw.reshape(-1))
            else:
                b = raw.to(dtype)
            out = {}
            for n, r in readers.items():
                x = xs[n]
                if fast:
                    d = ws.get(("delta", n), n_el, torch.float32)
                    d.copy_(x.reshape(-1))
                    d.sub_(b)
                elif x is not None:
                    d = x.to(dtype, copy=True)
                    d -= b
                else:
                    d = r.delta(t.name, b.to(torch.float32), rows).to(dtype)
                if check and not math.isfinite(float(d.sum())):  # NaN/Inf anywhere in the block reaches the sum
                    check_finite(raw, base_reader.path, t.name)
                    check_finite(x if x is not None else d, r.path, t.name)
                    if not bool(torch.isfinite(d).all()):
                        raise ModelError(f"model {r.path}: tensor {t.name}: the task vector overflows")
                out[n] = d.reshape(-1)
            return out

        reason = None
        if config.engine != "eager":
            from rlm.core.conflicts.fused import unavailable_reason

            reason = unavailable_reason(config, metrics, base_reader, readers, tensors, hist_bits)
            if reason is not None and config.engine == "fused":
                raise RlmError(f"engine 'fused' cannot run these inputs: {reason}")

        def eager() -> tuple[dict[str, dict[str, Any]], int]:
            thresholds: dict[str, dict[str, Any]] = {}
            kept_actual: dict[str, dict[str, Any]] = {m: {n: torch.zeros(g, dtype=torch.int64) for n in names}
                                                      for m in modes}
            per_tensor_thr: dict[str, dict[str, Thresholds]] = {}
            global_hist = {n: torch.zeros(nb, dtype=torch.int64) for n in names} if "global" in modes else {}
            deferred: list[Any] = []  # tensors whose top-k statistics wait for the second pass
            trim = _trim_heap()

            def make_chunk(t: Any, deltas: dict[str, Any]) -> Chunk:
                c = Chunk(t.name, deltas, numel=t.numel, kept_rates=config.kept_rates, bits=bits,
                          thresholds=thresholds, modes=modes, workspace=ws)
                c.engine_histograms = True  # the engine hands per-tensor histograms to update_histogram
                return c

            # pass 1: every statistic that needs no top-k threshold, and the magnitude histograms (per tensor and
            # global); top-k statistics too where the thresholds are known by then (per-tensor only, one block)
            phase1 = "histogram" if "global" in modes else "statistics"
            for i, t in enumerate(tensors):
                bl = blocks(t)
                hdt = torch.int32 if t.numel < 2 ** 31 else torch.int64  # int32 index_add_ is about twice as fast
                hists = {n: ws.get(("thist", n), n_bins(hist_bits), hdt).zero_() for n in names} if need_hist else {}
                chunk: Chunk | None = None
                for rows in bl:
                    chunk = make_chunk(t, read_block(t, rows, True))
                    for m in plain_metrics:
                        m.update(t.name, chunk.deltas, context=chunk)
                    for n in hists:
                        chunk.add_bin_histogram(n, hists[n], hist_bits)
                for m in hist_metrics:
                    m.update_histogram(t.name, hists, hist_bits)
                for n, h in global_hist.items():
                    h += hists[n]
                if "per_tensor" in modes:
                    per_tensor_thr[t.name] = {}
                    for n, h in hists.items():
                        thr, kept = histogram_thresholds(h, t.numel, config.kept_rates)
                        per_tensor_thr[t.name][n] = Thresholds(thr, bits)
                        kept_actual["per_tensor"][n] += kept
                if modes:
                    if "global" not in modes and len(bl) == 1 and chunk is not None:
                        thresholds["per_tensor"] = per_tensor_thr.pop(t.name)
                        chunk.thresholds = dict(thresholds)
                        for m in topk_metrics:
                            m.update(t.name, chunk.deltas, context=chunk)
                    else:
                        deferred.append(t)
                if i % 16 == 15:
                    trim()
                if progress:
                    progress(phase1, i + 1, len(tensors))
            if "global" in modes:
                thresholds["global"] = {}
                for n, h in global_hist.items():
                    thr = threshold_bins(h, total, config.kept_rates)
                    thresholds["global"][n] = Thresholds(thr, bits)
                    kept_actual["global"][n] += kept_from_histogram(h, thr)
                del global_hist

            # pass 2: top-k statistics of the tensors whose thresholds needed a full first pass
            for i, t in enumerate(deferred):
                if "per_tensor" in modes:
                    thresholds["per_tensor"] = per_tensor_thr.pop(t.name)
                for rows in blocks(t):
                    chunk = make_chunk(t, read_block(t, rows, False))
                    for m in topk_metrics:
                        m.update(t.name, chunk.deltas, context=chunk)
                if i % 16 == 15:
                    trim()
                if progress:
                    progress("statistics", i + 1, len(deferred))
            return kept_actual, 1 + bool(deferred)

        if config.engine != "eager" and reason is None:
            from rlm.core.conflicts import fused as fused_conflicts

            kept_actual, passes = fused_conflicts.run(config=config, metrics=metrics, base_reader=base_reader,
                                                      readers=readers, tensors=tensors, modes=modes,
                                                      hist_bits=hist_bits, total=total, progress=progress)
            engine = "fused"
        else:
            kept_actual, passes = eager()
            engine = "eager"
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
        stats = {"tensors": len(tensors), "parameters": total, "passes": passes, "engine": engine}
        if reason is not None and config.engine == "auto":
            stats["eager_because"] = reason
        return ConflictsResult(data=_json_clean(data), config=config, models={k: str(v) for k, v in models.items()},
                               base=str(base), stats=stats)
    finally:
        for reader in (*readers.values(), base_reader):
            reader.close()


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
    from rlm.core.io import plots
    from rlm.core.io.atomic import atomic_write_json, atomic_write_text

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
    from rlm.core.io import plots
    from rlm.core.io.atomic import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    atomic_write_json(out / "over_steps.json", data)
    atomic_write_text(out / "report.md", markdown_over_steps(data))
    steps = data["steps"]
    plots.plot_vs_step(steps, {n: v.get("update_norm", []) for n, v in data["models"].items()},
                       "update norm ‖τ‖₂", out / "norm_vs_step.png")
    plots.plot_vs_step(steps, {p.replace("|", " vs "): v.get("conflict_norm", []) for p, v in data["pairs"].items()},
                       "conflict norm", out / "conflict_norm_vs_step.png")
    return ["over_steps.json", "report.md", "norm_vs_step.png", "conflict_norm_vs_step.png"]
