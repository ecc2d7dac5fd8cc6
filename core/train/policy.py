"""The policy a training run updates: loading it (full fine-tuning, or LoRA through peft) with its tokenizer and
frozen start copy, the start model's reference log-probs, the model a checkpoint saves (LoRA: merged), ‖θ − θ0‖
and the weight digest that checks processes agree.

The session (:mod:`rlm.core.train.session`) loads one. This module does not import torch at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError
from rlm.core.train.checkpoints import STATE_DIR
from rlm.core.train.config import TrainConfig
from rlm.core.train.forward import forward_response


@dataclasses.dataclass
class LoadedPolicy:
    """What :func:`load_policy` returns: the trainable ``model`` (a peft model for LoRA), ``ref`` the frozen
    start model (None for LoRA: the base with the adapter switched off), the tokenizer, the resolved start
    model path, the torch dtype and whether prompts use the plain fallback format (no chat template)."""

    model: Any
    ref: Any | None
    tokenizer: Any
    model_path: str
    dtype: Any
    chat_fallback: bool


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_tokenizer(tok: Any, model_name: str, cfg: TrainConfig, is_main: bool) -> bool:
    """Whether the plain fallback prompt is used (no chat template); fail where the config or rlm needs more."""
    fallback = False
    if not getattr(tok, "chat_template", None):
        if cfg.require_chat_template:
            raise RlmError(f"model {model_name} has no chat template (require_chat_template is set)")
        fallback = True
        if is_main:
            print(f"warning: model {model_name} has no chat template; prompts use the plain fallback "
                  f"format (the question, then a newline)", file=sys.stderr)
    if tok.eos_token_id is None:
        raise RlmError(f"the tokenizer of {model_name} has no eos token")
    return fallback


def load_policy(model_name: str, model_path: str, cfg: TrainConfig, device: Any, *, resume_dir: Path | None,
                is_main: bool) -> LoadedPolicy:
    """Load the policy from ``model_path`` (the resolved ``model_name``), or from ``resume_dir`` when a full
    fine-tuning run resumes (LoRA: the start model plus the checkpoint's adapter), in training mode on
    ``device``, and the frozen start copy for full fine-tuning."""
    from rlm.core.models.hf import load_model

    dtype = torch_dtype(cfg.dtype)
    src = model_path if (resume_dir is None or cfg.lora.enabled) else str(resume_dir)
    model, tok = load_model(src, dtype=dtype)
    chat_fallback = _check_tokenizer(tok, model_name, cfg, is_main)
    if cfg.lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_dir is not None:
            model = PeftModel.from_pretrained(model, str(resume_dir / STATE_DIR / "adapter"), is_trainable=True)
        else:
            lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                            target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
            model = get_peft_model(model, lc)
        ref = None  # the base model with the adapter disabled
    else:
        # the frozen start model: reference log-probs for the KL term and θ0 for delta_norm
        ref, _ = load_model(model_path, dtype=dtype, with_tokenizer=False)
        ref.requires_grad_(False)
        ref.eval()
        ref.to(device)
    model.to(device)
    model.train()
    if hasattr(model, "config"):
        model.config.use_cache = False
    return LoadedPolicy(model, ref, tok, model_path, dtype, chat_fallback)


def reference_logprobs(ref: Any | None, policy: Any, model: Any, t: dict[str, Any], temperature: float) -> Any:
    """Log-probs of the frozen start model: ``ref``, or for LoRA (``ref`` None) ``model`` (the prepared
    policy) with the adapter of ``policy`` (the unwrapped one) switched off."""
    import torch

    with torch.no_grad():
        if ref is not None:
            return forward_response(ref, t, temperature=temperature)[0]
        with policy.disable_adapter():
            return forward_response(model, t, temperature=temperature)[0]


def model_to_save(policy: Any, lora: bool) -> tuple[Any, Any]:
    """(model to save as a plain HF directory, adapter model or None): a LoRA policy is saved merged, on a
    copy, with its adapter next to it."""
    if lora:
        import copy

        merged = copy.deepcopy(policy).merge_and_unload()
        return merged, policy
    return policy, None


def delta_norm(policy: Any, ref: Any | None) -> float:
    """‖θ − θ0‖₂ over the model's weights (LoRA, ``ref`` None: the merged low-rank updates)."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        if ref is not None:
            ref_params = dict(ref.named_parameters())
            for name, p in policy.named_parameters():
                total += (p.detach().double() - ref_params[name].detach().double()).pow(2).sum().cpu()
        else:
            for module in policy.modules():
                if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
                    for adapter in getattr(module, "active_adapters", []):
                        if adapter in module.lora_A:
                            total += module.get_delta_weight(adapter).double().pow(2).sum().cpu()
    return float(total.sqrt())


def weight_digest(policy: Any) -> str:
    """sha256 of every parameter of ``policy`` (to check that processes agree)."""
    h = hashlib.sha256()
    for name, p in sorted(policy.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()
