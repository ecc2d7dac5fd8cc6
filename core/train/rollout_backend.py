"""The generation backend RL rollouts sample from (config ``generation.backend``), its weight sync and the
rollout-vs-trainer diagnostics.

- ``hf`` (default): the policy itself through :class:`rlm.core.eval.generation.HFBackend`, built around the live
  model for every rollout exactly as :func:`rlm.core.eval.generation.generate` does — results are unchanged and
  nothing needs syncing.
- any other backend (``vllm``): its own engine, loaded once on the start model (``generation.dtype``,
  ``generation.config``), given the policy's weights at the start and after every optimizer update
  (:meth:`RolloutBackend.push`); after each push the engine's weights checksum must equal the policy's (within
  ``generation.checksum_rtol``, for a lower-precision engine) or the run stops — a rollout engine silently
  sampling from stale weights is the failure TRL and OpenRLHF users report most. The engine sleeps between a
  rollout and the update when its config allows (``enable_sleep_mode``).

Old log-probs for the PPO ratio still come from the trainer's own forward pass, not from the engine: the engine
differs from the trainer in kernels, precision and batching, and a ratio against its log-probs would not be 1 at
the first update even with identical weights. :meth:`RolloutBackend.diagnostics` measures that gap every step
(``rollout_logp_diff_mean``/``_max``: |Δ log p| over sampled tokens between the engine's log-probs and the
trainer's at temperature 1, the definition both use; ``rollout_ratio_mean``: the mean of exp(trainer − engine)).
Sampling settings are the config's on both sides by construction (one :class:`SamplingParams`).
"""

from __future__ import annotations

from typing import Any, Sequence

from rlm.core.contracts import Generation, SamplingParams
from rlm.core.errors import RlmError


class RolloutBackend:
    """Where an RL run's rollouts come from; ``external`` when it is not the policy itself."""

    def __init__(self, sess: Any, cfg: Any) -> None:
        self.sess = sess
        self.settings = cfg.generation
        self.external = self.settings.backend not in ("hf", "transformers")
        self._engine: Any = None
        self.pushes = 0
        self.last: list[Generation] = []
        if self.external:
            if sess.world > 1:
                raise RlmError(f"generation.backend {self.settings.backend!r}: rollouts through an external engine "
                               "run in one process only")
            if cfg.lora.enabled:
                raise RlmError(f"generation.backend {self.settings.backend!r}: LoRA policies sample with the hf "
                               "backend (the engine takes full weights in checkpoint names)")

    @property
    def engine(self) -> Any:
        """The external engine, loaded on first use and given the policy's current weights."""
        if self._engine is None:
            from rlm.core.plugins import get_plugin

            cls = get_plugin("generation_backend", self.settings.backend)
            self._engine = cls.load(str(self.sess.model_path), dtype=self.settings.dtype,
                                    config=dict(self.settings.config))
            self.push()
        return self._engine

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        if not self.external:
            from rlm.core.eval.generation import HFBackend

            return HFBackend(self.sess.policy, self.sess.tokenizer).generate(prompts, params)
        engine = self.engine
        engine.wake_up()
        self.last = engine.generate(prompts, SamplingParams(**{**vars(params), "logprobs": True}))
        engine.sleep()
        return self.last

    def push(self) -> None:
        """Send the policy's weights to the engine and check the engine's checksum against the policy's."""
        if not self.external or self._engine is None:
            return
        import torch

        policy = self.sess.policy
        with torch.no_grad():
            self._engine.load_weights([(n, p.detach()) for n, p in policy.named_parameters()])
            want = float(sum(p.detach().double().sum().item() for p in policy.parameters()))
        got = self._engine.weights_checksum()
        tol = self.settings.checksum_rtol * max(1.0, abs(want))
        if not abs(got - want) <= tol:
            raise RlmError(f"generation.backend {self.settings.backend!r}: after weight push {self.pushes + 1} the "
                           f"engine's weights checksum is {got!r}, the policy's {want!r} (tolerance {tol:.3g}); "
                           "the engine would sample from other weights")
        self.pushes += 1

    def diagnostics(self, trainer_logp: Any, mask: Any) -> dict[str, float]:
        """|Δ log p| and the mean ratio between the trainer's (B, T) log-probs at temperature 1 and the engine's
        of the last rollout, over response tokens."""
        import torch

        if not self.external or not self.last:
            return {}
        engine = torch.zeros_like(trainer_logp, dtype=torch.float32)
        for r, g in enumerate(self.last):
            if g.logprobs is None:
                raise RlmError(f"generation.backend {self.settings.backend!r} returned no log-probs")
            engine[r, :len(g.logprobs)] = torch.tensor(g.logprobs, dtype=torch.float32)
        m = mask.bool()
        diff = (trainer_logp.float() - engine)[m]
        if diff.numel() == 0:
            return {}
        return {"rollout_logp_diff_mean": float(diff.abs().mean()), "rollout_logp_diff_max": float(diff.abs().max()),
                "rollout_ratio_mean": float(diff.exp().mean())}
