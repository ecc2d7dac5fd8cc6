"""Supervised fine-tuning: token-mean NLL over the response tokens of (prompt, response) pairs, ``batch_size``
sequences per optimizer step split across processes, with gradient accumulation over ``micro_batch_size``.

Used by the ``sft`` trainer plugin (the task's reference responses) and by :mod:`rlm.core.train.rft` (the start
model's own verified samples). This module does not import torch at import time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from rlm.core.errors import RlmError
from rlm.core.train.algorithms import sft_loss
from rlm.core.train.config import SFTConfig, TrainRun
from rlm.core.train.data import TokenBatch, encode_pairs, load_examples, micro_batches, take
from rlm.core.train.forward import forward_response
from rlm.core.train.session import Session

Pairs = list[tuple[str, str]]
#: ``pairs_fn(session) -> (pairs, manifest fields)``: the (prompt, response) pairs to fine-tune on
PairsFn = Callable[[Session], tuple[Pairs, dict[str, Any]]]


def run_sft(trainer: Any, run: TrainRun, pairs_fn: PairsFn | None = None) -> Path:
    """Supervised fine-tuning of ``trainer.config`` (an :class:`SFTConfig`): token-mean NLL over the response
    tokens of (prompt, response) pairs. The pairs are the task's examples with their reference responses, or
    what ``pairs_fn(session)`` returns as ``(pairs, manifest_fields)`` (RFT samples them with the session's
    model). Returns the ``final/`` directory."""
    cfg: SFTConfig = trainer.config
    examples = None
    if pairs_fn is None:
        examples = load_examples(run, cfg, need_reference=True)
    sess = Session(trainer, run, cfg, cfg.steps or 1)
    if cfg.batch_size % sess.world:
        raise RlmError(f"batch_size {cfg.batch_size} is not divisible by the {sess.world} processes")
    if pairs_fn is None:
        pairs = [(e.prompt, e.reference or "") for e in examples]
        fields: dict[str, Any] = {}
    else:
        pairs, fields = pairs_fn(sess)
    n = len(pairs)
    sess.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * n / cfg.batch_size))
    sess.finish_manifest(train_examples=n, **fields)
    data = encode_pairs(sess.tokenizer, pairs, cfg, cfg.max_response_tokens, cfg.system_prompt)

    def position(step: int) -> dict[str, Any]:
        epoch, offset = divmod(step * cfg.batch_size, n)
        return {"epoch": epoch, "offset": offset, "examples_seen": step * cfg.batch_size}

    return sess.run_steps(lambda step: sft_step(sess, cfg, data, step), position)


def sft_step(sess: Session, cfg: SFTConfig, data: TokenBatch, step: int) -> dict[str, Any]:
    """One optimizer step on this process's share of the step's ``batch_size`` pairs of ``data``."""
    n = len(data)
    local = cfg.batch_size // sess.world
    idx = take(n, cfg.seed, (step - 1) * cfg.batch_size, cfg.batch_size)[sess.rank * local:(sess.rank + 1) * local]
    batch = TokenBatch([data.prompt_ids[i] for i in idx], [data.response_ids[i] for i in idx], data.pad_id)
    ntok = sess.reduce_sum(sum(len(r) for r in batch.response_ids))
    micro = micro_batches(list(range(len(batch))), cfg.micro_batch_size)
    loss_sum = ent_sum = 0.0
    for i, rows in enumerate(micro):
        t = batch.tensors(rows, sess.device)
        with sess.grad_sync(sess.model, last=i == len(micro) - 1):
            with sess.autocast():
                logp, ent = forward_response(sess.model, t, entropy=True)
                loss = sft_loss(logp.float(), t["response_mask"], num_tokens=ntok.float())
            sess.backward(loss * sess.world)
        loss_sum += float(loss.detach())
        ent_sum += float((ent * t["response_mask"]).sum())
    total_loss = float(sess.reduce_sum(loss_sum))
    sess.check_finite(total_loss, step)
    gnorm = sess.optimizer_step(step)
    return {"loss": total_loss, "entropy": float(sess.reduce_sum(ent_sum)) / max(float(ntok), 1.0),
            "grad_norm": gnorm, "_tokens": float(ntok), "epoch": (step * cfg.batch_size) / n}
