"""The fused path of the task-conflict engine: bf16 or float32 safetensors inputs, sums from compiled kernels.

:func:`rlm.core.conflicts.engine.compute_conflicts` hands over here when :func:`unavailable_reason` is ``None``
(every input a safetensors model whose tensors are bf16 or float32 alike in every model, every metric fed by
the engine's sums, the C extension
:mod:`rlm.core.conflicts._kernels` built). The statistics are the eager path's, with the same definitions (τ in float32, thresholds from ``threshold_bits``
magnitude bins, the same top-k rules) and the same results — counts identical, sums to float64 rounding
(bf16: τ in float32 and its products formed exactly in float64; float32 inputs: τ in float64, as eager).
What changes is how the data flows:

* the kernels read the stored values themselves, with positioned reads of 128 KiB per input at a time
  into buffers that stay in the L2 cache (no memory map, no page-table work): resident memory does not grow
  with the model;
* ``workers`` threads take whole tensors (the kernels release the GIL); results are folded into the metrics
  in tensor order, so the output does not depend on the number of workers;
* pass 1 (every tensor): norms, products, counts above thresholds and the magnitude histograms (per tensor,
  then added into the model's global histogram); per-tensor thresholds follow from each tensor's histogram;
* pass 2 (only with a top-k metric): one count per (first kept rate of a, first kept rate of b, opposite
  signs) code for all scopes at once, through per-tensor lookup tables bin -> first kept rate. With
  ``per_tensor`` top-k alone each tensor's second pass follows its first one at once.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rlm.core.errors import ModelError, RlmError

_PAD = 80  # entries between the 4 interleaved histogram copies (rows 2^k apart would share cache sets)
DTYPES = ("BF16", "F32")  # stored dtypes (safetensors codes) the kernels read


def unavailable_reason(config: Any, metrics: Sequence[Any], base_reader: Any, readers: Mapping[str, Any],
                       tensors: Sequence[Any], hist_bits: int) -> str | None:
    """Why the fused path cannot run these inputs (``None`` when it can)."""
    from rlm.core.models.reader import ModelReader, st_code

    if sys.byteorder != "little":
        return "this machine is big-endian (the kernels read safetensors' little-endian values as stored)"
    if config.delta_dtype != "auto":
        return f"delta_dtype is {config.delta_dtype!r} (the fused kernels form τ as 'auto' does)"
    for m in metrics:
        if getattr(m, "reads_deltas", True):
            return f"metric {m.name!r} reads task-vector blocks (reads_deltas = True)"
        if (m.histogram_bits or 0) > hist_bits:
            return f"metric {m.name!r} wants {m.histogram_bits}-bit magnitude bins, more than threshold_bits"
    big = next((t for t in tensors if t.numel >= 2 ** 31), None)
    if big is not None:
        return f"tensor {big.name} has {big.numel} elements (the fused per-tensor histograms count in int32)"
    for name, r in [("base", base_reader), *readers.items()]:
        if not isinstance(r, ModelReader) or r.format != "safetensors":
            return f"model {name} ({r.path}) is not a safetensors model directory"
    for t in tensors:
        codes = {name: st_code(r.dtype(t.name)) for name, r in [("base", base_reader), *readers.items()]}
        kinds = set(codes.values())
        if len(kinds) > 1 or not kinds <= set(DTYPES):
            listing = ", ".join(f"{n} {c}" for n, c in codes.items())
            return f"tensor {t.name} is {listing} (the fused kernels take BF16 or F32, the same in every model)"
    try:
        from rlm.core.conflicts import _kernels  # noqa: F401
    except ImportError as exc:
        return f"the compiled kernels rlm.core.conflicts._kernels are not built ({exc})"
    return None


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class TensorSums:
    """The per-tensor context handed to metrics on the fused path (the eager path's :class:`Chunk` API,
    answered from the kernels' sums). ``deltas`` is empty there: metrics on this path set
    ``reads_deltas = False``."""

    engine_histograms = True

    def __init__(self, tensor_name: str, names: Sequence[str], numel: int, *, kept_rates: Sequence[float],
                 bits: int, modes: Sequence[str], ss: np.ndarray | None = None, pair: np.ndarray | None = None,
                 above: np.ndarray | None = None, above_thresholds: Sequence[float] = (),
                 joint: Mapping[tuple[str, str, str], np.ndarray] | None = None) -> None:
        self.tensor_name = tensor_name
        self.names = list(names)
        self.pairs = list(itertools.combinations(self.names, 2))
        self.numel = self.size = numel
        self.kept_rates = list(kept_rates)
        self.bits = bits
        self.modes = list(modes)
        self._ss, self._pair, self._above = ss, pair, above
        self._above_thresholds = list(above_thresholds)
        self._joint = dict(joint or {})
        self._index = {n: i for i, n in enumerate(self.names)}
        self._pair_index = {p: i for i, p in enumerate(self.pairs)}

    def sum_squares(self, name: str) -> float:
        return float(self._ss[self._index[name]])

    def dot(self, a: str, b: str) -> float:
        return float(self._pair[self._pair_index[(a, b)], 0])

    def conflict_sum_squares(self, a: str, b: str) -> float:
        return float(self._pair[self._pair_index[(a, b)], 1])

    def count_above(self, name: str, threshold: float) -> int:
        try:
            k = self._above_thresholds.index(threshold)
        except ValueError:
            raise RlmError(f"the fused engine counted |τ| above {self._above_thresholds}, not {threshold}: a "
                           f"metric asking for another threshold must list it in count_thresholds") from None
        return int(self._above[self._index[name], k])

    def pair_joint(self, a: str, b: str, mode: str) -> Any:
        import torch

        return torch.from_numpy(self._joint[(a, b, mode)])


def range_thresholds(seg: np.ndarray, lo: int, hi: int, total: int, kept_rates: Sequence[float]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Threshold bins and kept counts (as :func:`rlm.core.conflicts.engine.threshold_bins` and
    ``kept_from_histogram``) of one histogram from its non-zero part ``seg`` (the counts of bins ``lo..hi``);
    ``total`` positions include the zeros."""
    from rlm.core.conflicts.engine import n_keep

    need = np.array([n_keep(k, total) for k in kept_rates], dtype=np.int64)
    if hi < lo:
        return np.zeros(len(need), np.int64), np.zeros(len(need), np.int64)
    above = np.cumsum(seg[::-1], dtype=np.int64)  # above[i] = #{positions in bins >= hi - i}
    i = np.searchsorted(above, need, side="left")  # the first i where that reaches n_keep
    found = i < len(above)
    thr = np.where(found, hi - i, 0)  # not reached among the non-zero bins: the threshold is bin 0
    kept = np.where(found, above[np.minimum(i, len(above) - 1)], above[-1])
    return thr.astype(np.int64), kept.astype(np.int64)


def run(*, config: Any, metrics: Sequence[Any], base_reader: Any, readers: Mapping[str, Any],
        tensors: Sequence[Any], modes: Sequence[str], hist_bits: int, total: int,
        progress: Callable[[str, int, int], None] | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Feed ``metrics`` from the fused kernels; returns ``(kept_actual, passes)`` as the eager path does."""
    import torch

    from rlm.core.conflicts import _kernels as K
    from rlm.core.conflicts.engine import float32_floor_bits, histogram_thresholds, n_bins
    from rlm.core.models.reader import check_finite, element_size, row_blocks

    names = list(readers)
    n_models = len(names)
    pairs = list(itertools.combinations(range(n_models), 2))
    pair_index = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    g = len(config.kept_rates)
    big = g + 1
    topk_metrics = [m for m in metrics if getattr(m, "needs_topk", False)]
    plain_metrics = [m for m in metrics if not getattr(m, "needs_topk", False)]
    hist_metrics = [m for m in plain_metrics if m.histogram_bits is not None]
    need_hist = bool(modes) or bool(hist_metrics)
    nb = n_bins(hist_bits) if need_hist else 0
    shift = 32 - hist_bits
    stride = nb + _PAD if nb else 0
    copies = 4 if hist_bits <= 14 else 1  # coarse bins repeat often: spread them over interleaved copies
    thresholds = sorted({float(t) for m in metrics for t in getattr(m, "count_thresholds", ())})
    above_bits = np.array([float32_floor_bits(t) for t in thresholds], dtype=np.uint32)  # bf16: float32 τ
    above_values = np.array(thresholds, dtype=np.float64)  # float32 inputs: float64 τ
    workers = config.workers or default_workers()
    block_elements = config.fused_block_elements
    span = big ** len(modes)
    table_dtype = np.uint8 if span <= 256 else np.uint16 if span <= 65536 else None
    if modes and table_dtype is None:
        raise RlmError(f"{g} kept rates over {len(modes)} top-k scopes are too many for the fused engine "
                       f"((g+1)^scopes = {span} > 65536); use engine: eager")
    sources = {"base": base_reader, **readers}  # read in this order: the base, then the models
    local = threading.local()
    states: list[Any] = []
    states_lock = threading.Lock()

    def state() -> Any:
        st = getattr(local, "state", None)
        if st is None:
            st = type("WorkerState", (), {})()
            st.hist = np.zeros((n_models, copies, stride), np.int32)
            st.glob = np.zeros((n_models, nb), np.int64)
            st.joint = np.zeros((max(len(pairs), 1), 4, span * span * 2 if modes else 0), np.int64)
            local.state = st
            with states_lock:
                states.append(st)
        return st

    def blocks(t: Any) -> list[tuple[int, int]]:
        return row_blocks(t.shape, t.numel, block_elements)

    def inputs(t: Any, start: int, stop: int) -> tuple[tuple[int, ...], np.ndarray, int]:
        """File descriptors and byte offsets of rows ``start:stop`` of ``t`` in every input (the readers
        checked every tensor's byte range against its file when they opened it), and the element count."""
        row = t.numel // t.shape[0] if t.shape else 1
        located = [r.location(t.name) for r in sources.values()]
        offsets = np.array([off + start * row * element_size(t.dtype) for _, off, _ in located], dtype=np.int64)
        return tuple(fd for fd, _, _ in located), offsets, (stop - start) * row

    def kernel(fn: Any, t: Any, *args: Any) -> None:
        try:
            fn(*args)
        except (OSError, EOFError) as exc:
            raise ModelError(f"tensor {t.name}: reading the inputs failed ({exc}); inputs in order: "
                             + ", ".join(f"{n}={r.path}" for n, r in sources.items())) from None

    def fail_nonfinite(t: Any, ss: np.ndarray) -> None:
        """Name the input holding NaN/Inf (or, if every input is finite, the model whose τ overflows)."""
        check_finite(base_reader.get(t.name), base_reader.path, t.name)
        for n, r in readers.items():
            check_finite(r.get(t.name), r.path, t.name)
        j = int(np.flatnonzero(~np.isfinite(ss))[0]) if not np.isfinite(ss).all() else 0
        raise ModelError(f"model {readers[names[j]].path}: tensor {t.name}: the task vector overflows float32")

    def topk_pass(t: Any, lohi: np.ndarray, thr: np.ndarray, st: Any) -> None:
        """Joint counts of one tensor; thr: int64[S, M, g] threshold bins of this tensor's scopes."""
        lo = np.maximum(lohi[:, 0], 1)
        hi = lohi[:, 1]
        length = int(max(0, int((hi - lo).max())) + 3)
        tables = np.empty((n_models, length), table_dtype)
        for j in range(n_models):
            eff = np.ascontiguousarray(np.maximum(thr[:, j, :], 1), dtype=np.int32)
            K.first_kept_table(eff, len(modes), int(lo[j]), int(hi[j]), tables[j], tables.itemsize)
        lo64 = np.ascontiguousarray(lo, dtype=np.int64)
        for start, stop in blocks(t):
            fds, offsets, n = inputs(t, start, stop)
            kernel(K.topk_block, t, fds, offsets, n, shift, lo64, tables, tables.itemsize, pair_index, span,
                   st.joint, element_size(t.dtype))

    def first_pass(t: Any) -> dict[str, Any]:
        st = state()
        ss = np.zeros(n_models)
        pair = np.zeros((len(pairs), 2))
        above = np.zeros((n_models, len(thresholds)), np.int64)
        lohi = np.array([[0xFFFFFFFF, 0]] * n_models, dtype=np.int64)
        for start, stop in blocks(t):
            fds, offsets, n = inputs(t, start, stop)
            kernel(K.stats_block, t, fds, offsets, n, pair_index, above_bits, shift, st.hist, stride, copies, ss,
                   pair, above, lohi, element_size(t.dtype), above_values)
        if config.check_finite and not (np.isfinite(ss).all() and np.isfinite(pair).all()):
            fail_nonfinite(t, ss)
        lohi[:, 0] = np.where(lohi[:, 1] > 0, lohi[:, 0], 1)  # no non-zero bin: an empty range [1, 0]
        out: dict[str, Any] = {"ss": ss, "pair": pair, "above": above, "lohi": lohi}
        if nb:
            tensor_thr = np.zeros((n_models, g), np.int64)
            kept = np.zeros((n_models, g), np.int64)
            for j in range(n_models):
                lo, hi = int(lohi[j, 0]), int(lohi[j, 1])
                seg = np.empty(max(0, hi - lo + 1), np.int64)
                K.fold_histogram(st.hist[j], stride, lo, hi, seg, st.glob[j])
                if "per_tensor" in modes:
                    tensor_thr[j], kept[j] = range_thresholds(seg, lo, hi, t.numel, config.kept_rates)
            out["thr"], out["kept"] = tensor_thr, kept
            if modes == ["per_tensor"]:
                topk_pass(t, lohi, tensor_thr[None], st)
        return out

    def second_pass(item: tuple[Any, np.ndarray, np.ndarray]) -> None:
        t, lohi, thr = item
        topk_pass(t, lohi, thr, state())

    kept_actual = {m: {n: torch.zeros(g, dtype=torch.int64) for n in names} for m in modes}
    pending: list[tuple[Any, np.ndarray, np.ndarray]] = []  # waiting for global thresholds: (tensor, lohi, thr)
    phase1 = "histogram" if "global" in modes else "statistics"
    gc_was_enabled = gc.isenabled()
    gc.disable()  # thousands of small arrays, no cycles: collections would only cost time
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlm-conflicts")
    try:
        for i, (t, res) in enumerate(zip(tensors, pool.map(first_pass, tensors))):
            ctx = TensorSums(t.name, names, t.numel, kept_rates=config.kept_rates, bits=hist_bits,
                             modes=modes, ss=res["ss"], pair=res["pair"], above=res["above"],
                             above_thresholds=thresholds)
            for m in plain_metrics:
                m.update(t.name, {}, context=ctx)
            if "per_tensor" in modes:
                for j, n in enumerate(names):
                    kept_actual["per_tensor"][n] += torch.from_numpy(res["kept"][j])
            if "global" in modes:
                pending.append((t, res["lohi"], res.get("thr")))
            if progress:
                progress(phase1, i + 1, len(tensors))
        glob = sum(st.glob for st in states) if states else np.zeros((n_models, nb), np.int64)
        for m in hist_metrics:
            m.update_histogram("*", {n: torch.from_numpy(glob[j]) for j, n in enumerate(names)}, hist_bits)
        if "global" in modes:
            global_thr = np.zeros((n_models, g), np.int64)
            for j, n in enumerate(names):
                thr, kept = histogram_thresholds(torch.from_numpy(glob[j]), total, config.kept_rates)
                global_thr[j] = thr.numpy()
                kept_actual["global"][n] += kept
            items = []
            for t, lohi, tthr in pending:
                scopes = [global_thr if mode == "global" else tthr for mode in modes]
                items.append((t, lohi, np.stack(scopes)))
            for i, _ in enumerate(pool.map(second_pass, items)):
                if progress:
                    progress("statistics", i + 1, len(items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error: stop, do not finish the pass
        if gc_was_enabled:
            gc.enable()
    if modes:
        joint = sum(st.joint.sum(axis=1) for st in states)  # (P, span² · 2)
        shape = (big,) * (2 * len(modes)) + (2,)
        per_pair: dict[tuple[str, str, str], np.ndarray] = {}
        for q, (a, b) in enumerate(pairs):
            c = joint[q].reshape(shape)
            for s, mode in enumerate(modes):
                if len(modes) == 1:
                    m2 = c
                else:  # axes (first_a scope 0, first_a scope 1, first_b scope 0, first_b scope 1, sign)
                    m2 = c.sum(axis=(1, 3)) if s == 0 else c.sum(axis=(0, 2))
                per_pair[(names[a], names[b], mode)] = np.ascontiguousarray(m2, dtype=np.int64)
        ctx = TensorSums("*", names, total, kept_rates=config.kept_rates, bits=hist_bits, modes=modes,
                         joint=per_pair)
        for m in topk_metrics:
            m.update("*", {}, context=ctx)
    return kept_actual, 1 + bool("global" in modes)
