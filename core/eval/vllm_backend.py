"""The ``vllm`` generation backend: vLLM's offline engine (``vllm.LLM``) behind the
:class:`rlm.core.contracts.GenerationBackend` contract, with the HF backend's semantics.

- ``generate`` sends one ``vllm.SamplingParams(n, temperature, top_p, max_tokens, stop, stop_token_ids, seed,
  logprobs)`` per prompt (the seed is ``seed + prompt index``, so each prompt has its own stream) and maps each
  ``RequestOutput.outputs[j]`` (``text``, ``token_ids``, ``logprobs``, ``finish_reason``) to a
  :class:`Generation`, prompt-major, samples in ``CompletionOutput.index`` order. Greedy decoding asks for one
  completion and repeats it ``n`` times, as the HF backend does.
- The engine ignores the model's ``generation_config`` defaults (``generation_config="vllm"``) and stops at the
  same eos ids as the HF backend (``stop_token_ids``); log-probs are ``raw_logprobs`` (temperature 1, no
  top-p), the HF backend's definition.
- Colocated training: ``gpu_memory_utilization`` is the fraction of GPU memory the engine may take;
  ``enable_sleep_mode`` lets :meth:`sleep` free it between rollouts and the update (``LLM.sleep(level)``) and
  :meth:`wake_up` restore it (``LLM.wake_up(tags)``: the weights first, then the KV cache, so a push after
  sleep fits). :meth:`load_weights` pushes the policy's tensors with ``LLM.collective_rpc`` into
  :class:`rlm.core.eval.vllm_worker.WeightSyncExtension` and resets the prefix cache (cached KV of the old
  weights must not be reused). After a level-2 sleep the engine's weights are gone: generating before a push
  is an error.

vLLM is an optional extra (``pip install 'rlm[vllm]'``); in this repository the backend is tested against a
fake ``vllm`` module (``tests/fakes/vllm``) that implements exactly the calls made here. Each call was checked
against vLLM's documentation and source (``logprobs_mode`` is ``ModelConfig.logprobs_mode``, whose default is
``raw_logprobs``; the sources are listed in docs/generation_backends.md).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Sequence

from pydantic import Field

from rlm.core.contracts import Generation, GenerationBackend, PluginConfig, SamplingParams
from rlm.core.errors import RlmError

#: ``--dtype`` names -> vLLM's ``dtype`` argument
VLLM_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "auto": "auto"}


class VLLMConfig(PluginConfig):
    """Engine settings of the ``vllm`` backend."""

    #: fraction of the GPU's memory vLLM may take (weights + KV cache); lower it when training shares the GPU
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    #: allow :meth:`VLLMBackend.sleep` (vLLM's sleep mode) to free GPU memory between rollouts and updates
    enable_sleep_mode: bool = False
    #: 1: weights offloaded to CPU, KV cache dropped; 2: both dropped (a weight push must follow)
    sleep_level: Literal[1, 2] = 1
    max_model_len: int | None = Field(None, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    #: the engine's own seed (per-request seeds come from ``SamplingParams.seed``)
    seed: int = 0


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise RlmError(f"the vllm generation backend needs vLLM: pip install 'rlm[vllm]' ({exc})") from None
    return vllm


def _generation_config_eos(model_path: str) -> Any:
    """The model directory's ``generation_config.json`` (for its eos ids), or ``None``."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_path)
    except Exception:  # no generation_config.json: the tokenizer's eos alone
        return None


class VLLMBackend(GenerationBackend):
    """Generation with vLLM's offline engine (``vllm.LLM``)."""

    name = "vllm"
    Config = VLLMConfig

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: list[int],
                 config: PluginConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.sleeping = False
        self.weights_awake = True  # while asleep: whether a push woke the weights already
        self.weights_missing = False  # after a level-2 sleep, until the next push

    @classmethod
    def load(cls, model_path: str, *, device: str | None = None, dtype: str = "float32",
             config: PluginConfig | dict[str, Any] | None = None) -> "VLLMBackend":
        """Start ``vllm.LLM`` on the model directory (a full model: vLLM does not merge rlm's LoRA adapters).
        ``device`` is not passed: vLLM runs on its platform's accelerator."""
        import os
        from pathlib import Path

        from rlm.core.eval.generation import eos_token_ids
        from rlm.core.eval.vllm_worker import EXTENSION
        from rlm.core.models.hf import load_tokenizer
        from rlm.core.models.lora import is_adapter_only

        cfg = config if isinstance(config, VLLMConfig) else VLLMConfig(**dict(config or {}))
        if str(dtype).lower() not in VLLM_DTYPES:
            raise RlmError(f"unknown dtype {dtype!r} (dtypes: float32, bfloat16, float16, auto)")
        if is_adapter_only(Path(model_path)):
            raise RlmError(f"{model_path}: a LoRA adapter without a merged model; the vllm backend needs a full "
                           "model directory (the run's final/merged/)")
        vllm = _import_vllm()
        # in-process engine: collective_rpc hands the policy's tensors to the worker without copying them
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = vllm.LLM(model=str(model_path), dtype=VLLM_DTYPES[str(dtype).lower()], seed=cfg.seed,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode,
                       max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size,
                       enforce_eager=cfg.enforce_eager, generation_config="vllm", logprobs_mode="raw_logprobs",
                       worker_extension_cls=EXTENSION)
        tok = load_tokenizer(str(model_path))
        eos = eos_token_ids(tok, _GenerationConfigHolder(_generation_config_eos(str(model_path))))
        if not eos:
            raise RlmError(f"{model_path}: the tokenizer has no eos token; generation cannot know where to stop")
        return cls(llm, tok, eos, cfg)

    # -- generation ----------------------------------------------------------------------------------------
    def _request_params(self, params: SamplingParams, n_prompts: int) -> list[Any]:
        """One ``vllm.SamplingParams`` per prompt (per-prompt seeds)."""
        vllm = _import_vllm()
        common: dict[str, Any] = dict(n=1 if params.greedy else params.n, temperature=params.temperature,
                                      top_p=1.0 if params.greedy else params.top_p,
                                      max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                      stop_token_ids=list(self.eos_ids), skip_special_tokens=True,
                                      logprobs=0 if params.logprobs else None)
        common.update(params.extra)
        return [vllm.SamplingParams(**common, seed=None if params.seed is None else params.seed + i)
                for i in range(n_prompts)]

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        prompts = list(prompts)
        if not prompts:
            return []
        if self.weights_missing:
            raise RlmError("vllm backend: the engine's weights were dropped by a level-2 sleep and no weights were "
                           "pushed since; call load_weights before generate")
        if self.sleeping:
            self.wake_up()
        outputs = self.llm.generate(prompts, sampling_params=self._request_params(params, len(prompts)),
                                    use_tqdm=params.progress)
        if len(outputs) != len(prompts):
            raise RlmError(f"vllm returned {len(outputs)} results for {len(prompts)} prompts")
        result: list[Generation] = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs)):
            samples = sorted(out.outputs, key=lambda c: c.index)
            gens = [self._make(i, j, prompt, list(out.prompt_token_ids or []), c, params.logprobs)
                    for j, c in enumerate(samples)]
            if params.greedy:  # one greedy completion, repeated n times
                gens = [Generation(i, j, prompt, list(gens[0].prompt_ids), list(gens[0].completion_ids),
                                   gens[0].text, gens[0].finish_reason,
                                   None if gens[0].logprobs is None else list(gens[0].logprobs))
                        for j in range(params.n)]
            if len(gens) != params.n:
                raise RlmError(f"vllm returned {len(gens)} completions for prompt {i}, expected {params.n}")
            result.extend(gens)
        return result

    @staticmethod
    def _make(i: int, j: int, prompt: str, prompt_ids: list[int], c: Any, with_logprobs: bool) -> Generation:
        ids = [int(t) for t in c.token_ids]
        logprobs = None
        if with_logprobs:
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RlmError(f"vllm returned no log-prob for some tokens of prompt {i} sample {j}")
            logprobs = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)]
        finish = "length" if c.finish_reason == "length" else "stop"
        return Generation(i, j, prompt, prompt_ids, ids, c.text, finish, logprobs)

    # -- weights and memory ------------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Push the policy's tensors into the engine (waking only its weights first when asleep) and reset the
        prefix cache."""
        if self.sleeping and not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        self.llm.collective_rpc("rlm_load_weights", args=(list(named_tensors),))
        self.llm.reset_prefix_cache()
        self.weights_missing = False

    def weights_checksum(self) -> float:
        if self.config.tensor_parallel_size != 1:
            raise RlmError("vllm backend: the weights checksum needs tensor_parallel_size 1 (shards replicate "
                           "some tensors)")
        return float(self.llm.collective_rpc("rlm_weights_checksum")[0])

    def sleep(self) -> None:
        if not self.config.enable_sleep_mode or self.sleeping:
            return
        self.llm.sleep(level=self.config.sleep_level)
        self.sleeping = True
        self.weights_awake = False
        self.weights_missing = self.config.sleep_level == 2

    def wake_up(self) -> None:
        if not self.sleeping:
            return
        self.llm.wake_up(tags=["kv_cache"] if self.weights_awake else None)
        self.sleeping = False
        self.weights_awake = True


class _GenerationConfigHolder:
    """What :func:`rlm.core.eval.generation.eos_token_ids` reads from a model: its ``generation_config``."""

    def __init__(self, generation_config: Any) -> None:
        self.generation_config = generation_config
