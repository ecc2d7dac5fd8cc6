"""``rlm model init|import-gguf|export-gguf``: create a tiny model, convert GGUF files to and from Hugging Face
directories."""

from __future__ import annotations

from pathlib import Path

import typer

from rlm.core.errors import RlmError
from rlm.core.hookspecs import hookimpl
from rlm.core.io.lock import run_lock


def model_init(preset: str = typer.Argument("tiny", help="Model preset; only 'tiny' is built in."),
               out: Path = typer.Option(..., "--out", help="Output HF directory."),
               seed: int = typer.Option(0, help="Seed for the initial weights."),
               overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
               set_: list[str] = typer.Option([], "--set", help="Override a preset field, e.g. hidden_size=64.")) -> None:
    """Create a freshly initialised model from a preset."""
    from rlm.core.config import load_config
    from rlm.core.io.manifest import write_manifest
    from rlm.core.models.hf import init_tiny
    from rlm.core.models.tiny import TinyPreset

    if preset != "tiny":
        raise RlmError(f"unknown model preset {preset!r} (presets: tiny)")
    cfg = load_config(TinyPreset, sets=set_)
    with run_lock(out):
        init_tiny(out, seed=seed, overwrite=overwrite, preset=cfg)
        write_manifest(out, name="rlm_manifest.json", config=cfg, seed=seed)
    typer.echo(f"wrote {preset} model to {out}")


def model_import_gguf(file: Path = typer.Argument(..., help="GGUF file."),
                      out: Path = typer.Option(..., "--out", help="Output HF directory."),
                      overwrite: bool = typer.Option(False, help="Replace an existing output directory.")) -> None:
    """Import a GGUF file (through transformers) and save it as a plain HF directory."""
    from rlm.core.io.manifest import write_manifest
    from rlm.core.models.hf import import_gguf

    with run_lock(out):
        import_gguf(file, out, overwrite=overwrite)
        write_manifest(out, name="rlm_manifest.json", inputs={"gguf": file})
    typer.echo(f"wrote {out}")


def model_export_gguf(model: str = typer.Argument(..., help="Llama-architecture HF directory (or 'tiny')."),
                      out: Path = typer.Option(..., "--out", help="Output .gguf file."),
                      dtype: str = typer.Option("f32", help="f32 or f16 for matrices (norms stay f32).")) -> None:
    """Write a Llama-architecture HF directory as a GGUF file."""
    from rlm.core.models.gguf import export_gguf
    from rlm.core.models.hf import resolve_model

    if dtype not in ("f32", "f16"):
        raise RlmError(f"--dtype must be f32 or f16, not {dtype!r}")
    export_gguf(resolve_model(model), out, dtype=dtype)
    typer.echo(f"wrote {out}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Create, import and inspect models.", no_args_is_help=True)
    model_app.command("init")(model_init)
    model_app.command("import-gguf")(model_import_gguf)
    model_app.command("export-gguf")(model_export_gguf)
    app.add_typer(model_app, name="model")
