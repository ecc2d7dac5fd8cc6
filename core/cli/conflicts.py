"""``rlm conflicts``: task-vector statistics of expert checkpoints against a base (or over training steps)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from rlm.core.errors import RlmError
from rlm.core.hookspecs import hookimpl
from rlm.core.io.lock import run_lock

if TYPE_CHECKING:
    from rlm.core.conflicts.config import ConflictsConfig


def parse_named_dirs(spec: str, what: str) -> dict[str, str]:
    """``name1=DIR1,name2=DIR2`` -> ``{name1: DIR1, ...}`` in the order given (``DIR`` alone is named by its
    folder name)."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise RlmError(f"--{what} expects name=DIR items separated by commas, got {item!r}")
        if "|" in name:
            raise RlmError(f"--{what}: name {name!r} may not contain '|' (it joins pair names)")
        if name in out:
            raise RlmError(f"--{what}: the name {name!r} is given twice")
        out[name] = path
    if not out:
        raise RlmError(f"--{what} is empty")
    return out


def _resolve(spec: str) -> str:
    from rlm.core.models.hf import is_named_model, resolve_model

    return resolve_model(spec) if is_named_model(spec) else spec


class ConflictsProgress:
    """A rich progress bar per phase, driven by the engine's ``progress(phase, done, total)`` callback."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=False, disable=not sys.stderr.isatty())
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "ConflictsProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=done, total=total)


def conflicts(
    base: str = typer.Option(..., "--base", help="Start model θ0 (HF dir, 'tiny' or 'smollm2-135m')."),
    models: Optional[str] = typer.Option(None, "--models", help="name1=DIR1,name2=DIR2,... expert models (HF "
                                                                "or PEFT LoRA directories, e.g. a run's final/)."),
    runs: Optional[str] = typer.Option(None, "--runs", help="With --over-steps: name1=RUN1,name2=RUN2,..."),
    over_steps: bool = typer.Option(False, "--over-steps", help="Norms and conflict norms at every common "
                                                                "checkpoint step (RUN/checkpoints/step-N)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metric plugins "
                                                                  "(default: the metrics that declare "
                                                                  "themselves default)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="|τ| threshold of fraction_updated."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML/JSON config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. kept_rates=[0.1,0.5]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Task-vector statistics: update norms, fraction updated, conflict norm, sign conflicts, cosine."""
    from rlm.core.config import load_config
    from rlm.core.conflicts.config import ConflictsConfig
    from rlm.core.io.atomic import prepare_output_dir

    flags: dict[str, Any] = {}
    if metrics is not None:
        flags["metrics"] = [m.strip() for m in metrics.split(",") if m.strip()]
    if threshold is not None:
        flags["metric.fraction_updated.threshold"] = threshold
    cfg = load_config(ConflictsConfig, file=config, sets=set_, flags=flags)
    with run_lock(out):
        prepare_output_dir(out, overwrite)
        base_dir = _resolve(base)
        if over_steps:
            if models is not None:
                raise RlmError("--over-steps reads --runs (name=RUN_DIR,...), not --models")
            if runs is None:
                raise RlmError("--over-steps needs --runs name1=RUN1,name2=RUN2")
            _run_over_steps(base_dir, parse_named_dirs(runs, "runs"), cfg, out, overwrite)
            return
        if runs is not None:
            raise RlmError("--runs is only used with --over-steps; pass experts with --models")
        if models is None:
            raise RlmError("--models name1=DIR1,name2=DIR2 is required (or --over-steps --runs ...)")
        model_dirs = {n: _resolve(p) for n, p in parse_named_dirs(models, "models").items()}
        _run_models(base_dir, model_dirs, cfg, out, overwrite)


def _run_models(base_dir: str, model_dirs: dict[str, str], cfg: ConflictsConfig, out: Path,
               overwrite: bool) -> None:
    """Statistics of ``model_dirs`` against ``base_dir``, written into ``out``."""
    from rlm.core.conflicts.engine import build_metrics, compute_conflicts
    from rlm.core.conflicts.report import write_conflicts
    from rlm.core.io.atomic import atomic_dir
    from rlm.core.io.manifest import write_manifest

    metric_plugins = build_metrics(cfg)
    with ConflictsProgress() as bar:
        res = compute_conflicts(base_dir, model_dirs, cfg, metrics=metric_plugins, progress=bar)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        files = write_conflicts(tmp, res.data, metric_plugins)
        write_manifest(tmp, config=cfg, inputs={"base": base_dir, **model_dirs},
                       extra={"mode": "models", "stats": res.stats, "files": files})
    typer.echo(f"wrote {', '.join(files)} to {out}")


def _run_over_steps(base_dir: str, run_dirs: dict[str, str], cfg: ConflictsConfig, out: Path,
                    overwrite: bool) -> None:
    """Statistics at every checkpoint step the runs share, written into ``out``."""
    from rlm.core.conflicts.over_steps import compute_over_steps
    from rlm.core.conflicts.report import write_over_steps
    from rlm.core.io.atomic import atomic_dir
    from rlm.core.io.manifest import write_manifest

    with ConflictsProgress() as bar:
        data = compute_over_steps(base_dir, run_dirs, cfg, progress=bar)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_over_steps(tmp, data)
        write_manifest(tmp, config=cfg, inputs={"base": base_dir, **run_dirs},
                       extra={"mode": "over_steps", "steps": data["steps"]})
    typer.echo(f"wrote statistics over {len(data['steps'])} steps to {out}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("conflicts")(conflicts)
