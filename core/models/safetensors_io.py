"""Lazy per-tensor access to Hugging Face model directories, and an incremental sharded safetensors writer.

Nothing here loads a whole model. A reader plans from the safetensors headers and index files only (names,
shapes, dtypes, shard order) and reads one tensor (or a block of rows of one tensor) at a time: safetensors
data with positional reads straight into the tensor's buffer (so resident memory holds only the tensor being
read, while the OS page cache is shared as with a memory map), ``.bin`` files through
``torch.load(weights_only=True, mmap=True)``. Every error is a :class:`rlm.core.errors.ModelError` naming the model path and, where there is one, the
tensor.

Public API (used by the merge engine and the task-vector statistics engine)::

    from rlm.core.models.safetensors_io import ModelReader, LoraReader, open_source, validate_models, ShardedWriter

    r = ModelReader("path/to/hf_dir")      # model.safetensors | sharded + model.safetensors.index.json
                                           # | pytorch_model.bin[.index.json] (torch.load weights_only, mmap)
    r.tensor_names()                       # in shard order (file order, then offset order inside a file)
    r.shape(name), r.dtype(name)           # from headers; dtype is a torch.dtype
    r.get(name)                            # torch.Tensor in its stored dtype (one positional read)
    r.get(name, rows=(start, stop))        # only rows start:stop of dimension 0
    r.config                               # config.json as a dict;  r.vocab_size

    lo = LoraReader("adapter_dir", base=r) # PEFT adapter: adapter_config.json + adapter_model.safetensors
    lo.delta(name)                         # fp32 task vector ΔW = scaling·B@A for a target tensor, else None

    src = open_source("dir", base=r)       # ModelReader or LoraReader, whichever the directory holds
    src.delta(name, base_fp32, rows=None)  # fp32 τ = θ − θ_base for either kind (LoRA: zeros off-target)

    plan = validate_models(r, [src1, src2], vocab="error", scan_finite=False)
    plan.tensors                           # [TensorPlan(name, shape, dtype, vocab_rows)] in base shard order

    w = ShardedWriter(out_dir, [(name, shape, dtype), ...], max_shard_bytes=2**30)
    w.write(name, tensor)                  # any order, thread-safe (positional writes at planned offsets)
    w.close()                              # checks completeness, writes model.safetensors.index.json

``check_finite(tensor, model, name)`` raises a ModelError naming the model and tensor on NaN/Inf.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlm.core.errors import ModelError

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# safetensors dtype codes <-> torch dtype names
_ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
                "U64": "uint64"}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
_FLOAT_NAMES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


def _torch():
    import torch

    return torch


def torch_dtype(code: str) -> Any:
    """torch dtype for a safetensors dtype code (``BF16`` -> ``torch.bfloat16``)."""
    name = _ST_TO_TORCH.get(code)
    if name is None:
        raise ModelError(f"unsupported safetensors dtype {code!r}")
    return getattr(_torch(), name)


def st_code(dtype: Any) -> str:
    """safetensors dtype code for a torch dtype."""
    name = str(dtype).replace("torch.", "")
    if name not in _TORCH_TO_ST:
        raise ModelError(f"dtype {dtype} cannot be written to safetensors")
    return _TORCH_TO_ST[name]


def is_float(dtype: Any) -> bool:
    return str(dtype).replace("torch.", "") in _FLOAT_NAMES


_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def element_size(dtype: Any) -> int:
    """Bytes per element of a torch dtype or a safetensors dtype code."""
    code = dtype if isinstance(dtype, str) and dtype in _SIZES else st_code(dtype)
    return _SIZES[code]


def read_header(file: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (without reading tensor data)."""
    return _read_header(file)[0]


def _read_header(file: str | Path) -> tuple[dict[str, Any], int]:
    """:func:`read_header` and the byte offset where the file's tensor data starts."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelError(f"{file}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            size = file.stat().st_size
            if n > size - 8 or n > 100_000_000:
                raise ModelError(f"{file}: not a safetensors file (header length {n} exceeds the file)")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ModelError(f"cannot read {file}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: corrupt safetensors header")
    return header, 8 + n


def check_finite(tensor: Any, model: str | Path, name: str) -> None:
    """Raise a ModelError naming ``model`` and ``name`` if ``tensor`` holds NaN or Inf."""
    import math

    torch = _torch()
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # a NaN or Inf anywhere makes the sum non-finite: one cheap reduction screens the tensor, the exact
    # count runs only when the screen fires (an fp32 overflow of the sum alone passes the exact test)
    if math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise ModelError(f"model {model}: tensor {name} contains non-finite values ({nan} NaN, {inf} Inf)")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data


def config_vocab_size(config: dict[str, Any]) -> int | None:
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return int(v) if v is not None else None


@dataclass
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype_code: str  # safetensors code, e.g. "BF16"
    offset: int = 0  # absolute byte offset of the data in the file (safetensors); storage order
    nbytes: int = 0


class ModelReader:
    """Per-tensor reader over an HF model directory (see the module docstring)."""

    kind = "model"

    def __init__(self, path: str | Path, *, check_config: bool = True) -> None:
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise ModelError(f"model path {p} does not exist")
        if not p.is_dir():
            raise ModelError(f"model path {p} is a file, not a model directory")
        self.config: dict[str, Any] = {}
        if (p / "config.json").is_file():
            self.config = _read_json(p / "config.json", "model config")
        elif check_config:
            raise ModelError(f"{p} is not a model directory: config.json is missing")
        self._entries: dict[str, _Entry] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if (p / ST_INDEX).is_file() or (p / ST_SINGLE).is_file():
            self.format = "safetensors"
            self._plan_safetensors()
        elif (p / BIN_INDEX).is_file() or (p / BIN_SINGLE).is_file():
            self.format = "bin"
            self._plan_bin()
        else:
            raise ModelError(f"{p} is not a model directory: no {ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} or "
                             f"{BIN_INDEX}")
        if not self._entries:
            raise ModelError(f"model {p} holds no tensors")

    # -- planning -------------------------------------------------------------------------------------
    def _index_files(self, index_name: str) -> list[Path]:
        index = _read_json(self.path / index_name, "index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{self.path / index_name} has no weight_map")
        files = list(dict.fromkeys(weight_map.values()))
        out = []
        for f in files:
            fp = self.path / f
            if not fp.is_file():
                raise ModelError(f"model {self.path}: shard {f} named in {index_name} is missing")
            out.append(fp)
        self._weight_map = weight_map
        return sorted(out, key=lambda x: x.name)

    def _plan_safetensors(self) -> None:
        files = self._index_files(ST_INDEX) if (self.path / ST_INDEX).is_file() else [self.path / ST_SINGLE]
        indexed = getattr(self, "_weight_map", None)
        for fp in files:
            header, data_start = _read_header(fp)
            size = fp.stat().st_size
            items = [(k, v) for k, v in header.items() if k != "__metadata__"]
            items.sort(key=lambda kv: kv[1].get("data_offsets", [0])[0] if isinstance(kv[1], dict) else 0)
            for name, info in items:
                try:
                    shape = tuple(int(x) for x in info["shape"])
                    code = str(info["dtype"])
                    off, end = (int(x) for x in info["data_offsets"])
                except (KeyError, TypeError, ValueError, IndexError):
                    raise ModelError(f"model {self.path}: corrupt header entry for tensor {name} in {fp.name}") from None
                if code not in _ST_TO_TORCH:
                    raise ModelError(f"model {self.path}: tensor {name} has unsupported dtype {code}")
                if end - off != math.prod(shape) * element_size(code) or data_start + end > size:
                    raise ModelError(f"model {self.path}: tensor {name} in {fp.name} is truncated or corrupt "
                                     f"(data_offsets {off}..{end}, file size {size})")
                if name in self._entries:
                    raise ModelError(f"model {self.path}: tensor {name} appears in two shards "
                                     f"({self._entries[name].file.name}, {fp.name})")
                self._entries[name] = _Entry(fp, shape, code, data_start + off, end - off)
        if indexed is not None:
            missing = [n for n in indexed if n not in self._entries]
            if missing:
                raise ModelError(f"model {self.path}: tensor {missing[0]} is listed in {ST_INDEX} but absent "
                                 f"from its shard {indexed[missing[0]]}")

    def _load_bin(self, fp: Path) -> dict[str, Any]:
        if fp not in self._bin:
            torch = _torch()
            try:
                sd = torch.load(fp, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ModelError(f"model {self.path}: cannot load {fp.name}: {exc}") from None
            if not isinstance(sd, dict):
                raise ModelError(f"model {self.path}: {fp.name} does not hold a state dict")
            self._bin[fp] = sd
        return self._bin[fp]

    def _plan_bin(self) -> None:
        files = self._index_files(BIN_INDEX) if (self.path / BIN_INDEX).is_file() else [self.path / BIN_SINGLE]
        for fp in files:
            sd = self._load_bin(fp)
            for i, (name, t) in enumerate(sd.items()):
                if not hasattr(t, "shape"):
                    continue
                self._entries[name] = _Entry(fp, tuple(t.shape), st_code(t.dtype), i)

    # -- queries --------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"ModelReader({str(self.path)!r})"

    @property
    def vocab_size(self) -> int | None:
        return config_vocab_size(self.config)

    def tensor_names(self) -> list[str]:
        """All tensor names in shard order (file order, then storage order inside each file)."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelError(f"model {self.path}: tensor {name} is missing") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> Any:
        return torch_dtype(self._entry(name).dtype_code)

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def nbytes(self, name: str) -> int:
        return self.numel(name) * element_size(self.dtype(name))

    def location(self, name: str) -> tuple[int, int, int]:
        """``(file descriptor, byte offset, byte count)`` of a safetensors tensor's data (stored little-endian,
        row-major; the descriptor is this reader's, closed by :meth:`close`, for positioned reads); a ModelError
        for ``.bin`` checkpoints, whose layout is torch's."""
        e = self._entry(name)
        if self.format != "safetensors":
            raise ModelError(f"model {self.path}: tensor {name} is in a .bin checkpoint, not safetensors")
        return self._fd(e.file), e.offset, e.nbytes

    def files(self) -> list[Path]:
        return list(dict.fromkeys(e.file for e in self._entries.values()))

    # -- reading --------------------------------------------------------------------------------------
    def _fd(self, fp: Path) -> int:
        fd = self._handles.get(fp)
        if fd is None:
            with self._lock:
                fd = self._handles.get(fp)
                if fd is None:
                    try:
                        fd = os.open(fp, os.O_RDONLY)
                    except OSError as exc:
                        raise ModelError(f"model {self.path}: cannot open {fp.name}: {exc}") from None
                    self._handles[fp] = fd
        return fd

    def _read_st(self, e: _Entry, name: str, rows: tuple[int, int] | None) -> Any:
        # Positional reads straight into the tensor's buffer: the page cache is shared like a memory map,
        # but only the tensor being read counts towards this process's resident memory.
        torch = _torch()
        shape = list(e.shape)
        off, nbytes = e.offset, e.nbytes
        if rows is not None:
            if not shape:
                raise ModelError(f"model {self.path}: tensor {name} is a scalar; it has no rows")
            start, stop = max(0, rows[0]), min(rows[1], shape[0])
            row_bytes = nbytes // shape[0] if shape[0] else 0
            off, nbytes = off + start * row_bytes, max(0, stop - start) * row_bytes
            shape[0] = max(0, stop - start)
        t = torch.empty(shape, dtype=torch_dtype(e.dtype_code))
        if nbytes:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            fd = self._fd(e.file)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buf[done:]], off + done)
                if got <= 0:
                    raise ModelError(f"model {self.path}: tensor {name}: unexpected end of {e.file.name}")
                done += got
        return t

    def get(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        """Tensor ``name`` in its stored dtype; with ``rows=(start, stop)`` only that block of dim 0."""
        e = self._entry(name)
        try:
            if self.format == "safetensors":
                return self._read_st(e, name, rows)
            t = self._load_bin(e.file)[name]
            return t if rows is None else t[rows[0]:rows[1]]
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {self.path}: cannot read tensor {name} from {e.file.name}: {exc}") from None

    def delta(self, name: str, base: Any, rows: tuple[int, int] | None = None, *, out: Any = None) -> Any:
        """fp32 task vector θ − θ_base for ``name``; ``base`` is the base block in fp32 (rows ``start:stop``
        of dim 0 when given). Where this model has fewer rows than asked (a smaller vocabulary) the missing
        rows are zero; extra rows are ignored. ``out``: an fp32 tensor of ``base``'s shape to fill."""
        torch = _torch()
        shape = self.shape(name)
        if out is None:
            out = torch.empty(base.shape, dtype=torch.float32)
        if not shape:
            out.copy_(self.get(name))
            return out.sub_(base)
        start, stop = rows if rows is not None else (0, base.shape[0])
        have = min(stop, shape[0])
        if have >= stop:
            out.copy_(self.get(name, (start, stop)))
            return out.sub_(base)
        n = max(have - start, 0)
        if n:
            out[:n].copy_(self.get(name, (start, have)))
            out[:n].sub_(base[:n])
        out[n:] = 0
        return out

    def close(self) -> None:
        for fd in self._handles.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._handles.clear()
        self._bin.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------
# LoRA adapters
# ------------------------------------------------------------------------------------------------------

_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                      r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def _pattern_value(module: str, pattern: dict[str, Any], default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class LoraReader:
    """A PEFT LoRA adapter directory used as a task vector: ``delta(name)`` is scaling·B@A, mapped onto
    the base model's tensor name (``<module>.weight``), never materialising the full model."""

    kind = "lora"

    def __init__(self, path: str | Path, base: ModelReader) -> None:
        self.path = Path(path)
        self.base = base
        p = self.path
        if not (p / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{p} is not a LoRA adapter directory: {ADAPTER_CONFIG} is missing")
        self.adapter_config = _read_json(p / ADAPTER_CONFIG, "adapter config")
        cfg = self.adapter_config
        ptype = str(cfg.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise ModelError(f"adapter {p}: peft_type {ptype} is not supported (only LORA)")
        self.config = base.config  # the merged result keeps the base architecture
        weights = next((p / w for w in ADAPTER_WEIGHTS if (p / w).is_file()), None)
        if weights is None:
            raise ModelError(f"adapter {p}: no adapter_model.safetensors or adapter_model.bin")
        self._weights_file = weights
        if weights.suffix == ".safetensors":
            header = read_header(weights)
            self._raw_names = [k for k in header if k != "__metadata__"]
            self._sd: dict[str, Any] | None = None
        else:
            self._sd = _torch().load(weights, map_location="cpu", weights_only=True, mmap=True)
            self._raw_names = list(self._sd)
        self._handle: Any = None
        self._targets: dict[str, dict[str, Any]] = {}  # base tensor name -> parts
        base_names = set(base.tensor_names())
        for raw in self._raw_names:
            stripped = raw
            for prefix in ("base_model.model.", "base_model."):
                if stripped.startswith(prefix):
                    stripped = stripped[len(prefix):]
                    break
            m = _LORA_RE.match(stripped)
            if m:
                module = m.group("module")
                target = self._resolve(module + ".weight", base_names, raw)
                self._targets.setdefault(target, {"module": module})[m.group("kind")] = raw
            else:  # modules_to_save: a full replacement tensor
                target = self._resolve(stripped, base_names, raw)
                self._targets.setdefault(target, {"module": stripped})["full"] = raw
        for target, parts in self._targets.items():
            if "full" in parts:
                continue
            a = parts.get("lora_A") or parts.get("lora_embedding_A")
            b = parts.get("lora_B") or parts.get("lora_embedding_B")
            if a is None or b is None:
                raise ModelError(f"adapter {p}: tensor {target} has only one of lora_A/lora_B")
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))

    def _resolve(self, name: str, base_names: set[str], raw: str) -> str:
        for cand in (name, "model." + name, name.removeprefix("model.")):
            if cand in base_names:
                return cand
        raise ModelError(f"adapter {self.path}: tensor {raw} targets {name}, which the base model "
                         f"{self.base.path} does not have")

    def __repr__(self) -> str:
        return f"LoraReader({str(self.path)!r})"

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> Any:
        return self.base.dtype(name)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    @property
    def vocab_size(self) -> int | None:
        return self.base.vocab_size

    def _raw(self, key: str) -> Any:
        if self._sd is not None:
            return self._sd[key]
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self._weights_file), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def scaling(self, module: str, r: int) -> float:
        cfg = self.adapter_config
        rank = int(_pattern_value(module, cfg.get("rank_pattern") or {}, cfg.get("r", r)))
        alpha = float(_pattern_value(module, cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", rank)))
        if cfg.get("use_rslora"):
            return alpha / rank ** 0.5
        return alpha / rank

    def delta(self, name: str, base: Any = None, rows: tuple[int, int] | None = None, *, out: Any = None) -> Any:
        """fp32 ΔW for ``name`` (rows ``start:stop`` of it when given); zeros for tensors the adapter does not
        touch when ``base`` is given, else None. ``out``: an fp32 tensor to fill."""
        if out is not None:
            d = self.delta(name, base, rows)
            return out.copy_(d) if d is not None else out.zero_()
        torch = _torch()
        parts = self._targets.get(name)
        if parts is None:
            return None if base is None else torch.zeros_like(base, dtype=torch.float32)
        shape = self.base.shape(name)
        try:
            if "full" in parts:
                full = self._raw(parts["full"]).to(torch.float32)
                if tuple(full.shape) != shape:
                    raise ModelError(f"adapter {self.path}: tensor {name} has shape {tuple(full.shape)}, base "
                                     f"has {shape}")
                if rows is not None:
                    full = full[rows[0]:rows[1]]
                b0 = base if base is not None else self.base.get(name, rows).to(torch.float32)
                return full - b0
            if "lora_A" in parts:
                A = self._raw(parts["lora_A"]).to(torch.float32)   # r x in
                B = self._raw(parts["lora_B"]).to(torch.float32)   # out x r
                s = self.scaling(parts["module"], A.shape[0])
                if self.fan_in_fan_out:  # stored weight is (in, out) = (B@A).T
                    out = (B @ A).T
                    out = out[rows[0]:rows[1]] if rows is not None else out
                else:
                    out = (B[rows[0]:rows[1]] if rows is not None else B) @ A
            else:  # embedding LoRA: A is r x num_embeddings, B is dim x r; weight is num_embeddings x dim
                A = self._raw(parts["lora_embedding_A"]).to(torch.float32)
                B = self._raw(parts["lora_embedding_B"]).to(torch.float32)
                s = self.scaling(parts["module"], A.shape[0])
                At = A.T if rows is None else A.T[rows[0]:rows[1]]
                out = At @ B.T
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"adapter {self.path}: cannot compute the task vector of {name}: {exc}") from None
        expect = shape if rows is None else (rows[1] - rows[0], *shape[1:])
        if tuple(out.shape) != tuple(expect):
            raise ModelError(f"adapter {self.path}: tensor {name}: LoRA product has shape {tuple(out.shape)}, "
                             f"base has {tuple(expect)}")
        return out.mul_(s).contiguous()

    def close(self) -> None:
        self._handle = None


def is_lora_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and any((p / w).is_file() for w in ADAPTER_WEIGHTS)


def open_source(path: str | Path, base: ModelReader | None = None) -> ModelReader | LoraReader:
    """A ModelReader for a model directory, a LoraReader (needs ``base``) for a PEFT adapter directory."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model path {p} does not exist")
    if p.is_dir() and is_lora_dir(p) and not (p / "config.json").is_file():
        if base is None:
            raise ModelError(f"{p} is a LoRA adapter; a base model is needed to use it")
        return LoraReader(p, base)
    return ModelReader(p)


def row_blocks(shape: Sequence[int], numel: int, max_elements: int) -> list[tuple[int, int]]:
    """Blocks of whole rows (dim 0) of a tensor of ``shape`` with at most ``max_elements`` elements each (at
    least one row): what the streaming engines read at a time. A scalar is one row; no rows, no blocks."""
    rows = shape[0] if len(shape) else 1
    step = max(1, max_elements // max(1, numel // max(1, rows)))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


# ------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------

@dataclass
class TensorPlan:
    """One output tensor: its name, output shape and dtype, and whether dim 0 is the vocabulary."""

    name: str
    shape: tuple[int, ...]
    dtype: Any
    vocab: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelSetPlan:
    """What :func:`validate_models` found: output tensors in base shard order and the output vocab size."""

    tensors: list[TensorPlan]
    vocab_size: int | None
    vocab_policy: str
    # per source: rows of each vocab tensor that the source really has (rows past it fall back to the base)
    source_vocab: list[int | None] = field(default_factory=list)

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


_ARCH_KEYS = ("model_type", "architectures")


def validate_models(base: ModelReader, models: Sequence[ModelReader | LoraReader], *, vocab: str = "error",
                    scan_finite: bool = False, progress: Any = None) -> ModelSetPlan:
    """Check ``models`` against ``base`` from headers and configs: same architecture, same tensor names,
    same shapes (vocabulary rows per ``vocab``: ``error`` | ``truncate`` to the smallest | ``base``'s size),
    floating dtypes where the base is floating. With ``scan_finite`` every tensor of every input is read once
    and checked for NaN/Inf. Raises ModelError naming the model and tensor; returns the plan."""
    if vocab not in ("error", "truncate", "base"):
        raise ModelError(f"unknown vocab policy {vocab!r} (error | truncate | base)")
    base_names = base.tensor_names()
    base_set = set(base_names)
    bv = base.vocab_size
    for m in models:
        if isinstance(m, LoraReader):
            continue
        for key in _ARCH_KEYS:
            a, b = base.config.get(key), m.config.get(key)
            if a != b:
                raise ModelError(f"model {m.path} has {key}={b!r} but the base {base.path} has {key}={a!r}: "
                                 f"different architectures cannot be merged")
        names = m.tensor_names()
        extra = [n for n in names if n not in base_set]
        if extra:
            raise ModelError(f"model {m.path}: tensor {extra[0]} is not in the base model {base.path}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        have = set(names)
        missing = [n for n in base_names if n not in have]
        if missing:
            raise ModelError(f"model {m.path}: tensor {missing[0]} (present in the base {base.path}) is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    vocabs = [bv] + [m.vocab_size for m in models]
    out_vocab = bv
    if vocab == "truncate" and all(v is not None for v in vocabs):
        out_vocab = min(vocabs)  # type: ignore[type-var]
    plans: list[TensorPlan] = []
    for name in base_names:
        bshape = base.shape(name)
        bdtype = base.dtype(name)
        is_vocab = bool(bshape) and bv is not None and bshape[0] == bv and (
            "embed" in name or "lm_head" in name or "wte" in name or "output" in name)
        for m in models:
            shape = m.shape(name)
            mdtype = m.dtype(name)
            if is_float(bdtype) != is_float(mdtype):
                raise ModelError(f"model {m.path}: tensor {name} has dtype {mdtype} but the base has {bdtype}")
            if shape == bshape:
                continue
            vocab_diff = (is_vocab and len(shape) == len(bshape) and shape[1:] == bshape[1:]
                          and m.vocab_size is not None and shape[0] == m.vocab_size)
            if not vocab_diff:
                raise ModelError(f"model {m.path}: tensor {name} has shape {list(shape)} but the base "
                                 f"{base.path} has {list(bshape)}")
            if vocab == "error":
                raise ModelError(f"model {m.path}: tensor {name} has vocabulary size {shape[0]} but the base "
                                 f"{base.path} has {bshape[0]}; pass --vocab truncate or --vocab base")
        oshape = bshape
        if is_vocab and out_vocab is not None:
            oshape = (out_vocab, *bshape[1:])
        plans.append(TensorPlan(name, tuple(oshape), bdtype, is_vocab))
    src_vocab = [m.vocab_size for m in models]
    plan = ModelSetPlan(plans, out_vocab, vocab, src_vocab)
    if scan_finite:
        for src in [base, *models]:
            for t in plans:
                if isinstance(src, LoraReader):
                    d = src.delta(t.name)
                    if d is not None:
                        check_finite(d, src.path, t.name)
                else:
                    check_finite(src.get(t.name), src.path, t.name)
                if progress is not None:
                    progress(src, t.name)
    return plan


# ------------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------------

@dataclass
class _Slot:
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    shape: tuple[int, ...]
    code: str
    written: bool = False
    done: int = 0


class ShardedWriter:
    """Write safetensors shards incrementally without holding more than one tensor in memory.

    The layout (which tensor goes into which shard, at what offset) is fixed up front from the planned
    ``(name, shape, dtype)`` list, so each shard's header is written first and tensor bytes go to their
    place with positional writes, in any order and from any thread. ``close()`` checks every tensor was
    written and writes ``model.safetensors.index.json`` (a single shard is named ``model.safetensors``)."""

    def __init__(self, out_dir: str | Path, tensors: Iterable[tuple[str, Sequence[int], Any]], *,
                 max_shard_bytes: int = 2 * 1024 ** 3, metadata: dict[str, str] | None = None,
                 prefix: str = "model") -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        groups: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            shape = tuple(int(s) for s in shape)
            nbytes = math.prod(shape) * element_size(dtype)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, shape, st_code(dtype), nbytes))
            size += nbytes
        count = len(groups)
        self.files = ([f"{prefix}.safetensors"] if count == 1 else
                      [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self.total_bytes = 0
        meta = {"format": "pt", **(metadata or {})}
        for i, group in enumerate(groups):
            header: dict[str, Any] = {"__metadata__": meta}
            pos = 0
            for name, shape, code, nbytes in group:
                if name in header:
                    raise ModelError(f"writer: tensor {name} planned twice")
                header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            path = self.out_dir / self.files[i]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, start + pos)
            for name, shape, code, nbytes in group:
                off = header[name]["data_offsets"][0]
                self.slots[name] = _Slot(i, start + off, nbytes, shape, code, written=nbytes == 0)
            self.total_bytes += pos
        self._lock = threading.Lock()
        self._closed = False

    def write(self, name: str, tensor: Any, rows_offset: int = 0) -> None:
        """Write ``tensor`` (whole, or a block of rows starting at row ``rows_offset``) into its slot."""
        torch = _torch()
        slot = self.slots.get(name)
        if slot is None:
            raise ModelError(f"writer: tensor {name} was not planned")
        if st_code(tensor.dtype) != slot.code:
            raise ModelError(f"writer: tensor {name} has dtype {tensor.dtype}, planned {slot.code}")
        t = tensor.detach().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy() if t.numel() else b""
        row_bytes = slot.nbytes // slot.shape[0] if slot.shape and slot.shape[0] else 0
        off = slot.offset + rows_offset * row_bytes
        if off + len(data) > slot.offset + slot.nbytes:
            raise ModelError(f"writer: tensor {name}: {len(data)} bytes at row {rows_offset} overflow its "
                             f"planned size {slot.nbytes}")
        mv = memoryview(data) if len(data) else b""
        done = 0
        while done < len(mv):
            done += os.pwrite(self._fds[slot.shard], mv[done:], off + done)
        with self._lock:
            slot.done += len(data)
            if slot.done >= slot.nbytes:
                slot.written = True

    def close(self) -> Path | None:
        """Flush, check completeness, write the index (for more than one shard); returns the index path."""
        if self._closed:
            return None
        missing = [n for n, s in self.slots.items() if not s.written]
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._closed = True
        if missing:
            raise ModelError(f"writer: tensor {missing[0]} was never written ({len(missing)} missing)")
        if len(self.files) == 1:
            return None
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {n: self.files[s.shard] for n, s in self.slots.items()}}
        path = self.out_dir / ST_INDEX
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return path

    def abort(self) -> None:
        if not self._closed:
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._closed = True
