"""Rejection-sampling fine-tuning: sample ``samples_per_prompt`` completions per training prompt from the start
model, keep the verified-correct ones (:func:`select_correct`), write them to ``rft_data.jsonl`` and fine-tune on
them with the SFT loop (:func:`rlm.core.train.sft.run_sft`).

Sampling goes in rounds over a seeded permutation of the prompt pool (:func:`rft_target`, :func:`plan_round`):
with ``steps`` set it stops once the kept samples cover ``steps × batch_size / epochs`` (the kept set is passed
over ``epochs`` times, as when the steps come from the epochs), the pool is exhausted or ``max_rounds`` rounds
are done; with ``steps`` unset one round samples the whole pool and the steps follow from the kept count. Round
``r`` samples under ``sample_seed(seed, r, rank)``, so the kept set is a function of the seed. Nothing kept is an
error; fewer than the target is a warning. A resumed run reads the kept samples back from ``rft_data.jsonl``
(and the sampling counts from ``rft_sampling.json``) instead of sampling again.

Sampling goes through the generation backend of ``generation.backend``
(:class:`rlm.core.train.rollout_backend.RolloutBackend`, as RL rollouts do): ``hf`` samples from the policy
itself exactly as before; an external engine (``vllm``) is loaded on the start model at the first round, given
the policy's weights before every round (checksum-checked) and let go once sampling is over, before training.

Used by the ``rft`` trainer plugin. This module does not import torch at import time.
"""

from __future__ import annotations

import json
import math
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from rlm.core.contracts import Example, Task
from rlm.core.errors import RlmError
from rlm.core.train.config import RFTConfig, TrainRun
from rlm.core.train.data import load_examples, sample_seed, take
from rlm.core.train.rollout_backend import RolloutBackend
from rlm.core.train.session import Session
from rlm.core.train.sft import Pairs, run_sft

RFT_DATA_FILE = "rft_data.jsonl"
#: the sampling counts (the ``rft_*`` manifest fields) of the run that wrote ``rft_data.jsonl``
RFT_STATS_FILE = "rft_sampling.json"
#: a later round samples this many times the prompts the observed keep rate says the target still needs
KEEP_MARGIN = Fraction(3, 2)
#: a round after rounds that kept nothing samples this many times the previous round's prompts
GROWTH = 2


def select_correct(examples: list[Example], completions: list[list[str]], task: Task, min_reward: float = 1.0,
                   dedupe: bool = True, max_per_prompt: int | None = None) -> list[tuple[Example, str]]:
    """RFT's filter: for each example, its completions whose reward is at least ``min_reward``, duplicates
    (same text after stripping surrounding whitespace) removed, in sampling order."""
    from rlm.core.train.rollout import score_completions

    # every completion scored in one batch (a task may run it in parallel: the code task's sandbox threads)
    rewards = iter(score_completions(task, [ex for ex, comps in zip(examples, completions) for _ in comps],
                                     [text for comps in completions for text in comps]))
    kept: list[tuple[Example, str]] = []
    for ex, comps in zip(examples, completions):
        seen: set[str] = set()
        n = 0
        scored = [(text, next(rewards)) for text in comps]
        for text, r in scored:
            key = text.strip()
            if dedupe and key in seen:
                continue
            if math.isnan(r) or r < min_reward:  # NaN never passes
                continue
            seen.add(key)
            kept.append((ex, text))
            n += 1
            if max_per_prompt is not None and n >= max_per_prompt:
                break
    return kept


# -- the round planner -------------------------------------------------------------------------------------------

def rft_target(cfg: RFTConfig) -> int | None:
    """The kept samples the configured steps need: ``ceil(steps × batch_size / epochs)``; None when ``steps``
    is unset (the whole pool is sampled and the steps follow from what is kept)."""
    if cfg.steps is None:
        return None
    return math.ceil(Fraction(cfg.steps * cfg.batch_size) / Fraction(str(cfg.epochs)))  # exact: no 320.00000001


def plan_round(pool: int, target: int | None, sizes: list[int], kept: int, *, per_prompt: int, min_round: int,
               max_rounds: int) -> int:
    """Prompts the next sampling round takes from the pool (0: stop), given the prompts each earlier round took
    (``sizes``) and the samples kept so far. It stops when ``kept`` reaches ``target``, the pool is exhausted or
    ``max_rounds`` rounds are done. Without a target the one round is the whole pool. The first round assumes
    every prompt keeps ``per_prompt`` samples; a later one divides what is missing by the observed keep rate
    (kept per prompt) times :data:`KEEP_MARGIN`, or takes :data:`GROWTH` × the previous round when nothing was
    kept. A round takes at least ``min_round`` prompts (one generation batch) and at most what is left."""
    left = pool - sum(sizes)
    if left <= 0 or len(sizes) >= max_rounds or (target is not None and kept >= target):
        return 0
    if target is None:
        return left
    if not sizes:
        need = math.ceil(Fraction(target, per_prompt))
    elif kept == 0:
        need = GROWTH * sizes[-1]
    else:
        need = math.ceil(KEEP_MARGIN * (target - kept) * sum(sizes) / kept)
    return min(left, max(need, min_round))


# -- the run -----------------------------------------------------------------------------------------------------

def run_rft(trainer: Any, run: TrainRun) -> Path:
    """Rejection-sampling fine-tuning of ``trainer.config`` (an :class:`RFTConfig`). A resumed run reads the
    kept samples back from ``rft_data.jsonl`` instead of sampling again. Returns the ``final/`` directory."""
    cfg: RFTConfig = trainer.config
    examples = load_examples(run, cfg)

    def pairs_fn(sess: Session) -> tuple[Pairs, dict[str, Any]]:
        data_file = Path(run.out) / RFT_DATA_FILE
        stats_file = Path(run.out) / RFT_STATS_FILE
        fields: dict[str, Any] = {"rft_prompts": len(examples), "rft_data": str(data_file)}
        if sess.start_step and data_file.is_file():
            pairs = [tuple(json.loads(line)) for line in data_file.read_text().splitlines() if line.strip()]
            old = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
            return [(p, r) for p, r in pairs], {**fields, **old, "rft_kept": len(pairs)}
        pairs, stats = sample_correct(sess, cfg, run, examples)
        if not pairs:
            msg = (f"RFT kept no samples: none of the {stats['rft_generated']} completions of the start model for "
                   f"{stats['rft_prompts_sampled']} of the {len(examples)} prompts (in {stats['rft_rounds']} "
                   f"rounds) reached reward {cfg.min_reward} on task {run.task.name!r}")
            sess.finish_manifest(status="failed", error=msg, **fields, **stats)
            raise RlmError(msg)
        target = stats["rft_target"]
        if target is not None and len(pairs) < target:
            stats["rft_warning"] = (f"RFT kept {len(pairs)} samples, fewer than the {target} the {cfg.steps} steps "
                                    f"of batch_size {cfg.batch_size} over {cfg.epochs} epochs need; training on them")
            if sess.is_main:
                print(f"warning: {stats['rft_warning']}", file=sys.stderr)
        if sess.is_main:
            from rlm.core.io.atomic import atomic_write_text

            atomic_write_text(data_file, "".join(json.dumps([p, r]) + "\n" for p, r in pairs))
            atomic_write_text(stats_file, json.dumps(stats, sort_keys=True) + "\n")
        sess.acc.wait_for_everyone()
        return pairs, {**fields, **stats}

    return run_sft(trainer, run, pairs_fn)


def sample_correct(sess: Session, cfg: RFTConfig, run: TrainRun,
                   examples: list[Example]) -> tuple[Pairs, dict[str, Any]]:
    """Sample rounds of prompts from the seeded permutation of ``examples`` (:func:`plan_round`) with the
    (untrained) policy and keep the correct completions; returns the kept (prompt, response) pairs in sampling
    order and the ``rft_*`` counts (target, rounds, prompts sampled, completions generated, kept)."""
    n, k = len(examples), cfg.samples_per_prompt
    target = rft_target(cfg)
    per_prompt = min(k, cfg.max_per_prompt or k)
    min_round = sess.world * max(1, cfg.generation_batch_size // k)  # one generation batch on every process
    sizes: list[int] = []
    kept: Pairs = []
    sampler = RolloutBackend(sess, cfg)
    try:
        while size := plan_round(n, target, sizes, len(kept), per_prompt=per_prompt, min_round=min_round,
                                 max_rounds=cfg.max_rounds):
            start = sum(sizes)
            chosen = [examples[i] for i in take(n, cfg.seed, start, size)]
            kept += sample_round(sess, cfg, run, chosen, len(sizes), sampler)
            sizes.append(size)
    finally:
        sampler.close()
    stats = {"rft_target": target, "rft_rounds": len(sizes), "rft_prompts_sampled": sum(sizes),
             "rft_generated": sum(sizes) * k, "rft_kept": len(kept)}
    return kept, stats


def sample_round(sess: Session, cfg: RFTConfig, run: TrainRun, chosen: list[Example], rnd: int,
                 sampler: RolloutBackend) -> Pairs:
    """One round: every process samples its share of ``chosen`` under ``sample_seed(seed, rnd, rank)`` through
    ``sampler`` (a :class:`rlm.core.train.rollout_backend.RolloutBackend`, given the policy's current weights
    first) and keeps the correct completions; returns the kept (prompt, response) pairs of all processes in the
    order of ``chosen``."""
    from rlm.core.eval.generation import SamplingParams, chat_prompt

    mine = list(range(sess.rank, len(chosen), sess.world))
    prompts = [chat_prompt(sess.tokenizer, chosen[i].prompt, system=cfg.system_prompt) for i in mine]
    k = cfg.samples_per_prompt
    params = SamplingParams(n=k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            batch_size=cfg.generation_batch_size, seed=sample_seed(cfg.seed, rnd, sess.rank),
                            progress=cfg.progress and sess.is_main)
    with sess.generation():
        sampler.sync()
        gens = sampler.generate(prompts, params)
    local: list[tuple[int, str, str]] = []
    for j, i in enumerate(mine):
        comps = [g.text for g in gens[j * k:(j + 1) * k]]
        for ex, text in select_correct([chosen[i]], [comps], run.task, cfg.min_reward, cfg.dedupe,
                                       cfg.max_per_prompt):
            local.append((i, ex.prompt, text))
    if sess.world > 1:
        from accelerate.utils import gather_object

        local = sorted((tuple(x) for x in gather_object(local)), key=lambda x: x[0])  # stable: sampling order
    return [(p, r) for _, p, r in local]
