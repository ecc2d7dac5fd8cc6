"""Lazy per-tensor access to Hugging Face model directories (safetensors or ``.bin``) and the safetensors
dtype helpers.

Nothing here loads a whole model. A reader plans from the safetensors headers and index files only (names,
shapes, dtypes, shard order) and reads one tensor (or a block of rows of one tensor) at a time: safetensors
data with positional reads straight into the tensor's buffer (so resident memory holds only the tensor being
read, while the OS page cache is shared as with a memory map), ``.bin`` files through
``torch.load(weights_only=True, mmap=True)``. Every error is a :class:`rlm.core.errors.ModelError` naming the
model path and, where there is one, the tensor. Used by the merge engine, the task-conflict engines and the
study's landscape step::

    r = ModelReader("path/to/hf_dir")      # model.safetensors | sharded + model.safetensors.index.json
                                           # | pytorch_model.bin[.index.json] (torch.load weights_only, mmap)
    r.tensor_names()                       # in shard order (file order, then offset order inside a file)
    r.shape(name), r.dtype(name)           # from headers; dtype is a torch.dtype
    r.get(name)                            # torch.Tensor in its stored dtype (one positional read)
    r.get(name, rows=(start, stop))        # only rows start:stop of dimension 0
    r.config                               # config.json as a dict;  r.vocab_size
    ModelReader("run/final")               # a LoRA training run's final/: reads its merged model, final/merged

``check_finite(tensor, model, name)`` raises a ModelError naming the model and tensor on NaN/Inf;
``row_blocks`` cuts a tensor into blocks of whole rows for the streaming engines. LoRA adapters:
:mod:`rlm.core.models.lora`; checking a set of models against a base: :mod:`rlm.core.models.validate`;
writing: :mod:`rlm.core.models.writer`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rlm.core.errors import ModelError

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: a LoRA training run's ``final/`` holds the adapter at its top and the merged full model in this subdirectory
MERGED_DIR = "merged"

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


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the file (ModelError)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return data


def full_model_dir(path: Path) -> Path:
    """The directory of the full model ``path`` holds: ``path/merged`` for a LoRA training output (a PEFT adapter
    directory without ``config.json`` whose merged model is in ``merged/``), else ``path`` itself."""
    if not (path / "config.json").is_file() and (path / ADAPTER_CONFIG).is_file() \
            and (path / MERGED_DIR / "config.json").is_file():
        return path / MERGED_DIR
    return path


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
        p = Path(path)
        if not p.exists():
            raise ModelError(f"model path {p} does not exist")
        if not p.is_dir():
            raise ModelError(f"model path {p} is a file, not a model directory")
        p = self.path = full_model_dir(p)  # a LoRA run's final/ is read through its merged model
        self.config: dict[str, Any] = {}
        if (p / "config.json").is_file():
            self.config = read_json_object(p / "config.json", "model config")
        elif check_config and (p / ADAPTER_CONFIG).is_file():
            raise ModelError(f"{p} is a LoRA adapter without a merged model ({MERGED_DIR}/ is missing): a full model "
                             f"directory is needed here")
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
        index = read_json_object(self.path / index_name, "index")
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


def row_blocks(shape: Sequence[int], numel: int, max_elements: int) -> list[tuple[int, int]]:
    """Blocks of whole rows (dim 0) of a tensor of ``shape`` with at most ``max_elements`` elements each (at
    least one row): what the streaming engines read at a time. A scalar is one row; no rows, no blocks."""
    rows = shape[0] if len(shape) else 1
    step = max(1, max_elements // max(1, numel // max(1, rows)))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]
