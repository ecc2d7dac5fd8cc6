"""The hook specifications every rlm plugin implements a subset of.

A plugin module marks functions with :data:`hookimpl` and is registered through an entry point in the
``rlm`` group. Each ``register_*`` hook receives a ``register`` callback; call it once per class::

    from rlm.core.hookspecs import hookimpl

    @hookimpl
    def register_merge_methods(register):
        register(MyMethod)                    # name taken from MyMethod.name
        register(MyMethod, aliases=["mine"])  # extra names
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import typer

PROJECT = "rlm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callback handed to every ``register_*`` hook."""

    def __call__(self, cls: type[Any], *, name: str | None = None, aliases: tuple[str, ...] | list[str] = ()) -> None: ...


@hookspec
def register_trainers(register: Register) -> None:
    """Register :class:`rlm.core.contracts.Trainer` subclasses by calling ``register(cls)`` for each."""


@hookspec
def register_merge_methods(register: Register) -> None:
    """Register :class:`rlm.core.contracts.MergeMethod` subclasses by calling ``register(cls)`` for each."""


@hookspec
def register_tasks(register: Register) -> None:
    """Register :class:`rlm.core.contracts.Task` subclasses by calling ``register(cls)`` for each."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register :class:`rlm.core.contracts.Metric` subclasses by calling ``register(cls)`` for each."""


@hookspec
def register_generation_backends(register: Register) -> None:
    """Register :class:`rlm.core.contracts.GenerationBackend` subclasses by calling ``register(cls)`` for each."""


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add commands to the ``rlm`` command line: decorate functions with ``@app.command()``."""
