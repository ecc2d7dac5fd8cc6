"""``dare_ties``: DARE random drop (Bernoulli(d_i), L1-rescaled) then the TIES sign election (mergekit
semantics: normalize off, rescale on by default)."""

from __future__ import annotations

from rlm.core.contracts import MergeMethod
from rlm.core.hookspecs import hookimpl
from rlm.core.merge.params import DareConfig, DensityParams


class DareTies(MergeMethod):
    """DARE-TIES: random drop with rescale, then sign election."""

    name = "dare_ties"
    default = True  # one of the paper's four methods (rlm merge-eval --methods)
    elect = True

    Config = DareConfig
    ModelParams = DensityParams
    presets = {"paper": {"params": {}, "model_params": {"weight": 0.5, "density": 0.8}}}

    def prepare(self, delta, param, *, context):
        from rlm.core.merge.ops import dare_mask, l1_scale

        mask = dare_mask(delta.shape, param.density, context.generator(context.model_index), delta.device)
        return mask, (l1_scale(delta, mask) if self.config.rescale else 1.0)

    def prepare_blocks(self, blocks, param, *, context):
        from rlm.core.merge.ops import SequentialMask, l1_scale_blocks

        seq = SequentialMask(context, context.model_index, param.density)
        scale = l1_scale_blocks(blocks, lambda rows, b: seq.take(b.shape, b.device)) if self.config.rescale else 1.0
        seq.reset()
        return seq, scale

    def merge(self, base, deltas, params, *, context=None):
        import torch

        from rlm.core.merge.ops import SequentialMask, combine

        u = torch.empty_like(deltas)
        row = base.numel() // max(1, base.shape[0]) if base.dim() else 1
        for i, (mask, scale) in enumerate(context.stats):  # u_i = w_i · scale_i · dropped τ_i
            torch.mul(deltas[i], params[i].weight * scale, out=u[i])
            keep = mask.block(context.rows[0] * row, u[i].shape, u[i].device) if isinstance(mask, SequentialMask) \
                else context.block(mask)
            u[i].mul_(keep)
        return combine(base, u, params, lam=self.config.lambda_, normalize=self.config.normalize,
                       elect=self.elect, weighted=True)


@hookimpl
def register_merge_methods(register):
    register(DareTies)
