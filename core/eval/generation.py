"""Batched text generation: the engine behind ``rlm eval`` and the trainers' rollouts.

Usage::

    from rlm.core.eval.generation import chat_prompt, generate

    prompts = [chat_prompt(tokenizer, "What is 2 + 3?")]
    gens = generate(model, tokenizer, prompts, n=4, temperature=1.0, seed=0)
    gens[0].text, gens[0].completion_ids, gens[0].finish_reason

``generate`` returns one :class:`Generation` per prompt × sample, flat and ordered prompt-major
(``gens[i * n + j]`` is sample ``j`` of prompt ``i``). Prompts are final strings (already chat-formatted, see
:func:`chat_prompt`); they are tokenized without adding special tokens a second time.

Backends. All work goes through a :class:`rlm.core.contracts.GenerationBackend` (a plugin kind, registered
with ``register_generation_backends``); :class:`HFBackend` (``hf``, the default) wraps a transformers causal
LM (left padding, batches sorted by prompt length, ``model.generate`` with a KV cache); the ``vllm`` backend
is :mod:`rlm.core.eval.vllm_backend`. Pass a backend object as ``model`` to :func:`generate` and it is used
as is.

Semantics (every backend must keep them):

- ``temperature == 0`` is greedy decoding; ``n > 1`` then repeats the single greedy completion. Sampling draws
  from softmax(logits / temperature) restricted to the top-p nucleus, nothing else: decoding defaults in a
  model's ``generation_config`` (top-k, repetition penalty, min-p, ...) are switched off.
- Generation stops at the first end-of-sequence token (the tokenizer's eos plus any eos ids in the model's
  generation config), at the first stop string (``SamplingParams.stop``: ``text`` ends before it,
  ``completion_ids`` end with the token that completed it) or after ``max_new_tokens``. ``finish_reason`` is
  ``"stop"`` or ``"length"``.
- ``SamplingParams.logprobs``: ``Generation.logprobs[t]`` is log p(completion_ids[t]) under
  log-softmax(raw logits) — temperature 1, no top-p, as vLLM's default ``raw_logprobs``.
- ``completion_ids`` never contain padding; they end with the eos token when one was produced.
- ``text`` is the completion decoded without special tokens.
- ``seed`` makes sampling reproducible: batch ``b`` samples under ``torch.manual_seed(seed + b)`` inside a
  forked RNG state, so the caller's global RNG is untouched.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from rlm.core.contracts import Generation, GenerationBackend, PluginConfig, SamplingParams
from rlm.core.io.progress import progress_bar

__all__ = ["Generation", "GenerationBackend", "HFBackend", "SamplingParams", "chat_prompt", "generate"]

#: ``--dtype`` names -> torch dtype attribute names (``auto``: the checkpoint's own dtype)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


def torch_dtype(name: str) -> Any:
    """The torch dtype (or ``"auto"``) for a ``--dtype`` name; an unknown name is one :class:`RlmError` line."""
    key = DTYPES.get(str(name).lower())
    if key is None:
        from rlm.core.errors import RlmError

        raise RlmError(f"unknown dtype {name!r} (dtypes: float32, bfloat16, float16, auto)")
    if key == "auto":
        return "auto"
    import torch

    return getattr(torch, key)


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's eos and the model generation config's eos ids."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        extra = [extra]
    for i in extra or []:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


NEUTRAL: dict[str, Any] = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
NEUTRAL_SAMPLING: dict[str, Any] = dict(top_k=0, typical_p=1.0, min_p=0.0, epsilon_cutoff=0.0, eta_cutoff=0.0)


class HFBackend(GenerationBackend):
    """Generation with a transformers causal LM (``model.generate``), left padding, length-sorted batches.
    Built from a model directory by :meth:`load` (``rlm eval --backend hf``) or around a model already in memory
    (``HFBackend(model, tokenizer)``: the trainers' policy, whose weights it then shares)."""

    name = "hf"
    Config = PluginConfig

    def __init__(self, model: Any, tokenizer: Any, config: PluginConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, model)
        if not self.eos_ids:
            from rlm.core.errors import RlmError

            raise RlmError("the tokenizer has no eos token; generation cannot know where to stop")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    @classmethod
    def load(cls, model_path: str, *, device: str | None = None, dtype: str = "float32",
             config: PluginConfig | dict[str, Any] | None = None) -> "HFBackend":
        from rlm.core.models.hf import load_model
        from rlm.core.models.lora import is_adapter_only

        wanted = torch_dtype(dtype)
        if wanted == "auto" and is_adapter_only(model_path):
            wanted = None  # an adapter merges in float32
        model, tok = load_model(model_path, dtype=wanted, device=device)
        return cls(model, tok, config)

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    from rlm.core.errors import RlmError

                    raise RlmError(f"load_weights: the model has no parameter {name!r}")
                if params[name].data_ptr() != tensor.data_ptr():
                    params[name].copy_(tensor)

    def weights_checksum(self) -> float:
        import torch

        with torch.no_grad():
            return float(sum(p.detach().double().sum().item() for p in self.model.parameters()))

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(prompts), add_special_tokens=False)
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def _left_padded(self, seqs: list[list[int]]) -> tuple[Any, Any, int]:
        """``(input_ids, attention_mask, width)`` of token lists padded on the left to the longest; an empty
        prompt gets one eos token to condition on."""
        import torch

        width = max(len(s) for s in seqs)
        if width == 0:  # an empty prompt: give the model something to condition on
            width = 1
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            if s:
                input_ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
                attn[r, width - len(s):] = 1
            else:
                input_ids[r, -1] = self.eos_ids[0]
                attn[r, -1] = 1
        return input_ids, attn, width

    def _decoding_kwargs(self, params: SamplingParams, n_draw: int) -> dict[str, Any]:
        """``model.generate`` settings besides the inputs: length, stop tokens, greedy or nucleus sampling."""
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
                                      pad_token_id=self.pad_id, num_return_sequences=n_draw,
                                      return_dict_in_generate=params.logprobs)
        if params.logprobs:
            kwargs["output_logits"] = True  # raw logits, before temperature / top-p
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        # neutralise decoding defaults a hub model's generation_config may carry (transformers fills
        # every unset value from it): the distribution is exactly softmax(logits / T) with top-p
        kwargs.update(NEUTRAL)
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(NEUTRAL_SAMPLING, do_sample=True, temperature=params.temperature, top_p=params.top_p)
        kwargs.update(params.extra)
        return kwargs

    @staticmethod
    def _token_logprobs(step_logits: Sequence[Any], tokens: Any) -> list[list[float]]:
        """log-softmax(raw logits) of each row's generated token at every step: ``[row][step]``."""
        import torch

        cols = [torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, t:t + 1]).squeeze(1)
                for t, logits in enumerate(step_logits)]
        return torch.stack(cols, dim=1).tolist() if cols else [[] for _ in range(tokens.shape[0])]

    def _run_batch(self, input_ids: Any, attn: Any, width: int, decoding: dict[str, Any], device: Any,
                   seed: int | None) -> tuple[list[list[int]], list[list[float]] | None]:
        """One ``model.generate`` call under a forked RNG: the new tokens of each row (and their log-probs)."""
        import torch

        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                out = self.model.generate(**{"input_ids": input_ids.to(device), "attention_mask": attn.to(device),
                                             **decoding})
                if not decoding.get("return_dict_in_generate"):
                    return out[:, width:].tolist(), None
                new = out.sequences[:, width:]
                return new.tolist(), self._token_logprobs(out.logits, new)

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        prompts = list(prompts)
        if not prompts:
            return []
        encoded = self._encode(prompts)
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        device = next(self.model.parameters()).device
        n_draw = 1 if params.greedy else params.n
        results: dict[int, list[Generation]] = {}
        was_training = self.model.training
        self.model.eval()
        # with n samples per prompt, each batch holds batch_size sequences in total
        per_batch = max(1, params.batch_size // n_draw)
        batches = [order[s:s + per_batch] for s in range(0, len(order), per_batch)]
        decoding = self._decoding_kwargs(params, n_draw)
        try:
            with progress_bar(len(prompts), params.progress, "generating") as bar:
                for b, idx in enumerate(batches):
                    input_ids, attn, width = self._left_padded([encoded[i] for i in idx])
                    new, logprobs = self._run_batch(input_ids, attn, width, decoding, device,
                                                    None if params.seed is None else params.seed + b)
                    for r, i in enumerate(idx):
                        rows = range(r * n_draw, (r + 1) * n_draw)
                        gens = [self._make(i, j, prompts[i], encoded[i], new[row], params,
                                           logprobs[row] if logprobs is not None else None)
                                for j, row in enumerate(rows)]
                        if n_draw < params.n:  # greedy: every sample is the same completion
                            gens = [self._copy(gens[0], j) for j in range(params.n)]
                        results[i] = gens
                    bar.advance(len(idx))
        finally:
            if was_training:
                self.model.train()
        return [g for i in range(len(prompts)) for g in results[i]]

    def _make(self, i: int, j: int, prompt: str, prompt_ids: list[int], new: list[int], params: SamplingParams,
              logprobs: list[float] | None = None) -> Generation:
        eos = set(self.eos_ids)
        completion: list[int] = []
        finish = "length"
        for t in new[:params.max_new_tokens]:
            completion.append(int(t))
            if t in eos:
                finish = "stop"
                break
        if finish == "length":
            # trailing pad tokens (only possible when pad is not an eos id and the row ended early)
            while completion and completion[-1] == self.pad_id and self.pad_id not in eos:
                completion.pop()
        text = self.tokenizer.decode(completion, skip_special_tokens=True)
        if params.stop:
            cut = self._cut_at_stop(completion, text, params.stop)
            if cut is not None:
                completion, text, finish = cut[0], cut[1], "stop"
        lps = [float(x) for x in logprobs[:len(completion)]] if logprobs is not None else None
        return Generation(i, j, prompt, list(prompt_ids), completion, text, finish, lps)

    def _cut_at_stop(self, completion: list[int], text: str, stop: tuple[str, ...]) -> tuple[list[int], str] | None:
        """``(ids up to the token that completed the first stop string, text before it)``, or ``None``."""
        hits = [(text.find(s), s) for s in stop if s in text]
        if not hits:
            return None
        at = min(h[0] for h in hits)

        def has_stop(k: int) -> bool:
            return any(s in self.tokenizer.decode(completion[:k], skip_special_tokens=True) for s in stop)

        lo, hi = 1, len(completion)  # the shortest prefix that holds a stop string (monotone in k)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        return completion[:lo], text[:at]

    @staticmethod
    def _copy(g: Generation, j: int) -> Generation:
        return Generation(g.prompt_index, j, g.prompt, list(g.prompt_ids), list(g.completion_ids), g.text,
                          g.finish_reason, None if g.logprobs is None else list(g.logprobs))


def generate(model: Any, tokenizer: Any, prompts: list[str], *, n: int = 1, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, seed: int | None = None,
             progress: bool = False, stop: Sequence[str] = (), logprobs: bool = False) -> list[Generation]:
    """Generate ``n`` completions for each chat-formatted prompt string.

    ``model`` is a transformers causal LM (wrapped in :class:`HFBackend`) or any :class:`GenerationBackend`
    (then ``tokenizer`` may be ``None``). Greedy when ``temperature == 0``; left padding; stops at eos. Returns
    ``len(prompts) * n`` :class:`Generation` objects, ``result[i * n + j]`` being sample ``j`` of prompt ``i``,
    each with the prompt's token ids, the completion's token ids (no padding; the eos token included when it
    was produced), the completion text without special tokens and the finish reason (``"stop"``/``"length"``).
    """
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            batch_size=batch_size, seed=seed, progress=progress, stop=tuple(stop),
                            logprobs=logprobs)
    backend = model if isinstance(model, GenerationBackend) else HFBackend(model, tokenizer)
    return backend.generate(prompts, params)


FALLBACK_TEMPLATE = "{system}{user}\n"


def chat_prompt(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """The prompt string for one user turn, ending where the assistant's reply begins.

    Uses the tokenizer's chat template (``add_generation_prompt=True``). A tokenizer without a chat template
    (a base model) gets a plain fallback: the system text and a blank line (if any), then the user text and a
    newline — so base models see the question as plain text and continue after it.
    """
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_text})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(system=f"{system}\n\n" if system else "", user=user_text)
