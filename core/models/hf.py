"""Load and save Hugging Face causal LMs and tokenizers; the ``tiny`` preset; GGUF import.

Every command that takes a model accepts a local HF directory, a hub id (where the network allows), or the
word ``tiny`` (optionally ``tiny:SEED``) for a freshly initialised tiny model cached under ``$RLM_CACHE``.
"""

from __future__ import annotations

import hashlib
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
               max_shard_size: str | int = "2GB") -> Path:
    """Save ``model`` and ``tokenizer`` as an HF directory (safetensors, config, tokenizer, generation
    config), written to a temporary directory and renamed into place when complete."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and not (tmp / "generation_config.json").exists():
            gen.save_pretrained(tmp)
    return out


def init_tiny(out: str | Path, seed: int = 0, overwrite: bool = False, preset: Any = None) -> Path:
    """Create the tiny preset model in ``out``."""
    from rlm.core.models.tiny import build_tiny

    model, tokenizer = build_tiny(seed=seed, preset=preset)
    return save_model(model, tokenizer, out, overwrite=overwrite)


def tiny_seed(spec: str | Path, default: int = 0) -> int | None:
    """The seed when ``spec`` names the tiny model (``tiny`` → ``default``, ``tiny:SEED`` → SEED), else None."""
    text = str(spec)
    if text == "tiny":
        return default
    return int(text.split(":", 1)[1]) if text.startswith("tiny:") else None


def resolve_model(spec: str | Path, seed: int | None = None) -> str:
    """Turn a model argument into something ``from_pretrained`` loads: ``tiny`` / ``tiny:SEED`` becomes a
    cached tiny model directory; an existing directory is checked; anything else is passed on as a hub id."""
    text = str(spec)
    s = tiny_seed(text, seed if seed is not None else 0)
    if s is not None:
        from rlm.core.models.tiny import TinyPreset

        key = hashlib.sha256(json.dumps(TinyPreset().model_dump(), sort_keys=True).encode()).hexdigest()[:10]
        path = cache_dir() / "tiny" / f"seed-{s}-{key}"
        if not is_model_dir(path):
            init_tiny(path, seed=s, overwrite=True)
        return str(path)
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model path {p} is a file, not a model directory (for GGUF use `rlm model import-gguf`)")
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a model directory: config.json is missing")
        return str(p)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelError(f"model path {text} does not exist")
    return text  # hub id


def load_tokenizer(spec: str | Path, seed: int | None = None) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(spec, seed)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"cannot load tokenizer from {path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str | Path, seed: int | None = None, dtype: Any = None, device: Any = None,
               with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a directory, hub id or ``tiny``."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec, seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot load model from {path}: {exc}") from exc
    if device is not None:
        model.to(device)
    tok = load_tokenizer(path) if with_tokenizer else None
    return model, tok


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
