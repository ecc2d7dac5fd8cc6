"""Test-only tasks for the trainer tests, and a runner that registers them and calls the rlm CLI.

Run as a script (``python tests/train/test_train_support.py train ...``) it is what the subprocess tests (SIGKILL
and resume, two processes under ``accelerate launch``) execute, so they do not depend on the built-in tasks.
"""

from __future__ import annotations

import contextlib

import sys

from rlm.core.contracts import Example, Task
from rlm.core.hookspecs import hookimpl


class DigitsTask(Task):
    """Easy generated task: the reward is the share of non-space characters of the completion that are digits
    (dense, so a random tiny model starts near 0.03 and GRPO can raise it within a few dozen steps)."""

    name = "digits"
    subsets = {"default": "16 prompts", "small": "4 prompts"}

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        n = 4 if subset == "small" else 16
        out = [Example(id=f"d{i}", prompt=f"Write some digits, please {i}.", answer=None,
                       reference=f"{(i * 37) % 1000} {i}") for i in range(n)]
        return out[:limit] if limit else out

    def reward(self, example, completion):
        chars = [c for c in completion if not c.isspace()]
        return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


class EmptyTask(Task):
    """A task without training data."""

    name = "empty"

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        return []

    def reward(self, example, completion):
        return 0.0


class NoReferenceTask(DigitsTask):
    """Prompts and a verifier, but no reference responses (SFT cannot use it)."""

    name = "noref"

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        return [Example(id=e.id, prompt=e.prompt) for e in super().examples(subset, limit=limit)]


class SupportTasks:
    @hookimpl
    def register_tasks(self, register):
        register(DigitsTask)
        register(EmptyTask)
        register(NoReferenceTask)


@contextlib.contextmanager
def rlm_cli(system=None):
    """The rlm CLI as a function of its arguments, over ``system`` (default: :func:`make_system`), reset after."""
    from rlm.core.cli import main
    from rlm.core.plugins import reset_system

    reset_system(system or make_system())
    try:
        yield lambda *args: main([str(a) for a in args])
    finally:
        reset_system(None)


def make_system():
    """The built-in plugins (entry points) plus the test tasks."""
    from rlm.core.plugins import PluginSystem

    system = PluginSystem()
    system.add_plugin(SupportTasks(), name="rlm-test-tasks")
    return system


if __name__ == "__main__":
    from rlm.core.cli import main
    from rlm.core.plugins import reset_system

    reset_system(make_system())
    sys.exit(main(sys.argv[1:]))
