"""Hugging Face model directories on disk: where rlm caches models (``$RLM_CACHE``), what counts as a model
directory, saving a model and tokenizer atomically (optionally in another dtype), and GGUF import.

Kept apart from :mod:`rlm.core.models.hf` (loading and the named models) so that the named models' builders
(:mod:`rlm.core.models.smollm2`) can save and cache without importing the resolver that dispatches to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlm.core.errors import ModelError
from rlm.core.io.atomic import atomic_dir

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def cache_dir() -> Path:
    return Path(os.environ.get("RLM_CACHE", Path.home() / ".cache" / "rlm"))


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def save_model(model: Any, tokenizer: Any, out: str | Path, overwrite: bool = False,
               max_shard_size: str | int = "2GB", dtype: Any = None, state_dict: dict[str, Any] | None = None) -> Path:
    """Save ``model`` and ``tokenizer`` as an HF directory (safetensors, config, tokenizer, generation
    config), written to a temporary directory and renamed into place when complete. ``dtype`` (a torch dtype)
    saves the floating tensors in that dtype and records it in ``config.json`` without touching the model's own
    parameters (fp32 master weights saved as bf16); ``state_dict`` saves those tensors instead of the model's
    (a state dict gathered from sharded processes)."""
    out = Path(out)
    sd = saved_state_dict(model, dtype, state_dict)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size, state_dict=sd)
        if dtype is not None:  # save_pretrained records the parameters' dtype, not the saved one
            set_config_dtype(tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and not (tmp / "generation_config.json").exists():
            gen.save_pretrained(tmp)
    return out


def set_config_dtype(path: Path, dtype: Any) -> None:
    """Record ``dtype`` (a torch dtype) as the weights' dtype in ``path/config.json``."""
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        data = json.loads(cfg_file.read_text())
        data["dtype"] = str(dtype).removeprefix("torch.")
        data.pop("torch_dtype", None)
        cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def saved_state_dict(model: Any, dtype: Any = None, state_dict: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The tensors :func:`save_model` writes: ``state_dict`` (or the model's), floating ones cast to ``dtype``;
    None when neither is given (``save_pretrained`` reads the model itself)."""
    if dtype is None and state_dict is None:
        return None
    sd = state_dict if state_dict is not None else model.state_dict()
    if dtype is None:
        return sd
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def import_gguf(file: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a GGUF file (through transformers' GGUF loader) into a plain HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(file)
    if not file.is_file():
        raise ModelError(f"GGUF file not found: {file}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as exc:
        raise ModelError(f"cannot import GGUF file {file}: {exc}") from exc
    # transformers marks GGUF-loaded models as quantized and refuses to save them: rebuild a plain model.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return save_model(plain, tok, out, overwrite=overwrite)
