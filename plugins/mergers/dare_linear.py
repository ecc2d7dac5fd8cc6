"""``dare_linear``: DARE random drop (Bernoulli(d_i), L1-rescaled) and task arithmetic, no sign election."""

from __future__ import annotations

from rlm.core.hookspecs import hookimpl
from rlm.plugins.mergers.dare_ties import DareTies


class DareLinear(DareTies):
    """DARE-linear: random drop with rescale, then the weighted sum of task vectors."""

    name = "dare_linear"
    elect = False
    default = False  # not one of the paper's four methods


@hookimpl
def register_merge_methods(register):
    register(DareLinear)
