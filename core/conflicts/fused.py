"""The fused path of the task-conflict engine: bf16 or float32 safetensors inputs, sums from compiled kernels.

:func:`rlm.core.conflicts.engine.compute_conflicts` hands over here (:class:`FusedPass`) when
:func:`unavailable_reason` is ``None``
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
from typing import Any, Mapping, Sequence

import numpy as np

from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.passes import EnginePass, Progress
from rlm.core.conflicts.stats import float32_floor_bits, histogram_thresholds, n_bins, n_keep
from rlm.core.errors import ModelError, RlmError

_PAD = 80  # entries between the 4 interleaved histogram copies (rows 2^k apart would share cache sets)
DTYPES = ("BF16", "F32")  # stored dtypes (safetensors codes) the kernels read


def unavailable_reason(config: ConflictsConfig, metrics: Sequence[Any], base_reader: Any, readers: Mapping[str, Any],
                       tensors: Sequence[Any], hist_bits: int) -> str | None:
    """Why the fused path cannot run these inputs (``None`` when it can)."""
    from rlm.core.models.reader import ModelReader, st_code

    if sys.byteorder != "little":
        return "this machine is big-endian (the kernels read safetensors' little-endian values as stored)"
    if config.delta_dtype != "auto":
        return f"delta_dtype is {config.delta_dtype!r} (the fused kernels form τ as 'auto' does)"
    for m in metrics:
        if m.reads_deltas:
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
    """Threshold bins and kept counts (as :func:`rlm.core.conflicts.stats.threshold_bins` and
    ``kept_from_histogram``) of one histogram from its non-zero part ``seg`` (the counts of bins ``lo..hi``);
    ``total`` positions include the zeros."""
    need = np.array([n_keep(k, total) for k in kept_rates], dtype=np.int64)
    if hi < lo:
        return np.zeros(len(need), np.int64), np.zeros(len(need), np.int64)
    above = np.cumsum(seg[::-1], dtype=np.int64)  # above[i] = #{positions in bins >= hi - i}
    i = np.searchsorted(above, need, side="left")  # the first i where that reaches n_keep
    found = i < len(above)
    thr = np.where(found, hi - i, 0)  # not reached among the non-zero bins: the threshold is bin 0
    kept = np.where(found, above[np.minimum(i, len(above) - 1)], above[-1])
    return thr.astype(np.int64), kept.astype(np.int64)


class _WorkerState:
    """One worker thread's accumulators: per-tensor histograms (``copies`` interleaved rows per model), the
    global histograms and the joint top-k counts."""

    def __init__(self, n_models: int, copies: int, stride: int, nb: int, n_pairs: int, joint_size: int) -> None:
        self.hist = np.zeros((n_models, copies, stride), np.int32)
        self.glob = np.zeros((n_models, nb), np.int64)
        self.joint = np.zeros((max(n_pairs, 1), 4, joint_size), np.int64)


class FusedPass(EnginePass):
    """One run of the fused engine (see :class:`rlm.core.conflicts.passes.EnginePass`): :meth:`run` feeds the
    metrics from the kernels."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_models = len(self.names)
        self.pairs = list(itertools.combinations(range(self.n_models), 2))
        self.pair_index = np.array(self.pairs, dtype=np.int64).reshape(-1, 2)
        self.g = len(self.config.kept_rates)
        self.nb = n_bins(self.hist_bits) if self.need_hist else 0
        self.shift = 32 - self.hist_bits
        self.stride = self.nb + _PAD if self.nb else 0
        # coarse bins repeat often: spread them over interleaved copies
        self.copies = 4 if self.hist_bits <= 14 else 1
        self.thresholds = sorted({float(t) for m in self.metrics for t in m.count_thresholds})
        self.above_bits = np.array([float32_floor_bits(t) for t in self.thresholds], dtype=np.uint32)  # bf16
        self.above_values = np.array(self.thresholds, dtype=np.float64)  # float32 inputs: float64 τ
        self.span = (self.g + 1) ** len(self.modes)
        self.table_dtype = np.uint8 if self.span <= 256 else np.uint16 if self.span <= 65536 else None
        if self.modes and self.table_dtype is None:
            raise RlmError(f"{self.g} kept rates over {len(self.modes)} top-k scopes are too many for the fused "
                           f"engine ((g+1)^scopes = {self.span} > 65536); use engine: eager")
        self.sources = {"base": self.base_reader, **self.readers}  # read in this order: the base, then the models
        self._local = threading.local()
        self._states: list[_WorkerState] = []
        self._states_lock = threading.Lock()

    # -- per-thread state and reading ---------------------------------------------------------------------
    def state(self) -> _WorkerState:
        st = getattr(self._local, "state", None)
        if st is None:
            st = _WorkerState(self.n_models, self.copies, self.stride, self.nb, len(self.pairs),
                              self.span * self.span * 2 if self.modes else 0)
            self._local.state = st
            with self._states_lock:
                self._states.append(st)
        return st

    def blocks(self, t: Any) -> list[tuple[int, int]]:
        from rlm.core.models.reader import row_blocks

        return row_blocks(t.shape, t.numel, self.config.fused_block_elements)

    def inputs(self, t: Any, start: int, stop: int) -> tuple[tuple[int, ...], np.ndarray, int]:
        """File descriptors and byte offsets of rows ``start:stop`` of ``t`` in every input (the readers
        checked every tensor's byte range against its file when they opened it), and the element count."""
        from rlm.core.models.reader import element_size

        row = t.numel // t.shape[0] if t.shape else 1
        located = [r.location(t.name) for r in self.sources.values()]
        offsets = np.array([off + start * row * element_size(t.dtype) for _, off, _ in located], dtype=np.int64)
        return tuple(fd for fd, _, _ in located), offsets, (stop - start) * row

    def kernel(self, fn: Any, t: Any, *args: Any) -> None:
        try:
            fn(*args)
        except (OSError, EOFError) as exc:
            raise ModelError(f"tensor {t.name}: reading the inputs failed ({exc}); inputs in order: "
                             + ", ".join(f"{n}={r.path}" for n, r in self.sources.items())) from None

    def fail_nonfinite(self, t: Any, ss: np.ndarray) -> None:
        """Name the input holding NaN/Inf (or, if every input is finite, the model whose τ overflows)."""
        from rlm.core.models.reader import check_finite

        check_finite(self.base_reader.get(t.name), self.base_reader.path, t.name)
        for n, r in self.readers.items():
            check_finite(r.get(t.name), r.path, t.name)
        j = int(np.flatnonzero(~np.isfinite(ss))[0]) if not np.isfinite(ss).all() else 0
        raise ModelError(f"model {self.readers[self.names[j]].path}: tensor {t.name}: the task vector overflows "
                         f"float32")

    # -- the kernels' passes over one tensor ----------------------------------------------------------------
    def topk_pass(self, t: Any, lohi: np.ndarray, thr: np.ndarray, st: _WorkerState) -> None:
        """Joint counts of one tensor; thr: int64[S, M, g] threshold bins of this tensor's scopes."""
        from rlm.core.conflicts import _kernels as K
        from rlm.core.models.reader import element_size

        lo = np.maximum(lohi[:, 0], 1)
        hi = lohi[:, 1]
        length = int(max(0, int((hi - lo).max())) + 3)
        tables = np.empty((self.n_models, length), self.table_dtype)
        for j in range(self.n_models):
            eff = np.ascontiguousarray(np.maximum(thr[:, j, :], 1), dtype=np.int32)
            K.first_kept_table(eff, len(self.modes), int(lo[j]), int(hi[j]), tables[j], tables.itemsize)
        lo64 = np.ascontiguousarray(lo, dtype=np.int64)
        for start, stop in self.blocks(t):
            fds, offsets, n = self.inputs(t, start, stop)
            self.kernel(K.topk_block, t, fds, offsets, n, self.shift, lo64, tables, tables.itemsize,
                        self.pair_index, self.span, st.joint, element_size(t.dtype))

    def first_pass(self, t: Any) -> dict[str, Any]:
        """Sums, counts and histograms of one tensor (a worker thread's job): ``{"ss", "pair", "above",
        "lohi"}`` plus, with histograms, this tensor's thresholds and kept counts (``"thr"``, ``"kept"``)."""
        from rlm.core.conflicts import _kernels as K
        from rlm.core.models.reader import element_size

        st = self.state()
        ss = np.zeros(self.n_models)
        pair = np.zeros((len(self.pairs), 2))
        above = np.zeros((self.n_models, len(self.thresholds)), np.int64)
        lohi = np.array([[0xFFFFFFFF, 0]] * self.n_models, dtype=np.int64)
        for start, stop in self.blocks(t):
            fds, offsets, n = self.inputs(t, start, stop)
            self.kernel(K.stats_block, t, fds, offsets, n, self.pair_index, self.above_bits, self.shift, st.hist,
                        self.stride, self.copies, ss, pair, above, lohi, element_size(t.dtype), self.above_values)
        if self.config.check_finite and not (np.isfinite(ss).all() and np.isfinite(pair).all()):
            self.fail_nonfinite(t, ss)
        lohi[:, 0] = np.where(lohi[:, 1] > 0, lohi[:, 0], 1)  # no non-zero bin: an empty range [1, 0]
        out: dict[str, Any] = {"ss": ss, "pair": pair, "above": above, "lohi": lohi}
        if self.nb:
            out["thr"], out["kept"] = self._fold_histograms(t, lohi, st)
            if self.modes == ["per_tensor"]:
                self.topk_pass(t, lohi, out["thr"][None], st)
        return out

    def _fold_histograms(self, t: Any, lohi: np.ndarray, st: _WorkerState) -> tuple[np.ndarray, np.ndarray]:
        """Fold the tensor's histograms into the global ones (and clear them); per-tensor thresholds and kept
        counts when ``per_tensor`` top-k is asked for (zeros otherwise)."""
        from rlm.core.conflicts import _kernels as K

        tensor_thr = np.zeros((self.n_models, self.g), np.int64)
        kept = np.zeros((self.n_models, self.g), np.int64)
        for j in range(self.n_models):
            lo, hi = int(lohi[j, 0]), int(lohi[j, 1])
            seg = np.empty(max(0, hi - lo + 1), np.int64)
            K.fold_histogram(st.hist[j], self.stride, lo, hi, seg, st.glob[j])
            if "per_tensor" in self.modes:
                tensor_thr[j], kept[j] = range_thresholds(seg, lo, hi, t.numel, self.config.kept_rates)
        return tensor_thr, kept

    def second_pass(self, item: tuple[Any, np.ndarray, np.ndarray]) -> None:
        t, lohi, thr = item
        self.topk_pass(t, lohi, thr, self.state())

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None) -> tuple[dict[str, dict[str, Any]], int]:
        import torch

        gc_was_enabled = gc.isenabled()
        gc.disable()  # thousands of small arrays, no cycles: collections would only cost time
        pool = ThreadPoolExecutor(max_workers=self.config.workers or default_workers(),
                                  thread_name_prefix="rlm-conflicts")
        try:
            pending = self._run_first_pass(pool, progress)
            glob = (sum(st.glob for st in self._states) if self._states
                    else np.zeros((self.n_models, self.nb), np.int64))
            for m in self.hist_metrics:
                m.update_histogram("*", {n: torch.from_numpy(glob[j]) for j, n in enumerate(self.names)},
                                   self.hist_bits)
            if "global" in self.modes:
                self._run_global_pass(pool, glob, pending, progress)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error: stop, do not finish the pass
            if gc_was_enabled:
                gc.enable()
        if self.modes:
            self._feed_topk_metrics()
        return self.kept_actual, 1 + bool("global" in self.modes)

    def _run_first_pass(self, pool: ThreadPoolExecutor, progress: Progress | None) -> list[tuple[Any, np.ndarray, Any]]:
        """Pass 1 over every tensor on the pool, folded into the metrics in tensor order; returns the tensors
        waiting for global thresholds as ``(tensor, lohi, per-tensor thresholds)``."""
        import torch

        pending: list[tuple[Any, np.ndarray, Any]] = []
        phase = "histogram" if "global" in self.modes else "statistics"
        for i, (t, res) in enumerate(zip(self.tensors, pool.map(self.first_pass, self.tensors))):
            ctx = TensorSums(t.name, self.names, t.numel, kept_rates=self.config.kept_rates, bits=self.hist_bits,
                             modes=self.modes, ss=res["ss"], pair=res["pair"], above=res["above"],
                             above_thresholds=self.thresholds)
            for m in self.plain_metrics:
                m.update(t.name, {}, context=ctx)
            self.nonzero.update(self.names[j] for j in np.flatnonzero(res["ss"] > 0))
            if "per_tensor" in self.modes:
                for j, n in enumerate(self.names):
                    self.kept_actual["per_tensor"][n] += torch.from_numpy(res["kept"][j])
            if "global" in self.modes:
                pending.append((t, res["lohi"], res.get("thr")))
            if progress:
                progress(phase, i + 1, len(self.tensors))
        return pending

    def _run_global_pass(self, pool: ThreadPoolExecutor, glob: np.ndarray,
                         pending: list[tuple[Any, np.ndarray, Any]], progress: Progress | None) -> None:
        """Global thresholds from the summed histograms, then pass 2 (top-k counts) over ``pending``."""
        import torch

        global_thr = np.zeros((self.n_models, self.g), np.int64)
        for j, n in enumerate(self.names):
            thr, kept = histogram_thresholds(torch.from_numpy(glob[j]), self.total, self.config.kept_rates)
            global_thr[j] = thr.numpy()
            self.kept_actual["global"][n] += kept
        items = []
        for t, lohi, tthr in pending:
            scopes = [global_thr if mode == "global" else tthr for mode in self.modes]
            items.append((t, lohi, np.stack(scopes)))
        for i, _ in enumerate(pool.map(self.second_pass, items)):
            if progress:
                progress("statistics", i + 1, len(items))

    def _feed_topk_metrics(self) -> None:
        """Split the joint counts of all scopes by scope and pair and hand them to the top-k metrics at once."""
        joint = sum(st.joint.sum(axis=1) for st in self._states)  # (P, span² · 2)
        shape = (self.g + 1,) * (2 * len(self.modes)) + (2,)
        per_pair: dict[tuple[str, str, str], np.ndarray] = {}
        for q, (a, b) in enumerate(self.pairs):
            c = joint[q].reshape(shape)
            for s, mode in enumerate(self.modes):
                if len(self.modes) == 1:
                    m2 = c
                else:  # axes (first_a scope 0, first_a scope 1, first_b scope 0, first_b scope 1, sign)
                    m2 = c.sum(axis=(1, 3)) if s == 0 else c.sum(axis=(0, 2))
                per_pair[(self.names[a], self.names[b], mode)] = np.ascontiguousarray(m2, dtype=np.int64)
        ctx = TensorSums("*", self.names, self.total, kept_rates=self.config.kept_rates, bits=self.hist_bits,
                         modes=self.modes, joint=per_pair)
        for m in self.topk_metrics:
            m.update("*", {}, context=ctx)
