"""The ``rlm`` command line (typer). Each command group lives in a small ``cli_*`` module of its own;
plugins add commands through the ``register_commands(app)`` hook."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from rlm.core import __version__
from rlm.core.errors import RlmError

app = typer.Typer(name="rlm", help="rlm: how post-training (SFT, RFT, RL) decides how well task experts merge.",
                  rich_markup_mode="rich", no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
model_app = typer.Typer(help="Create, import and inspect models.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect plugin configs.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")

# Modules under rlm.core that add command groups: each defines ``add_commands(app)``.
COMMAND_MODULES: list[str] = ["merge", "conflicts", "train", "eval", "experiment"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """rlm: train task experts with SFT/RFT/RL, merge them, and measure task conflicts."""


@app.command("plugins")
def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List installed plugins and what each registered."""
    from rlm.core.plugins import get_system

    data = get_system().as_json()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for kind in ("trainers", "merge_methods", "tasks", "metrics"):
        console.print(f"[bold]{kind.replace('_', ' ')}[/bold]: {', '.join(data[kind]) or '(none)'}")
    table = Table(title="plugins")
    for col in ("plugin", "distribution", "version", "registered", "error"):
        table.add_column(col, overflow="fold")
    for p in data["plugins"]:
        table.add_row(p["name"], p["distribution"] or "", p["version"] or "", ", ".join(p["registered"]),
                      f"[red]{p['error']}[/red]" if p["error"] else "")
    console.print(table)


@config_app.command("schema")
def config_schema(kind: str = typer.Argument(..., help="trainer | merge_method | task | metric"),
                  name: str = typer.Argument(..., help="Registered plugin name.")) -> None:
    """Print a plugin's config as JSON schema."""
    from rlm.core.plugins import get_plugin

    cls = get_plugin(kind, name)
    schema = {"config": cls.Config.model_json_schema()}
    model_params = getattr(cls, "ModelParams", None)
    if model_params is not None:
        schema["model_params"] = model_params.model_json_schema()
    typer.echo(json.dumps(schema if model_params is not None else schema["config"], indent=2))


@model_app.command("init")
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
    init_tiny(out, seed=seed, overwrite=overwrite, preset=cfg)
    write_manifest(out, name="rlm_manifest.json", config=cfg, seed=seed)
    typer.echo(f"wrote {preset} model to {out}")


@model_app.command("import-gguf")
def model_import_gguf(file: Path = typer.Argument(..., help="GGUF file."),
                      out: Path = typer.Option(..., "--out", help="Output HF directory."),
                      overwrite: bool = typer.Option(False, help="Replace an existing output directory.")) -> None:
    """Import a GGUF file (through transformers) and save it as a plain HF directory."""
    from rlm.core.io.manifest import write_manifest
    from rlm.core.models.hf import import_gguf

    import_gguf(file, out, overwrite=overwrite)
    write_manifest(out, name="rlm_manifest.json", inputs={"gguf": file})
    typer.echo(f"wrote {out}")


@model_app.command("export-gguf")
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


_loaded = False


def _load_commands() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in COMMAND_MODULES:
        importlib.import_module(f"rlm.core.cli.{mod}").add_commands(app)
    from rlm.core.plugins import get_system

    get_system().register_commands(app)


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: run the app, turning :class:`RlmError` into a one-line message and exit code 2."""
    _load_commands()
    try:
        app(args=argv, prog_name="rlm", standalone_mode=False)
    except RlmError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # click usage errors (typer vendors its own click)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper around :func:`main`."""
    sys.exit(main())
