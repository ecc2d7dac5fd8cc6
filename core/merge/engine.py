"""Streaming merge engine: drives :class:`rlm.core.contracts.MergeMethod` plugins tensor by tensor.

``merge_models(run, out)`` plans from safetensors headers and index files, validates every input against the
base before any compute (architecture, tensor names, shapes, dtypes, vocabulary policy; every float parameter
must be finite and within float32's range; NaN/Inf are caught as each tensor is read, naming model and tensor,
and in each merged tensor before it is written), then for each tensor in the base's shard order: reads the
base and each model's tensor, forms fp32 task vectors τ_i = θ_i − θ_b, asks the method for the merged
tensor and writes it straight into its place in the output shards. Tensors over ``chunk_elements`` are merged
in row blocks; a method's whole-tensor statistic (:meth:`MergeMethod.prepare`: the TIES magnitude cut, the DARE
mask and L1 factor) is computed on the whole task vector for tensors up to ``whole_elements`` and by streaming
passes over row blocks (``prepare_blocks``) above that, so peak memory depends on these two settings and the
number of workers, not on the model size. Output goes to a temporary directory renamed into place when
complete, with the base's config and tokenizer files and ``merge_manifest.json``.

Before merging, the inputs must also belong together (:func:`_check_inputs`: configs, tokenizers, descent from
the base by the cosine similarity of a few sampled matrices). ``run.device`` (:mod:`rlm.core.merge.device`) is
where ``prepare``/``merge`` compute; reading and writing stay on the CPU. ``run.smoke`` generates from the
written model (:mod:`rlm.core.merge.smoke`) and flags degenerate output. mergekit YAML configs are translated
into a ``MergeRunConfig`` by :mod:`rlm.core.merge.mergekit`. See ``docs/merging.md``.

On the CPU the built-in methods run in compiled kernels (:mod:`rlm.core.merge.fused`, ``run.engine``) that give
the same bytes as the torch path described above; ``result.engine`` in the manifest says which path merged what.

Random masks use one generator per (seed, tensor name, model index) (:func:`rlm.core.contracts.tensor_seed`),
so the output does not depend on tensor order or the number of worker threads.

A method's settings come from its ``Config``, filled from ``MergeRunConfig.params`` over the method's preset
(``MergeMethod.presets[run.preset]``); per-model parameters likewise from ``model_params`` and each model entry.
The tensor helpers and configs the built-in methods share are in :mod:`rlm.core.merge.ops` and
:mod:`rlm.core.merge.params`. Used by ``rlm merge`` and the study's merge steps.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from rlm.core.contracts import MergeContext, MergeMethod, PluginConfig
from rlm.core.errors import ConfigError, ModelError, RlmError


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
    check_finite: bool = Field(True, description="refuse NaN/Inf in any input tensor and in any merged tensor "
                               "(in the output dtype) before it is written, naming model and tensor")
    check_descent: bool = Field(True, description="refuse a full model whose weights are not close to the base's "
                                "(cosine similarity on a few sampled matrices; see docs/merging.md)")
    device: str = Field("cpu", description="torch device of the merge arithmetic (cpu, cuda, cuda:1, ...); "
                        "tensors are read and written on the CPU")
    engine: Literal["auto", "fused", "torch"] = Field("auto", description="auto: the compiled kernels "
                                                      "(rlm.core.merge.fused) where they apply, else torch; fused: "
                                                      "refuse a merge they can't run; torch: always torch")
    smoke: bool = Field(False, description="after writing, generate from a few fixed prompts and flag degenerate "
                        "output in merge_manifest.json and on the terminal")


#: the largest finite float32: a parameter beyond it overflows the fp32 merge arithmetic
FLOAT32_MAX = 3.4028234663852886e38
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "manifest.json",
              "rlm_manifest.json", "merge_manifest.json", "adapter_config.json"}


# ------------------------------------------------------------------------------------------------------
# the method and its parameters
# ------------------------------------------------------------------------------------------------------


def _resolve_path(spec: str) -> str:
    """A model directory as given (it must exist), or ``tiny[:SEED]`` / ``smollm2-135m`` built in the cache."""
    from rlm.core.models.hf import is_named_model, resolve_model

    text = str(spec)
    p = Path(text).expanduser()
    if is_named_model(text):
        return resolve_model(text)
    if not p.exists():
        raise ModelError(f"model path {text} does not exist")
    return str(p)


def method_preset(cls: type[MergeMethod], preset: str | None, *, suggest: bool = False) -> dict[str, Any]:
    """The method's named settings (``{"params": {...}, "model_params": {...}}``; empty for ``None``); an
    unknown name is a :class:`ConfigError` listing the method's presets (``suggest``: and the closest ones)."""
    if preset is None:
        return {}
    presets = getattr(cls, "presets", {}) or {}
    if preset not in presets:
        hint = ""
        if suggest:
            import difflib

            close = difflib.get_close_matches(preset, list(presets), n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"merge method {cls.name!r} has no preset {preset!r}{hint} "
                          f"(presets: {', '.join(presets) or 'none'})")
    return presets[preset]


def check_numbers(cfg: Any, where: str) -> None:
    """Refuse a float field of the validated config ``cfg`` (and float items of a list field) that is NaN, ±Inf
    or beyond float32's range, with one line naming ``where`` and the field (its alias, e.g. ``lambda``)."""
    import math

    for name, field in type(cfg).model_fields.items():
        label = field.alias or name
        value = getattr(cfg, name)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if not isinstance(v, float):
                continue
            if not math.isfinite(v):
                raise ConfigError(f"{where}: {label} is {v}; it must be a finite number")
            if abs(v) > FLOAT32_MAX:
                raise ConfigError(f"{where}: {label} = {v:g} is beyond float32's range (|{label}| <= 3.4e38)")


def _check_scale(method: MergeMethod, params: list[Any]) -> None:
    """Refuse a global scale (``lambda``) times the summed |weights| that overflows float32."""
    lam = getattr(method.config, "lambda_", 1.0)
    weights = [abs(w) for w in (getattr(p, "weight", 0.0) for p in params) if isinstance(w, float)]
    if isinstance(lam, float) and weights and abs(lam) * sum(weights) > FLOAT32_MAX:
        raise ConfigError(f"merge method {method.name!r}: lambda {lam:g} times the weights "
                          f"({', '.join(f'{w:g}' for w in weights)}) overflows float32")


def _model_params(run: MergeRunConfig, cls: type[MergeMethod], preset: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """Each model's validated parameters (the preset's, then ``run.model_params``, then the entry's own) and
    path."""
    from rlm.core.config import validate

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
        params = validate(mp_cls, data, f"parameters of model {i} ({path})")
        check_numbers(params, f"parameters of model {i} ({path})")
        model_params.append(params)
        paths.append(str(path))
    return model_params, paths


def build_method(run: MergeRunConfig, system: Any = None) -> tuple[MergeMethod, list[Any], list[str]]:
    """The configured method instance, its per-model params and the model paths (not yet resolved). Every float
    parameter, global or per model, must be finite and within float32's range, and so must lambda times the
    weights (:class:`ConfigError`, before any file is opened)."""
    from rlm.core.config import validate
    from rlm.core.plugins import get_system

    system = system or get_system()
    cls = system.registry("merge_methods").get(run.method)
    preset = method_preset(cls, run.preset)
    params = {**preset.get("params", {}), **run.params}
    config = validate(cls.Config, params, f"params of merge method {cls.name!r}")
    check_numbers(config, f"params of merge method {cls.name!r}")
    method = cls(config)
    model_params, paths = _model_params(run, cls, preset)
    _check_scale(method, model_params)
    method.check(model_params)
    return method, model_params, paths


# ------------------------------------------------------------------------------------------------------
# merging tensors
# ------------------------------------------------------------------------------------------------------


def _out_dtype(run: MergeRunConfig, t: Any) -> Any:
    """Output dtype of planned tensor ``t``: ``run.dtype`` for floating tensors, else the base's."""
    import torch

    if run.dtype == "base" or not t.dtype.is_floating_point:
        return t.dtype
    return getattr(torch, run.dtype)


def _check_output(merged: Any, method: str, name: str) -> None:
    """Refuse to write a merged tensor holding NaN or Inf (in its output dtype), naming the tensor."""
    import torch

    if not merged.is_floating_point() or bool(torch.isfinite(merged).all()):
        return
    nan, inf = int(torch.isnan(merged).sum()), int(torch.isinf(merged).sum())
    raise RlmError(f"merge method {method!r} produced non-finite values in tensor {name} ({nan} NaN, {inf} Inf "
                   f"as {str(merged.dtype).replace('torch.', '')}); nothing was written")


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

    def _prepare_whole(self, ctx: MergeContext, blocks: list[tuple[int, int] | None], single: bool) -> tuple[Any, Any]:
        """Read the tensor once, run the method's ``prepare`` on each whole task vector (``ctx.stats``) and
        return ``(base, deltas)`` for merging in row blocks of them."""
        e, t = self.e, self.t
        rows = blocks[0] if single else ((0, t.shape[0]) if t.vocab else None)
        base = self._base(rows)
        deltas = self._deltas(base, rows)
        base, deltas = e.on_device(base), e.on_device(deltas)
        stats = []
        for i in range(len(deltas)):
            ctx.model_index = i
            stats.append(e.method.prepare(deltas[i], e.params[i], context=ctx))
        ctx.stats = stats
        return base, deltas

    def _prepare_streamed(self, ctx: MergeContext, blocks: list[tuple[int, int] | None]) -> None:
        """Run the method's ``prepare_blocks`` on each model's task vector, read block by block (as many passes
        as the method needs), into ``ctx.stats``."""
        e = self.e
        stats = []
        for i in range(len(e.sources)):
            def model_blocks(i: int = i) -> Any:
                for rows in blocks:
                    assert rows is not None
                    yield rows, e.on_device(self._deltas(self._base(rows), rows, only=i))

            ctx.model_index = i
            stats.append(e.method.prepare_blocks(model_blocks, e.params[i], context=ctx))
        ctx.stats = stats

    def _merge_blocks(self, ctx: MergeContext, blocks: list[tuple[int, int] | None], single: bool,
                      loaded: tuple[Any, Any] | None) -> None:
        """Merge and write each row block (slices of ``loaded`` when the tensor was read whole)."""
        e, name = self.e, self.t.name
        out_dtype = _out_dtype(e.run, self.t)
        for rows in blocks:
            if loaded is not None:
                base, deltas = loaded if rows is None or single else (loaded[0][rows[0]:rows[1]],
                                                                     loaded[1][:, rows[0]:rows[1]])
            else:
                base = self._base(rows)
                deltas = self._deltas(base, rows)
                base, deltas = e.on_device(base), e.on_device(deltas)
            ctx.rows = None if single else rows
            merged = e.method.merge(base, deltas, e.params, context=ctx)
            if tuple(merged.shape) != tuple(base.shape):
                raise RlmError(f"merge method {e.method.name!r} returned shape {tuple(merged.shape)} for tensor "
                               f"{name}, expected {tuple(base.shape)}")
            merged = merged.to(out_dtype)
            if e.run.check_finite:
                _check_output(merged, e.method.name, name)
            e.writer.write(name, merged.cpu(), rows_offset=0 if rows is None else rows[0])
            del base, deltas, merged

    def run(self) -> None:
        e, t = self.e, self.t
        if not t.dtype.is_floating_point:  # integer buffers are copied from the base
            e.writer.write(t.name, e.base.get(t.name))
            return
        blocks = self._rows()
        ctx = MergeContext(tensor_name=t.name, shape=tuple(t.shape), seed=e.run.seed)
        single = len(blocks) == 1
        loaded: tuple[Any, Any] | None = None  # whole base and task vectors, when read at once
        if e.needs_prepare:
            if single or t.numel <= e.run.whole_elements:
                loaded = self._prepare_whole(ctx, blocks, single)
            else:
                self._prepare_streamed(ctx, blocks)
        ctx.model_index = None
        self._merge_blocks(ctx, blocks, single, loaded)
        e.advance(t.name)


class _Engine:
    """The tensors of one planned merge, run inline or by ``run.workers`` threads (at most workers + 1 queued)."""

    def __init__(self, run: MergeRunConfig, method: MergeMethod, params: list[Any], base: Any, sources: list[Any],
                 plan: Any, writer: Any, progress: Callable[[str], None] | None, device: Any) -> None:
        self.run, self.method, self.params, self.device = run, method, params, device
        self.base, self.sources, self.plan, self.writer = base, sources, plan, writer
        self.needs_prepare = type(method).prepare is not MergeMethod.prepare
        self._progress = progress
        self._lock = threading.Lock()
        from rlm.core.merge.fused import FusedMerge, unavailable_reason

        self.torch_because = unavailable_reason(run, method, base, sources, device)
        if self.torch_because is not None and run.engine == "fused":
            raise ConfigError(f"engine 'fused' cannot run this merge: {self.torch_because}")
        self.fused = (FusedMerge(self, lambda t: _Job(self, t).run(), lambda t: _out_dtype(run, t))
                      if self.torch_because is None else None)

    def summary(self) -> dict[str, Any]:
        """Which path merged the tensors and why (``engine`` in ``merge_manifest.json``)."""
        if self.fused is not None:
            return self.fused.summary()
        return {"path": "torch", "because": self.torch_because}

    def job(self, t: Any) -> Callable[[], None]:
        return (lambda: self.fused.run_tensor(t)) if self.fused is not None else _Job(self, t).run

    def on_device(self, tensor: Any) -> Any:
        """``tensor`` (read on the CPU) on the merge's device."""
        if self.device.type == "cpu":
            return tensor
        from rlm.core.merge import device

        return device.to_device(tensor, self.device)

    def advance(self, name: str) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(name)

    def execute(self) -> None:
        tensors = self.plan.tensors
        if self.run.workers <= 0:
            for t in tensors:
                self.job(t)()
            return
        pool = ThreadPoolExecutor(max_workers=self.run.workers, thread_name_prefix="rlm-merge")
        pending: set[Future] = set()
        try:
            for t in tensors:
                if len(pending) >= self.run.workers + 1:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        f.result()
                pending.add(pool.submit(self.job(t)))
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------------
# the run: plan, merge, write
# ------------------------------------------------------------------------------------------------------


def _check_inputs(run: MergeRunConfig, base: Any, sources: list[Any], plan: Any, paths: list[str]) -> dict[str, Any]:
    """The checks that the inputs belong together, beyond :func:`validate_models`: configs, tokenizers and
    descent from the base (a few sampled rows read). ``tiny:SEED`` experts are independent random
    initialisations by design and are not compared for descent. Returns what was checked and how long it took."""
    from rlm.core.models.hf import tiny_seed
    from rlm.core.models.validate import check_configs, check_descent, check_tokenizers

    t0 = time.perf_counter()
    check_configs(base, sources, vocab=run.vocab)
    compared = check_tokenizers(base, sources, vocab=run.vocab)
    descent = None
    if run.check_descent:
        descent = check_descent(base, sources, plan, skip=[i for i, p in enumerate(paths) if tiny_seed(p) is not None])
    return {"configs": True, "tokenizers_compared": compared, "descent": descent,
            "seconds": round(time.perf_counter() - t0, 4)}


def plan_merge(run: MergeRunConfig, system: Any = None) -> dict[str, Any]:
    """Resolve and validate everything before any tensor is merged: method, params, device, readers, the tensor
    plan, and the checks that the inputs belong together (:func:`_check_inputs`)."""
    from rlm.core.merge.device import resolve_device
    from rlm.core.models.lora import open_source
    from rlm.core.models.reader import ModelReader
    from rlm.core.models.validate import validate_models

    method, params, paths = build_method(run, system)
    device = resolve_device(run.device)
    if not run.base:
        raise ConfigError("no base model: pass --base DIR")
    base = ModelReader(_resolve_path(run.base))
    sources: list[Any] = []
    try:
        sources += [open_source(_resolve_path(p), base) for p in paths]
        plan = validate_models(base, sources, vocab=run.vocab)
        checks = _check_inputs(run, base, sources, plan, paths)
    except BaseException:
        for r in [base, *sources]:
            r.close()
        raise
    return {"method": method, "params": params, "base": base, "sources": sources, "plan": plan, "device": device,
            "checks": checks}


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


def _write_tensors(run: MergeRunConfig, tmp: Path, p: dict[str, Any],
                   progress: Callable[[str], None] | None) -> tuple[Any, dict[str, Any]]:
    """Merge every planned tensor into shards under ``tmp`` (``run.threads`` torch threads meanwhile); returns
    the closed writer (aborted on any error) and which path merged the tensors."""
    import torch

    from rlm.core.models.writer import ShardedWriter

    specs = [(t.name, t.shape, _out_dtype(run, t)) for t in p["plan"].tensors]
    writer = ShardedWriter(tmp, specs, max_shard_bytes=run.max_shard_bytes,
                           metadata={"merged_by": "rlm", "merge_method": p["method"].name})
    engine = _Engine(run, p["method"], p["params"], p["base"], p["sources"], p["plan"], writer, progress, p["device"])
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
    return writer, engine.summary()


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


def _write_merge_manifest(run: MergeRunConfig, tmp: Path, p: dict[str, Any], summary: dict[str, Any],
                          command: list[str] | None, smoke: dict[str, Any] | None) -> None:
    """``merge_manifest.json``: the run config, the inputs, the method's and each model's parameters, the
    vocabulary policy, the seed rule, the device, the input checks, the smoke test (when run) and the result."""
    from rlm.core.io.manifest import write_manifest

    method, params, base, sources, plan = p["method"], p["params"], p["base"], p["sources"], p["plan"]
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
               "device": str(p["device"]), "checks": p["checks"], **({"smoke": smoke} if smoke is not None else {}),
               "result": summary})


def _merge_planned(run: MergeRunConfig, out: Path, p: dict[str, Any], t0: float, *, overwrite: bool,
                   progress: Callable[[str], None] | None, on_plan: Callable[[Any], None] | None,
                   command: list[str] | None) -> dict[str, Any]:
    from rlm.core.io.atomic import atomic_dir

    base, plan = p["base"], p["plan"]
    if on_plan is not None:
        on_plan(plan)
    smoke = None
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            writer, engine = _write_tensors(run, tmp, p, progress)
            _copy_side_files(base.path, tmp, plan.vocab_size if plan.vocab_size != base.vocab_size else None,
                             None if run.dtype == "base" else run.dtype)
            seconds = time.perf_counter() - t0
            summary = {"tensors": len(plan.tensors), "bytes": writer.total_bytes, "shards": len(writer.files),
                       "seconds": round(seconds, 3), "engine": engine}
            if run.smoke:
                from rlm.core.merge.smoke import smoke_test

                smoke = smoke_test(tmp, p["device"], base_dir=base.path)
            _write_merge_manifest(run, tmp, p, summary, command, smoke)
    except OSError as exc:  # a write on a file descriptor (disk full) names no file: name the output
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc
        raise
    if smoke is not None:
        from rlm.core.merge.smoke import smoke_warning

        warning = smoke_warning(smoke, out)
        if warning:
            print(warning, file=sys.stderr)
        summary = {**summary, "smoke": smoke}
    return summary
