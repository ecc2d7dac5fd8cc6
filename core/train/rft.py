"""Rejection-sampling fine-tuning: sample ``samples_per_prompt`` completions per training prompt from the start
model, keep the verified-correct ones (:func:`select_correct`), write them to ``rft_data.jsonl`` and fine-tune on
them with the SFT loop (:func:`rlm.core.train.sft.run_sft`).

Used by the ``rft`` trainer plugin. This module does not import torch at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlm.core.contracts import Example, Task
from rlm.core.errors import RlmError
from rlm.core.train.config import RFTConfig, TrainRun
from rlm.core.train.data import load_examples, sample_seed
from rlm.core.train.session import Session
from rlm.core.train.sft import Pairs, run_sft

RFT_DATA_FILE = "rft_data.jsonl"


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


def run_rft(trainer: Any, run: TrainRun) -> Path:
    """Rejection-sampling fine-tuning of ``trainer.config`` (an :class:`RFTConfig`). A resumed run reads the
    kept samples back from ``rft_data.jsonl`` instead of sampling again. Returns the ``final/`` directory."""
    cfg: RFTConfig = trainer.config
    examples = load_examples(run, cfg)

    def pairs_fn(sess: Session) -> tuple[Pairs, dict[str, Any]]:
        data_file = Path(run.out) / RFT_DATA_FILE
        fields: dict[str, Any] = {"rft_prompts": len(examples), "rft_data": str(data_file)}
        if sess.start_step and data_file.is_file():
            pairs = [tuple(json.loads(line)) for line in data_file.read_text().splitlines() if line.strip()]
            return [(p, r) for p, r in pairs], {**fields, "rft_kept": len(pairs)}
        pairs, n_gen = sample_correct(sess, cfg, run, examples)
        if not pairs:
            raise RlmError(f"RFT kept no samples: none of the {n_gen} completions of the start model reached "
                           f"reward {cfg.min_reward} on task {run.task.name!r}")
        if sess.is_main:
            from rlm.core.io.atomic import atomic_write_text

            atomic_write_text(data_file, "".join(json.dumps([p, r]) + "\n" for p, r in pairs))
        sess.acc.wait_for_everyone()
        return pairs, {**fields, "rft_kept": len(pairs), "rft_generated": n_gen}

    return run_sft(trainer, run, pairs_fn)


def sample_correct(sess: Session, cfg: RFTConfig, run: TrainRun, examples: list[Example]) -> tuple[Pairs, int]:
    """Every process samples its share of the prompts with the (untrained) policy and keeps the correct ones;
    returns the kept (prompt, response) pairs gathered in prompt order and the number of completions sampled."""
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
