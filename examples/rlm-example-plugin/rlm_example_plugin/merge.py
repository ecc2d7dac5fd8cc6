"""``sign_consensus``: a merge method that averages, at each position, only the task-vector entries whose sign
agrees with the sign of their weighted sum (positions whose sum is zero keep the base value).

Its ``paper`` preset is what ``rlm merge-eval`` (``--preset paper``, the default) and studies that ask for
``preset: paper`` use; ``rlm merge --preset paper`` too."""

from rlm.core.contracts import MergeMethod, PluginConfig


class SignConsensus(MergeMethod):
    """Average of the task-vector entries that agree with the elected sign."""

    name = "sign_consensus"

    class Config(PluginConfig):
        scale: float = 1.0

    #: named settings: global ``params`` and per-model ``model_params``
    presets = {"paper": {"params": {"scale": 0.8}, "model_params": {"weight": 1.0}}}

    def merge(self, base, deltas, params, *, context=None):
        import torch

        weights = torch.tensor([p.weight for p in params], dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
        weighted = deltas * weights
        elected = torch.sign(weighted.sum(dim=0))
        agree = (torch.sign(weighted) == elected) & (elected != 0)
        count = (agree * weights).sum(dim=0)
        total = (weighted * agree).sum(dim=0)
        merged = torch.where(count != 0, total / torch.where(count != 0, count, torch.ones_like(count)),
                             torch.zeros_like(total))
        return base + self.config.scale * merged
