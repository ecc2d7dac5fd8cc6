"""Batched text generation: the engine behind ``rlm eval`` and the trainers' rollouts.

Usage::

    from rlm.core.eval.generation import chat_prompt, generate

    prompts = [chat_prompt(tokenizer, "What is 2 + 3?")]
    gens = generate(model, tokenizer, prompts, n=4, temperature=1.0, seed=0)
    gens[0].text, gens[0].completion_ids, gens[0].finish_reason

``generate`` returns one :class:`Generation` per prompt × sample, flat and ordered prompt-major
(``gens[i * n + j]`` is sample ``j`` of prompt ``i``). Prompts are final strings (already chat-formatted, see
:func:`chat_prompt`); they are tokenized without adding special tokens a second time.

Backends. All work goes through a :class:`GenerationBackend`; :class:`HFBackend` wraps a transformers causal
LM (left padding, batches sorted by prompt length, ``model.generate`` with a KV cache). A vLLM backend can
implement the same one method (``generate(prompts, params) -> list[Generation]``) later; pass a backend
object as ``model`` to :func:`generate` and it is used as is.

Semantics (every backend must keep them):

- ``temperature == 0`` is greedy decoding; ``n > 1`` then repeats the single greedy completion. Sampling draws
  from softmax(logits / temperature) restricted to the top-p nucleus, nothing else: decoding defaults in a
  model's ``generation_config`` (top-k, repetition penalty, min-p, ...) are switched off.
- Generation stops at the first end-of-sequence token (the tokenizer's eos plus any eos ids in the model's
  generation config) or after ``max_new_tokens``. ``finish_reason`` is ``"stop"`` or ``"length"``.
- ``completion_ids`` never contain padding; they end with the eos token when one was produced.
- ``text`` is the completion decoded without special tokens.
- ``seed`` makes sampling reproducible: batch ``b`` samples under ``torch.manual_seed(seed + b)`` inside a
  forked RNG state, so the caller's global RNG is untouched.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlm.core.io.progress import progress_bar


@dataclass
class Generation:
    """One sampled completion of one prompt."""

    prompt_index: int
    sample_index: int
    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" (an eos token was produced) or "length" (max_new_tokens reached)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.completion_ids)


@dataclass
class SamplingParams:
    """What to generate; shared by every backend."""

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from rlm.core.errors import RlmError

        if self.n < 1:
            raise RlmError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise RlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise RlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise RlmError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class GenerationBackend(abc.ABC):
    """Turns prompt strings into :class:`Generation` objects. Implement this for a new inference engine."""

    tokenizer: Any

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Return ``len(prompts) * params.n`` generations, prompt-major."""


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
    """Generation with a transformers causal LM (``model.generate``), left padding, length-sorted batches."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, model)
        if not self.eos_ids:
            from rlm.core.errors import RlmError

            raise RlmError("the tokenizer has no eos token; generation cannot know where to stop")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

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
                                      return_dict_in_generate=False)
        # neutralise decoding defaults a hub model's generation_config may carry (transformers fills
        # every unset value from it): the distribution is exactly softmax(logits / T) with top-p
        kwargs.update(NEUTRAL)
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(NEUTRAL_SAMPLING, do_sample=True, temperature=params.temperature, top_p=params.top_p)
        kwargs.update(params.extra)
        return kwargs

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        import torch

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
                    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                        if params.seed is not None:
                            torch.manual_seed(params.seed + b)
                        with torch.inference_mode():
                            out = self.model.generate(**{"input_ids": input_ids.to(device),
                                                         "attention_mask": attn.to(device), **decoding})
                    new = out[:, width:].tolist()
                    for r, i in enumerate(idx):
                        gens = [self._make(i, j, prompts[i], encoded[i], new[r * n_draw + j], params.max_new_tokens)
                                for j in range(n_draw)]
                        if n_draw < params.n:  # greedy: every sample is the same completion
                            gens = [self._copy(gens[0], j) for j in range(params.n)]
                        results[i] = gens
                    bar.advance(len(idx))
        finally:
            if was_training:
                self.model.train()
        return [g for i in range(len(prompts)) for g in results[i]]

    def _make(self, i: int, j: int, prompt: str, prompt_ids: list[int], new: list[int], max_new: int) -> Generation:
        eos = set(self.eos_ids)
        completion: list[int] = []
        finish = "length"
        for t in new[:max_new]:
            completion.append(int(t))
            if t in eos:
                finish = "stop"
                break
        if finish == "length":
            # trailing pad tokens (only possible when pad is not an eos id and the row ended early)
            while completion and completion[-1] == self.pad_id and self.pad_id not in eos:
                completion.pop()
        text = self.tokenizer.decode(completion, skip_special_tokens=True)
        return Generation(i, j, prompt, list(prompt_ids), completion, text, finish)

    @staticmethod
    def _copy(g: Generation, j: int) -> Generation:
        return Generation(g.prompt_index, j, g.prompt, list(g.prompt_ids), list(g.completion_ids), g.text,
                          g.finish_reason)


def generate(model: Any, tokenizer: Any, prompts: list[str], *, n: int = 1, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, seed: int | None = None,
             progress: bool = False) -> list[Generation]:
    """Generate ``n`` completions for each chat-formatted prompt string.

    ``model`` is a transformers causal LM (wrapped in :class:`HFBackend`) or any :class:`GenerationBackend`
    (then ``tokenizer`` may be ``None``). Greedy when ``temperature == 0``; left padding; stops at eos. Returns
    ``len(prompts) * n`` :class:`Generation` objects, ``result[i * n + j]`` being sample ``j`` of prompt ``i``,
    each with the prompt's token ids, the completion's token ids (no padding; the eos token included when it
    was produced), the completion text without special tokens and the finish reason (``"stop"``/``"length"``).
    """
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            batch_size=batch_size, seed=seed, progress=progress)
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
