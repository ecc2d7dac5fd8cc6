"""The ``rlm`` command line (typer): the root app, ``main`` and the plugin kernel's own commands (``rlm
plugins``, ``rlm config schema``).

Every other command arrives through the ``register_commands(app)`` hook, the built-in ones exactly as a third
party's: each module of this package (``model``, ``train``, ``merge``, ``conflicts``, ``eval``,
``experiment``) is an entry point of the ``rlm`` group (``commands.NAME``) whose module-level command
functions a ``register_commands`` implementation adds to the app."""

from __future__ import annotations

import errno
import json
import sys
from typing import Optional

import typer

from rlm.core import __version__
from rlm.core.errors import RlmError

app = typer.Typer(name="rlm", help="rlm: how post-training (SFT, RFT, RL) decides how well task experts merge.",
                  rich_markup_mode="rich", no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
config_app = typer.Typer(help="Inspect plugin configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


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
    for kind in ("trainers", "merge_methods", "tasks", "metrics", "generation_backends"):
        console.print(f"[bold]{kind.replace('_', ' ')}[/bold]: {', '.join(data[kind]) or '(none)'}")
    table = Table(title="plugins")
    for col in ("plugin", "distribution", "version", "registered", "error"):
        table.add_column(col, overflow="fold")
    for p in data["plugins"]:
        table.add_row(p["name"], p["distribution"] or "", p["version"] or "", ", ".join(p["registered"]),
                      f"[red]{p['error']}[/red]" if p["error"] else "")
    console.print(table)


@config_app.command("schema")
def config_schema(kind: str = typer.Argument(..., help="trainer | merge_method | task | metric | generation_backend"),
                  name: str = typer.Argument(..., help="Registered plugin name.")) -> None:
    """Print a plugin's config as JSON schema."""
    from rlm.core.plugins import get_plugin

    cls = get_plugin(kind, name)
    schema = {"config": cls.Config.model_json_schema()}
    model_params = getattr(cls, "ModelParams", None)
    if model_params is not None:
        schema["model_params"] = model_params.model_json_schema()
    typer.echo(json.dumps(schema if model_params is not None else schema["config"], indent=2))


#: what failed, by error number, for the one-line message of an :class:`OSError` (others: "access")
_OS_OPERATIONS = {errno.EROFS: "write", errno.ENOSPC: "write", errno.EDQUOT: "write", errno.EFBIG: "write",
                  errno.EIO: "write", errno.EEXIST: "create"}


def os_error_line(exc: OSError) -> str:
    """One line for an :class:`OSError`: the operation (as far as the error number tells), the path(s) and the
    reason, e.g. ``cannot write /x/y: read-only file system``; ``str(exc)`` when it names no path."""
    reason = exc.strerror or str(exc)
    reason = reason[:1].lower() + reason[1:]
    if exc.filename is None:
        return reason
    if getattr(exc, "filename2", None) is not None:
        return f"cannot move {exc.filename} to {exc.filename2}: {reason}"
    return f"cannot {_OS_OPERATIONS.get(exc.errno, 'access')} {exc.filename}: {reason}"


def _os_error_in(exc: BaseException) -> OSError | None:
    """The :class:`OSError` that caused ``exc`` (its ``__cause__``/``__context__`` chain), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_loaded = False


def _load_commands() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from rlm.core.plugins import get_system

    get_system().register_commands(app)


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: run the app, turning :class:`RlmError` into a one-line message and exit code 2, and
    an :class:`OSError` (read-only or full disk, permissions, a path through a file, a name too long; also one
    that caused another exception) into one line naming the operation and path, exit code 1. Whatever was
    being written is abandoned by its atomic write (:mod:`rlm.core.io.atomic`), so nothing partial is left."""
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
    except OSError as exc:
        typer.secho(f"error: {os_error_line(exc)}", fg="red", err=True)
        return 1
    except Exception as exc:  # click usage errors (typer vendors its own click)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        cause = _os_error_in(exc)
        if cause is None:
            raise
        typer.secho(f"error: {os_error_line(cause)}", fg="red", err=True)
        return 1
    return 0


def run() -> None:
    """Console-script wrapper around :func:`main`."""
    sys.exit(main())
