"""Checkpoints of a training run: ``checkpoints/step-N/`` written atomically, read back for an exact resume,
and pruned to the newest ``keep_checkpoints``; ``final/``.

A checkpoint is an HF directory (LoRA runs: the merged model) plus ``trainer_state/``: ``optimizer.pt``,
``scheduler.pt``, ``rng-R.pt`` for every process R, ``master.safetensors`` (the fp32 master weights when the
HF directory holds narrower ones), ``scaler.pt`` (fp16-mixed), ``state.json`` (step, data position, processes),
``adapter/`` for LoRA and ``NAME.safetensors`` with ``NAME_optimizer.pt`` / ``NAME_scheduler.pt`` for each
extra module (PPO's critic). ``state.json`` is written last, so a directory without it is incomplete.

The session (:mod:`rlm.core.train.session`) holds one :class:`Checkpoints`; the run-directory checks
(:mod:`rlm.core.train.run_dir`) read :func:`checkpoint_steps`. This module does not import torch at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

from rlm.core.errors import RlmError

STATE_DIR = "trainer_state"
#: free space under which a failed checkpoint write counts as a full disk
FULL_DISK_BYTES = 64 << 20
#: the master weights of a checkpoint saved in a narrower dtype (full fine-tuning)
MASTER_FILE = "master.safetensors"
#: an extra module saved with the policy: name → (module, its optimizer, its scheduler)
ExtraModules = dict[str, tuple[Any, Any, Any]]


@dataclasses.dataclass
class Gathered:
    """Full states of a sharded run (FSDP2), gathered by every process and held by the main one: the policy's
    state dict and optimizer state, and each extra module's (name → (state dict, optimizer state))."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    extra: dict[str, tuple[dict[str, Any], dict[str, Any]]] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def disk_errors(path: Path) -> Any:
    """Writing under ``path``: torch and safetensors report a full disk as a RuntimeError without an errno;
    when the disk is in fact (nearly) full, re-raise it as the OSError it is, naming ``path``."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        try:
            free = shutil.disk_usage(path.parent if not path.exists() else path).free
        except OSError:
            raise exc from None
        if free < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


def write_final(target: Path, model: Any, adapter: Any, tokenizer: Any, dtype: Any,
                state_dict: dict[str, Any] | None) -> None:
    """``final/``: the full model as a plain HF directory, or (LoRA) the adapter and tokenizer with the merged
    model (when there is one) in ``merged/``."""
    from rlm.core.io.atomic import atomic_dir
    from rlm.core.models.hf import save_model
    from rlm.core.models.lora import save_adapter
    from rlm.core.models.reader import MERGED_DIR

    if adapter is None:
        save_model(model, tokenizer, target, overwrite=True, dtype=dtype, state_dict=state_dict)
        return
    with atomic_dir(target, overwrite=True) as tmp:
        save_adapter(adapter, tokenizer, tmp)
        if model is not None:
            save_model(model, tokenizer, tmp / MERGED_DIR, dtype=dtype)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def checkpoint_steps(out: Path) -> list[int]:
    """The steps of the complete checkpoints under ``out/checkpoints``, ascending."""
    root = out / "checkpoints"
    steps = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step-") and (d / STATE_DIR / "state.json").is_file():
                try:
                    steps.append(int(d.name[5:]))
                except ValueError:
                    pass
    return sorted(steps)


def rng_state() -> dict[str, Any]:
    """The Python, numpy, torch CPU and (where there is one) CUDA random states of this process."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Checkpoints:
    """Saves and restores the checkpoints of the run directory ``out`` for one process of ``acc`` (an
    ``accelerate.Accelerator``); the main process writes, every process saves and restores its own RNG.
    ``resume_dir`` is the checkpoint this run resumes from (None: a fresh run); ``last_good`` the newest
    checkpoint known complete."""

    def __init__(self, out: Path, acc: Any, keep: int | None, resume_dir: Path | None) -> None:
        self.out = out
        self.acc = acc
        self.keep = keep
        self.resume_dir = resume_dir
        self.last_good: Path | None = resume_dir
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process

    def path(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step}"

    # -- writing ----------------------------------------------------------------------------------------------
    def save(self, step: int, hf_state: Callable[[], tuple[Any, Any]], tokenizer: Any, optimizer: Any,
             scheduler: Any, data_position: dict[str, Any] | None = None,
             extra_modules: ExtraModules | None = None, *, dtype: Any = None, master: Any = None,
             scaler: Any = None, gathered: Gathered | None = None) -> Path:
        """Write ``checkpoints/step-N`` atomically. ``hf_state()`` (called on the main process only) returns
        (model to save as a plain HF directory, adapter model or None); the HF directory holds its weights in
        ``dtype`` (None: their own), ``trainer_state/master.safetensors`` the trainable parameters of ``master``
        (the policy, when the saved dtype is narrower than its own) and ``scaler.pt`` the fp16 loss scaler's
        state. A sharded run passes the full states it ``gathered`` instead of the modules' own."""
        import torch
        from safetensors.torch import save_file

        from rlm.core.io.atomic import atomic_dir, atomic_write_json
        from rlm.core.models.hf import saved_state_dict, set_config_dtype

        target = self.path(step)
        rng_dir = self.out / "checkpoints" / f".rng-step-{step}"
        if self.world > 1:  # RNG states of the other processes are collected before the atomic write
            rng_dir.mkdir(parents=True, exist_ok=True)
            if not self.is_main:
                torch.save(rng_state(), rng_dir / f"rng-{self.rank}.pt")
        self.acc.wait_for_everyone()
        if self.is_main:
            model, adapter = hf_state()
            with disk_errors(target), atomic_dir(target, overwrite=True) as tmp:
                full = gathered.model if gathered is not None else None
                model.save_pretrained(tmp, safe_serialization=True, state_dict=saved_state_dict(model, dtype, full))
                if dtype is not None:
                    set_config_dtype(tmp, dtype)
                tokenizer.save_pretrained(tmp)
                state = tmp / STATE_DIR
                state.mkdir()
                if adapter is not None:
                    adapter.save_pretrained(state / "adapter")
                if master is not None:
                    values = full if full is not None else dict(master.named_parameters())
                    save_file({k: values[k].detach().contiguous().cpu() for k, p in master.named_parameters()
                               if p.requires_grad}, str(state / MASTER_FILE))
                if scaler is not None:
                    torch.save(scaler.state_dict(), state / "scaler.pt")
                torch.save(gathered.optimizer if gathered is not None else optimizer.state_dict(),
                           state / "optimizer.pt")
                torch.save(scheduler.state_dict(), state / "scheduler.pt")
                torch.save(rng_state(), state / "rng-0.pt")
                for r in range(1, self.world):
                    shutil.copy(rng_dir / f"rng-{r}.pt", state / f"rng-{r}.pt")
                self._save_extra_modules(state, extra_modules or {}, gathered.extra if gathered else {})
                atomic_write_json(state / "state.json", {"step": step, "data_position": data_position or {},
                                                         "processes": self.world})
            remove_tree(rng_dir)
            self._prune()
        self.last_good = target
        self.acc.wait_for_everyone()
        return target

    def _save_extra_modules(self, state: Path, extra_modules: ExtraModules,
                            gathered: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        import torch
        from safetensors.torch import save_file

        for name, (module, opt, sched) in extra_modules.items():
            sd, osd = gathered.get(name) or (self.acc.unwrap_model(module).state_dict(), opt.state_dict())
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(state / f"{name}.safetensors"))
            torch.save(osd, state / f"{name}_optimizer.pt")
            torch.save(sched.state_dict(), state / f"{name}_scheduler.pt")

    def _prune(self) -> None:
        if self.keep is None:
            return
        for s in checkpoint_steps(self.out)[:-self.keep]:
            remove_tree(self.path(s))

    def save_final(self, hf_state: Callable[[], tuple[Any, Any]], tokenizer: Any, dtype: Any = None,
                   state_dict: dict[str, Any] | None = None) -> Path:
        """Write ``final/`` atomically and return its path. ``hf_state()`` (main process only) returns (full model
        or None, adapter model or None). Full fine-tuning: ``final/`` is a plain HF directory of the model. LoRA:
        the PEFT adapter as trained (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer
        at the top, the merged model (when there is one) as a plain HF directory in ``final/merged/``. ``dtype``
        (a torch dtype; None: the parameters' own) is the dtype the full or merged model is saved in;
        ``state_dict`` the full weights a sharded run gathered (full fine-tuning)."""
        target = self.out / "final"
        if self.is_main:
            model, adapter = hf_state()
            with disk_errors(target):
                write_final(target, model, adapter, tokenizer, dtype, state_dict)
        self.acc.wait_for_everyone()
        return target

    # -- reading (resume) -------------------------------------------------------------------------------------
    def restore_optimizer(self, opt: Any, sched: Any, prefix: str = "", sharded_model: Any = None) -> None:
        """Load ``{prefix}optimizer.pt`` and ``{prefix}scheduler.pt`` of the checkpoint this run resumes from
        (into the prepared optimizer of ``sharded_model`` when the run is sharded: the file holds the full
        state)."""
        import torch

        state = self.resume_dir / STATE_DIR
        opt_state = torch.load(state / f"{prefix}optimizer.pt", map_location="cpu", weights_only=False)
        if sharded_model is not None:
            from rlm.core.train.distributed import load_full_optimizer_state

            load_full_optimizer_state(sharded_model, opt, opt_state)
        else:
            opt.load_state_dict(opt_state)
        sched.load_state_dict(torch.load(state / f"{prefix}scheduler.pt", map_location="cpu", weights_only=False))

    def restore_scaler(self, scaler: Any) -> None:
        """Load the fp16 loss scaler's state of the checkpoint this run resumes from."""
        import torch

        path = self.resume_dir / STATE_DIR / "scaler.pt"
        if not path.is_file():
            raise RlmError(f"cannot resume: {path} is missing (the run was not checkpointed in fp16-mixed)")
        scaler.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def restore_rng(self) -> None:
        """Restore this process's random states from the checkpoint this run resumes from."""
        import numpy as np
        import torch

        path = self.resume_dir / STATE_DIR / f"rng-{self.rank}.pt"
        if not path.is_file():
            raise RlmError(f"cannot resume with {self.world} processes: {path} is missing "
                           f"(the run was checkpointed with fewer processes)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def load_module(self, module: Any, name: str) -> None:
        """Load the extra module ``name`` (e.g. ``critic``) of the checkpoint this run resumes from, if any."""
        if self.resume_dir is None:
            return
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(self.resume_dir / STATE_DIR / f"{name}.safetensors")))
