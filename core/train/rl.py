"""Experience for the RL trainers and the RL training loop; RFT's sample-and-filter step.

One RL step: take ``prompts_per_step`` prompts (a seeded permutation of the task's training examples, split
across processes), sample ``group_size`` completions of each with :func:`rlm.core.eval.generation.generate`, score
them with the task's ``reward``, recompute the old (when more than one update uses the batch, or the KL sits
in the reward) and reference log-probs, read the critic's values (PPO), compute advantages with the registered
estimator of :mod:`rlm.core.train.algorithms`, then run ``ppo_epochs`` × ``mini_batches`` clipped policy updates (with
gradient accumulation over ``micro_batch_size`` sequences) and, for PPO, the same number of critic updates.

Generation goes through :mod:`rlm.core.eval.generation` (an HF backend now; a vLLM backend implements the same
interface). Sampling seeds are functions of (seed, step, process), so a resumed run samples exactly what an
uninterrupted one would.

This module does not import torch at import time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rlm.core.contracts import Example, Task
from rlm.core.errors import RlmError
from rlm.core.train.session import (
    Session,
    SFTConfig,
    TokenBatch,
    TrainConfig,
    TrainRun,
    forward_response,
    load_examples,
    micro_batches,
    pad_token_id,
    run_sft,
    take,
)


class RLConfig(TrainConfig):
    """Fields of every RL trainer. Research defaults (verl GRPO / the paper: lr 1e-6, 512 prompts × G = 8,
    KL 1e-3 with k3 in the loss, temperature 1, top-p 1, ε = 0.2, one epoch per batch) scaled for a tiny CPU
    model: a larger lr and fewer prompts per step."""

    steps: int | None = Field(100, ge=1)
    lr: float = Field(1e-5, gt=0, description="paper: 1e-6")
    prompts_per_step: int = Field(8, ge=1, description="prompts per step, all processes (paper: 512)")
    group_size: int = Field(8, ge=1, description="completions per prompt (G)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    generation_batch_size: int = Field(64, ge=1, description="sequences per generate() call")
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"] = "grpo"
    adv_eps: float = Field(1e-6, gt=0, description="GRPO: A = (r - mean) / (std + adv_eps)")
    positive_only: bool = Field(False, description="RL-Pos: set every negative advantage to 0")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda")
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(3.0, gt=1, description="dual-clip constant c for A < 0 (None: off)")
    kl_coef: float = Field(1e-3, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["loss", "reward", "none"] = Field("loss", description="where the KL penalty goes")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    norm_len: int | None = Field(None, ge=1, description="seq-mean-token-sum-norm divisor (None: max_new_tokens)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    mini_batches: int = Field(1, ge=1, description="optimizer updates per pass (1: on-policy, ratio = 1)")
    correct_threshold: float = Field(1.0, description="a completion counts as correct (accuracy) at this reward")
    critic_lr: float = Field(1e-4, gt=0, description="PPO critic (verl: 1e-5)")
    value_clip: float = Field(0.5, gt=0)
    critic_warmup_steps: int = Field(0, ge=0, description="PPO: steps that train only the critic")
    disable_dropout: bool = Field(True, description="dropout off in policy and critic (old log-probs stay exact)")


class RFTConfig(SFTConfig):
    """Rejection-sampling fine-tuning: sample k responses per prompt from the start model, keep the verified-
    correct ones (deduplicated), then SFT on them."""

    samples_per_prompt: int = Field(8, ge=1, description="k")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    generation_batch_size: int = Field(64, ge=1)
    min_reward: float = Field(1.0, description="keep samples whose reward is at least this")
    dedupe: bool = True
    max_per_prompt: int | None = Field(None, ge=1, description="keep at most this many samples per prompt")


def sample_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank * 101) % (2**31 - 1)


# -- experience ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Experience:
    """A batch of sampled completions with everything the update needs; tensors are (B, T) unless noted."""

    batch: TokenBatch
    examples: list[Example]
    texts: list[str]
    index: list[int]            # group (prompt) id of each sequence, global across processes
    rewards: Any                # (B,)
    mask: Any                   # response mask
    advantages: Any
    returns: Any
    old_logp: Any | None
    ref_logp: Any | None
    values: Any | None
    kl: Any | None              # the KL estimate at sampling time (for kl_in == "reward")


def select_correct(examples: list[Example], completions: list[list[str]], task: Task, min_reward: float = 1.0,
                   dedupe: bool = True, max_per_prompt: int | None = None) -> list[tuple[Example, str]]:
    """RFT's filter: for each example, its completions whose reward is at least ``min_reward``, duplicates
    (same text after stripping surrounding whitespace) removed, in sampling order."""
    kept: list[tuple[Example, str]] = []
    for ex, comps in zip(examples, completions):
        seen: set[str] = set()
        n = 0
        for text in comps:
            key = text.strip()
            if dedupe and key in seen:
                continue
            r = float(task.reward(ex, text))
            if r != r or r < min_reward:  # NaN never passes
                continue
            seen.add(key)
            kept.append((ex, text))
            n += 1
            if max_per_prompt is not None and n >= max_per_prompt:
                break
    return kept


class ValueModel:
    """PPO's critic: the policy's architecture (a copy of the start model's backbone) with a value head
    ``Linear(hidden, 1)`` (zero-initialised); values are read at the state before each response token."""

    @staticmethod
    def build(model_path: str, dtype: Any) -> Any:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        class _Critic(torch.nn.Module):
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

        return _Critic()


class RLEngine:
    """The RL loop shared by grpo, ppo, reinforce_pp and rl_pos (they differ only in config)."""

    def __init__(self, trainer: Any, run: TrainRun) -> None:
        cfg: RLConfig = trainer.config
        self.cfg = cfg
        self.run = run
        self.examples = load_examples(run, cfg)
        self.use_critic = cfg.advantage == "gae"
        self.sess = Session(trainer, run, cfg, cfg.steps or 1, updates_per_step=cfg.ppo_epochs * cfg.mini_batches,
                            extra_manifest={"train_examples": len(self.examples)})
        s = self.sess
        if cfg.prompts_per_step % s.world:
            raise RlmError(f"prompts_per_step {cfg.prompts_per_step} is not divisible by the {s.world} processes")
        self.local_prompts = cfg.prompts_per_step // s.world
        if self.local_prompts % cfg.mini_batches:
            raise RlmError(f"mini_batches {cfg.mini_batches} must divide the prompts per process "
                           f"({self.local_prompts})")
        self.extra: dict[str, tuple[Any, Any, Any]] = {}
        self.timing: dict[str, float] = {}
        if self.use_critic:
            critic = ValueModel.build(s.model_path, s.dtype)
            s.load_extra_module(critic, "critic")
            critic.to(s.device)
            critic.train()
            self.critic, self.critic_opt, self.critic_sched = s.make_optimizer(critic, cfg.critic_lr, "critic")
            self.extra["critic"] = (self.critic, self.critic_opt, self.critic_sched)
        from rlm.core.eval.generation import chat_prompt

        prompts = [chat_prompt(s.tokenizer, e.prompt, system=cfg.system_prompt) for e in self.examples]
        # like verl's filter_overlong_prompts: a prompt is never cut (its log-probs would not match sampling)
        lengths = [len(ids) for ids in s.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        keep = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_tokens]
        if not keep:
            raise RlmError(f"every training prompt of task {run.task.name!r} is longer than max_prompt_tokens "
                           f"({cfg.max_prompt_tokens})")
        if len(keep) < len(prompts) and s.is_main:
            print(f"warning: {len(prompts) - len(keep)} prompts longer than max_prompt_tokens "
                  f"({cfg.max_prompt_tokens}) are left out", file=sys.stderr)
        self.examples = [self.examples[i] for i in keep]
        self.prompts = [prompts[i] for i in keep]
        s.finish_manifest(train_examples=len(self.examples), prompts_too_long=len(prompts) - len(keep))
        if cfg.disable_dropout:
            import torch

            for module in (s.raw_model, getattr(self, "critic", None)):
                for m in module.modules() if module is not None else []:
                    if isinstance(m, torch.nn.Dropout):
                        m.p = 0.0
        self.pad_id = pad_token_id(s.tokenizer)

    # -- whitening over all processes --------------------------------------------------------------------
    def _whiten_stats(self, x: Any, mask: Any) -> tuple[Any, Any, Any]:
        m = mask.to(x.dtype)
        s = self.sess
        return (s.reduce_sum((x * m).sum()).to(x.dtype), s.reduce_sum((x * x * m).sum()).to(x.dtype),
                s.reduce_sum(m.sum()).to(x.dtype))

    def make_experience(self, step: int) -> Experience:
        import torch

        from rlm.core.eval.generation import generate
        from rlm.core.train import algorithms as rl

        cfg, s = self.cfg, self.sess
        global_idx = take(len(self.examples), cfg.seed, (step - 1) * cfg.prompts_per_step, cfg.prompts_per_step)
        start = s.rank * self.local_prompts
        mine = global_idx[start:start + self.local_prompts]
        prompts = [self.prompts[i] for i in mine]
        t0 = time.perf_counter()
        gens = generate(s.policy, s.tokenizer, prompts, n=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size,
                        seed=sample_seed(cfg.seed, step, s.rank))
        self.timing["gen_time"] = time.perf_counter() - t0
        examples = [self.examples[mine[g.prompt_index]] for g in gens]
        texts = [g.text for g in gens]
        rewards = []
        for ex, text in zip(examples, texts):
            try:
                r = float(self.run.task.reward(ex, text))
            except Exception as exc:
                raise RlmError(f"task {self.run.task.name!r} failed to score a completion: {exc}") from exc
            rewards.append(r)
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=s.device)
        index = [start + g.prompt_index for g in gens]
        batch = TokenBatch([g.prompt_ids for g in gens], [g.completion_ids for g in gens], self.pad_id)
        t = batch.tensors(device=s.device)
        mask = t["response_mask"]
        need_old = cfg.ppo_epochs * cfg.mini_batches > 1 or (cfg.kl_in == "reward" and cfg.kl_coef > 0)
        need_ref = cfg.kl_in != "none"
        old_logp = ref_logp = values = kl = None
        with torch.no_grad():
            chunks = micro_batches(list(range(len(batch))), cfg.micro_batch_size)
            if need_old:
                old_logp = self._cat_chunks(batch, chunks, lambda u: forward_response(s.model, u, temperature=cfg.temperature)[0], t["T"])
            if need_ref:
                ref_logp = self._cat_chunks(batch, chunks, lambda u: s.ref_logprobs(u, cfg.temperature), t["T"])
            if self.use_critic:
                values = self._cat_chunks(batch, chunks, lambda u: self.critic(u), t["T"])
        if cfg.kl_in == "reward" and cfg.kl_coef > 0:
            kl = rl.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) * mask
        adv, ret = rl.compute_advantages(
            cfg.advantage, rewards=rewards_t, mask=mask, index=index, kl=kl,
            beta=cfg.kl_coef if cfg.kl_in == "reward" else 0.0, gamma=cfg.gamma, lam=cfg.lam, values=values,
            eps=cfg.adv_eps, whiten_stats=self._whiten_stats if s.world > 1 else None)
        if cfg.positive_only:
            adv = rl.positive_only(adv)
        return Experience(batch, examples, texts, index, rewards_t, mask, adv.detach(), ret.detach(), old_logp,
                          ref_logp, values, kl)

    def _cat_chunks(self, batch: TokenBatch, chunks: list[list[int]], fn: Any, T: int) -> Any:
        import torch

        parts = []
        for rows in chunks:
            out = fn(batch.tensors(rows, self.sess.device))
            parts.append(torch.nn.functional.pad(out.float(), (0, T - out.shape[-1])))
        return torch.cat(parts, 0)

    # -- one step ---------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, Any]:
        import torch

        from rlm.core.train import algorithms as rl

        cfg, s = self.cfg, self.sess
        self.timing = {}
        t0 = time.perf_counter()
        exp = self.make_experience(step)
        t1 = time.perf_counter()
        B = len(exp.batch)
        mask = exp.mask
        n_tok = float(s.reduce_sum(mask.sum()))
        stats = {k: 0.0 for k in ("pg_loss", "kl", "clip_frac", "entropy", "vf_loss", "vf_clip_frac", "tok")}
        grad_norms: list[float] = []
        critic_only = self.use_critic and step <= cfg.critic_warmup_steps
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        norm_len = cfg.norm_len or cfg.max_new_tokens
        groups = sorted(set(exp.index))
        for epoch in range(cfg.ppo_epochs):
            # shuffle whole groups so a mini-batch holds complete groups; the same order on every process
            order = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()] \
                if cfg.mini_batches > 1 else groups
            per_mb = len(order) // cfg.mini_batches
            for mb in range(cfg.mini_batches):
                gset = set(order[mb * per_mb:(mb + 1) * per_mb])
                rows = [i for i in range(B) if exp.index[i] in gset]
                mb_tok = s.reduce_sum(mask[rows].sum())
                mb_seq = s.reduce_sum(len(rows))
                agg_kw = dict(num_tokens=mb_tok.float(), num_seqs=mb_seq.float(), norm_len=norm_len)
                micro = micro_batches(rows, cfg.micro_batch_size)
                if not critic_only:
                    for j, mrows in enumerate(micro):
                        u = exp.batch.tensors(mrows, s.device)
                        T = u["T"]
                        m = u["response_mask"]
                        with s.grad_sync(s.model, last=j == len(micro) - 1):
                            logp, ent = forward_response(s.model, u, temperature=cfg.temperature, entropy=True)
                            old = exp.old_logp[mrows, :T] if exp.old_logp is not None else logp.detach()
                            adv = exp.advantages[mrows, :T]
                            pl, st = rl.policy_loss(logp, old, adv, m, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                                    dual_clip=cfg.dual_clip, agg=cfg.loss_agg, **agg_kw)
                            loss = pl
                            if exp.ref_logp is not None:
                                ref = exp.ref_logp[mrows, :T]
                                if cfg.kl_in == "loss" and cfg.kl_coef > 0:
                                    kl_t = rl.kl_estimate(logp, ref, cfg.kl_estimator)
                                    loss = loss + cfg.kl_coef * rl.aggregate(kl_t, m, cfg.loss_agg, **agg_kw)
                                # logged KL: always k3 (non-negative, low variance), comparable across trainers
                                k3 = rl.kl_estimate(logp.detach(), ref, "k3")
                                stats["kl"] += float((k3 * m).sum())
                            s.acc.backward(loss * s.world)
                        ntok_m = float(m.sum())
                        stats["pg_loss"] += float(pl.detach())
                        stats["clip_frac"] += float(st["clip_frac"]) * ntok_m
                        stats["entropy"] += float((ent * m).sum())
                        stats["tok"] += ntok_m
                    s.check_finite(float(s.reduce_sum(stats["pg_loss"])), step)
                    grad_norms.append(s.optimizer_step(step))
                if self.use_critic:
                    for j, mrows in enumerate(micro):
                        u = exp.batch.tensors(mrows, s.device)
                        T = u["T"]
                        m = u["response_mask"]
                        with s.grad_sync(self.critic, last=j == len(micro) - 1):
                            v = self.critic(u)
                            vl, vst = rl.value_loss(v, exp.values[mrows, :T], exp.returns[mrows, :T], m,
                                                    clip=cfg.value_clip, agg=cfg.loss_agg, **agg_kw)
                            s.acc.backward(vl * s.world)
                        stats["vf_loss"] += float(vl.detach())
                        stats["vf_clip_frac"] += float(vst["vf_clip_frac"]) * float(m.sum())
                    s.check_finite(float(s.reduce_sum(stats["vf_loss"])), step, "value loss")
                    s.optimizer_step(step, self.critic, self.critic_opt, self.critic_sched, "value loss")
        t2 = time.perf_counter()
        updates = cfg.ppo_epochs * cfg.mini_batches
        tok_all = max(float(s.reduce_sum(stats["tok"])), 1.0)
        adv_valid = exp.advantages[mask > 0]
        parts = [(exp.rewards.cpu().tolist(), exp.index)]
        if s.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)
        rewards_all = torch.tensor([r for rs, _ in parts for r in rs], dtype=torch.float64)
        index_all = [i for _, ix in parts for i in ix]
        out = {
            "reward_mean": float(rewards_all.mean()),
            "accuracy": float((rewards_all >= cfg.correct_threshold).double().mean()),
            "adv_abs_mean": float(s.reduce_sum(adv_valid.abs().sum())) / max(n_tok, 1.0),
            "adv_min": -float(self._reduce_max(-adv_valid.min() if adv_valid.numel() else torch.tensor(0.0))),
            "zero_std_frac": rl.zero_std_fraction(rewards_all, index_all) if cfg.group_size > 1 else None,
            "kl": (float(s.reduce_sum(stats["kl"])) / tok_all) if exp.ref_logp is not None and not critic_only else None,
            "clip_frac": None if critic_only else float(s.reduce_sum(stats["clip_frac"])) / tok_all,
            "entropy": None if critic_only else float(s.reduce_sum(stats["entropy"])) / tok_all,
            "grad_norm": (sum(grad_norms) / len(grad_norms)) if grad_norms else None,
            "loss": None if critic_only else float(s.reduce_sum(stats["pg_loss"])) / updates,
            "response_length": n_tok / max(float(s.reduce_sum(B)), 1.0),
            "_tokens": n_tok + float(s.reduce_sum(sum(len(p) for p in exp.batch.prompt_ids))),
        }
        out.update(gen_time=self.timing["gen_time"], rollout_time=t1 - t0, update_time=t2 - t1)
        if self.use_critic:
            out["vf_loss"] = float(s.reduce_sum(stats["vf_loss"])) / updates
            out["vf_clip_frac"] = float(s.reduce_sum(stats["vf_clip_frac"])) / max(n_tok * updates, 1.0)
        return out

    def _reduce_max(self, x: Any) -> float:
        s = self.sess
        if s.world == 1:
            return float(x)
        from accelerate.utils import gather_object

        return float(max(gather_object([float(x)])))

    def position(self, step: int) -> dict[str, Any]:
        n = len(self.examples)
        epoch, offset = divmod(step * self.cfg.prompts_per_step, n)
        return {"epoch": epoch, "offset": offset, "prompts_seen": step * self.cfg.prompts_per_step}

    def train(self) -> Path:
        return self.sess.run_steps(self.step, self.position, self.extra)


def run_rl(trainer: Any, run: TrainRun) -> Path:
    return RLEngine(trainer, run).train()


# -- RFT -------------------------------------------------------------------------------------------------

def run_rft(trainer: Any, run: TrainRun) -> Path:
    """Sample ``samples_per_prompt`` completions per training prompt from the start model, keep the verified-
    correct ones (:func:`select_correct`), write them to ``rft_data.jsonl`` and fine-tune on them. A resumed
    run reads the kept samples back instead of sampling again."""
    cfg: RFTConfig = trainer.config
    examples = load_examples(run, cfg)

    def pairs_fn(sess: Session) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        data_file = Path(run.out) / "rft_data.jsonl"
        fields: dict[str, Any] = {"rft_prompts": len(examples), "rft_data": str(data_file)}
        if sess.start_step and data_file.is_file():
            pairs = [tuple(json.loads(line)) for line in data_file.read_text().splitlines() if line.strip()]
            return [(p, r) for p, r in pairs], {**fields, "rft_kept": len(pairs)}
        pairs, n_gen = _rft_sample(sess, cfg, run, examples)
        if not pairs:
            raise RlmError(f"RFT kept no samples: none of the {n_gen} completions of the start model reached "
                           f"reward {cfg.min_reward} on task {run.task.name!r}")
        if sess.is_main:
            from rlm.core.io.atomic import atomic_write_text

            atomic_write_text(data_file, "".join(json.dumps([p, r]) + "\n" for p, r in pairs))
        sess.acc.wait_for_everyone()
        return pairs, {**fields, "rft_kept": len(pairs), "rft_generated": n_gen}

    return run_sft(trainer, run, pairs_fn)


def _rft_sample(sess: Session, cfg: RFTConfig, run: TrainRun,
                examples: list[Example]) -> tuple[list[tuple[str, str]], int]:
    """Every process samples its share of the prompts with the (untrained) policy; kept pairs are gathered
    in prompt order."""
    from rlm.core.eval.generation import chat_prompt, generate

    mine = list(range(sess.rank, len(examples), sess.world))
    prompts = [chat_prompt(sess.tokenizer, examples[i].prompt, system=cfg.system_prompt) for i in mine]
    k = cfg.samples_per_prompt
    gens = generate(sess.policy, sess.tokenizer, prompts, n=k, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size,
                    seed=sample_seed(cfg.seed, 0, sess.rank), progress=cfg.progress and sess.is_main)
    comps = [[g.text for g in gens[j * k:(j + 1) * k]] for j in range(len(mine))]
    chosen = [examples[i] for i in mine]
    kept = select_correct(chosen, comps, run.task, cfg.min_reward, cfg.dedupe, cfg.max_per_prompt)
    order = {id(ex): pos for pos, ex in zip(mine, chosen)}
    local = [(order[id(ex)], ex.prompt, text) for ex, text in kept]
    if sess.world > 1:
        from accelerate.utils import gather_object

        local = sorted((tuple(x) for x in gather_object(local)), key=lambda x: x[0])
    return [(p, r) for _, p, r in local], len(examples) * k
