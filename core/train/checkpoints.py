"""Checkpoints of a training run: ``checkpoints/step-N/`` written atomically, read back for an exact resume,
and pruned to the newest ``keep_checkpoints``; ``final/``.

A checkpoint is an HF directory (LoRA runs: the merged model) plus ``trainer_state/``: ``optimizer.pt``,
``scheduler.pt``, ``rng-R.pt`` for every process R, ``state.json`` (step, data position, processes),
``adapter/`` for LoRA and ``NAME.safetensors`` with ``NAME_optimizer.pt`` / ``NAME_scheduler.pt`` for each
extra module (PPO's critic). ``state.json`` is written last, so a directory without it is incomplete.

The session (:mod:`rlm.core.train.session`) holds one :class:`Checkpoints`; the run-directory checks
(:mod:`rlm.core.train.run_dir`) read :func:`checkpoint_steps`. This module does not import torch at import time.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable

from rlm.core.errors import RlmError

STATE_DIR = "trainer_state"
#: an extra module saved with the policy: name → (module, its optimizer, its scheduler)
ExtraModules = dict[str, tuple[Any, Any, Any]]


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
    """The Python, numpy and torch CPU random states of this process."""
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}


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
             extra_modules: ExtraModules | None = None) -> Path:
        """Write ``checkpoints/step-N`` atomically. ``hf_state()`` (called on the main process only) returns
        (model to save as a plain HF directory, adapter model or None)."""
        import torch

        from rlm.core.io.atomic import atomic_dir, atomic_write_json

        target = self.path(step)
        rng_dir = self.out / "checkpoints" / f".rng-step-{step}"
        if self.world > 1:  # RNG states of the other processes are collected before the atomic write
            rng_dir.mkdir(parents=True, exist_ok=True)
            if not self.is_main:
                torch.save(rng_state(), rng_dir / f"rng-{self.rank}.pt")
        self.acc.wait_for_everyone()
        if self.is_main:
            model, adapter = hf_state()
            with atomic_dir(target, overwrite=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                state = tmp / STATE_DIR
                state.mkdir()
                if adapter is not None:
                    adapter.save_pretrained(state / "adapter")
                torch.save(optimizer.state_dict(), state / "optimizer.pt")
                torch.save(scheduler.state_dict(), state / "scheduler.pt")
                torch.save(rng_state(), state / "rng-0.pt")
                for r in range(1, self.world):
                    shutil.copy(rng_dir / f"rng-{r}.pt", state / f"rng-{r}.pt")
                self._save_extra_modules(state, extra_modules or {})
                atomic_write_json(state / "state.json", {"step": step, "data_position": data_position or {},
                                                         "processes": self.world})
            remove_tree(rng_dir)
            self._prune()
        self.last_good = target
        self.acc.wait_for_everyone()
        return target

    def _save_extra_modules(self, state: Path, extra_modules: ExtraModules) -> None:
        import torch
        from safetensors.torch import save_file

        for name, (module, opt, sched) in extra_modules.items():
            weights = {k: v.detach().contiguous().cpu() for k, v in self.acc.unwrap_model(module).state_dict().items()}
            save_file(weights, str(state / f"{name}.safetensors"))
            torch.save(opt.state_dict(), state / f"{name}_optimizer.pt")
            torch.save(sched.state_dict(), state / f"{name}_scheduler.pt")

    def _prune(self) -> None:
        if self.keep is None:
            return
        for s in checkpoint_steps(self.out)[:-self.keep]:
            remove_tree(self.path(s))

    def save_final(self, hf_state: Callable[[], tuple[Any, Any]], tokenizer: Any) -> Path:
        """Write ``final/`` (the model of ``hf_state()``, as :meth:`save`) and return its path."""
        from rlm.core.models.hf import save_model

        target = self.out / "final"
        if self.is_main:
            model, _ = hf_state()
            save_model(model, tokenizer, target, overwrite=True)
        self.acc.wait_for_everyone()
        return target

    # -- reading (resume) -------------------------------------------------------------------------------------
    def restore_optimizer(self, opt: Any, sched: Any, prefix: str = "") -> None:
        """Load ``{prefix}optimizer.pt`` and ``{prefix}scheduler.pt`` of the checkpoint this run resumes from."""
        import torch

        state = self.resume_dir / STATE_DIR
        opt.load_state_dict(torch.load(state / f"{prefix}optimizer.pt", map_location="cpu", weights_only=False))
        sched.load_state_dict(torch.load(state / f"{prefix}scheduler.pt", map_location="cpu", weights_only=False))

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

    def load_module(self, module: Any, name: str) -> None:
        """Load the extra module ``name`` (e.g. ``critic``) of the checkpoint this run resumes from, if any."""
        if self.resume_dir is None:
            return
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(self.resume_dir / STATE_DIR / f"{name}.safetensors")))
