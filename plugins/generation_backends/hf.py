"""The ``hf`` generation backend: transformers ``model.generate`` (the engine is
:class:`rlm.core.eval.generation.HFBackend`)."""

from __future__ import annotations

from rlm.core.eval.generation import HFBackend
from rlm.core.hookspecs import hookimpl


@hookimpl
def register_generation_backends(register):
    register(HFBackend, aliases=["transformers"])
