"""A rich progress bar for loops over items (generation batches, sandboxed test runs), or a no-op stand-in when
disabled. Shared by the evaluation engine and task plugins (the code task's judge)."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool, description: str) -> Any:
    """A rich progress bar (or a no-op stand-in) with ``advance(k)`` and context-manager use."""
    import contextlib

    if not enabled:
        class _Null:
            def advance(self, k: int = 1) -> None:
                pass

        return contextlib.nullcontext(_Null())

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    @contextlib.contextmanager
    def _bar():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), transient=False) as prog:
            task = prog.add_task(description, total=total)

            class _Adv:
                def advance(self, k: int = 1) -> None:
                    prog.advance(task, k)

            yield _Adv()

    return _bar()
