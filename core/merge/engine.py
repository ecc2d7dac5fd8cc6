"""Streaming merge engine: drives :class:`rlm.core.contracts.MergeMethod` plugins tensor by tensor.

``merge_models(run, out)`` plans from safetensors headers and index files, validates every input against the
base before any compute (architecture, tensor names, shapes, dtypes, vocabulary policy; NaN/Inf are caught
as each tensor is read, naming model and tensor), then for each tensor in the base's shard order: reads the
base and each model's tensor, forms fp32 task vectors τ_i = θ_i − θ_b, asks the method for the merged
tensor and writes it straight into its place in the output shards. Tensors over ``chunk_elements`` are merged
in row blocks; a method's whole-tensor statistic (:meth:`MergeMethod.prepare`: the TIES magnitude cut, the DARE
mask and L1 factor) is computed on the whole task vector for tensors up to ``whole_elements`` and by streaming
passes over row blocks (``prepare_blocks``) above that, so peak memory depends on these two settings and the
number of workers, not on the model size. Output goes to a temporary directory renamed into place when complete, with the base's config
and tokenizer files and ``merge_manifest.json``.

Random masks use one generator per (seed, tensor name, model index) (:func:`rlm.core.contracts.tensor_seed`),
so the output does not depend on tensor order or the number of worker threads.

The helpers below (``magnitude_threshold``, ``dare_mask``, ``l1_scale``, ``combine``) are the shared pure
tensor code of the built-in methods (``rlm.plugins.mergers``), defined as in ``DESIGN.md``.
"""

from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import ConfigDict, Field

from rlm.core.contracts import MergeContext, MergeMethod, PluginConfig
from rlm.core.errors import ConfigError, ModelError, RlmError

# ------------------------------------------------------------------------------------------------------
# configs shared by the built-in methods
# ------------------------------------------------------------------------------------------------------


class DensityParams(MergeMethod.ModelParams):
    """Per-model parameters of the sparsifying methods."""

    weight: float = 1.0
    density: float = Field(1.0, ge=0.0, le=1.0)


class TaskArithmeticConfig(PluginConfig):
    """Global parameters of task arithmetic (mergekit names; ``lambda`` scales the merged task vector)."""

    model_config = ConfigDict(populate_by_name=True)

    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False


class TiesConfig(TaskArithmeticConfig):
    normalize: bool = True
    rescale: bool = False


class DareConfig(TaskArithmeticConfig):
    normalize: bool = False
    rescale: bool = True


# ------------------------------------------------------------------------------------------------------
# pure tensor helpers (fp32 in, fp32 out)
# ------------------------------------------------------------------------------------------------------

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
        return torch.ones(delta.shape, dtype=torch.bool)
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

    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for _, block in blocks():
        hist += torch.bincount(bits_of(block) >> 16, minlength=1 << 15)[: 1 << 15]
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # entries in higher bins
    hi = int(torch.nonzero((above < k) & (above + hist >= k)).max())
    rank = k - int(above[hi])
    low = torch.zeros(1 << 16, dtype=torch.int64)
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

    def take(self, shape: Sequence[int]) -> Any:
        mask = dare_mask(shape, self.density, self.generator)
        self.position += math.prod(shape)
        return mask

    def block(self, start_flat: int, shape: Sequence[int]) -> Any:
        """The mask for ``shape`` entries starting at flat index ``start_flat`` (cheap when in order)."""
        if start_flat != self.position:
            self.reset()
            while self.position < start_flat:  # skip ahead in bounded pieces
                self.take((min(start_flat - self.position, 1 << 22),))
        return self.take(shape)


def dare_mask(shape: Sequence[int], density: float, generator: Any) -> Any:
    """Bernoulli(density) keep-mask drawn from ``generator`` (a bool tensor of ``shape``)."""
    import torch

    if density >= 1:
        return torch.ones(tuple(shape), dtype=torch.bool)
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) < density


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

    w = torch.tensor([float(p.weight) for p in params], dtype=like.dtype)
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


# ------------------------------------------------------------------------------------------------------
# the run config
# ------------------------------------------------------------------------------------------------------


class MergeRunConfig(PluginConfig):
    """Everything ``rlm merge`` needs (``--config FILE`` holds these fields; ``--set k=v`` overrides them).

    ``models`` entries are paths or mappings ``{path: DIR, weight: .., density: ..}``; ``model_params``
    applies to every model (an entry's own values win); ``params`` are the method's global parameters
    (``lambda``, ``normalize``, ``rescale``...). ``preset`` (e.g. ``paper``) supplies defaults below all of
    these."""

    method: str = "ties"
    base: str | None = None
    models: list[str | dict[str, Any]] = Field(default_factory=list)
    preset: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    model_params: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    vocab: Literal["error", "truncate", "base"] = "error"
    dtype: Literal["base", "float32", "bfloat16", "float16"] = "base"
    chunk_elements: int = Field(1024 * 1024, ge=1, description="tensors larger than this are read, merged "
                                "and written in row blocks of about this many elements")
    whole_elements: int = Field(8 * 1024 * 1024, ge=1, description="methods with a whole-tensor statistic "
                                "(TIES cut, DARE mask) read tensors up to this size once and whole; larger "
                                "ones are streamed in row blocks, in several passes")
    workers: int = Field(2, ge=0, description="worker threads that read, merge and write tensors; 0 = inline")
    threads: int = Field(1, ge=0, description="torch intra-op threads during the merge (0: leave torch's "
                         "setting); parallelism comes from workers, which stays fast on a busy machine")
    max_shard_bytes: int = Field(2 * 1024 ** 3, ge=1)
    check_finite: bool = True


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "manifest.json",
              "rlm_manifest.json", "merge_manifest.json", "adapter_config.json"}


def _resolve_path(spec: str) -> str:
    from rlm.core.models.hf import resolve_model

    text = str(spec)
    p = Path(text).expanduser()
    if text == "tiny" or text.startswith("tiny:"):
        return resolve_model(text)
    if not p.exists():
        raise ModelError(f"model path {text} does not exist")
    return str(p)


def build_method(run: MergeRunConfig, system: Any = None) -> tuple[MergeMethod, list[Any], list[str]]:
    """The configured method instance, its per-model params and the model paths (not yet resolved)."""
    from rlm.core.config import validate
    from rlm.core.plugins import get_system

    system = system or get_system()
    cls = system.registry("merge_methods").get(run.method)
    preset: dict[str, Any] = {}
    if run.preset is not None:
        presets = getattr(cls, "presets", {}) or {}
        if run.preset not in presets:
            raise ConfigError(f"merge method {cls.name!r} has no preset {run.preset!r} "
                              f"(presets: {', '.join(presets) or 'none'})")
        preset = presets[run.preset]
    params = {**preset.get("params", {}), **run.params}
    method = cls(validate(cls.Config, params, f"params of merge method {cls.name!r}"))
    mp_cls = getattr(cls, "ModelParams", MergeMethod.ModelParams)
    paths: list[str] = []
    model_params: list[Any] = []
    if not run.models:
        raise ConfigError("no models to merge: pass --models DIR1,DIR2 or set models in the config")
    for i, entry in enumerate(run.models):
        if isinstance(entry, str):
            path, own = entry, {}
        else:
            own = dict(entry)
            path = own.pop("path", None)
            if not path:
                raise ConfigError(f"models.{i} has no path")
        data = {**preset.get("model_params", {}), **run.model_params, **own}
        model_params.append(validate(mp_cls, data, f"parameters of model {i} ({path})"))
        paths.append(str(path))
    method.check(model_params)
    return method, model_params, paths


def _copy_side_files(base: Path, out: Path, vocab_size: int | None, out_dtype: str | None) -> None:
    """Config, generation config, tokenizer and any other non-weight file of the base."""
    import json

    for f in sorted(base.iterdir()):
        if not f.is_file() or f.name in SKIP_FILES or f.name.endswith(WEIGHT_SUFFIXES) or f.name.startswith("."):
            continue
        if f.name == "config.json":
            cfg = json.loads(f.read_text(encoding="utf-8"))
            if vocab_size is not None and "vocab_size" in cfg:
                cfg["vocab_size"] = vocab_size
            if out_dtype is not None:
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = out_dtype
            (out / f.name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(f, out / f.name)


def _out_dtype(run: MergeRunConfig, t: Any) -> Any:
    """Output dtype of planned tensor ``t``: ``run.dtype`` for floating tensors, else the base's."""
    import torch

    if run.dtype == "base" or not t.dtype.is_floating_point:
        return t.dtype
    return getattr(torch, run.dtype)


class _Job:
    """Merging of one tensor (used from worker threads; everything it touches is per-tensor)."""

    def __init__(self, engine: "_Engine", tplan: Any) -> None:
        self.e = engine
        self.t = tplan

    def _rows(self) -> list[tuple[int, int] | None]:
        t = self.t
        if not t.shape or t.numel <= self.e.run.chunk_elements or t.shape[0] <= 1:
            return [(0, t.shape[0])] if t.vocab else [None]
        from rlm.core.models.reader import row_blocks

        return row_blocks(t.shape, t.numel, self.e.run.chunk_elements)

    def _base(self, rows: tuple[int, int] | None) -> Any:
        import torch

        e, name = self.e, self.t.name
        b = e.base.get(name, rows).to(torch.float32)
        if e.run.check_finite:
            from rlm.core.models.reader import check_finite

            check_finite(b, e.base.path, name)
        return b

    def _deltas(self, base: Any, rows: tuple[int, int] | None, only: int | None = None) -> Any:
        """Stacked fp32 task vectors ``(n_models, *base.shape)`` (just model ``only`` when given, unstacked)."""
        import torch

        from rlm.core.models.reader import check_finite

        e, name = self.e, self.t.name
        if only is not None:
            src = e.sources[only]
            d = src.delta(name, base, rows)
            if e.run.check_finite:
                check_finite(d, src.path, name)
            return d
        out = torch.empty((len(e.sources), *base.shape), dtype=torch.float32)
        for i, src in enumerate(e.sources):
            src.delta(name, base, rows, out=out[i])
            if e.run.check_finite:
                check_finite(out[i], src.path, name)
        return out

    def run(self) -> None:
        e, t = self.e, self.t
        name = t.name
        out_dtype = _out_dtype(e.run, t)
        if not t.dtype.is_floating_point:  # integer buffers are copied from the base
            e.writer.write(name, e.base.get(name))
            return
        blocks = self._rows()
        ctx = MergeContext(tensor_name=name, shape=tuple(t.shape), seed=e.run.seed)
        single = len(blocks) == 1
        loaded: tuple[Any, Any] | None = None  # whole base and task vectors, when read at once
        if e.needs_prepare:
            if single or t.numel <= e.run.whole_elements:
                # read once; prepare on the whole task vectors; merge below in row blocks of them
                rows = blocks[0] if single else ((0, t.shape[0]) if t.vocab else None)
                base = self._base(rows)
                deltas = self._deltas(base, rows)
                stats = []
                for i in range(len(deltas)):
                    ctx.model_index = i
                    stats.append(e.method.prepare(deltas[i], e.params[i], context=ctx))
                ctx.stats = stats
                loaded = (base, deltas)
            else:  # stream each model's task vector block by block (as many passes as the method needs)
                stats = []
                for i in range(len(e.sources)):
                    def model_blocks(i: int = i) -> Any:
                        for rows in blocks:
                            assert rows is not None
                            yield rows, self._deltas(self._base(rows), rows, only=i)

                    ctx.model_index = i
                    stats.append(e.method.prepare_blocks(model_blocks, e.params[i], context=ctx))
                ctx.stats = stats
        ctx.model_index = None
        for rows in blocks:
            if loaded is not None:
                base, deltas = loaded if rows is None or single else (loaded[0][rows[0]:rows[1]],
                                                                     loaded[1][:, rows[0]:rows[1]])
            else:
                base = self._base(rows)
                deltas = self._deltas(base, rows)
            ctx.rows = None if single else rows
            merged = e.method.merge(base, deltas, e.params, context=ctx)
            if tuple(merged.shape) != tuple(base.shape):
                raise RlmError(f"merge method {e.method.name!r} returned shape {tuple(merged.shape)} for tensor "
                               f"{name}, expected {tuple(base.shape)}")
            e.writer.write(name, merged.to(out_dtype), rows_offset=0 if rows is None else rows[0])
            del base, deltas, merged
        e.advance(name)


class _Engine:
    def __init__(self, run: MergeRunConfig, method: MergeMethod, params: list[Any], base: Any, sources: list[Any],
                 plan: Any, writer: Any, progress: Callable[[str], None] | None) -> None:
        self.run, self.method, self.params = run, method, params
        self.base, self.sources, self.plan, self.writer = base, sources, plan, writer
        self.needs_prepare = type(method).prepare is not MergeMethod.prepare
        self._progress = progress
        self._lock = threading.Lock()

    def advance(self, name: str) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(name)

    def execute(self) -> None:
        tensors = self.plan.tensors
        if self.run.workers <= 0:
            for t in tensors:
                _Job(self, t).run()
            return
        pool = ThreadPoolExecutor(max_workers=self.run.workers, thread_name_prefix="rlm-merge")
        pending: set[Future] = set()
        try:
            for t in tensors:
                if len(pending) >= self.run.workers + 1:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        f.result()
                pending.add(pool.submit(_Job(self, t).run))
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def plan_merge(run: MergeRunConfig, system: Any = None) -> dict[str, Any]:
    """Resolve and validate everything (no tensor data read): method, params, readers, the tensor plan."""
    from rlm.core.models.lora import open_source
    from rlm.core.models.reader import ModelReader
    from rlm.core.models.validate import validate_models

    method, params, paths = build_method(run, system)
    if not run.base:
        raise ConfigError("no base model: pass --base DIR")
    base = ModelReader(_resolve_path(run.base))
    sources = [open_source(_resolve_path(p), base) for p in paths]
    plan = validate_models(base, sources, vocab=run.vocab)
    return {"method": method, "params": params, "base": base, "sources": sources, "plan": plan}


def merge_models(run: MergeRunConfig, out: str | Path, *, overwrite: bool = False,
                 progress: Callable[[str], None] | None = None, on_plan: Callable[[Any], None] | None = None,
                 command: list[str] | None = None, system: Any = None) -> dict[str, Any]:
    """Merge per ``run`` into the HF directory ``out`` (atomically). ``progress(name)`` is called after each
    tensor; ``on_plan(plan)`` once validation passed. Returns a summary (tensors, bytes, seconds)."""
    from rlm.core.io.atomic import prepare_output_dir

    out = Path(out)
    prepare_output_dir(out, overwrite)  # refuse early, before reading anything
    t0 = time.perf_counter()
    p = plan_merge(run, system)
    try:
        return _merge_planned(run, out, p, t0, overwrite=overwrite, progress=progress, on_plan=on_plan,
                              command=command)
    finally:
        for r in [p["base"], *p["sources"]]:
            r.close()


def _merge_planned(run: MergeRunConfig, out: Path, p: dict[str, Any], t0: float, *, overwrite: bool,
                   progress: Callable[[str], None] | None, on_plan: Callable[[Any], None] | None,
                   command: list[str] | None) -> dict[str, Any]:
    import torch

    from rlm.core.io.atomic import atomic_dir
    from rlm.core.io.manifest import write_manifest
    from rlm.core.models.writer import ShardedWriter

    method, params, base, sources, plan = p["method"], p["params"], p["base"], p["sources"], p["plan"]
    if on_plan is not None:
        on_plan(plan)
    out_dtype_name = None if run.dtype == "base" else run.dtype
    with atomic_dir(out, overwrite=overwrite) as tmp:
        specs = [(t.name, t.shape, _out_dtype(run, t)) for t in plan.tensors]
        writer = ShardedWriter(tmp, specs, max_shard_bytes=run.max_shard_bytes,
                               metadata={"merged_by": "rlm", "merge_method": method.name})
        engine = _Engine(run, method, params, base, sources, plan, writer, progress)
        old_threads = torch.get_num_threads()
        if run.threads:
            torch.set_num_threads(run.threads)
        try:
            engine.execute()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            torch.set_num_threads(old_threads)
        _copy_side_files(base.path, tmp, plan.vocab_size if plan.vocab_size != base.vocab_size else None,
                         out_dtype_name)
        seconds = time.perf_counter() - t0
        summary = {"tensors": len(plan.tensors), "bytes": writer.total_bytes, "shards": len(writer.files),
                   "seconds": round(seconds, 3)}
        inputs = {"base": str(base.path), **{f"model_{i}": str(s.path) for i, s in enumerate(sources)}}
        write_manifest(
            tmp, name="merge_manifest.json", command=command if command is not None else sys.argv,
            config=run, seed=run.seed, inputs=inputs,
            extra={"method": method.name,
                   "method_params": method.config.model_dump(mode="json", by_alias=True),
                   "model_params": [{"path": str(s.path), "kind": s.kind, **mp.model_dump(mode="json")}
                                    for s, mp in zip(sources, params)],
                   "vocab_size": plan.vocab_size, "vocab_policy": plan.vocab_policy,
                   "seed_rule": "torch.Generator per sha256(seed, tensor name, model index)",
                   "result": summary})
    return summary
