"""The RL loop shared by every RL trainer (:class:`rlm.core.train.rl.RLTrainer`): experience (sampling and
rewards from :mod:`rlm.core.train.rollout`, old and reference log-probs, the critic's values from
:mod:`rlm.core.train.critic`, the trainer's advantage estimator), ``ppo_epochs`` × ``mini_batches`` updates of the
trainer's ``policy_loss`` with the KL term of the config, critic updates, and the step's metrics.

:func:`rlm.core.train.rl.run_rl` builds an :class:`RLEngine`; this module reads the trainer only through its
members (``advantage_estimator()``, ``policy_loss``, ``critic``, ``config``, ``name``), so it does not import
:mod:`rlm.core.train.rl`. It does not import torch at import time.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from rlm.core.errors import RlmError
from rlm.core.train import algorithms
from rlm.core.train.config import RLConfig, TrainRun
from rlm.core.train.critic import Critic
from rlm.core.train.data import load_examples, micro_batches, pad_token_id
from rlm.core.train.forward import forward_response
from rlm.core.train.rollout import Experience, no_grad_pass, old_and_reference_logprobs, sample_rollout
from rlm.core.train.session import Session


@dataclasses.dataclass
class UpdateStats:
    """Sums of one step's policy updates on this process (reduced over processes for the metrics)."""

    pg_loss: float = 0.0
    kl: float = 0.0             # logged KL (k3), summed over valid tokens
    clip_frac: float = 0.0      # weighted by valid tokens
    dual_clip_frac: float = 0.0  # weighted by valid tokens
    entropy: float = 0.0        # summed over valid tokens
    tok: float = 0.0            # valid tokens seen by the policy updates
    grad_norms: list[float] = dataclasses.field(default_factory=list)


class RLEngine:
    """The RL loop of one run of ``trainer`` (an ``RLTrainer``): a session, the filtered prompts, the critic if
    the trainer has one, and :meth:`step` (experience, updates, metrics)."""

    def __init__(self, trainer: Any, run: TrainRun) -> None:
        cfg: RLConfig = trainer.config
        self.trainer, self.cfg, self.run = trainer, cfg, run
        self.estimator = trainer.advantage_estimator()
        examples = load_examples(run, cfg)
        self.sess = Session(trainer, run, cfg, cfg.steps or 1, updates_per_step=cfg.ppo_epochs * cfg.mini_batches,
                            extra_manifest={"train_examples": len(examples)})
        self._check_batch_split()
        self.critic = Critic(self.sess, cfg) if trainer.critic else None
        self.examples, self.prompts = self._usable_prompts(examples)
        if cfg.disable_dropout:
            self._disable_dropout()
        self.pad_id = pad_token_id(self.sess.tokenizer)
        from rlm.core.train.rollout_backend import RolloutBackend

        self.rollouts = RolloutBackend(self.sess, cfg)
        self.rollout_stats: dict[str, float] = {}

    # -- setup --------------------------------------------------------------------------------------------
    def _check_batch_split(self) -> None:
        cfg, world = self.cfg, self.sess.world
        if cfg.prompts_per_step % world:
            raise RlmError(f"prompts_per_step {cfg.prompts_per_step} is not divisible by the {world} processes")
        local_prompts = cfg.prompts_per_step // world
        if local_prompts % cfg.mini_batches:
            raise RlmError(f"mini_batches {cfg.mini_batches} must divide the prompts per process "
                           f"({local_prompts})")

    def _usable_prompts(self, examples: list[Any]) -> tuple[list[Any], list[str]]:
        """The examples whose chat-formatted prompt fits ``max_prompt_tokens``, and those prompts."""
        from rlm.core.eval.generation import chat_prompt

        cfg, s = self.cfg, self.sess
        prompts = [chat_prompt(s.tokenizer, e.prompt, system=cfg.system_prompt) for e in examples]
        # like verl's filter_overlong_prompts: a prompt is never cut (its log-probs would not match sampling)
        lengths = [len(ids) for ids in s.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        keep = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_tokens]
        if not keep:
            raise RlmError(f"every training prompt of task {self.run.task.name!r} is longer than "
                           f"max_prompt_tokens ({cfg.max_prompt_tokens})")
        if len(keep) < len(prompts) and s.is_main:
            print(f"warning: {len(prompts) - len(keep)} prompts longer than max_prompt_tokens "
                  f"({cfg.max_prompt_tokens}) are left out", file=sys.stderr)
        s.finish_manifest(train_examples=len(keep), prompts_too_long=len(prompts) - len(keep))
        return [examples[i] for i in keep], [prompts[i] for i in keep]

    def _disable_dropout(self) -> None:
        import torch

        for module in (self.sess.raw_model, self.critic.model if self.critic is not None else None):
            for m in module.modules() if module is not None else []:
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0

    # -- experience ---------------------------------------------------------------------------------------
    def _whiten_stats(self, x: Any, mask: Any) -> tuple[Any, Any, Any]:
        """(count, mean, sum of squared deviations) of ``x`` over the valid tokens of every process, in float64
        and two passes (batch whitening without cancellation)."""
        import torch

        s = self.sess
        m = mask.to(torch.float64)
        x64 = x.to(torch.float64)
        n = s.reduce_sum(m.sum())
        mean = s.reduce_sum((x64 * m).sum()) / n.clamp(min=1)
        return n, mean, s.reduce_sum((((x64 - mean) * m) ** 2).sum())

    def make_experience(self, step: int) -> Experience:
        """Sample and score the step's completions, run the no-grad passes and compute the advantages."""
        cfg, s = self.cfg, self.sess
        ro = sample_rollout(s, cfg, self.run.task, self.examples, self.prompts, self.pad_id, step,
                            backend=self.rollouts)
        old_logp, ref_logp = old_and_reference_logprobs(s, cfg, ro.batch)
        self.rollout_stats = self._rollout_diagnostics(ro)
        values = no_grad_pass(s, ro.batch, cfg.micro_batch_size, self.critic) if self.critic is not None else None
        kl = None
        if cfg.kl_in == "reward" and cfg.kl_coef > 0:
            kl = algorithms.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * ro.mask
        adv, ret = self.estimator(
            rewards=ro.rewards, mask=ro.mask, index=ro.index, kl=kl,
            beta=cfg.kl_coef if cfg.kl_in == "reward" else 0.0, gamma=cfg.gamma, lam=cfg.lam, values=values,
            eps=cfg.adv_eps, whiten_stats=self._whiten_stats if s.world > 1 else None,
            single_sample_groups=cfg.single_sample_groups, baseline_mode=cfg.baseline_mode)
        if cfg.positive_only:
            adv = algorithms.positive_only(adv, ro.rewards, cfg.correct_threshold, cfg.positive_mode)
        return Experience(**vars(ro), advantages=adv.detach(), returns=ret.detach(), old_logp=old_logp,
                          ref_logp=ref_logp, values=values, kl=kl)

    def _rollout_diagnostics(self, ro: Any) -> dict[str, float]:
        """An external rollout engine's log-probs against the trainer's own at temperature 1 (none for hf)."""
        if not self.rollouts.external:
            return {}
        s = self.sess
        logp = no_grad_pass(s, ro.batch, self.cfg.micro_batch_size,
                            lambda u: forward_response(s.model, u, temperature=1.0)[0])
        return self.rollouts.diagnostics(logp, ro.mask)

    # -- updates ------------------------------------------------------------------------------------------
    def _mini_batches(self, exp: Experience, step: int) -> Iterator[list[int]]:
        """The rows of each mini-batch of each epoch. Whole groups are shuffled, so a mini-batch holds complete
        groups; the order is the same on every process."""
        import torch

        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        groups = sorted(set(exp.index))
        for _epoch in range(cfg.ppo_epochs):
            order = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()] \
                if cfg.mini_batches > 1 else groups
            per_mb = len(order) // cfg.mini_batches
            for mb in range(cfg.mini_batches):
                gset = set(order[mb * per_mb:(mb + 1) * per_mb])
                yield [i for i in range(len(exp.batch)) if exp.index[i] in gset]

    def update(self, exp: Experience, step: int, critic_only: bool) -> UpdateStats:
        """``ppo_epochs`` × ``mini_batches`` policy updates (none while ``critic_only``) and critic updates."""
        cfg, s = self.cfg, self.sess
        stats = UpdateStats()
        if self.critic is not None:
            self.critic.begin_step()
        norm_len = cfg.norm_len or cfg.max_new_tokens
        for rows in self._mini_batches(exp, step):
            mb_tok = s.reduce_sum(exp.mask[rows].sum())
            mb_seq = s.reduce_sum(len(rows))
            agg_kw = dict(num_tokens=mb_tok.float(), num_seqs=mb_seq.float(), norm_len=norm_len,
                          sum_norm_by_seqs=cfg.sum_norm_by_seqs)
            micro = micro_batches(rows, cfg.micro_batch_size)
            if not critic_only:
                stats.grad_norms.append(self._policy_update(exp, micro, agg_kw, stats, step))
            if self.critic is not None:
                self.critic.update(exp.batch, exp.values, exp.returns, micro, agg_kw, step)
        return stats

    def _policy_update(self, exp: Experience, micro: list[list[int]], agg_kw: dict[str, Any], stats: UpdateStats,
                       step: int) -> float:
        """One optimizer step of the policy over the micro-batches of a mini-batch; returns the grad norm."""
        cfg, s = self.cfg, self.sess
        for j, rows in enumerate(micro):
            u = exp.batch.tensors(rows, s.device)
            T = u["T"]
            m = u["response_mask"]
            with s.grad_sync(s.model, last=j == len(micro) - 1), s.autocast():
                logp, ent = forward_response(s.model, u, temperature=cfg.temperature,
                                             entropy="grad" if cfg.entropy_coef > 0 else True)
                logp = logp.float()
                old = exp.old_logp[rows, :T] if exp.old_logp is not None else logp.detach()
                pl, st = self.trainer.policy_loss(logp, old, exp.advantages[rows, :T], m, **agg_kw)
                loss = pl
                if cfg.entropy_coef > 0:  # verl: pg_loss - entropy_coeff * agg(entropy)
                    loss = loss - cfg.entropy_coef * algorithms.aggregate(ent.float(), m, cfg.loss_agg, **agg_kw)
                if exp.ref_logp is not None:
                    penalty = self._kl_penalty(logp, exp.ref_logp[rows, :T], m, agg_kw, stats)
                    if penalty is not None:
                        loss = loss + penalty
                s.backward(loss * s.world)
            ntok_m = float(m.sum())
            stats.pg_loss += float(pl.detach())
            stats.clip_frac += float(st.get("clip_frac", 0.0)) * ntok_m
            stats.dual_clip_frac += float(st.get("dual_clip_frac", 0.0)) * ntok_m
            stats.entropy += float((ent.detach() * m).sum())
            stats.tok += ntok_m
        s.check_finite(float(s.reduce_sum(stats.pg_loss)), step)
        grad_norm = s.optimizer_step(step)
        self.rollouts.push()  # an external rollout engine gets the updated weights (checksum-checked)
        return grad_norm

    def _kl_penalty(self, logp: Any, ref_logp: Any, mask: Any, agg_kw: dict[str, Any], stats: UpdateStats) -> Any:
        """The KL term of the loss (``kl_in == "loss"``; else None); adds the logged KL to ``stats``: always k3
        (non-negative, low variance), comparable across trainers."""
        cfg = self.cfg
        penalty = None
        if cfg.kl_in == "loss" and cfg.kl_coef > 0:
            kl_t = algorithms.kl_estimate(logp, ref_logp, cfg.kl_estimator)
            penalty = cfg.kl_coef * algorithms.aggregate(kl_t, mask, cfg.loss_agg, **agg_kw)
        stats.kl += float((algorithms.kl_estimate(logp.detach(), ref_logp, "k3") * mask).sum())
        return penalty

    # -- one step ---------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, Any]:
        """One RL step: experience, updates; returns the step's metrics."""
        critic_only = self.critic is not None and step <= self.cfg.critic_warmup_steps
        t0 = time.perf_counter()
        exp = self.make_experience(step)
        t1 = time.perf_counter()
        n_tok = float(self.sess.reduce_sum(exp.mask.sum()))
        stats = self.update(exp, step, critic_only)
        t2 = time.perf_counter()
        out = self.step_metrics(exp, stats, n_tok, critic_only)
        out.update(gen_time=exp.gen_time, rollout_time=t1 - t0, update_time=t2 - t1, **self.rollout_stats)
        if self.critic is not None:
            updates = self.cfg.ppo_epochs * self.cfg.mini_batches
            out["vf_loss"] = float(self.sess.reduce_sum(self.critic.loss_sum)) / updates
            out["vf_clip_frac"] = float(self.sess.reduce_sum(self.critic.clip_sum)) / max(n_tok * updates, 1.0)
        return out

    def _gathered_rewards(self, exp: Experience) -> tuple[Any, list[int]]:
        """Rewards (float64) and group ids of every process's sequences."""
        import torch

        parts = [(exp.rewards.cpu().tolist(), exp.index)]
        if self.sess.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)
        rewards_all = torch.tensor([r for rs, _ in parts for r in rs], dtype=torch.float64)
        return rewards_all, [i for _, ix in parts for i in ix]

    def step_metrics(self, exp: Experience, stats: UpdateStats, n_tok: float, critic_only: bool) -> dict[str, Any]:
        """The step's metrics over every process (``n_tok``: valid response tokens of all processes)."""
        import torch

        cfg, s = self.cfg, self.sess
        updates = cfg.ppo_epochs * cfg.mini_batches
        tok_all = max(float(s.reduce_sum(stats.tok)), 1.0)
        adv_valid = exp.advantages[exp.mask > 0]
        rewards_all, index_all = self._gathered_rewards(exp)
        policy_ran = not critic_only
        return {
            "reward_mean": float(rewards_all.mean()),
            "accuracy": float((rewards_all >= cfg.correct_threshold).double().mean()),
            "adv_abs_mean": float(s.reduce_sum(adv_valid.abs().sum())) / max(n_tok, 1.0),
            "adv_abs_mean_seq": self._per_sample_abs_advantage(exp),
            "adv_min": -float(self._reduce_max(-adv_valid.min() if adv_valid.numel() else torch.tensor(0.0))),
            "zero_std_frac": algorithms.zero_std_fraction(rewards_all, index_all) if cfg.group_size > 1 else None,
            "kl": float(s.reduce_sum(stats.kl)) / tok_all if exp.ref_logp is not None and policy_ran else None,
            "clip_frac": float(s.reduce_sum(stats.clip_frac)) / tok_all if policy_ran else None,
            "dual_clip_frac": float(s.reduce_sum(stats.dual_clip_frac)) / tok_all if policy_ran else None,
            "entropy": float(s.reduce_sum(stats.entropy)) / tok_all if policy_ran else None,
            "grad_norm": (sum(stats.grad_norms) / len(stats.grad_norms)) if stats.grad_norms else None,
            "loss": float(s.reduce_sum(stats.pg_loss)) / updates if policy_ran else None,
            "response_length": n_tok / max(float(s.reduce_sum(len(exp.batch))), 1.0),
            "_tokens": n_tok + float(s.reduce_sum(sum(len(p) for p in exp.batch.prompt_ids))),
        }

    def _per_sample_abs_advantage(self, exp: Experience) -> float:
        """E_i |A_i| over the sampled sequences of every process (Theorem 2's quantity), where A_i is the
        token-mean advantage of sequence i (GRPO's broadcast advantage itself); sequences without a response
        token are left out."""
        import torch

        m = exp.mask.to(torch.float64)
        n = m.sum(-1)
        per_seq = (exp.advantages.to(torch.float64) * m).sum(-1) / n.clamp(min=1)
        has = n > 0
        total = float(self.sess.reduce_sum(per_seq[has].abs().sum()))
        return total / max(float(self.sess.reduce_sum(has.sum())), 1.0)

    def _reduce_max(self, x: Any) -> float:
        s = self.sess
        if s.world == 1:
            return float(x)
        from accelerate.utils import gather_object

        return float(max(gather_object([float(x)])))

    def position(self, step: int) -> dict[str, Any]:
        """The data position saved with a checkpoint after ``step``."""
        n = len(self.examples)
        epoch, offset = divmod(step * self.cfg.prompts_per_step, n)
        return {"epoch": epoch, "offset": offset, "prompts_seen": step * self.cfg.prompts_per_step}

    def train(self) -> Path:
        extra = self.critic.checkpoint_modules() if self.critic is not None else {}
        return self.sess.run_steps(self.step, self.position, extra)
