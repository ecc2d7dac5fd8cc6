"""The ``vllm`` generation backend: vLLM's offline engine (the engine is
:class:`rlm.core.eval.vllm_backend.VLLMBackend`; vLLM itself is imported only when an engine starts)."""

from __future__ import annotations

from rlm.core.eval.vllm_backend import VLLMBackend
from rlm.core.hookspecs import hookimpl


@hookimpl
def register_generation_backends(register):
    register(VLLMBackend)
