"""PEFT LoRA adapter directories used as task vectors (``rlm merge`` and ``rlm conflicts`` take them as
experts)::

    lo = LoraReader("adapter_dir", base=r) # PEFT adapter: adapter_config.json + adapter_model.safetensors
    lo.delta(name)                         # fp32 task vector ΔW = scaling·B@A for a target tensor, else None

    src = open_source("dir", base=r)       # ModelReader or LoraReader, whichever the directory holds
    src.delta(name, base_fp32, rows=None)  # fp32 τ = θ − θ_base for either kind (LoRA: zeros off-target)

A LoRA training run's ``final/`` (:func:`save_adapter`, called by ``Checkpoints.save_final``) is such an adapter
directory with the tokenizer beside it and, unless ``lora.merge_lora`` is false, the merged full model in
``final/merged/`` (:data:`rlm.core.models.reader.MERGED_DIR`): as an expert it is read as the adapter, as a full model
(``resolve_model``, ``ModelReader``) as ``merged/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rlm.core.errors import ModelError
from rlm.core.models.reader import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ModelReader, read_header, read_json_object

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
        self.adapter_config = read_json_object(p / ADAPTER_CONFIG, "adapter config")
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
            import torch

            self._sd = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
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
        import torch
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
    """Whether ``path`` is a PEFT adapter directory (adapter config and weights)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and any((p / w).is_file() for w in ADAPTER_WEIGHTS)


def adapter_base(path: str | Path) -> str:
    """The ``base_model_name_or_path`` of the adapter directory ``path`` (a ModelError naming the file when it
    is not set)."""
    cfg_file = Path(path) / ADAPTER_CONFIG
    base = read_json_object(cfg_file, "adapter config").get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{cfg_file}: base_model_name_or_path is not set, so the adapter's base model is unknown")
    return str(base)


def save_adapter(adapter: Any, tokenizer: Any, out: str | Path) -> None:
    """Write the adapter of the peft model ``adapter`` (``adapter_config.json`` and
    ``adapter_model.safetensors``, in its parameters' dtype) and ``tokenizer`` into the directory ``out``. A
    ``base_model_name_or_path`` that is an existing local path is recorded absolute, so the adapter finds its
    base from any working directory."""
    out = Path(out)
    adapter.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg_file = out / ADAPTER_CONFIG
    cfg = read_json_object(cfg_file, "adapter config")
    base = cfg.get("base_model_name_or_path")
    if base and Path(base).expanduser().exists():
        cfg["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_adapter_only(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory without a full model of its own (no ``config.json``)."""
    p = Path(path)
    return p.is_dir() and not (p / "config.json").is_file() and is_lora_dir(p)


def open_source(path: str | Path, base: ModelReader | None = None) -> ModelReader | LoraReader:
    """A ModelReader for a model directory, a LoraReader (needs ``base``) for a PEFT adapter directory (also a
    LoRA training run's ``final/``, whose ``merged/`` model is not used here: the adapter is the exact task
    vector)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model path {p} does not exist")
    if is_adapter_only(p):
        if base is None:
            raise ModelError(f"{p} is a LoRA adapter; a base model is needed to use it")
        return LoraReader(p, base)
    return ModelReader(p)
