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
from rlm.core.train.checkpoints import MASTER_FILE, STATE_DIR
from rlm.core.train.config import TrainConfig
from rlm.core.train.forward import forward_response
from rlm.core.train.precision import (
    Precision,
    model_dtype_name,
    saved_differs,
    start_snapshot,
    torch_dtype,
    warn_pure,
)


@dataclasses.dataclass
class LoadedPolicy:
    """What :func:`load_policy` returns: the trainable ``model`` (a peft model for LoRA) in the master dtype,
    ``ref`` the frozen start model in the compute dtype (None for LoRA: the base with the adapter switched off),
    ``start`` θ0's trainable parameters in the start model's dtype (full fine-tuning; LoRA: empty), the
    tokenizer, the resolved start model path, the run's :class:`Precision` and whether prompts use the plain
    fallback format (no chat template)."""

    model: Any
    ref: Any | None
    start: dict[str, Any]
    tokenizer: Any
    model_path: str
    precision: Precision
    chat_fallback: bool

    @property
    def dtype(self) -> Any:
        """The master weights' dtype."""
        return self.precision.master


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


def _load_master(model: Any, resume_dir: Path) -> None:
    """Put the checkpoint's master weights (``trainer_state/master.safetensors``, written when the saved dtype
    is narrower than the master's) into ``model``."""
    master = resume_dir / STATE_DIR / MASTER_FILE
    if not master.is_file():
        return
    import torch
    from safetensors.torch import load_file

    state = load_file(str(master))
    params = dict(model.named_parameters())
    missing = [k for k in params if params[k].requires_grad and k not in state]
    if missing:
        raise RlmError(f"{master} lacks the master weights of {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for name, tensor in state.items():
            if name in params:
                params[name].copy_(tensor)


def load_policy(model_name: str, model_path: str, cfg: TrainConfig, device: Any, *, resume_dir: Path | None,
                is_main: bool) -> LoadedPolicy:
    """Load the policy from ``model_path`` (the resolved ``model_name``), or from ``resume_dir`` when a full
    fine-tuning run resumes (its master weights; LoRA: the start model plus the checkpoint's adapter), in the
    master dtype and training mode on ``device``; for full fine-tuning also the frozen reference (compute dtype,
    on the CPU with ``ref_offload``) and θ0."""
    from rlm.core.models.hf import load_model

    prec = Precision.of(cfg.precision, cfg.save_dtype, model_path)
    warn_pure(prec, is_main)
    src = model_path if (resume_dir is None or cfg.lora.enabled) else str(resume_dir)
    model, tok = load_model(src, dtype=prec.master)
    if resume_dir is not None and not cfg.lora.enabled:
        _load_master(model, resume_dir)
    chat_fallback = _check_tokenizer(tok, model_name, cfg, is_main)
    start: dict[str, Any] = {}
    if cfg.lora.enabled:
        model = _with_adapter(model, cfg, resume_dir)
        ref = None  # the base model with the adapter disabled
    else:
        # the frozen start model: reference log-probs for the KL term, in the compute dtype
        ref, _ = load_model(model_path, dtype=prec.compute, with_tokenizer=False)
        ref.requires_grad_(False)
        ref.eval()
        ref.to("cpu" if cfg.ref_offload else device)
        start = _start_weights(model, model_path, ref, resume_dir)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.lora.enabled)
    model.to(device)
    model.train()
    if hasattr(model, "config"):
        model.config.use_cache = False
    return LoadedPolicy(model, ref, start, tok, model_path, prec, chat_fallback)


def _with_adapter(model: Any, cfg: TrainConfig, resume_dir: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_dir is not None:
        return PeftModel.from_pretrained(model, str(resume_dir / STATE_DIR / "adapter"), is_trainable=True)
    lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def _start_weights(model: Any, model_path: str, ref: Any, resume_dir: Path | None) -> dict[str, Any]:
    """θ0 in the start model's own dtype: the reference's tensors when it holds them in that dtype, else the
    fresh policy's (cast back exactly), else (a resumed run) the start model loaded again, on the CPU."""
    from rlm.core.models.hf import load_model

    start_dtype = torch_dtype(model_dtype_name(model_path))
    if next(ref.parameters()).dtype == start_dtype:
        return dict(ref.named_parameters())
    if resume_dir is None:
        return {k: v.to(start_dtype) for k, v in start_snapshot(model).items()}
    start, _ = load_model(model_path, dtype=start_dtype, with_tokenizer=False)
    return start_snapshot(start)


def enable_gradient_checkpointing(model: Any, lora: bool) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs keep working)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise RlmError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    if lora and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def reference_logprobs(ref: Any | None, policy: Any, model: Any, t: dict[str, Any], temperature: float) -> Any:
    """Log-probs of the frozen start model: ``ref``, or for LoRA (``ref`` None) ``model`` (the prepared
    policy) with the adapter of ``policy`` (the unwrapped one) switched off."""
    import torch

    with torch.no_grad():
        if ref is not None:
            return forward_response(ref, t, temperature=temperature)[0]
        with policy.disable_adapter():
            return forward_response(model, t, temperature=temperature)[0]


def model_to_save(policy: Any, lora: bool, merge: bool = True) -> tuple[Any, Any]:
    """(full model to save as a plain HF directory or None, adapter model or None): full fine-tuning saves
    ``policy``; a LoRA policy is saved as its adapter (the peft model itself) plus, when ``merge``, a merged
    copy (``merge_and_unload`` on a deep copy, so the policy keeps training unchanged)."""
    if lora:
        if not merge:
            return None, policy
        import copy

        merged = copy.deepcopy(policy).merge_and_unload()
        return merged, policy
    return policy, None


def update_stats(policy: Any, start: dict[str, Any], save: Any) -> dict[str, float]:
    """How far the policy moved from θ0: ``delta_norm`` ‖θ − θ0‖₂ (float64), ``changed_frac`` the share of the
    model's parameters whose master value differs from θ0, ``saved_changed_frac`` the share whose value in the
    saved dtype ``save`` differs from θ0's in that dtype (what a checkpoint keeps of the update). Full fine-tuning
    compares with ``start`` (θ0's trainable parameters); LoRA (``start`` empty) with the base weights under each
    adapter's merged update."""
    import torch

    sq = torch.zeros((), dtype=torch.float64)
    changed = saved = total = 0
    with torch.no_grad():
        for theta, theta0 in _updated_pairs(policy, start):
            d = theta.double() - theta0.to(theta.device).double()
            sq += d.pow(2).sum().cpu()
            changed += int((d != 0).sum())
            saved += saved_differs(theta, theta0, save)
        total = sum(p.numel() for name, p in policy.named_parameters() if "lora_" not in name)
    n = max(total, 1)
    return {"delta_norm": float(sq.sqrt()), "changed_frac": changed / n, "saved_changed_frac": saved / n}


def _updated_pairs(policy: Any, start: dict[str, Any]) -> Any:
    """(θ, θ0) tensor pairs of the updated weights: the trainable parameters against ``start``, or for LoRA each
    adapted base weight with its merged update against the base weight."""
    from rlm.core.train.distributed import full_tensor

    if start:
        for name, p in policy.named_parameters():
            if name in start:
                yield full_tensor(p.detach()), start[name].detach()
        return
    for module in policy.modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            base = module.base_layer.weight.detach()
            for adapter in getattr(module, "active_adapters", []):
                if adapter in module.lora_A:
                    yield (base.float() + module.get_delta_weight(adapter).float()).to(base.dtype), base


def weight_digest(policy: Any) -> str:
    """sha256 of every parameter of ``policy`` (to check that processes agree; sharded parameters are gathered
    whole, so every process must call)."""
    from rlm.core.train.distributed import full_tensor

    h = hashlib.sha256()
    for name, p in sorted(policy.state_dict().items()):
        h.update(name.encode())
        h.update(full_tensor(p.detach()).contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()
