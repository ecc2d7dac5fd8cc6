"""The RL trainer contract (:class:`RLTrainer`) and :func:`run_rl`, which runs the RL loop every RL trainer
shares (:mod:`rlm.core.train.rl_engine`).

One RL step: take ``prompts_per_step`` prompts (a seeded permutation of the task's training examples, split
across processes), sample ``group_size`` completions of each and score them with the task's ``reward``
(:mod:`rlm.core.train.rollout`), recompute the old (when more than one update uses the batch, or the KL sits in
the reward) and reference log-probs, read the critic's values (a trainer with ``critic = True``,
:mod:`rlm.core.train.critic`), compute advantages with the trainer's chosen estimator, then run ``ppo_epochs`` ×
``mini_batches`` updates of the trainer's ``policy_loss`` (with gradient accumulation over ``micro_batch_size``
sequences) and, with a critic, as many critic updates.

The built-in RL trainers (``grpo``, ``rl_pos``, ``reinforce_pp``, ``ppo``) are declarations on
:class:`RLTrainer`; a third-party one subclasses it the same way. This module does not import torch at import
time, nor the engines (the trainer plugins import it when ``rlm --help`` loads them).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from rlm.core.contracts import PluginConfig, Trainer
from rlm.core.errors import ConfigError
from rlm.core.train import algorithms
from rlm.core.train.config import RLConfig, TrainRun

#: an advantage estimator: ``fn(*, rewards, mask, index, kl, beta, gamma, lam, values, eps, whiten_stats,
#: single_sample_groups, baseline_mode, **_) -> (advantages, returns)``, see :mod:`rlm.core.train.algorithms`
AdvantageFn = Callable[..., tuple[Any, Any]]


class RLTrainer(Trainer):
    """Base of the RL trainers: declare the advantage estimators on offer, whether a critic is trained, and
    optionally the policy loss; :meth:`train` runs the shared RL loop (:func:`run_rl`).

    The loop calls ``self.advantages[self.config.advantage]`` with every input (an estimator takes those it
    uses), applies ``positive_only`` from the config, and calls :meth:`policy_loss` on each micro-batch; the KL
    term (``kl_in``, ``kl_coef``, ``kl_estimator``) is added by the loop. A subclass sets ``name`` and, to change
    defaults, a ``Config`` derived from :class:`RLConfig` (``advantage`` names the default estimator)."""

    Config: ClassVar[type[PluginConfig]] = RLConfig
    #: the advantage estimators this trainer offers, name → pure function (e.g.
    #: :func:`rlm.core.train.algorithms.grpo_advantage`); ``config.advantage`` picks one. An estimator marked
    #: with :func:`rlm.core.train.algorithms.needs_values` needs ``critic = True``.
    advantages: ClassVar[Mapping[str, AdvantageFn]] = {}
    #: build, train and checkpoint a critic (a value model, ``critic_lr``, ``value_clip``,
    #: ``critic_warmup_steps``) and pass its values to the estimator as ``values`` (PPO)
    critic: ClassVar[bool] = False

    def __init__(self, config: PluginConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.advantage_estimator()  # refuse an unusable estimator at config time

    def advantage_estimator(self) -> AdvantageFn:
        """The estimator ``config.advantage`` names. Raises :class:`ConfigError` naming the field and this
        trainer, with the closest names and the names on offer, for an unknown name or an estimator that needs
        the critic's values on a trainer without one."""
        chosen, trainer = self.config.advantage, self.name or type(self).__name__
        offered = ", ".join(self.advantages) or "none"
        if chosen not in self.advantages:
            close = difflib.get_close_matches(chosen, list(self.advantages), n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"advantage: unknown advantage estimator {chosen!r} for trainer {trainer!r}{hint} "
                              f"(it offers: {offered})")
        estimator = self.advantages[chosen]
        if algorithms.reads_values(estimator) and not self.critic:
            raise ConfigError(f"advantage: estimator {chosen!r} needs a critic's values and trainer {trainer!r} "
                              f"has none (critic = False; it offers: {offered})")
        return estimator

    def policy_loss(self, logp: Any, old_logp: Any, advantages: Any, mask: Any,
                    **agg_kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """The loss of one micro-batch, aggregated, and its statistics: ``logp`` (B, T) under the current
        policy (with gradient), ``old_logp`` at sampling time, ``advantages`` and ``mask`` (B, T); ``agg_kwargs``
        hold the mini-batch's ``num_tokens``, ``num_seqs`` and ``norm_len`` for
        :func:`rlm.core.train.algorithms.aggregate`. ``stats["clip_frac"]`` (share of valid tokens clipped) is
        logged when present. Default: PPO clip with dual clip (``clip_low``, ``clip_high``, ``dual_clip``,
        ``loss_agg``), :func:`rlm.core.train.algorithms.policy_loss`."""
        cfg = self.config
        return algorithms.policy_loss(logp, old_logp, advantages, mask, clip_low=cfg.clip_low,
                                      clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.loss_agg,
                                      **agg_kwargs)

    def train(self, run: TrainRun) -> Path:
        return run_rl(self, run)


def run_rl(trainer: RLTrainer, run: TrainRun) -> Path:
    """Train ``trainer`` (an :class:`RLTrainer`) on ``run`` with the RL loop and return the ``final/``
    directory. The engine (:mod:`rlm.core.train.rl_engine`) is imported here, so that loading a trainer plugin
    does not load the engines."""
    from rlm.core.train.rl_engine import RLEngine

    return RLEngine(trainer, run).train()
