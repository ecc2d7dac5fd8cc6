"""The run directory (``--out``) of a training run: whether it may be used (fresh, ``--overwrite``,
``--resume`` of the same trainer, task and config), the cleanup of a killed run's partial directories, and
``manifest.json``.

Run directory layout::

    manifest.json                 command, resolved config, seed, inputs, versions, status
    metrics.jsonl                 one JSON object per step (rlm.core.train.metrics_log)
    checkpoints/step-N/           HF directory + trainer_state/ (rlm.core.train.checkpoints)
    final/                        HF directory of the trained model (LoRA: the PEFT adapter, the merged
                                  model in final/merged/)

The session (:mod:`rlm.core.train.session`) calls these on the main process. This module does not import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError
from rlm.core.train.checkpoints import checkpoint_steps, remove_tree
from rlm.core.train.config import TrainConfig, TrainRun

# fields that may differ between a run and its resumption
RESUME_FREE_FIELDS = ("steps", "progress", "tensorboard", "num_threads")
# what a killed run may leave behind half-written
PARTIAL_PATTERNS = ("checkpoints/.step-*", "checkpoints/.rng-step-*", ".final.*")


def _read_manifest(out: Path) -> dict[str, Any]:
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())
        except ValueError:
            return {}
    return {}


def check_run_dir(out: Path, run: TrainRun, trainer_name: str, cfg: TrainConfig) -> int:
    """The step this run starts from (0: fresh; N: resume from ``checkpoints/step-N``). An existing
    directory is removed with ``run.overwrite``, continued with ``run.resume`` when it holds a run of the same
    trainer, task and config (but for :data:`RESUME_FREE_FIELDS`), and refused otherwise."""
    if out.exists() and not out.is_dir():
        raise RlmError(f"output path {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return 0
    if run.overwrite and not run.resume:
        remove_tree(out)
        return 0
    prev = _read_manifest(out)
    if not run.resume:
        what = f"a {prev.get('trainer')} run on {prev.get('task')}" if prev.get("kind") == "train" else "other files"
        raise RlmError(f"output directory {out} already holds {what}; pass --resume to continue it or "
                       f"--overwrite to replace it")
    if prev.get("kind") != "train":
        raise RlmError(f"cannot resume: {out} holds no rlm training run (manifest.json missing or foreign)")
    if prev.get("trainer") != trainer_name or prev.get("task") != run.task.name:
        raise RlmError(f"cannot resume: {out} holds a {prev.get('trainer')} run on {prev.get('task')}, not "
                       f"{trainer_name} on {run.task.name}")
    old = dict(prev.get("config") or {})
    new = cfg.model_dump(mode="json")
    for d in (old, new):
        for k in RESUME_FREE_FIELDS:
            d.pop(k, None)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise RlmError(f"cannot resume: the config differs from the run in {out} in: {', '.join(diff)}")
    steps = checkpoint_steps(out)
    return steps[-1] if steps else 0


def remove_partial_dirs(out: Path) -> None:
    """Remove the half-written directories a killed run left in ``out``."""
    for pattern in PARTIAL_PATTERNS:
        for d in out.glob(pattern):
            remove_tree(d)


class RunManifest:
    """``manifest.json`` of a training run: written when the run starts (status ``running``) and rewritten
    with more fields as it goes (:meth:`update`)."""

    def __init__(self, out: Path, run: TrainRun, cfg: TrainConfig, trainer_name: str, *, processes: int,
                 start_step: int, extra: dict[str, Any]) -> None:
        self.out = out
        self.fields: dict[str, Any] = {
            "kind": "train", "trainer": trainer_name, "task": run.task.name, "subset": run.subset,
            "task_config": run.task.config.model_dump(mode="json"),
            "model": run.model, "status": "running", "resumed_from_step": start_step or None,
            "processes": processes, **extra}
        inputs = {"model": run.model} if Path(run.model).exists() else {}
        if run.data_path:
            inputs["data"] = run.data_path
        self._build_args = dict(command=run.command, config=cfg, seed=cfg.seed, inputs=inputs)

    def update(self, **fields: Any) -> None:
        """Add ``fields`` and rewrite the manifest (atomically)."""
        from rlm.core.io.manifest import write_manifest

        self.fields.update(fields)
        write_manifest(self.out, **self._build_args, extra=self.fields)
