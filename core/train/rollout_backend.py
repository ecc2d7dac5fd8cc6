"""The generation backend RL rollouts and RFT sampling draw from (config ``generation.backend``), its weight sync
and the rollout-vs-trainer diagnostics.

- ``hf`` (default): the policy itself through :func:`rlm.core.eval.generation.generate` (an
  :class:`rlm.core.eval.generation.HFBackend` built around the live model for every call) — results are unchanged
  and nothing needs syncing.
- any other backend (``vllm``): its own engine, loaded once on the start model (``generation.dtype``,
  ``generation.config``) and given the policy's weights when it is loaded, after every RL optimizer update
  (:meth:`RolloutBackend.push`) and before every RFT sampling round (:meth:`RolloutBackend.sync`); after each push
  the engine's weights checksum must equal the policy's (within ``generation.checksum_rtol``, for a
  lower-precision engine) or the run stops — a rollout engine silently sampling from stale weights is the failure
  TRL and OpenRLHF users report most. The engine sleeps between a rollout and the update when its config allows
  (``enable_sleep_mode``); :meth:`RolloutBackend.close` lets it go once sampling is over (RFT).

Old log-probs for the PPO ratio still come from the trainer's own forward pass, not from the engine: the engine
differs from the trainer in kernels, precision and batching, and a ratio against its log-probs would not be 1 at
the first update even with identical weights. :meth:`RolloutBackend.diagnostics` measures that gap every step
(``rollout_logp_diff_mean``/``_max``: |Δ log p| over sampled tokens between the engine's log-probs and the
trainer's at temperature 1, the definition both use; ``rollout_ratio_mean``: the mean of exp(trainer − engine);
``rollout_checksum_rel_diff``: the engine-vs-policy checksum difference of the push before the rollout).
Sampling settings are the config's on both sides by construction (one :class:`SamplingParams`).
"""

from __future__ import annotations

from typing import Any, Sequence

from rlm.core.contracts import Generation, SamplingParams
from rlm.core.errors import RlmError


class RolloutBackend:
    """Where an RL run's rollouts (an RFT run's samples) come from; ``external`` when it is not the policy
    itself."""

    def __init__(self, sess: Any, cfg: Any) -> None:
        self.sess = sess
        self.settings = cfg.generation
        self.external = self.settings.backend not in ("hf", "transformers")
        self._engine: Any = None
        self.pushes = 0
        #: |engine − policy| / max(1, |policy|) of the weights checksums after the last push
        self.checksum_rel_diff: float | None = None
        self.last: list[Generation] = []
        if self.external:
            if sess.world > 1:
                raise RlmError(f"generation.backend {self.settings.backend!r}: sampling through an external engine "
                               "runs in one process only")
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
        """``len(prompts) * params.n`` generations, prompt-major; through the engine (log-probs included) or, for
        ``hf``, from the policy itself exactly as :func:`rlm.core.eval.generation.generate` samples."""
        if not self.external:
            from rlm.core.eval import generation

            if params.extra:
                return generation.HFBackend(self.sess.policy, self.sess.tokenizer).generate(prompts, params)
            return generation.generate(  # looked up at call time: the function RFT and RL called before backends
                self.sess.policy, self.sess.tokenizer, list(prompts), n=params.n,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                batch_size=params.batch_size, seed=params.seed, progress=params.progress, stop=params.stop,
                logprobs=params.logprobs)
        engine = self.engine
        engine.wake_up()
        self.last = engine.generate(prompts, SamplingParams(**{**vars(params), "logprobs": True}))
        engine.sleep()
        return self.last

    def sync(self) -> None:
        """Before a sampling round: give the engine the policy's current weights (checksum-checked), loading it
        first when this is the first round (the load pushes them). Nothing for ``hf``."""
        if not self.external:
            return
        if self._engine is None:
            _ = self.engine  # loads and pushes
        else:
            self.push()

    def close(self) -> None:
        """Let the engine go (RFT, once sampling is over, so training gets its memory back)."""
        if self._engine is None:
            return
        self._engine = None
        import gc

        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def push(self) -> None:
        """Send the policy's weights to the engine and check the engine's checksum against the policy's (nothing
        before the engine is loaded: loading pushes)."""
        if not self.external or self._engine is None:
            return
        import torch

        policy = self.sess.policy
        with torch.no_grad():
            self._engine.load_weights([(n, p.detach()) for n, p in policy.named_parameters()])
            want = float(sum(p.detach().double().sum().item() for p in policy.parameters()))
        got = self._engine.weights_checksum()
        scale = max(1.0, abs(want))
        tol = self.settings.checksum_rtol * scale
        self.checksum_rel_diff = abs(got - want) / scale
        if not abs(got - want) <= tol:
            raise RlmError(f"generation.backend {self.settings.backend!r}: after weight push {self.pushes + 1} the "
                           f"engine's weights checksum is {got!r}, the policy's {want!r} (tolerance {tol:.3g}); "
                           "the engine would sample from other weights")
        self.pushes += 1

    def diagnostics(self, trainer_logp: Any, mask: Any) -> dict[str, float]:
        """|Δ log p| and the mean ratio between the trainer's (B, T) log-probs at temperature 1 and the engine's
        of the last rollout, over response tokens, and the relative weights-checksum difference of the push that
        rollout followed."""
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
        out = {"rollout_logp_diff_mean": float(diff.abs().mean()), "rollout_logp_diff_max": float(diff.abs().max()),
               "rollout_ratio_mean": float(diff.exp().mean())}
        if self.checksum_rel_diff is not None:  # of the push the rollout sampled after
            out["rollout_checksum_rel_diff"] = self.checksum_rel_diff
        return out
