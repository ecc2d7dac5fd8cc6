"""``rlm eval`` and ``rlm score``: evaluate a model on registered tasks, or score given completions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from rlm.core.errors import RlmError
from rlm.core.hookspecs import hookimpl
from rlm.core.io.lock import run_lock


def _print_summary(summary: dict) -> None:
    """The summary as a table: one row per task with its float metrics and example count."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="summary")
    table.add_column("task")
    table.add_column("metrics")
    table.add_column("n", justify="right")
    for task, m in summary.items():
        table.add_row(task, ", ".join(f"{k}={v:.4f}" for k, v in m.items() if k != "n" and isinstance(v, float)),
                      str(m.get("n")))
    Console().print(table)


def _run_lm_eval(model: str, task: list[str], tasks: str | None, out: Path, data: list[str], *, limit: int | None,
                 batch_size: int, max_new_tokens: int, num_fewshot: int | None, chat: bool, device: str | None,
                 overwrite: bool) -> dict:
    """``rlm eval --harness lm-eval``: the lm-eval task names come from ``--tasks`` (or ``--task``)."""
    from rlm.core.eval.lm_eval import run_lm_eval

    names = [t.strip() for t in (tasks or ",".join(task)).split(",") if t.strip()]
    return run_lm_eval(model, names, out, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       num_fewshot=num_fewshot, data_dir=data[0] if data else None, apply_chat_template=chat,
                       device=device, overwrite=overwrite)


def eval(
    model: str = typer.Option(..., "--model", help="Model directory, hub id, 'tiny' or 'smollm2-135m'."),
    task: list[str] = typer.Option([], "--task", help="TASK or TASK:SUBSET (repeatable), e.g. math:gsm8k."),
    data: list[str] = typer.Option([], "--data", help="Data file/dir/dataset name; with several tasks "
                                   "TASK[:SUBSET]=PATH (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N examples of each task."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Completion length limit."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    seed: int = typer.Option(0, "--seed", help="Seed (generated subsets, sampling)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    harness: str = typer.Option("rlm", "--harness", help="rlm (the task plugins) or lm-eval."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks, comma-separated (--harness lm-eval)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="lm-eval: few-shot examples."),
    chat: bool = typer.Option(False, "--chat-template", help="lm-eval: apply the model's chat template."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Generate greedily on task test examples and score them (summary.json, records.jsonl, manifest)."""
    if harness not in ("rlm", "lm-eval"):
        raise RlmError(f"unknown harness {harness!r} (harnesses: rlm, lm-eval)")
    with run_lock(out):
        if harness == "lm-eval":
            summary = _run_lm_eval(model, task, tasks, out, data, limit=limit, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, num_fewshot=num_fewshot, chat=chat, device=device,
                                   overwrite=overwrite)
        else:
            if tasks and not task:
                task = [t.strip() for t in tasks.split(",") if t.strip()]
            from rlm.core.eval.engine import evaluate

            summary = evaluate(model, task, out, data=data, limit=limit, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, seed=seed, progress=progress, overwrite=overwrite,
                               device=device)
    _print_summary(summary)
    typer.echo(f"wrote {out}")


def score(
    task: str = typer.Option(..., "--task", help="TASK or TASK:SUBSET, e.g. code:humaneval."),
    completions: Path = typer.Option(..., "--completions", help="JSONL: an id (task_id/id/key/prompt) and "
                                     "'completion' per line."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    data: Optional[str] = typer.Option(None, "--data", help="Data file/dir/dataset name for the task."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N examples of the task."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Score given completions without a model (same summary.json layout as rlm eval)."""
    from rlm.core.eval.engine import score_completions

    with run_lock(out):
        summary = score_completions(task, completions, out, data=data, limit=limit, progress=progress,
                                    overwrite=overwrite)
    errors_file = out / "errors.jsonl"
    if errors_file.is_file():
        errs = [json.loads(line) for line in errors_file.read_text(encoding="utf-8").splitlines() if line]
        typer.secho(f"warning: {len(errs)} problem(s) in {completions} (see {errors_file}):", fg="yellow", err=True)
        for e in errs[:5]:
            typer.secho(f"  line {e['line']}: {e['error']}", fg="yellow", err=True)
    _print_summary(summary)
    typer.echo(f"wrote {out}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("eval")(eval)
    app.command("score")(score)
