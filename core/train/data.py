"""Training data of the engines: the seeded data order and sampling seeds, loading a task's training examples,
and token batches (left-padded prompts, right-padded responses) cut into micro-batches.

Data order and sampling seeds are functions of (seed, step), which is what makes ``--resume`` exact. This module
does not import torch at import time.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from rlm.core.contracts import Example
from rlm.core.errors import RlmError
from rlm.core.train.config import TrainConfig, TrainRun

# -- data order and sampling seeds -------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of ``range(n)`` for one epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def take(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices ``start .. start+count`` of the endless sequence of seeded epoch permutations of ``range(n)``."""
    out: list[int] = []
    orders: dict[int, list[int]] = {}  # one shuffle per epoch touched, not one per position
    for pos in range(start, start + count):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(orders[epoch][offset])
    return out


def sample_seed(seed: int, step: int, rank: int) -> int:
    """The generation seed of one (seed, step, process): a resumed run samples what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 10_007 + rank * 101) % (2**31 - 1)


# -- examples --------------------------------------------------------------------------------------------

def load_examples(run: TrainRun, cfg: TrainConfig, *, need_reference: bool = False) -> list[Example]:
    """The task's training examples (at most ``cfg.train_limit``); ``need_reference`` keeps those with a
    reference response and fails when none has one; ``--data`` for a subset that reads no file is refused."""
    run.task.check_data(run.subset, run.data_path)
    try:
        examples = run.task.examples(run.subset, split="train", limit=cfg.train_limit, seed=cfg.seed,
                                     path=run.data_path)
    except RlmError:
        raise
    except Exception as exc:
        raise RlmError(f"task {run.task.name!r} cannot load training data: {exc}") from exc
    sub = f" (subset {run.subset!r})" if run.subset else ""
    if not examples:
        raise RlmError(f"task {run.task.name!r}{sub} has no training data")
    if need_reference:
        examples = [e for e in examples if e.reference]
        if not examples:
            raise RlmError(f"task {run.task.name!r}{sub} has no reference responses to fine-tune on; "
                           f"use --trainer rft or an RL trainer")
    return list(examples)


# -- token batches ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class TokenBatch:
    """Prompts left-padded to width P, responses right-padded to width T: ``input_ids`` is (B, P+T) and the
    response token ``t`` of row ``b`` is ``input_ids[b, P+t]`` where ``response_mask[b, t]`` is 1."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    pad_id: int

    def tensors(self, rows: list[int] | None = None, device: Any = None) -> dict[str, Any]:
        """``input_ids``, ``attention_mask``, ``position_ids`` (B, P+T), ``response_mask`` (B, T) of ``rows``
        (default: all), and the widths ``P`` and ``T``."""
        import torch

        rows = list(range(len(self.prompt_ids))) if rows is None else rows
        P = max(1, max(len(self.prompt_ids[r]) for r in rows))
        T = max(1, max(len(self.response_ids[r]) for r in rows))
        ids = torch.full((len(rows), P + T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), P + T), dtype=torch.long)
        rmask = torch.zeros((len(rows), T), dtype=torch.float32)
        for i, r in enumerate(rows):
            p, c = self.prompt_ids[r], self.response_ids[r]
            if p:
                ids[i, P - len(p):P] = torch.tensor(p)
                attn[i, P - len(p):P] = 1
            if c:
                ids[i, P:P + len(c)] = torch.tensor(c)
                attn[i, P:P + len(c)] = 1
                rmask[i, :len(c)] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "response_mask": rmask,
               "P": P, "T": T}
        if device is not None:
            for k in ("input_ids", "attention_mask", "position_ids", "response_mask"):
                out[k] = out[k].to(device)
        return out

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_response(self) -> int:
        return max((len(c) for c in self.response_ids), default=0)


def micro_batches(rows: list[int], size: int) -> list[list[int]]:
    """``rows`` cut into consecutive micro-batches of at most ``size`` (gradient accumulation, no-grad passes)."""
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id when it has none."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], cfg: TrainConfig, max_response: int,
                 system: str | None = None) -> TokenBatch:
    """Chat-format each (user prompt, response) pair; the response ends with the eos token. Prompts keep
    their last ``cfg.max_prompt_tokens`` tokens, responses their first ``max_response``."""
    from rlm.core.eval.generation import chat_prompt

    prompts = [chat_prompt(tokenizer, p, system=system) for p, _ in pairs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    P, R = [], []
    for p, r in zip(p_ids, r_ids):
        p = list(p)[-cfg.max_prompt_tokens:]
        r = (list(r) + [eos])[:max_response]
        P.append(p)
        R.append(r)
    return TokenBatch(P, R, pad_token_id(tokenizer))
