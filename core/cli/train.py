"""``rlm train``: turn a start model and a task into an expert with one of the registered trainers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from rlm.core.hookspecs import hookimpl


def train(
    trainer: str = typer.Option(..., "--trainer", help="Registered trainer: sft, rft, grpo, ppo, reinforce_pp, "
                                                        "rl_pos or a plugin's."),
    task: str = typer.Option(..., "--task", help="TASK or TASK:SUBSET, e.g. math or math:easy."),
    model: str = typer.Option("tiny", "--model",
                              help="Start model: HF directory, hub id, tiny[:SEED] or smollm2-135m."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints/, final/, metrics.jsonl)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Number of steps (overrides the config)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (overrides the config)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Trainer config file (YAML/TOML/JSON)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. lr=1e-5 or lora.enabled=true."),
    task_set: list[str] = typer.Option([], "--task-set", help="Override a task config field, e.g. "
                                                             "solution=answer or max_operand=99."),
    data: Optional[str] = typer.Option(None, "--data", help="Path of the task's training data, if it loads any."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace whatever --out holds."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show the progress line."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard",
                                               help="Also log to OUT/tensorboard."),
) -> None:
    """Train an expert: writes checkpoints/step-N/, final/, metrics.jsonl and manifest.json under --out."""
    from rlm.core.config import load_config, task_config_sets
    from rlm.core.errors import RlmError
    from rlm.core.io.lock import run_lock
    from rlm.core.plugins import get_plugin, make_task
    from rlm.core.train.config import TrainRun

    if resume and overwrite:
        raise RlmError("--resume and --overwrite exclude each other")
    trainer_cls = get_plugin("trainer", trainer)
    task_name, _, subset = task.partition(":")
    task_cls = get_plugin("task", task_name)
    cfg = load_config(trainer_cls.Config, config, set_,
                      {"steps": steps, "seed": seed, "progress": progress, "tensorboard": tensorboard})
    if subset and getattr(task_cls, "subsets", None) and subset not in task_cls.subsets:
        import difflib

        close = difflib.get_close_matches(subset, list(task_cls.subsets), n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise RlmError(f"task {task_name!r} has no subset {subset!r}{hint} "
                       f"(subsets: {', '.join(task_cls.subsets)})")
    task_obj = make_task(task_name, task_config_sets([task_name], task_set).get(task_name),
                         f"--task-set for task {task_name!r}")
    run = TrainRun(model=model, task=task_obj, out=out, subset=subset or None, data_path=data, resume=resume,
                   overwrite=overwrite)
    import torch

    threads = torch.get_num_threads()
    try:
        with run_lock(out):  # the main process only (ranks of one launch share it)
            final = trainer_cls(cfg).train(run)
        from rlm.core.train.distributed import end_distributed

        end_distributed()  # after a successful run only: a failed rank must not wait on the others
    finally:
        torch.set_num_threads(threads)  # num_threads applies to this run only (matters in-process)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"wrote {final}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("train")(train)
