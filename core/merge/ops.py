"""Pure tensor helpers of the merge methods (fp32 in, fp32 out), defined as in ``DESIGN.md``.

Magnitude pruning to exactly ``keep_count`` entries (``magnitude_threshold`` on a whole tensor,
``magnitude_threshold_blocks`` streamed over row blocks, ``magnitude_keep`` for the mask of a block), DARE
Bernoulli masks (``dare_mask``, ``SequentialMask`` for block-by-block draws identical to a whole draw), the L1
rescale factor (``l1_scale``, ``l1_scale_blocks``), the per-model weights (``weights_of``) and the weighted
sum with optional TIES sign election (``combine``).

Used by the built-in merge-method plugins (``rlm.plugins.mergers``) and open to third-party methods; they live
in core because several methods share them. The merge engine (``rlm.core.merge.engine``) does not use them:
it only calls a method's ``prepare``/``prepare_blocks``/``merge``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from rlm.core.contracts import MergeContext

L1_EPS = 1e-7           # below this L1 norm a rescale is skipped (as mergekit)
ZERO_DIVISOR = 1e-8     # |Σ w_i| below this counts as a zero divisor without sign election (as mergekit)


def keep_count(density: float, numel: int) -> int:
    """How many entries magnitude pruning keeps: ⌊d·n⌋, at least one for d > 0 (a positive density never
    empties a tensor, which would silently drop one-element tensors), none for d ≤ 0, all for d ≥ 1."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_threshold(delta: Any, density: float) -> tuple[float, int] | None:
    """Where magnitude pruning cuts: keep exactly k = :func:`keep_count` entries, the largest |τ|; among
    entries tied at the cut, the ones with the lowest flat index. Returns ``(threshold, last_index)``: an
    entry is kept when |τ| > threshold, or |τ| == threshold and its flat index ≤ last_index (see
    :func:`magnitude_keep`). ``None`` keeps everything; ``(inf, -1)`` nothing. The threshold comes from
    ``kthvalue`` on the whole tensor."""
    import torch

    n = delta.numel()
    k = keep_count(density, n)
    if k >= n:
        return None
    if k == 0:
        return float("inf"), -1
    flat = delta.reshape(-1).abs()
    thr = torch.kthvalue(flat, n - k + 1).values
    need = k - int((flat > thr).sum())
    ties = torch.nonzero(flat == thr).view(-1)
    if need == ties.numel():  # every entry tied at the cut is kept: |τ| ≥ threshold says it all
        return float(thr), n - 1
    return float(thr), int(ties[need - 1])


def magnitude_keep(delta: Any, cut: tuple[float, int] | None, context: MergeContext | None = None) -> Any:
    """Boolean keep-mask of ``delta`` (the whole tensor, or the block ``context.rows`` of it) for a cut from
    :func:`magnitude_threshold`."""
    import torch

    if cut is None:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    thr, last = cut
    a = delta.abs()
    start = 0
    if context is not None and context.rows is not None:
        start = context.rows[0] * (delta.numel() // max(1, delta.shape[0]))
    upto = min(last - start + 1, delta.numel())  # entries of this block at flat index ≤ last
    if upto == delta.numel():
        return a >= thr
    keep = a > thr
    if upto > 0:
        flat_keep = keep.view(-1)
        flat_keep[:upto] |= a.reshape(-1)[:upto] == thr
    return keep


def magnitude_threshold_blocks(blocks: Callable[[], Any], numel: int, density: float) -> tuple[float, int] | None:
    """:func:`magnitude_threshold` computed over ``blocks()`` (``(rows, delta_block)`` in row order) without
    holding the tensor: an exact radix selection on the fp32 bit patterns of |τ| (non-negative floats order
    like their bits), a 16-bit histogram pass, a second 16-bit pass inside the winning bin, and a pass that
    finds the flat index of the last kept entry tied at the cut."""
    import torch

    k = keep_count(density, numel)
    if k >= numel:
        return None
    if k == 0:
        return float("inf"), -1

    def bits_of(block: Any) -> Any:
        return block.abs().reshape(-1).view(torch.int32)

    hist: Any = None  # on the blocks' device
    for _, block in blocks():
        counts = torch.bincount(bits_of(block) >> 16, minlength=1 << 15)[: 1 << 15]
        hist = counts if hist is None else hist.add_(counts)
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # entries in higher bins
    hi = int(torch.nonzero((above < k) & (above + hist >= k)).max())
    rank = k - int(above[hi])
    low = torch.zeros(1 << 16, dtype=torch.int64, device=hist.device)
    for _, block in blocks():
        b = bits_of(block)
        sel = b[(b >> 16) == hi]
        if sel.numel():
            low += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
    above_lo = torch.flip(torch.cumsum(torch.flip(low, [0]), 0), [0]) - low
    lo = int(torch.nonzero((above_lo < rank) & (above_lo + low >= rank)).max())
    value_bits = (hi << 16) | lo
    need = rank - int(above_lo[lo])  # how many entries equal to the cut value are kept
    thr = float(torch.tensor([value_bits], dtype=torch.int32).view(torch.float32))
    if need == int(low[lo]):  # all of them: no need to find where the kept ties end
        return thr, numel - 1
    seen, pos = 0, 0
    last = -1
    for _, block in blocks():
        eq = bits_of(block) == value_bits
        c = int(eq.sum())
        if seen + c >= need:
            last = pos + int(torch.nonzero(eq).view(-1)[need - seen - 1])
            break
        seen += c
        pos += block.numel()
    return thr, last


def dare_mask(shape: Sequence[int], density: float, generator: Any, device: Any = None) -> Any:
    """Bernoulli(density) keep-mask drawn from ``generator`` (a bool tensor of ``shape``, on ``device``). The
    draw is on the generator's device (the CPU's for :meth:`MergeContext.generator`), so the mask is the same
    whatever device the merge runs on."""
    import torch

    if density >= 1:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    mask = torch.rand(tuple(shape), generator=generator, dtype=torch.float32) < density
    return mask if device is None else mask.to(device)


class SequentialMask:
    """A DARE keep-mask of a whole tensor drawn block by block from one generator, so that no block size
    changes it (torch's CPU generator yields the same stream in pieces as at once). ``take(n)`` returns the
    next ``n`` mask entries; ``reset()`` starts over."""

    def __init__(self, context: MergeContext, model_index: int, density: float) -> None:
        self.context, self.model_index, self.density = context, model_index, density
        self.reset()

    def reset(self) -> None:
        self.generator = self.context.generator(self.model_index)
        self.position = 0

    def take(self, shape: Sequence[int], device: Any = None) -> Any:
        mask = dare_mask(shape, self.density, self.generator, device)
        self.position += math.prod(shape)
        return mask

    def block(self, start_flat: int, shape: Sequence[int], device: Any = None) -> Any:
        """The mask for ``shape`` entries starting at flat index ``start_flat`` (cheap when in order), on
        ``device``."""
        if start_flat != self.position:
            self.reset()
            while self.position < start_flat:  # skip ahead in bounded pieces
                self.take((min(start_flat - self.position, 1 << 22),))
        return self.take(shape, device)


def l1_scale_blocks(blocks: Callable[[], Any], keep_of: Callable[[tuple[int, int], Any], Any]) -> float:
    """:func:`l1_scale` over ``blocks()``; ``keep_of(rows, block)`` gives each block's keep-mask."""
    import torch

    before = after = 0.0
    for rows, block in blocks():
        before += float(block.abs().sum(dtype=torch.float64))
        after += float((block * keep_of(rows, block)).abs().sum(dtype=torch.float64))
    if before < L1_EPS or after < L1_EPS:
        return 1.0
    return before / after


def l1_scale(delta: Any, kept: Any) -> float:
    """Factor that restores ‖τ‖₁ after masking: ‖τ‖₁ / ‖τ ⊙ kept‖₁ (1 when either is below ``L1_EPS``)."""
    return l1_scale_blocks(lambda: [(None, delta)], lambda rows, block: kept)


def weights_of(params: Sequence[Any], like: Any) -> Any:
    """Per-model weights as a tensor broadcastable against stacked deltas ``like`` (n, *shape)."""
    import torch

    w = torch.tensor([float(p.weight) for p in params], dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))


def combine(base: Any, deltas: Any, params: Sequence[Any], *, lam: float = 1.0, normalize: bool = False,
            elect: bool = False, weighted: bool = False) -> Any:
    """θ_b + λ · Σ_i m_i w_i τ_i / D.

    Without election m_i = 1 and D = Σ w_i (when ``normalize``; |D| < 1e-8 becomes 1). With TIES election
    (``elect``): u_i = w_i τ_i, γ = sign(Σ u_i) with γ = +1 where the sum is 0, m_i = [sign(u_i) = γ] (zeros
    never agree) and D = Σ m_i w_i (0 becomes 1). ``weighted``: ``deltas`` already holds u_i = w_i τ_i
    (it may then be overwritten)."""
    import torch

    w = weights_of(params, deltas)
    u = deltas if weighted else deltas * w
    if elect:
        gamma = torch.where(u.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (u * gamma) > 0  # same sign as the elected one; zeros never agree
        merged = u.mul_(agree).sum(dim=0)
        if normalize:
            div = (agree * w).sum(dim=0)
            merged /= div.masked_fill_(div == 0, 1.0)
    else:
        merged = u.sum(dim=0)
        if normalize:
            div = float(w.sum())
            merged /= 1.0 if abs(div) < ZERO_DIVISOR else div
    if lam != 1:
        merged *= lam
    return merged.add_(base)
