"""The torch device a merge computes on (``rlm merge --device``, mergekit's ``--cuda``).

Tensors are always read and written on the CPU; with another device the merge engine moves each fp32 base
block and task-vector stack there (:func:`to_device`), runs the method's ``prepare``/``merge`` on it and brings
the merged tensor back. Random masks are drawn by CPU generators whatever the device (see
:func:`rlm.core.merge.ops.dare_mask`), so a GPU merge gives the CPU's result within float rounding.
"""

from __future__ import annotations

from typing import Any

from rlm.core.errors import ConfigError


def device_available(device: Any) -> bool:
    """Whether the torch device ``device`` (a ``torch.device``) can be used in this process."""
    import torch

    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    if device.type == "mps":
        return bool(torch.backends.mps.is_available())
    backend = getattr(torch, device.type, None)
    return bool(getattr(backend, "is_available", lambda: False)())


def resolve_device(name: str) -> Any:
    """The ``torch.device`` named ``name`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``...); an unknown or unavailable
    device is a one-line :class:`ConfigError`."""
    import torch

    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if not device_available(device):
        raise ConfigError(f"device {name} is not available in this process (torch {torch.__version__}); "
                          f"merge on --device cpu")
    return device


def to_device(tensor: Any, device: Any) -> Any:
    """``tensor`` on ``device`` (the merge engine's one way of moving data off the CPU)."""
    return tensor.to(device)
