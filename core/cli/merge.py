"""``rlm merge``: merge task experts into one model with any registered merge method."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from rlm.core.errors import ConfigError
from rlm.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from rlm.core.merge.engine import MergeRunConfig


def _floats(text: str | None, flag: str, n: int) -> list[float] | None:
    """``--weights``/``--density``: comma-separated numbers, one (for every model) or one per model."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{flag} has {len(values)} values but there are {n} models")
    return values


def _with_per_model(run: MergeRunConfig, weights: str | None, density: str | None) -> MergeRunConfig:
    """``run`` with ``--weights``/``--density`` (one value for all models, or one per model) written into each
    model entry, where they win over ``model_params`` and the preset."""
    n = len(run.models)
    per_model = {"weight": _floats(weights, "--weights", n), "density": _floats(density, "--density", n)}
    if all(v is None for v in per_model.values()):
        return run
    entries = []
    for i, entry in enumerate(run.models):
        e = {"path": entry} if isinstance(entry, str) else dict(entry)
        for key, values in per_model.items():
            if values is not None:
                e[key] = values[i]
        entries.append(e)
    return run.model_copy(update={"models": entries})


def _config_source(config: Path | None) -> tuple[Path | None, dict[str, object] | None]:
    """``(file, None)`` for rlm's own config format; ``(None, data)`` for a mergekit YAML, translated into rlm's
    fields (refusing what rlm does not support, in one line naming the field)."""
    if config is None:
        return None, None
    from rlm.core.config import read_config_file
    from rlm.core.merge.mergekit import from_mergekit, is_mergekit_config

    data = read_config_file(config)
    if not is_mergekit_config(data):
        return config, None
    return None, from_mergekit(data, config)


def merge(
    method: Optional[str] = typer.Option(None, "--method", help="Merge method (see `rlm plugins`)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: HF directory, tiny[:SEED] or smollm2-135m."),
    models: Optional[str] = typer.Option(None, "--models",
                                         help="Comma-separated expert directories (HF, or PEFT LoRA "
                                              "such as a LoRA run's final/)."),
    out: Path = typer.Option(..., "--out", help="Output HF directory."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Per-model weights, e.g. 0.5,0.5."),
    density: Optional[str] = typer.Option(None, "--density", help="Per-model density (one value: all)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Scale of the merged task vector."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random masks (DARE)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named settings, e.g. paper."),
    vocab: Optional[str] = typer.Option(None, "--vocab", help="Vocabulary size mismatch: error|truncate|base."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker threads (0: inline)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/TOML/JSON file of merge settings: rlm's "
                                          "own, or a mergekit YAML (merge_method, base_model, models...)."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device of the merge arithmetic: cpu "
                                         "(default), cuda, cuda:1..."),
    smoke: Optional[bool] = typer.Option(None, "--smoke/--no-smoke", help="After writing, generate from a few "
                                         "fixed prompts and flag degenerate output (off by default)."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, e.g. params.normalize=false."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Merge expert models (or LoRA adapters) into the base, tensor by tensor."""
    from rlm.core.config import load_config
    from rlm.core.io.lock import run_lock
    from rlm.core.merge.engine import MergeRunConfig, merge_models

    flags: dict[str, object] = {"method": method, "base": base, "seed": seed, "preset": preset,
                                "vocab": vocab, "workers": workers, "params.lambda": lam, "device": device,
                                "smoke": smoke}
    if models is not None:
        flags["models"] = [m.strip() for m in models.split(",") if m.strip()]
    file, translated = _config_source(config)
    run = _with_per_model(load_config(MergeRunConfig, file=file, sets=set_, flags=flags, base=translated),
                          weights, density)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with run_lock(out), Progress(TextColumn("[bold]merge[/bold] {task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("validating", total=None)

        def on_plan(plan: object) -> None:
            bar.update(task, total=len(plan.tensors), description=run.method)  # type: ignore[attr-defined]

        def progress(name: str) -> None:
            bar.advance(task)

        summary = merge_models(run, out, overwrite=overwrite, progress=progress, on_plan=on_plan,
                               command=["rlm", *sys.argv[1:]])
    typer.echo(f"merged {summary['tensors']} tensors with {run.method} into {out} "
               f"({summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s)")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.command("merge")(merge)
