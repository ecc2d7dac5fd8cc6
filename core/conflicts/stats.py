"""Pure task-vector statistics: tensors in, float64 sums and int64 counts out, plus the name helpers.

Shared by both engines (:mod:`rlm.core.conflicts.eager`, :mod:`rlm.core.conflicts.fused`), the block context
:class:`rlm.core.conflicts.chunk.Chunk`, the built-in metric plugins (``rlm.plugins.metrics``: ``pair_key``,
``safe_ratio``, ``sum_squares``, ``layer_of``, the histogram helpers) and third-party metrics; it lives in core
because several plugin kinds and both engines need the same definitions. torch and numpy are imported inside
the functions.

Top-k masks ("keep each model's top-k fraction by |τ|", used by ``sign_conflict`` and ``topk_overlap``):

* ``n_keep(k, N) = max(1, floor(k·N + 1/2))`` where ``N`` counts every parameter of the scope (all parameters
  for ``global``, the tensor for ``per_tensor``), zeros included.
* Magnitudes are binned by the top ``threshold_bits`` bits of their float32 bit pattern (monotone in |τ|;
  the default 20 bits keep 11 mantissa bits, bins 2^-11 ≈ 0.05 % wide in relative terms). The threshold bin
  of ``k`` is the bin holding the ``n_keep``-th largest |τ|; a position is kept when its bin is at or above
  the threshold bin and above bin 0 (zeros, and |τ| below about 6e-42, are never kept). So exact ties are
  always kept together, and the kept set can exceed ``n_keep`` only by positions within one bin (relative
  2^-11) of the exact threshold: the kept fraction actually used is reported per model (``kept_fraction``).
* Sign-conflict rate at ``k``: among positions kept by both models, the fraction with opposite signs
  (denominator = |K_a(k) ∩ K_b(k)|; ``null`` when that set is empty).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence


def _torch():
    import torch

    return torch


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


@functools.lru_cache(maxsize=64)
def float32_floor_bits(threshold: float) -> int:
    """Bit pattern (as int32) of the largest float32 <= ``threshold`` (>= 0): for a float32 v,
    |v| > threshold  <=>  bits(|v|) > float32_floor_bits(threshold)."""
    import numpy as np

    f = np.float32(threshold)
    if float(f) > threshold:
        f = np.nextafter(f, np.float32(0))
    return int(np.array(f, dtype=np.float32).view(np.int32))


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
