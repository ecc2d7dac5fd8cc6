"""How a training session runs on several processes: the ``accelerate.Accelerator`` for plain runs, data
parallelism (DDP) and sharded models (FSDP2), and the sharded-model helpers (full state dicts gathered on the
main process, optimizer states in full form, whole weights for statistics, generation without per-token
all-gathers).

Launch with ``accelerate launch --config_file configs/accelerate/fsdp.yaml $(which rlm) train ...``. rlm's
``precision`` sets the compute dtype; accelerate's ``mixed_precision`` must be ``no`` or agree with it. Under
FSDP2 with ``bf16-mixed`` the shards are all-gathered in bf16 and gradients reduced in fp32 (verl's FSDP
setting), the master weights and optimizer state stay fp32 and sharded.

On a machine without a GPU accelerate never turns FSDP on (it only does for GPU run modes, and
``Accelerator(cpu=True)`` — which gloo needs — disables it); :func:`build_accelerator` then switches the
accelerator it built to FSDP with the plugin the launcher's ``FSDP_*`` environment describes, which is how the
test suite runs FSDP2 on 2 CPU processes over gloo. DeepSpeed is not supported by the session (its engine owns
gradient accumulation, clipping and the optimizer step, which rlm's loops do themselves): a DeepSpeed launch is
refused with a one-line error.

This module does not import torch at import time.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from rlm.core.errors import RlmError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def build_accelerator(precision: str) -> Any:
    """The accelerator of a training session: gloo on CPU when several processes run, FSDP2 when the launcher
    asks for FSDP (also on CPU), the FSDP mixed-precision policy of ``precision``."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        raise RlmError("DeepSpeed launches are not supported by rlm train (its engine owns accumulation, clipping "
                       "and the optimizer step); use configs/accelerate/fsdp.yaml (FSDP2) for sharded models")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(cpu=multi and not torch.cuda.is_available())
    mp = acc.mixed_precision
    if mp != "no" and (mp, precision) not in (("bf16", "bf16-mixed"), ("fp16", "fp16-mixed")):
        raise RlmError(f"accelerate's mixed_precision={mp} disagrees with precision={precision}: rlm's precision "
                       f"field sets the compute dtype; launch with mixed_precision 'no'")
    if _env_true("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU:
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* environment
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if is_fsdp(acc):
        plugin = acc.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 2) != 2:
            raise RlmError("rlm train supports FSDP2 only: set fsdp_version: 2 in the accelerate config")
        if precision in ("bf16-mixed", "fp16-mixed"):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            low = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32,
                                                                 output_dtype=torch.float32)
    return acc


def end_distributed() -> None:
    """Tear down the process group of a multi-process run once every rank has finished (a barrier, then
    ``destroy_process_group``), as PyTorch asks of a program that initialised one. Left to interpreter exit, the
    gloo group's threads are torn down in no defined order, and a rank of a finished run once aborted there
    ("terminate called without an active exception") under a loaded machine. Nothing happens in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_fsdp(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def full_tensor(t: Any) -> Any:
    """The whole tensor of a (possibly sharded) parameter: DTensors are all-gathered (every process must call)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: Any) -> dict[str, Any]:
    """The full state dict of a sharded ``model`` on the main process (empty elsewhere); every process calls."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The full optimizer state of a sharded ``model`` (keyed by parameter name) on the main process."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=_options())


def load_full_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a full optimizer state (read by every process) into the sharded ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(acc: Any, model: Any, max_norm: float) -> float:
    """Clip the gradients of ``model`` and return their total norm before clipping. Under FSDP2 torch's own
    clipping (DTensor-aware) is called directly: accelerate 1.15's fails once a second model is prepared."""
    if is_fsdp(acc):
        import torch

        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
        return float(full_tensor(norm))
    return float(full_tensor(acc.clip_grad_norm_(model.parameters(), max_norm)))


@contextlib.contextmanager
def generation_context(acc: Any, model: Any) -> Any:
    """Sampling from an FSDP2 model: gather every shard once for the whole ``generate`` call instead of for
    every layer at every token, and shard again after."""
    modules = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "set_reshard_after_forward")] \
        if is_fsdp(acc) else []
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(True)
            m.reshard()
