"""The worker extension rlm hands to vLLM (``LLM(worker_extension_cls=...)``): methods vLLM mixes into each of its
workers, called through ``LLM.collective_rpc(method_name, args=...)`` — vLLM's documented path for RL weight
updates. ``self`` is then vLLM's worker, whose ``model_runner.model`` is the engine's model; its
``load_weights(weights=...)`` takes ``(name, tensor)`` pairs in Hugging Face checkpoint names and fuses them
(q/k/v, gate/up) itself, as TRL and verl rely on.

Imported by vLLM inside its worker (by the dotted name :data:`EXTENSION`), never by rlm's own code paths.
"""

from __future__ import annotations

from typing import Any

#: the dotted name passed as ``worker_extension_cls``
EXTENSION = "rlm.core.eval.vllm_worker.WeightSyncExtension"


class WeightSyncExtension:
    """Weight push and checksum, run inside each vLLM worker."""

    model_runner: Any

    def rlm_load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Load the policy's ``(name, tensor)`` pairs into the engine's model; returns how many were given."""
        self.model_runner.model.load_weights(weights=named_tensors)
        return len(named_tensors)

    def rlm_weights_checksum(self) -> float:
        """The float64 sum of every element of every distinct parameter of the engine's model."""
        import torch

        with torch.no_grad():
            return float(sum(p.detach().double().sum().item() for p in self.model_runner.model.parameters()))
