"""Base classes for the four kinds of plugin: Trainer, MergeMethod, Task and Metric.

Each plugin class has a ``name`` (what users type), optional ``aliases`` and a nested pydantic ``Config``
(``extra="forbid"``) holding every number it uses. The engines in ``rlm.core`` drive these classes; the issues
that implement each kind extend the contracts where their engine needs more.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class PluginConfig(BaseModel):
    """Base for every plugin config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Plugin:
    """Common shape of all plugin classes."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, config: PluginConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        if isinstance(config, PluginConfig):
            data = config.model_dump()
        else:
            data = dict(config or {})
        data.update(overrides)
        self.config = self.Config(**data)

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring, shown by ``rlm plugins``."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class MergeMethod(Plugin, abc.ABC):
    """Combines task vectors tensor by tensor. ``Config`` holds global parameters (lambda, normalize, ...);
    ``ModelParams`` holds per-model parameters (weight, density, ...)."""

    class ModelParams(PluginConfig):
        weight: float = 1.0

    @abc.abstractmethod
    def merge(self, base: Any, deltas: Any, params: list[Any], *, context: Any = None) -> Any:
        """Return the merged tensor given the base tensor and stacked fp32 task vectors ``deltas[i]``."""


@dataclass
class Example:
    """One task example: a user prompt, the verifier's ground truth and, for SFT, a reference response."""

    id: str
    prompt: str
    answer: Any = None
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Plugin, abc.ABC):
    """A verifiable task: data (generated or loaded), a reward for one completion and aggregate metrics."""

    subsets: ClassVar[dict[str, str]] = {}

    @abc.abstractmethod
    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        """Return examples of a subset (``None`` means the task's default)."""

    @abc.abstractmethod
    def reward(self, example: Example, completion: str) -> float:
        """Score one completion in [0, 1]; never raises on garbage input."""


class Trainer(Plugin, abc.ABC):
    """Turns a start model and a task into an expert checkpoint."""

    @abc.abstractmethod
    def train(self, run: Any) -> Any:
        """Run training described by ``run`` and return the final checkpoint directory."""


class Metric(Plugin, abc.ABC):
    """A task-vector statistic accumulated tensor by tensor in one streaming pass."""

    @abc.abstractmethod
    def update(self, tensor_name: str, deltas: dict[str, Any]) -> None:
        """Accumulate the statistic for one tensor; ``deltas`` maps model name to its task-vector tensor."""

    @abc.abstractmethod
    def result(self) -> dict[str, Any]:
        """Return the accumulated statistic as JSON-serialisable data."""
