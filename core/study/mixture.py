"""The warm-up's training data: :class:`MixtureTask`, several tasks' training examples as one task, and
:func:`make_task`, a task plugin instance from a step config's task spec."""

from __future__ import annotations

from typing import Any, Mapping

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.errors import RlmError


def make_task(spec: Mapping[str, Any]) -> Task:
    """The task plugin ``spec["name"]`` with the config overrides ``spec["config"]``."""
    from rlm.core.plugins import make_task as make_plugin_task

    return make_plugin_task(spec["name"], spec.get("config"))


class MixtureTask(Task):
    """The warm-up's training data: several tasks' training examples together (each task's own subset, size
    and data path); rewards are delegated to the task an example came from."""

    name = "mixture"

    class Config(PluginConfig):
        tasks: list[dict[str, Any]] = []

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._tasks = {t["label"]: make_task(t) for t in self.config.tasks}

    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        out: list[Example] = []
        for t in self.config.tasks:
            task = self._tasks[t["label"]]
            exs = task.examples(t.get("subset"), split=split, limit=t.get("size"), seed=seed, path=t.get("path"))
            exs = exs[: t["size"]] if t.get("size") else exs
            for e in exs:
                out.append(Example(id=f"{t['label']}/{e.id}", prompt=e.prompt, answer=e.answer,
                                   reference=e.reference, meta={**e.meta, "_task": t["label"]}))
        return out[:limit] if limit else out

    def _origin(self, example: Example) -> tuple[Task, Example]:
        label = example.meta.get("_task")
        task = self._tasks.get(label)
        if task is None:
            raise RlmError(f"mixture example {example.id!r} names no task of the mixture")
        meta = {k: v for k, v in example.meta.items() if k != "_task"}
        return task, Example(id=example.id.split("/", 1)[-1], prompt=example.prompt, answer=example.answer,
                             reference=example.reference, meta=meta)

    def reward(self, example: Example, completion: str) -> float:
        task, ex = self._origin(example)
        return task.reward(ex, completion)

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        task, ex = self._origin(example)
        return task.score(ex, completion)
