"""The block context handed to metrics: :class:`Chunk` (one block of one tensor for every model, with the
shared derived quantities computed once) and the :class:`Workspace` of reused scratch buffers.

Used by the eager engine (:mod:`rlm.core.conflicts.eager`), by metric plugins that build a context from bare
τ blocks when called without an engine (``rlm.plugins.metrics``) and by third-party metrics. torch is imported
inside the functions.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Sequence

from rlm.core.conflicts.config import DEFAULT_KEPT_RATES
from rlm.core.conflicts.stats import (
    Thresholds,
    bin_histogram,
    conflict_mask,
    count_above,
    float32_floor_bits,
    joint_counts,
    kept_counts,
    sum_squares,
)
from rlm.core.errors import RlmError


def _torch():
    import torch

    return torch


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


class Chunk:
    """A block of one tensor for every model: ``deltas[name]`` is the flat τ block (float32 or float64).
    Derived quantities (squares, products τ_a·τ_b, sign conflicts, |τ| bit patterns, magnitude bins, top-k
    codes) are computed once, into reusable buffers of ``workspace``, and shared by every metric that asks.

    Float32 blocks: elementwise work in float32, every sum accumulated in float64; a block whose float32 sums
    are tiny (< 2^-100) or non-finite is recomputed in float64, so underflow of squares/products of tiny τ
    cannot zero a statistic. Float64 blocks: float64 throughout.

    In the engine, ``deltas`` and every derived array are views of buffers reused by the next block: a metric
    must not keep them beyond its ``update`` call (it keeps sums).

    ``engine_histograms``: the engine hands each tensor's magnitude histograms to
    :meth:`rlm.core.contracts.Metric.update_histogram` (metrics with ``histogram_bits`` need not bin the blocks
    themselves); ``False`` for a chunk built outside an engine."""

    def __init__(self, tensor_name: str, deltas: dict[str, Any], *, numel: int,
                 kept_rates: Sequence[float] = DEFAULT_KEPT_RATES, bits: int = 20,
                 thresholds: Mapping[str, Mapping[str, Any]] | None = None,
                 modes: Sequence[str] | None = None, workspace: Workspace | None = None,
                 engine_histograms: bool = False) -> None:
        self.tensor_name = tensor_name
        self.engine_histograms = engine_histograms
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

    def _thresholds(self, name: str, mode: str) -> Thresholds:
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
