"""The eager engine of ``rlm conflicts``: torch, block by block, for any input (:class:`EagerPass`).

Reads the base and every model one tensor at a time (in blocks of rows for large tensors) through
:mod:`rlm.core.models.reader` (or a LoRA reader), forms τ in reused buffers (``delta_dtype``: ``auto`` =
float32 for bf16/fp16 inputs, where the conversion and the difference are exact but for values more than 2^15
apart, float64 otherwise) and hands each block to every metric as a :class:`rlm.core.conflicts.chunk.Chunk`.

Passes: the first pass computes every statistic that needs no top-k threshold and the magnitude histograms
(per tensor and per model); top-k statistics follow in a second pass over the tensors whose thresholds were
not known while they were read (all of them for global top-k; multi-block tensors for per-tensor top-k).
Only :mod:`rlm.core.conflicts.engine` drives it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from rlm.core.conflicts.chunk import Chunk, Workspace
from rlm.core.conflicts.passes import EnginePass, Progress
from rlm.core.conflicts.stats import (
    Thresholds,
    histogram_thresholds,
    kept_from_histogram,
    n_bins,
    threshold_bins,
)


def trim_heap() -> Callable[[], Any]:
    """``malloc_trim(0)`` where glibc provides it: many short-lived multi-MB blocks otherwise leave freed heap
    pages resident, so RSS would creep up with the number of tensors (a no-op elsewhere)."""
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6").malloc_trim
        return lambda: fn(0)
    except (OSError, AttributeError):
        return lambda: None


class EagerPass(EnginePass):
    """One run of the eager engine (see :class:`rlm.core.conflicts.passes.EnginePass`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import torch

        super().__init__(*args, **kwargs)
        self.bits = self.config.threshold_bits
        self.auto = self.config.delta_dtype == "auto"
        self.dtype = torch.float64 if self.auto else getattr(torch, self.config.delta_dtype)
        self.ws = Workspace()
        self.thresholds: dict[str, dict[str, Any]] = {}  # mode -> model -> thresholds of the current tensor
        self.per_tensor_thr: dict[str, dict[str, Thresholds]] = {}
        self.global_hist = ({n: torch.zeros(n_bins(self.bits), dtype=torch.int64) for n in self.names}
                            if "global" in self.modes else {})
        self.deferred: list[Any] = []  # tensors whose top-k statistics wait for the second pass
        self.trim = trim_heap()

    def run(self, progress: Progress | None = None) -> tuple[dict[str, dict[str, Any]], int]:
        self.first_pass(progress)
        if "global" in self.modes:
            self.global_thresholds()
        self.second_pass(progress)
        return self.kept_actual, 1 + bool(self.deferred)

    # -- reading ------------------------------------------------------------------------------------------
    def blocks(self, t: Any) -> list[tuple[int, int] | None]:
        from rlm.core.models.reader import row_blocks

        return (row_blocks(t.shape, t.numel, self.config.chunk_elements) or [None]) if t.shape else [None]

    def read_block(self, t: Any, rows: tuple[int, int] | None, check: bool) -> dict[str, Any]:
        """τ of every model for one block. 16-bit inputs (with ``delta_dtype: auto``) give float32 τ formed
        in reused buffers: bf16/fp16 → float32 is exact and so is the difference, except where one value is
        over 2^15 times the other (then rounded to float32)."""
        import torch

        from rlm.core.models.reader import ModelReader

        half = (torch.bfloat16, torch.float16)
        raw = self.base_reader.get(t.name, rows)
        xs = {n: r.get(t.name, rows) if isinstance(r, ModelReader) else None for n, r in self.readers.items()}
        fast = self.auto and raw.dtype in half and all(x is not None and x.dtype in half for x in xs.values())
        n_el = raw.numel()
        if fast:
            b = self.ws.get("base", n_el, torch.float32)
            b.copy_(raw.reshape(-1))
        else:
            b = raw.to(self.dtype)
        out = {}
        for n, r in self.readers.items():
            x = xs[n]
            if fast:
                d = self.ws.get(("delta", n), n_el, torch.float32)
                d.copy_(x.reshape(-1))
                d.sub_(b)
            elif x is not None:
                d = x.to(self.dtype, copy=True)
                d -= b
            else:
                d = r.delta(t.name, b.to(torch.float32), rows).to(self.dtype)
            if check and self.config.check_finite:
                self._check_finite(t, raw, x, d, r)
            out[n] = d.reshape(-1)
        return out

    def _check_finite(self, t: Any, raw: Any, x: Any, d: Any, reader: Any) -> None:
        """NaN/Inf anywhere in the block reaches the sum of τ: then name the input that holds it (or the model
        whose τ overflows)."""
        import torch

        from rlm.core.errors import ModelError
        from rlm.core.models.reader import check_finite

        if math.isfinite(float(d.sum())):
            return
        check_finite(raw, self.base_reader.path, t.name)
        check_finite(x if x is not None else d, reader.path, t.name)
        if not bool(torch.isfinite(d).all()):
            raise ModelError(f"model {reader.path}: tensor {t.name}: the task vector overflows")

    def make_chunk(self, t: Any, deltas: dict[str, Any]) -> Chunk:
        return Chunk(t.name, deltas, numel=t.numel, kept_rates=self.config.kept_rates, bits=self.bits,
                     thresholds=self.thresholds, modes=self.modes, workspace=self.ws, engine_histograms=True)

    # -- passes -------------------------------------------------------------------------------------------
    def first_pass(self, progress: Progress | None) -> None:
        """Every statistic that needs no top-k threshold, and the magnitude histograms (per tensor and
        global); top-k statistics too where the thresholds are known by then (per-tensor only, one block)."""
        phase = "histogram" if "global" in self.modes else "statistics"
        for i, t in enumerate(self.tensors):
            self._first_pass_tensor(t)
            if i % 16 == 15:
                self.trim()
            if progress:
                progress(phase, i + 1, len(self.tensors))

    def _first_pass_tensor(self, t: Any) -> None:
        import torch

        bl = self.blocks(t)
        hdt = torch.int32 if t.numel < 2 ** 31 else torch.int64  # int32 index_add_ is about twice as fast
        hists = ({n: self.ws.get(("thist", n), n_bins(self.hist_bits), hdt).zero_() for n in self.names}
                 if self.need_hist else {})
        chunk: Chunk | None = None
        for rows in bl:
            chunk = self.make_chunk(t, self.read_block(t, rows, True))
            self.nonzero.update(n for n, d in chunk.deltas.items() if n not in self.nonzero and bool(d.any()))
            for m in self.plain_metrics:
                m.update(t.name, chunk.deltas, context=chunk)
            for n in hists:
                chunk.add_bin_histogram(n, hists[n], self.hist_bits)
        for m in self.hist_metrics:
            m.update_histogram(t.name, hists, self.hist_bits)
        for n, h in self.global_hist.items():
            h += hists[n]
        if "per_tensor" in self.modes:
            self.per_tensor_thr[t.name] = {}
            for n, h in hists.items():
                thr, kept = histogram_thresholds(h, t.numel, self.config.kept_rates)
                self.per_tensor_thr[t.name][n] = Thresholds(thr, self.bits)
                self.kept_actual["per_tensor"][n] += kept
        if not self.modes:
            return
        if "global" not in self.modes and len(bl) == 1 and chunk is not None:
            self.thresholds["per_tensor"] = self.per_tensor_thr.pop(t.name)
            chunk.thresholds = dict(self.thresholds)
            for m in self.topk_metrics:
                m.update(t.name, chunk.deltas, context=chunk)
        else:
            self.deferred.append(t)

    def global_thresholds(self) -> None:
        """Each model's global threshold bins from its whole-model histogram (after the first pass)."""
        self.thresholds["global"] = {}
        for n, h in self.global_hist.items():
            thr = threshold_bins(h, self.total, self.config.kept_rates)
            self.thresholds["global"][n] = Thresholds(thr, self.bits)
            self.kept_actual["global"][n] += kept_from_histogram(h, thr)
        self.global_hist = {}

    def second_pass(self, progress: Progress | None) -> None:
        """Top-k statistics of the tensors whose thresholds needed a full first pass."""
        for i, t in enumerate(self.deferred):
            if "per_tensor" in self.modes:
                self.thresholds["per_tensor"] = self.per_tensor_thr.pop(t.name)
            for rows in self.blocks(t):
                chunk = self.make_chunk(t, self.read_block(t, rows, False))
                for m in self.topk_metrics:
                    m.update(t.name, chunk.deltas, context=chunk)
            if i % 16 == 15:
                self.trim()
            if progress:
                progress("statistics", i + 1, len(self.deferred))
