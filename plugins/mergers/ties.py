"""``ties``: magnitude pruning to exactly the top ⌊d_i·n⌋ entries (ties at the cut: lowest index first),
sign election on weighted task vectors, disjoint mean (mergekit semantics: normalize on, rescale off)."""

from __future__ import annotations

import math

from rlm.core.contracts import MergeMethod
from rlm.core.hookspecs import hookimpl
from rlm.core.merge.params import DensityParams, TiesConfig


class Ties(MergeMethod):
    """TIES: trim by magnitude, elect the sign, merge the agreeing entries."""

    name = "ties"
    default = True  # one of the paper's four methods (rlm merge-eval --methods)

    Config = TiesConfig
    ModelParams = DensityParams
    presets = {"paper": {"params": {}, "model_params": {"weight": 0.5, "density": 0.8}}}

    def prepare(self, delta, param, *, context):
        from rlm.core.merge.ops import l1_scale, magnitude_keep, magnitude_threshold

        cut = magnitude_threshold(delta, param.density)
        scale = l1_scale(delta, magnitude_keep(delta, cut)) if self.config.rescale and cut is not None else 1.0
        return cut, scale

    def prepare_blocks(self, blocks, param, *, context):
        from dataclasses import replace

        from rlm.core.merge.ops import l1_scale_blocks, magnitude_keep, magnitude_threshold_blocks

        cut = magnitude_threshold_blocks(blocks, math.prod(context.shape), param.density)
        scale = 1.0
        if self.config.rescale and cut is not None:
            scale = l1_scale_blocks(blocks, lambda rows, b: magnitude_keep(b, cut, replace(context, rows=rows)))
        return cut, scale

    def merge(self, base, deltas, params, *, context=None):
        import torch

        from rlm.core.merge.ops import combine, magnitude_keep

        u = torch.empty_like(deltas)
        for i, (cut, scale) in enumerate(context.stats):  # u_i = w_i · scale_i · trimmed τ_i
            torch.mul(deltas[i], params[i].weight * scale, out=u[i])
            if cut is not None:
                u[i].mul_(magnitude_keep(deltas[i], cut, context))
        return combine(base, u, params, lam=self.config.lambda_, normalize=self.config.normalize, elect=True,
                       weighted=True)


@hookimpl
def register_merge_methods(register):
    register(Ties)
