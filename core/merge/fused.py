"""The fused path of the merge engine: the built-in methods on bf16 or float32 safetensors inputs, computed by
compiled kernels (:mod:`rlm.core.merge._kernels`) that read the files themselves.

:class:`rlm.core.merge.engine._Engine` hands each tensor here (:meth:`FusedMerge.run_tensor`) when
:func:`unavailable_reason` is ``None`` for the run: a CPU merge of full safetensors models by one of the built-in
methods (``ties``, ``dare_ties``, ``dare_linear``, ``task_arithmetic``, ``averaging``; a subclass or a third-party
method keeps the torch path) with the kernels built. A tensor the kernels do not take (:func:`tensor_reason`:
another stored dtype, a float16 output, shapes that differ from the base's, ...) and a tensor whose values are
not all finite go through the torch path instead, which raises the engine's usual errors; the merge manifest
counts both paths and says why (``engine`` in ``merge_manifest.json``).

The result is bit-identical to the torch path's: the same float32 operations in the same order (τ = θ − θ_b;
u_i = τ_i · float32(w_i · scale_i), masked; the sign election and sums in model order from +0; the divisions,
λ, + θ_b; round to nearest even into bf16), the exact TIES cut (keep ⌊d·n⌋ entries, ties at the cut by lowest
flat index) found by a 16-bit radix histogram of |τ|'s float32 bits that also collects the entries of the bins
where a sample of the tensor puts the cut (every entry of a small tensor), the rest of the selection (low 16 bits,
the last kept tie) running on those; where the sample missed, a pass for the low 16 bits inside the winning bin
and, when the cut splits entries of equal magnitude, a scan for the last kept one; the DARE masks drawn from
torch's generator stream (mt19937 seeded as :meth:`MergeContext.generator` seeds it).
The one quantity not reproduced operation by operation is the L1 rescale factor (torch sums |τ| in float64 in
its own order): the kernels sum accurately and the factor is used only when ``float32(w · scale)`` is the same
at both ends of an interval (±2⁻⁴⁰ relative on each sum) that holds torch's value; otherwise, about one tensor
in ten thousand, the tensor takes the torch path.

Memory: the kernels read 32768 elements per input at a time into buffers that stay in cache and write row
blocks of about ``BLOCK_ELEMENTS``; the TIES candidates take at most ``CANDIDATE_BYTES`` per worker thread.
Nothing grows with the model.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from rlm.core.merge.ops import L1_EPS, ZERO_DIVISOR, keep_count

FAST_CODES = {"BF16": 2, "F32": 4}  # stored dtypes (safetensors codes) the kernels read, and their widths
BLOCK_ELEMENTS = 1 << 18            # elements merged and written per kernel call
MAX_ROW = 1 << 22                   # longer rows would make a written block large: the torch path takes them
SCALE_TOL = 2.0 ** -40              # relative distance of torch's float64 L1 sums from the kernels'
BUILT_IN = {  # (module, class) of the built-in methods the kernels implement -> kernel recipe
    ("rlm.plugins.mergers.ties", "Ties"): "ties",
    ("rlm.plugins.mergers.dare_ties", "DareTies"): "dare_ties",
    ("rlm.plugins.mergers.dare_linear", "DareLinear"): "dare_linear",
    ("rlm.plugins.mergers.task_arithmetic", "TaskArithmetic"): "task_arithmetic",
    ("rlm.plugins.mergers.averaging", "Averaging"): "averaging",
}
NO_CUT = (0x7F800000, -1)  # keep nothing: no finite |τ| is above +inf
COLLECT_ALL = 1 << 20      # TIES: up to this many elements every entry is collected in the histogram pass
SAMPLES, SAMPLE = 64, 1024  # TIES on larger tensors: slices sampled to predict the cut's bins
MAX_SHARE = 0.2             # ... and the largest share of the entries collected there
CANDIDATE_BYTES = 1 << 27   # the most a worker thread holds of collected entries (8 bytes each)


def method_recipe(method: Any) -> str | None:
    """Which kernel recipe computes ``method`` exactly (``None``: not a built-in method, a subclass, or one whose
    ``merge``/``prepare``/``prepare_blocks`` was replaced)."""
    cls = type(method)
    recipe = BUILT_IN.get((cls.__module__, cls.__qualname__))
    for attr in ("merge", "prepare", "prepare_blocks"):
        fn = getattr(cls, attr, None)
        owner = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", "").rsplit(".", 1)[0])
        if attr in vars(method) or (owner not in BUILT_IN and owner != ("rlm.core.contracts", "MergeMethod")):
            return None
    return recipe


def unavailable_reason(run: Any, method: Any, base: Any, sources: list[Any], device: Any) -> str | None:
    """Why the fused path cannot run this merge at all (``None`` when it can, tensor by tensor)."""
    from rlm.core.models.reader import ModelReader

    if run.engine == "torch":
        return "engine: torch was asked for"
    if sys.byteorder != "little":
        return "this machine is big-endian (the kernels read safetensors' little-endian values as stored)"
    if device.type != "cpu":
        return f"device is {device} (the kernels compute on the CPU)"
    if method_recipe(method) is None:
        return f"merge method {method.name!r} ({type(method).__module__}) is not one of the built-in methods " \
               f"the kernels implement, or its merge/prepare was replaced"
    if len(sources) > 64:
        return f"{len(sources)} models (the kernels take at most 64)"
    for r in [base, *sources]:
        if not isinstance(r, ModelReader) or r.format != "safetensors":
            return f"model {r.path} is not a safetensors model directory (LoRA adapters and .bin take the torch path)"
    try:
        from rlm.core.merge import _kernels  # noqa: F401
    except ImportError as exc:
        return f"the compiled kernels rlm.core.merge._kernels are not built ({exc})"
    return None


def tensor_reason(t: Any, base: Any, sources: list[Any], out_dtype: Any) -> str | None:
    """Why one planned floating tensor takes the torch path (``None``: the kernels take it)."""
    import torch

    from rlm.core.models.reader import st_code

    if out_dtype not in (torch.bfloat16, torch.float32):
        return f"output dtype {str(out_dtype).replace('torch.', '')} (the kernels write bfloat16 or float32)"
    if t.numel == 0:
        return "empty tensor"
    if t.numel >= 2 ** 31:
        return "2^31 elements or more"
    if t.shape and t.numel // t.shape[0] > MAX_ROW:
        return f"rows of more than {MAX_ROW} elements"
    for r in [base, *sources]:
        if tuple(r.shape(t.name)) != tuple(t.shape):
            return "shapes differ from the planned one (vocabulary policy)"
        if st_code(r.dtype(t.name)) not in FAST_CODES:
            return f"stored dtype {st_code(r.dtype(t.name))} (the kernels read BF16 or F32)"
    return None


def exact_scale(before: float, after: float, weight: float) -> np.float32 | None:
    """``float32(weight · scale)`` for the L1 rescale ``scale = before / after`` (1 when either sum is below
    ``L1_EPS``) as torch's float64 sums give it, when every pair of sums within ``SCALE_TOL`` of the kernels' gives
    the same float32; ``None`` when it could differ."""
    lo_b, hi_b = before * (1 - SCALE_TOL), before * (1 + SCALE_TOL)
    lo_a, hi_a = after * (1 - SCALE_TOL), after * (1 + SCALE_TOL)
    if hi_b < L1_EPS or hi_a < L1_EPS:
        return np.float32(weight * 1.0)
    if lo_b < L1_EPS or lo_a < L1_EPS:
        return None
    ends = {np.float32(weight * (lo_b / hi_a) * (1 - 2.0 ** -50)), np.float32(weight * (hi_b / lo_a) * (1 + 2.0 ** -50))}
    return ends.pop() if len(ends) == 1 else None


class _Tensor:
    """Where one tensor's data lies in every input (base first) and the kernels' common arguments."""

    def __init__(self, t: Any, base: Any, sources: list[Any]) -> None:
        from rlm.core.models.reader import st_code

        located = [r.location(t.name) for r in [base, *sources]]
        self.fds = tuple(fd for fd, _, _ in located)
        self.offsets = np.array([off for _, off, _ in located], dtype=np.int64)
        self.widths = np.array([FAST_CODES[st_code(r.dtype(t.name))] for r in [base, *sources]], dtype=np.int32)
        self.n = t.numel
        self.m = len(sources)

    def head(self, start: int = 0, count: int | None = None) -> tuple[Any, ...]:
        return self.fds, self.offsets, self.widths, start, self.n if count is None else count


class NonFinite(Exception):
    """A task vector or merged value of the tensor is not finite: the torch path handles (and names) it."""


class FusedMerge:
    """The fused path of one merge run (shared by the engine's worker threads)."""

    def __init__(self, engine: Any, torch_job: Callable[[Any], None], out_dtype: Callable[[Any], Any]) -> None:
        """``engine``: the run's :class:`rlm.core.merge.engine._Engine` (method, params, readers, writer);
        ``torch_job(t)`` merges and writes tensor ``t`` on the torch path; ``out_dtype(t)`` is its output dtype."""
        self.e = engine
        self.torch_job, self.out_dtype = torch_job, out_dtype
        self.recipe = method_recipe(engine.method)
        self.cfg = engine.method.config
        self.weights = [float(getattr(p, "weight", 1.0)) for p in engine.params]
        self.densities = [float(getattr(p, "density", 1.0)) for p in engine.params]
        self.fused = 0
        self.torch: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- bookkeeping ------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"path": "fused", "tensors_fused": self.fused, "tensors_torch": sum(self.torch.values()),
                    "torch_because": {r: {"tensors": c, "first": self.examples[r]} for r, c in self.torch.items()}}

    def _torch_path(self, t: Any, reason: str) -> None:
        with self._lock:
            self.torch[reason] += 1
            self.examples.setdefault(reason, t.name)
        self.torch_job(t)

    # -- one tensor ---------------------------------------------------------------------------------------
    def run_tensor(self, t: Any) -> None:
        """Merge and write tensor ``t`` (a worker thread's job), on the torch path where the kernels can't."""
        e = self.e
        if not t.dtype.is_floating_point:
            e.writer.write(t.name, e.base.get(t.name))
            e.advance(t.name)
            return
        out_dtype = self.out_dtype(t)
        reason = tensor_reason(t, e.base, e.sources, out_dtype)
        if reason is None:
            try:
                self._merge(t, _Tensor(t, e.base, e.sources), out_dtype)
            except NonFinite as exc:
                reason = str(exc)
        if reason is not None:
            self._torch_path(t, reason)  # advances the progress itself
            return
        with self._lock:
            self.fused += 1
        e.advance(t.name)

    def _merge(self, t: Any, io: _Tensor, out_dtype: Any) -> None:
        import torch

        recipe, cfg = self.recipe, self.cfg
        w32 = np.array(self.weights, dtype=np.float32)
        mode, thr, last, states = 0, np.zeros(io.m, np.int64), np.zeros(io.m, np.int64), np.zeros(0, np.uint32)
        mults = w32
        if recipe == "ties":
            mode = 1
            cuts = self._ties_cuts(io)
            thr[:] = [c[0] for c in cuts]
            last[:] = [c[1] for c in cuts]
            scales: list[Any] = [None] * io.m
            if cfg.rescale:  # a keep-all cut (k = n) has no rescale
                scales = self._scales(io, 1, thr, last, states, skip=[keep_count(d, io.n) >= io.n
                                                                       for d in self.densities])
            mults = self._mults(scales)
        elif recipe in ("dare_ties", "dare_linear"):
            mode = 2
            states = self._dare_states(t, io)
            scales = [None] * io.m
            if cfg.rescale:  # an undrawn mask (density >= 1) keeps all: the factor is exactly 1
                scales = self._scales(io, 2, thr, last, states.copy(), skip=[d >= 1 for d in self.densities])
            mults = self._mults(scales)
        elect = recipe in ("ties", "dare_ties")
        norm, div = (1 if elect else 2) if getattr(cfg, "normalize", False) else 0, 1.0
        lam = float(getattr(cfg, "lambda_", 1.0))
        total = 0.0
        if recipe == "averaging":
            total, lam = float(torch.tensor(self.weights, dtype=torch.float32).sum()), 1.0
            norm, div = (2, total) if cfg.normalize else (0, 1.0)
        elif norm == 2:
            div = float(torch.tensor(self.weights, dtype=torch.float32).sum())
            div = 1.0 if abs(div) < ZERO_DIVISOR else div
        spec = (mode, thr, last, states, np.array(self.densities, np.float32), np.ascontiguousarray(mults, np.float32),
                w32, int(elect), norm, div, lam, lam != 1, total, recipe == "averaging" and not cfg.normalize)
        self._write_blocks(t, io, spec, out_dtype)

    def _write_blocks(self, t: Any, io: _Tensor, spec: tuple[Any, ...], out_dtype: Any) -> None:
        import torch

        from rlm.core.merge import _kernels as K

        row = t.numel // t.shape[0] if t.shape else 1
        rows = t.shape[0] if t.shape else 1
        step = max(1, BLOCK_ELEMENTS // max(1, row))
        width = 2 if out_dtype == torch.bfloat16 else 4
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            shape = (r1 - r0, *t.shape[1:]) if t.shape else ()
            out = torch.empty(shape, dtype=out_dtype)
            flags = K.merge(*io.head(r0 * row, (r1 - r0) * row), *spec, out.view(-1).view(torch.uint8).numpy(),
                            width)
            if flags:
                raise NonFinite("a task vector is not finite" if flags & 1 else "a merged value is not finite")
            self.e.writer.write(t.name, out, rows_offset=r0 if t.shape else 0)

    # -- TIES: the exact magnitude cut ----------------------------------------------------------------------
    def _ties_cuts(self, io: _Tensor) -> list[tuple[int, int]]:
        """Each model's cut ``(|τ| bits of the threshold, last flat index kept among entries equal to it)``,
        as :func:`rlm.core.merge.ops.magnitude_threshold` finds it (keep all: ``(0, n-1)``). One pass finds the
        top-16-bit bin of the cut and collects the entries of the bins where a sample puts it (all bins for a
        tensor up to ``COLLECT_ALL`` elements); the rest of the selection runs on them. Where the sample missed,
        a pass for the low 16 bits and, if the cut splits equal magnitudes, a scan for the last kept one follow."""
        from rlm.core.merge import _kernels as K

        ks = [keep_count(d, io.n) for d in self.densities]
        cuts: list[tuple[int, int] | None] = [(0, io.n - 1) if k >= io.n else NO_CUT if k == 0 else None for k in ks]
        todo = [j for j, c in enumerate(cuts) if c is None]
        if not todo:
            return cuts  # type: ignore[return-value]
        wlo, whi, cap = self._windows(io, ks, todo)
        hist = np.zeros((io.m, 1 << 15), np.int32)
        bits, idx = self._candidates(io.m * cap)
        bits, idx = bits.reshape(io.m, cap), idx.reshape(io.m, cap)
        ncand = np.zeros(io.m, np.int64)
        if K.hist_collect(*io.head(), hist, wlo, whi, cap, bits, idx, ncand):
            raise NonFinite("a task vector is not finite")
        missed: dict[int, tuple[int, int]] = {}
        for j in todo:
            hi, rank = _select(hist[j].astype(np.int64), ks[j])
            if wlo[j] <= hi <= whi[j] and ncand[j] <= cap:
                cuts[j] = K.cand_cut(bits[j], idx[j], int(ncand[j]), hi, rank, io.n)
            else:
                missed[j] = (hi, rank)
        if missed:
            self._cuts_by_passes(io, missed, cuts)
        return cuts  # type: ignore[return-value]

    def _candidates(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """This thread's candidate buffers (|τ| bits, flat indices) of at least ``size`` entries, kept between
        tensors so that their pages are touched once."""
        local = self._local
        if getattr(local, "size", 0) < size:
            local.bits, local.idx, local.size = np.empty(size, np.uint32), np.empty(size, np.int32), size
        return local.bits[:size], local.idx[:size]

    def _windows(self, io: _Tensor, ks: list[int], todo: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """Per model the window of top-16-bit bins to collect (``-1``: none) and the room per model: every bin
        for a small tensor, else the bins where ``SAMPLES`` slices of ``SAMPLE`` entries put the k-th largest
        |τ| (± 5 standard deviations of the sampled quantile)."""
        from rlm.core.merge import _kernels as K

        wlo, whi = np.full(io.m, -1, np.int32), np.full(io.m, -1, np.int32)
        if io.n <= COLLECT_ALL and io.n * io.m * 8 <= CANDIDATE_BYTES:
            wlo[todo], whi[todo] = 0, (1 << 15) - 1
            return wlo, whi, io.n
        hist = np.zeros((io.m, 1 << 15), np.int32)
        for start in np.linspace(0, io.n - SAMPLE, SAMPLES).astype(np.int64):
            if K.hist(*io.head(int(start), SAMPLE), hist):
                raise NonFinite("a task vector is not finite")
        total = SAMPLES * SAMPLE
        share = 0.0
        for j in todo:
            p = ks[j] / io.n
            margin = 5 * math.sqrt(p * (1 - p) / total) + 2 / total
            top = np.cumsum(hist[j, ::-1])[::-1] / total  # share of samples in bins >= b
            above = np.append(top[1:], 0.0)                # ... in bins > b
            inside = np.flatnonzero((top >= p - margin) & (above <= p + margin))
            if not len(inside):
                continue
            in_window = float(hist[j, inside.min():inside.max() + 1].sum()) / total
            if in_window <= MAX_SHARE:  # else too many to hold: the cut by passes
                wlo[j], whi[j] = inside.min(), inside.max()
                share = max(share, in_window)
        cap = min(io.n, int(share * io.n * 1.25) + 4 * SAMPLE)
        if cap * io.m * 8 > CANDIDATE_BYTES:  # too many to hold: every cut by passes
            return np.full(io.m, -1, np.int32), np.full(io.m, -1, np.int32), 0
        return wlo, whi, cap

    def _cuts_by_passes(self, io: _Tensor, missed: dict[int, tuple[int, int]], cuts: list[Any]) -> None:
        """The cuts the sampled windows missed: a pass for the low 16 bits inside the cut's bin, and a scan for
        the last kept entry equal to the cut where the cut splits them."""
        from rlm.core.merge import _kernels as K

        hi = np.full(io.m, -1, np.int32)
        for j, (h, _) in missed.items():
            hi[j] = h
        low = np.zeros((io.m, 1 << 16), np.int32)
        K.low_hist(*io.head(), hi, low)
        value = np.full(io.m, -1, np.int64)
        need = np.zeros(io.m, np.int64)
        for j, (h, rank) in missed.items():
            lo, need[j] = _select(low[j].astype(np.int64), rank)
            bits = (h << 16) | lo
            if need[j] == low[j, lo]:  # every entry equal to the cut is kept
                cuts[j] = (bits, io.n - 1)
            else:
                value[j] = bits
        if (value >= 0).any():
            found = np.full(io.m, -1, np.int64)
            K.find_tie(*io.head(), value, need, found, np.zeros(io.m, np.int64))
            for j in np.flatnonzero(value >= 0):
                cuts[j] = (int(value[j]), int(found[j]))

    # -- L1 rescale and DARE ---------------------------------------------------------------------------------
    def _scales(self, io: _Tensor, mode: int, thr: Any, last: Any, states: Any, skip: list[bool]) -> list[Any]:
        """Each model's multiplier ``float32(w · scale)`` with the L1 rescale of its mask (``mode`` 1: the cut
        ``thr``/``last``; 2: the DARE draws from ``states``, a copy: the merge draws again); ``None`` for the
        models in ``skip`` (keep-all masks, factor exactly 1)."""
        from rlm.core.merge import _kernels as K

        sums = np.zeros((io.m, 4), np.float64)
        if not all(skip):
            K.l1(*io.head(), mode, thr, last, states, np.array(self.densities, np.float32), sums)
        out = []
        for j in range(io.m):
            if skip[j]:
                out.append(None)
                continue
            mult = exact_scale(sums[j, 0] + sums[j, 1], sums[j, 2] + sums[j, 3], self.weights[j])
            if mult is None:
                raise NonFinite("the L1 rescale factor is too close to a float32 rounding boundary to reproduce")
            out.append(mult)
        return out

    def _mults(self, scaled: list[Any]) -> np.ndarray:
        """u_i = τ_i · float32(w_i · scale_i): ``scaled`` holds that float32 (``None``: scale 1)."""
        return np.array([np.float32(w) if s is None else s for w, s in zip(self.weights, scaled)], dtype=np.float32)

    def _dare_states(self, t: Any, io: _Tensor) -> np.ndarray:
        from rlm.core.contracts import tensor_seed
        from rlm.core.merge import _kernels as K

        states = np.zeros((io.m, K.STATE_WORDS), np.uint32)
        for j in range(io.m):
            K.mt_seed(states[j], tensor_seed(self.e.run.seed, t.name, j), self.densities[j] < 1)
        return states


def _select(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram (bins ordered by value) and that entry's rank
    among the bin's entries (1 = the largest)."""
    above = np.cumsum(hist[::-1])[::-1] - hist  # entries in higher bins
    b = int(np.flatnonzero((above < k) & (above + hist >= k)).max())
    return b, k - int(above[b])
