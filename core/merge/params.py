"""Configs shared by several merge methods: the per-model ``DensityParams`` (weight and density) and the global
parameters of task arithmetic, TIES and DARE (mergekit names and defaults).

Used by the built-in merge-method plugins (``rlm.plugins.mergers``: ``task_arithmetic``, ``ties``,
``dare_ties``, ``dare_linear``) and open to third-party methods that want the same settings; they live in core
because more than one plugin uses them.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from rlm.core.contracts import MergeMethod, PluginConfig


class DensityParams(MergeMethod.ModelParams):
    """Per-model parameters of the sparsifying methods: the weight and the fraction of the task vector kept
    (in [0, 1]; 0 keeps nothing, so the model adds nothing)."""

    weight: float = 1.0
    density: float = Field(1.0, ge=0.0, le=1.0)


class TaskArithmeticConfig(PluginConfig):
    """Global parameters of task arithmetic (mergekit names; ``lambda`` scales the merged task vector)."""

    model_config = ConfigDict(populate_by_name=True)

    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False


class TiesConfig(TaskArithmeticConfig):
    """TIES: the disjoint mean divides by the agreeing weights (``normalize``); no L1 rescale by default."""

    normalize: bool = True
    rescale: bool = False


class DareConfig(TaskArithmeticConfig):
    """DARE: no normalisation by default; the dropped task vector is L1-rescaled (``rescale``)."""

    normalize: bool = False
    rescale: bool = True
