"""PPO's critic: a value model (a copy of the start model's backbone with a zero-initialised value head
``Linear(hidden, 1)``; values are read at the state before each response token), its optimizer and schedule, and
its clipped value-loss update over one mini-batch.

The RL loop (:mod:`rlm.core.train.rl_engine`) builds a :class:`Critic` for a trainer with ``critic = True``; the
checkpoints save it as the extra module ``critic``. This module does not import torch at import time.
"""

from __future__ import annotations

from typing import Any

from rlm.core.train.algorithms import value_loss
from rlm.core.train.config import RLConfig
from rlm.core.train.data import TokenBatch
from rlm.core.train.forward import forward_response
from rlm.core.train.session import Session

CRITIC_NAME = "critic"


def build_value_model(model_path: str, dtype: Any) -> Any:
    """The value model on the architecture of ``model_path``: ``module(t) -> values (B, T)`` in float32 for
    the tensors ``t`` of a :class:`TokenBatch`."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    class ValueModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the LM head is dropped on purpose
            try:
                self.backbone = AutoModel.from_pretrained(model_path, dtype=dtype)
            finally:
                hf_logging.set_verbosity(level)
            self.value_head = torch.nn.Linear(self.backbone.config.hidden_size, 1, dtype=dtype)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

        def forward(self, t: dict[str, Any]) -> Any:
            h, _ = forward_response(self.backbone, t, hidden=True)
            return self.value_head(h).squeeze(-1).float()

    return ValueModel()


class Critic:
    """The critic of one session: the value model (restored from the checkpoint a run resumes from), prepared
    by accelerate with its own AdamW (``critic_lr``) and the session's schedule."""

    def __init__(self, sess: Session, cfg: RLConfig) -> None:
        self.sess, self.cfg = sess, cfg
        model = build_value_model(sess.model_path, sess.dtype)
        sess.load_extra_module(model, CRITIC_NAME)
        model.to(sess.device)
        model.train()
        self.model, self.optimizer, self.scheduler = sess.make_optimizer(model, cfg.critic_lr, CRITIC_NAME)
        self.begin_step()

    def __call__(self, t: dict[str, Any]) -> Any:
        """Values (B, T) of the tensors ``t`` of a token batch."""
        return self.model(t)

    def checkpoint_modules(self) -> dict[str, tuple[Any, Any, Any]]:
        """What the checkpoints save for the critic (``Session.run_steps``'s ``extra_modules``)."""
        return {CRITIC_NAME: (self.model, self.optimizer, self.scheduler)}

    def begin_step(self) -> None:
        """Reset the step's sums (:attr:`loss_sum`, :attr:`clip_sum`)."""
        self.loss_sum = 0.0  # value losses of the micro-batches of this step, this process
        self.clip_sum = 0.0  # their clip fractions weighted by valid tokens

    def update(self, batch: TokenBatch, old_values: Any, returns: Any, micro: list[list[int]],
               agg_kwargs: dict[str, Any], step: int) -> None:
        """One optimizer step on the clipped value loss over the micro-batches ``micro`` (rows of ``batch``;
        ``old_values`` and ``returns`` are (B, T) for the whole batch)."""
        sess, cfg = self.sess, self.cfg
        for j, rows in enumerate(micro):
            u = batch.tensors(rows, sess.device)
            T = u["T"]
            m = u["response_mask"]
            with sess.grad_sync(self.model, last=j == len(micro) - 1):
                with sess.autocast():
                    v = self.model(u)
                vl, vst = value_loss(v, old_values[rows, :T], returns[rows, :T], m, clip=cfg.value_clip,
                                     agg=cfg.loss_agg, **agg_kwargs)
                sess.backward(vl * sess.world)
            self.loss_sum += float(vl.detach())
            self.clip_sum += float(vst["vf_clip_frac"]) * float(m.sum())
        sess.check_finite(float(sess.reduce_sum(self.loss_sum)), step, "value loss")
        sess.optimizer_step(step, self.model, self.optimizer, self.scheduler, "value loss")
