"""Training precision: which dtype the master weights, the optimizer state, the compute and the saved
checkpoints use, and the statistics that show what the saved dtype keeps of an update.

========================  ===============  =================  =====================================================
``precision``             master weights   compute            notes
========================  ===============  =================  =====================================================
``fp32``                  float32          float32            the CPU default
``bf16-mixed``            float32          bfloat16 autocast  verl / OpenRLHF's regime; the paper's
``fp16-mixed``            float32          float16 autocast   with a dynamic loss scaler (skipped steps logged)
``bf16-pure``             bfloat16         bfloat16           only on request: AdamW updates bf16 parameters in
                                                              place, so updates below half a bf16 step are lost
========================  ===============  =================  =====================================================

The optimizer state follows the master weights (float32 in every mode but ``bf16-pure``). The frozen reference
model is held in the compute dtype. Checkpoints and ``final/`` are written in ``save_dtype`` (``auto``: the start
model's dtype); the float32 master goes into the checkpoint's trainer state when the saved dtype is narrower, so a
resumed run continues from exactly the weights it stopped at.

Autocast is rlm's own context (:meth:`Precision.autocast`) around every forward pass of the training engines
(updates, log-prob passes, sampling) rather than accelerate's ``mixed_precision`` alone: accelerate only autocasts
the models it prepares and has no fp16 autocast on CPU, while rlm also runs the reference model and generation.

This module does not import torch at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """The torch dtype called ``name`` (float32, bfloat16, float16)."""
    import torch

    if name not in DTYPE_NAMES:
        raise RlmError(f"unknown dtype {name!r} (expected one of {', '.join(DTYPE_NAMES)})")
    return getattr(torch, name)


def model_dtype_name(model_path: str) -> str:
    """The dtype the model at ``model_path`` is stored in (its ``config.json``; float32 when unrecorded)."""
    cfg_file = Path(model_path) / "config.json"
    if cfg_file.is_file():
        try:
            data = json.loads(cfg_file.read_text())
        except ValueError:
            data = {}
        name = data.get("dtype") or data.get("torch_dtype")
        if isinstance(name, str) and name.removeprefix("torch.") in DTYPE_NAMES:
            return name.removeprefix("torch.")
    return "float32"


@dataclasses.dataclass(frozen=True)
class Precision:
    """The dtypes of one run: ``mode`` (the config's ``precision``), the master weights', the compute's and
    the saved checkpoints' (torch dtypes)."""

    mode: str
    master: Any
    compute: Any
    save: Any

    @classmethod
    def of(cls, precision: str, save_dtype: str, model_path: str) -> "Precision":
        import torch

        compute = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16,
                   "bf16-pure": torch.bfloat16}[precision]
        master = torch.bfloat16 if precision == "bf16-pure" else torch.float32
        save = torch_dtype(model_dtype_name(model_path) if save_dtype == "auto" else save_dtype)
        return cls(precision, master, compute, save)

    @property
    def mixed(self) -> bool:
        return self.mode in ("bf16-mixed", "fp16-mixed")

    @property
    def needs_scaler(self) -> bool:
        return self.mode == "fp16-mixed"

    @property
    def save_master(self) -> bool:
        """Whether checkpoints must keep the master weights beside the saved ones (they are wider)."""
        return self.save != self.master

    def autocast(self, device: Any) -> Any:
        """The context every forward pass runs in: autocast to the compute dtype in the mixed modes."""
        if not self.mixed:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=torch.device(device).type, dtype=self.compute)

    def describe(self) -> dict[str, str]:
        """The manifest's ``precision`` record."""
        return {"precision": self.mode, "master_dtype": _name(self.master), "compute_dtype": _name(self.compute),
                "save_dtype": _name(self.save)}


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def warn_pure(precision: Precision, is_main: bool) -> None:
    """``bf16-pure`` loses small updates: say so once."""
    if precision.mode == "bf16-pure" and is_main:
        print("warning: precision bf16-pure keeps the parameters and AdamW's updates in bf16: every update smaller "
              "than half a bf16 step (2^-9 relative) is lost; bf16-mixed keeps fp32 master weights", file=sys.stderr)


def start_snapshot(model: Any) -> dict[str, Any]:
    """θ0: a CPU copy of ``model``'s trainable parameters in their own dtype (the start weights the change
    statistics compare with)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def saved_differs(theta: Any, theta0: Any, save: Any) -> int:
    """How many entries of ``theta`` differ from ``theta0`` once both are cast to the saved dtype ``save`` (on
    ``theta``'s device)."""
    return int((theta.to(save) != theta0.to(theta.device).to(save)).sum())


def saved_change_counts(params: dict[str, Any], start: dict[str, Any], save: Any) -> tuple[int, int]:
    """(parameters whose value in the ``save`` dtype differs from θ0's value in that dtype, all parameters
    compared) over the tensors of ``params`` (name → tensor) found in ``start``."""
    pairs = [(p.detach(), start[name]) for name, p in params.items() if name in start]
    return sum(saved_differs(a, b, save) for a, b in pairs), sum(a.numel() for a, _ in pairs)
