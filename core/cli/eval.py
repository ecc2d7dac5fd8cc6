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
                 overwrite: bool, backend: str, dtype: str, model_args: str | None, gen_kwargs: str | None,
                 system_prompt: str | None) -> dict:
    """``rlm eval --harness lm-eval``: the lm-eval task names come from ``--tasks`` (or ``--task``)."""
    from rlm.core.eval.lm_eval import run_lm_eval

    names = [t.strip() for t in (tasks or ",".join(task)).split(",") if t.strip()]
    return run_lm_eval(model, names, out, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       num_fewshot=num_fewshot, data_dir=data[0] if data else None, apply_chat_template=chat,
                       device=device, overwrite=overwrite, backend=backend, dtype=dtype, model_args=model_args,
                       gen_kwargs=gen_kwargs, system_instruction=system_prompt)


def _backend_config(text: str | None) -> dict | None:
    """``--backend-config '{"gpu_memory_utilization": 0.5}'`` -> a dict (the backend's Config checks it)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RlmError(f"--backend-config: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise RlmError("--backend-config: give a JSON object, e.g. '{\"gpu_memory_utilization\": 0.5}'")
    return value


def eval(
    model: str = typer.Option(..., "--model", help="Model directory, hub id, 'tiny' or 'smollm2-135m'."),
    task: list[str] = typer.Option([], "--task", help="TASK or TASK:SUBSET (repeatable), e.g. math:gsm8k."),
    data: list[str] = typer.Option([], "--data", help="Data file/dir/dataset name; with several tasks "
                                   "TASK[:SUBSET]=PATH (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N examples of each task."),
    task_set: list[str] = typer.Option([], "--task-set", help="Override a task config field: TASK.FIELD=VALUE "
                                                             "(FIELD=VALUE with one task), e.g. math.solution=answer."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Completion length limit."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    seed: int = typer.Option(0, "--seed", help="Seed (generated subsets, sampling)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    harness: str = typer.Option("rlm", "--harness", help="rlm (the task plugins) or lm-eval."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks, comma-separated (--harness lm-eval)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="lm-eval: few-shot examples."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    backend: str = typer.Option("hf", "--backend", help="Generation backend: hf or vllm (rlm plugins lists all)."),
    backend_config: Optional[str] = typer.Option(None, "--backend-config", help="The backend's config as JSON."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16, float16 or auto."),
    temperature: float = typer.Option(0.0, "--temperature", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    n: int = typer.Option(1, "--n", help="Samples per example (needs --temperature > 0 when above 1)."),
    pass_k: Optional[str] = typer.Option(None, "--pass-k", help="k values of pass@k, e.g. 1,10 (default: 1 and "
                                         "--n when --n > 1)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System message (replaces the "
                                                "task's; lm-eval: its system_instruction)."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Format prompts "
                                                 "with the tokenizer's chat template (default: on; lm-eval: off)."),
    model_args: Optional[str] = typer.Option(None, "--model-args", help="lm-eval: extra model_args, "
                                             "k=v,k=v (appended to rlm's)."),
    gen_kwargs: Optional[str] = typer.Option(None, "--gen-kwargs", help="lm-eval: gen_kwargs, k=v,k=v."),
) -> None:
    """Generate on task test examples and score them (summary.json, records.jsonl, manifest); greedy unless
    --temperature > 0; with --n > 1, pass@k."""
    if harness not in ("rlm", "lm-eval"):
        raise RlmError(f"unknown harness {harness!r} (harnesses: rlm, lm-eval)")
    with run_lock(out):
        if harness == "lm-eval":
            if task_set:
                raise RlmError("--task-set applies to --harness rlm only (lm-eval tasks take --model-args / "
                               "--gen-kwargs)")
            summary = _run_lm_eval(model, task, tasks, out, data, limit=limit, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, num_fewshot=num_fewshot,
                                   chat=bool(chat_template), device=device, overwrite=overwrite,
                                   backend=backend, dtype=dtype, model_args=model_args, gen_kwargs=gen_kwargs,
                                   system_prompt=system_prompt)
        else:
            if model_args or gen_kwargs:
                raise RlmError("--model-args and --gen-kwargs apply to --harness lm-eval only")
            if tasks and not task:
                task = [t.strip() for t in tasks.split(",") if t.strip()]
            from rlm.core.eval.engine import Decoding, evaluate

            decoding = Decoding(backend=backend, dtype=dtype, backend_config=_backend_config(backend_config),
                                temperature=temperature, top_p=top_p, n=n, pass_k=pass_k,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
                                chat_template=chat_template is not False)
            from rlm.core.config import task_config_sets
            from rlm.core.eval.engine import parse_task_spec

            task_config = task_config_sets([parse_task_spec(t)[0] for t in task], task_set)
            summary = evaluate(model, task, out, data=data, limit=limit, seed=seed, progress=progress,
                               overwrite=overwrite, device=device, decoding=decoding, task_config=task_config)
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
