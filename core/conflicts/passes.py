"""What both engines of ``rlm conflicts`` share: :class:`EnginePass`, the inputs of one run, the metrics split by
what they ask of the engine and the kept counts it fills.

Subclassed by :class:`rlm.core.conflicts.eager.EagerPass` and :class:`rlm.core.conflicts.fused.FusedPass`;
:mod:`rlm.core.conflicts.engine` builds one of them. torch is imported inside the functions.
"""

from __future__ import annotations

import abc

from typing import Any, Callable, Mapping, Sequence

from rlm.core.conflicts.config import ConflictsConfig

Progress = Callable[[str, int, int], None]


class EnginePass(abc.ABC):
    """One run of an engine over ``tensors`` (the float tensor plans of the base): :meth:`run` feeds ``metrics``
    and returns ``(kept_actual, passes)``, the kept counts per top-k mode and model (:attr:`kept_actual`) and the
    number of passes over the inputs; :meth:`zero_models` then lists the models whose task vector is all zero.
    ``modes`` are the top-k scopes to compute (none without a top-k metric), ``hist_bits`` the bits of the
    magnitude bins histogrammed, ``total`` the parameters of every tensor."""

    def __init__(self, config: ConflictsConfig, metrics: Sequence[Any], base_reader: Any,
                 readers: Mapping[str, Any], tensors: Sequence[Any], *, modes: Sequence[str], hist_bits: int,
                 total: int) -> None:
        import torch

        self.config = config
        self.metrics = list(metrics)
        self.base_reader = base_reader
        self.readers = dict(readers)
        self.names = list(readers)
        self.tensors = list(tensors)
        self.modes = list(modes)
        self.hist_bits = hist_bits
        self.total = total
        self.topk_metrics = [m for m in metrics if m.needs_topk]
        self.plain_metrics = [m for m in metrics if not m.needs_topk]
        self.hist_metrics = [m for m in self.plain_metrics if m.histogram_bits is not None]
        self.need_hist = bool(self.modes) or bool(self.hist_metrics)
        g = len(config.kept_rates)
        self.kept_actual: dict[str, dict[str, Any]] = {
            mode: {n: torch.zeros(g, dtype=torch.int64) for n in self.names} for mode in self.modes}
        #: models with a non-zero τ entry seen in the first pass (the others equal the base)
        self.nonzero: set[str] = set()

    def zero_models(self) -> list[str]:
        """The models whose task vector is all zero (identical to the base), after :meth:`run`."""
        return [n for n in self.names if n not in self.nonzero]

    @abc.abstractmethod
    def run(self, progress: Progress | None = None) -> tuple[dict[str, dict[str, Any]], int]:
        """Read the inputs and fill the metrics' statistics; returns (``kept_actual``: per top-k mode and model,
        the entries kept at each rate, the number of passes over the inputs). Each engine
        (:class:`~rlm.core.conflicts.eager.EagerPass`, :class:`~rlm.core.conflicts.fused.FusedPass`) has its
        own."""
