"""The worker extension rlm hands to vLLM (``LLM(worker_extension_cls=...)``): methods vLLM mixes into each of its
workers ("dynamically inherited by the worker class ... to inject new attributes and methods to the worker class
for use in collective_rpc calls", vLLM's ``ParallelConfig.worker_extension_cls``), called through
``LLM.collective_rpc(method_name, args=...)``. ``self`` is then vLLM's worker; :meth:`get_model` (the worker's
own accessor, which unwraps a CUDA-graph wrapper) is the engine's model, whose ``load_weights(weights=...)`` takes
``(name, tensor)`` pairs in Hugging Face checkpoint names and fuses them (q/k/v, gate/up) itself — the call
vLLM's own RLHF example worker extension makes, and TRL and OpenRLHF rely on.

Imported by vLLM inside its worker (by the dotted name :data:`EXTENSION`), never by rlm's own code paths.
"""

from __future__ import annotations

from typing import Any

#: the dotted name passed as ``worker_extension_cls``
EXTENSION = "rlm.core.eval.vllm_worker.WeightSyncExtension"


class WeightSyncExtension:
    """Weight push and checksum, run inside each vLLM worker."""

    get_model: Any  # the worker's: its model runner's model, unwrapped

    def rlm_load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Load the policy's ``(name, tensor)`` pairs into the engine's model; returns how many were given."""
        self.get_model().load_weights(weights=named_tensors)
        return len(named_tensors)

    def rlm_weights_checksum(self) -> float:
        """The float64 sum of every element of every distinct parameter of the engine's model."""
        import torch

        with torch.no_grad():
            return float(sum(p.detach().double().sum().item() for p in self.get_model().parameters()))
