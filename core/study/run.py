"""Running a study: :func:`run_study` (plan, graph, run, copy the report), and what ``rlm merge-eval`` builds
its study from: :func:`parse_experts` and :func:`parse_task_map` (its flags), :func:`merge_eval_config` (the
:class:`rlm.core.study.config.ExperimentConfig` of experts trained elsewhere) and :func:`plan_given_experts`
(the plan with every ``train`` step replaced by a given expert directory)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from rlm.core.cpu_numerics import pin_cpu_capability
from rlm.core.errors import RlmError
from rlm.core.study.config import ExperimentConfig
from rlm.core.study.plan import PlannedStep, build_graph, dir_fingerprint, plan_steps
from rlm.core.study.presets import load_experiment


def run_study(cfg: ExperimentConfig, out: str | Path, *, plan: Sequence[PlannedStep] | None = None,
              progress: bool = True, functions: dict[str, Any] | None = None, force: Sequence[str] = (),
              command: list[str] | None = None, console: Any = None, executor: Any = None) -> Any:
    """Plan (unless given), build the graph with the real step functions (or ``functions``), run it in
    ``out`` with ``executor`` (:mod:`rlm.core.study.executors`; default: one step at a time here) and copy the report step's folder to ``out/report``. Returns the graph's RunSummary; raises
    :class:`rlm.core.study.graph.StepFailed` naming failed steps (after running everything it could)."""
    from rlm.core.io.atomic import atomic_dir, atomic_write_json
    from rlm.core.io.manifest import write_manifest
    from rlm.core.study.steps import STEP_VERSIONS, StudySteps

    out = Path(out)
    pin_cpu_capability(getattr(cfg, "cpu_capability", "native"))  # before torch loads (refused after)
    if getattr(cfg, "threads", None):
        import torch

        torch.set_num_threads(int(cfg.threads))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the step bar is the one to read
    plan = list(plan) if plan is not None else plan_steps(cfg)
    fns = functions or StudySteps(cfg).functions()
    graph = build_graph(plan, fns, STEP_VERSIONS)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "experiment.json", cfg.model_dump(mode="json"))
    write_manifest(out, command=command if command is not None else list(sys.argv), config=cfg,
                   seed=cfg.seeds[0] if len(cfg.seeds) == 1 else None,
                   extra={"kind": "experiment", "steps": len(plan)})
    summary = graph.run(out, force=force, progress=progress, console=console, executor=executor)
    if "report" in summary.steps and summary.steps["report"].status in ("done", "cached"):
        src = summary.output("report").dir
        with atomic_dir(out / "report", overwrite=True) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            (tmp / "step.json").unlink(missing_ok=True)
    else:  # never leave the report of an earlier, different run in place
        shutil.rmtree(out / "report", ignore_errors=True)
    summary.raise_for_failures()
    return summary


def parse_experts(spec: str) -> dict[str, dict[str, str]]:
    """``GROUP:TASK=DIR,...`` -> ``{group: {task: DIR}}`` in the order given."""
    out: dict[str, dict[str, str]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        key, sep, path = item.partition("=")
        group, colon, task = key.partition(":")
        group, task, path = group.strip(), task.strip(), path.strip()
        if not sep or not colon or not group or not task or not path:
            raise RlmError(f"--experts expects GROUP:TASK=DIR items separated by commas (e.g. sft:math=runs/a), "
                           f"got {item!r}")
        if task in out.get(group, {}):
            raise RlmError(f"--experts: {group}:{task} is given twice")
        out.setdefault(group, {})[task] = path
    if not out:
        raise RlmError("--experts is empty")
    for g, tasks in out.items():
        if len(tasks) < 2:
            raise RlmError(f"--experts: group {g!r} has one expert ({', '.join(tasks)}); merging needs two or more")
    return out


def parse_task_map(spec: str | None) -> dict[str, str]:
    """``LABEL=TASK[:SUBSET],...`` (or ``TASK:SUBSET``, whose label is the task) -> ``{label: TASK[:SUBSET]}``."""
    task_map: dict[str, str] = {}
    for item in (s.strip() for s in (spec or "").split(",")):
        if item:
            label, sep, t = item.partition("=")
            if not sep:
                label, t = item.split(":", 1)[0], item
            task_map[label.strip()] = t.strip()
    return task_map


def merge_eval_config(base: str, experts: dict[str, dict[str, str]], methods: Sequence[str],
                      tasks: dict[str, str] | None = None, *, preset: str | None = "paper", limit: int | None = None,
                      max_new_tokens: int = 256, batch_size: int = 16, landscape: bool = True, curve: bool = True,
                      sets: Sequence[str] = (), name: str = "merge-eval") -> ExperimentConfig:
    """The :class:`ExperimentConfig` of a merge-eval: one trainer (group) per SPEC group with its tasks, the
    given methods (each with the method plugin's ``preset``, unless None), no warm-up, no start-model
    evaluation, no conflicts (unless ``--set`` turns them on), the base and experts in their own dtypes
    (``precision.save_dtype`` auto). ``tasks`` maps a task label to ``TASK[:SUBSET]`` (default: the label)."""
    labels: list[str] = []
    for g in experts.values():
        labels += [t for t in g if t not in labels]
    task_cfgs = []
    for label in labels:
        spec = (tasks or {}).get(label, label)
        tname, _, subset = spec.partition(":")
        t: dict[str, Any] = {"name": tname, "eval_subset": subset or None, "eval_size": limit, "train_size": None}
        if label != tname:
            t["label"] = label
        task_cfgs.append(t)
    unknown = sorted(set(tasks or {}) - set(labels))
    if unknown:
        raise RlmError(f"--tasks names task(s) no expert has: {', '.join(unknown)} (experts' tasks: {', '.join(labels)})")
    data = {"name": name, "description": f"merge-eval of {sum(len(v) for v in experts.values())} experts",
            "base": {"model": base}, "warmup": None, "tasks": task_cfgs,
            # nothing is trained or saved: the base and the experts are compared as they are
            "precision": {"save_dtype": "auto"},
            "trainers": [{"name": g, "tasks": list(ts)} for g, ts in experts.items()],
            "methods": [{"name": m, **({"preset": preset} if preset is not None else {})} for m in methods],
            "eval": {"limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "include_start": False},
            "conflicts": {"enabled": False}, "landscape": {"enabled": landscape},
            "curve": {"enabled": curve}}
    return load_experiment(data, sets=sets)


def plan_given_experts(cfg: ExperimentConfig, experts: dict[str, dict[str, str]]) -> list[PlannedStep]:
    """The study's plan with every ``train`` step replaced by a given expert directory (its fingerprint is the
    step config, so a rewritten directory invalidates what depends on it)."""
    plan = plan_steps(cfg)
    for s in plan:
        if s.kind == "train":
            g, t = s.config["group"], s.config["task"]["label"]
            s.config = {"group": g, "task": t, "given": dir_fingerprint(experts[g][t])}
    return plan
