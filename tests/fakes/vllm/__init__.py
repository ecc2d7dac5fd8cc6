"""A fake ``vllm`` for tests without a GPU: exactly the API surface rlm's vllm backend uses, with vLLM's documented
argument names and result shapes (``LLM``, ``SamplingParams``, ``RequestOutput``, ``CompletionOutput``,
``Logprob``; ``LLM.generate/sleep/wake_up/collective_rpc/reset_prefix_cache``; a worker with ``model_runner`` and
``get_model()`` into which the ``worker_extension_cls`` is mixed, refused when it shadows a worker attribute, as
vLLM does), recording every call in ``CALLS``. Completions are deterministic pseudo-random tokens (a function of
prompt, sample index and seed); the worker holds the real Hugging Face model of the directory so weight pushes and
checksums act on real tensors.
Put ``tests/fakes`` on ``sys.path`` to import it as ``vllm``.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import random
from dataclasses import dataclass
from typing import Any

#: every call, in order: (name, arguments)
CALLS: list[tuple[str, dict[str, Any]]] = []
#: every LLM built, in order
INSTANCES: list[Any] = []

LLM_ARGS = {"model", "dtype", "seed", "gpu_memory_utilization", "enable_sleep_mode", "max_model_len",
            "tensor_parallel_size", "enforce_eager", "generation_config", "logprobs_mode", "worker_extension_cls"}
SAMPLING_ARGS = {"n", "temperature", "top_p", "max_tokens", "stop", "stop_token_ids", "seed", "logprobs",
                 "skip_special_tokens"}


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_ARGS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected arguments {sorted(unknown)}")
        self.n = kwargs.get("n", 1)
        self.temperature = kwargs.get("temperature", 1.0)
        self.top_p = kwargs.get("top_p", 1.0)
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.stop = kwargs.get("stop")
        self.stop_token_ids = kwargs.get("stop_token_ids")
        self.seed = kwargs.get("seed")
        self.logprobs = kwargs.get("logprobs")
        self.skip_special_tokens = kwargs.get("skip_special_tokens", True)
        CALLS.append(("SamplingParams", dict(kwargs)))


class _Runner:
    def __init__(self, model: Any) -> None:
        self.model = _Model(model)


class _Worker:
    """vLLM's worker (``WorkerBase``): ``model_runner`` and ``get_model()``; rlm's extension is mixed into it."""

    model_runner: _Runner

    def get_model(self) -> Any:
        return self.model_runner.model


class _Model:
    """vLLM's model: ``load_weights(weights=...)`` takes (name, tensor) pairs in HF checkpoint names."""

    def __init__(self, hf_model: Any) -> None:
        self.hf = hf_model

    def load_weights(self, weights: Any) -> set[str]:
        params = dict(self.hf.named_parameters())
        loaded = set()
        for name, tensor in weights:
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded

    def parameters(self) -> Any:
        return self.hf.parameters()


class LLM:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - LLM_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected arguments {sorted(unknown)}")
        CALLS.append(("LLM", dict(kwargs)))
        INSTANCES.append(self)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        module, _, cls_name = kwargs["worker_extension_cls"].rpartition(".")
        extension = getattr(importlib.import_module(module), cls_name)
        for attr in dir(extension):  # vLLM refuses an extension that shadows anything of the worker's
            if not attr.startswith("__") and hasattr(_Worker, attr):
                raise AssertionError(f"Worker class already has an attribute {attr}, which conflicts with the "
                                     f"worker extension class {extension}.")
        worker_cls = type("FakeWorker", (_Worker, extension), {})  # as vLLM: the extension joins the worker's bases
        self.worker = worker_cls()
        self.worker.model_runner = _Runner(AutoModelForCausalLM.from_pretrained(kwargs["model"]))
        self.sleep_level: int | None = None

    def generate(self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True) -> list[RequestOutput]:
        CALLS.append(("generate", {"prompts": list(prompts), "sampling_params": sampling_params,
                                   "use_tqdm": use_tqdm}))
        if self.sleep_level is not None:
            raise RuntimeError("generate while asleep")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        return [self._one(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]

    def _one(self, i: int, prompt: str, sp: SamplingParams) -> RequestOutput:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        outs = [self._sample(prompt, j, sp) for j in range(sp.n)]
        return RequestOutput(str(i), prompt, list(ids), list(reversed(outs)))  # any order: rlm sorts by index

    def _sample(self, prompt: str, j: int, sp: SamplingParams) -> CompletionOutput:
        key = f"{prompt}|{j}|{sp.seed}|{sp.temperature}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        vocab = len(self.tokenizer)
        stops = set(sp.stop_token_ids or [])
        ids: list[int] = []
        finish = "length"
        for _ in range(sp.max_tokens):
            t = rng.randrange(vocab)
            ids.append(t)
            if t in stops:
                finish = "stop"
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
        for s in sp.stop or []:
            if s in text:
                text, finish = text[:text.index(s)], "stop"
        logprobs = None
        if sp.logprobs is not None:
            logprobs = [{t: Logprob(-math.log(vocab) - 0.001 * k, 1)} for k, t in enumerate(ids)]
        return CompletionOutput(j, text, ids, None, logprobs, finish)

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list[Any]:
        CALLS.append(("collective_rpc", {"method": method, "args": args, "kwargs": kwargs}))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def sleep(self, level: int = 1) -> None:
        CALLS.append(("sleep", {"level": level}))
        self.sleep_level = level

    def wake_up(self, tags: list[str] | None = None) -> None:
        CALLS.append(("wake_up", {"tags": tags}))
        if tags is None or "kv_cache" in tags:
            self.sleep_level = None

    def reset_prefix_cache(self) -> bool:
        CALLS.append(("reset_prefix_cache", {}))
        return True
