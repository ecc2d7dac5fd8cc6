"""The experience of one RL step: this process's share of the step's prompts, ``group_size`` completions of
each sampled with :func:`rlm.core.eval.generation.generate` (seeds are functions of (seed, step, process), so a
resumed run samples exactly what an uninterrupted one would), their rewards from the task, and the no-grad
log-prob passes (old policy, reference) over the sampled batch.

The RL loop (:mod:`rlm.core.train.rl_engine`) calls these and adds the advantages. This module does not import
torch at import time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from rlm.core.contracts import Example, Task
from rlm.core.errors import RlmError
from rlm.core.train.config import RLConfig
from rlm.core.train.data import TokenBatch, micro_batches, sample_seed, take
from rlm.core.train.forward import forward_response
from rlm.core.train.session import Session


@dataclasses.dataclass
class Rollout:
    """Sampled completions of this process with their rewards; ``index`` is the group (prompt) id of each
    sequence, global across processes."""

    batch: TokenBatch
    examples: list[Example]
    texts: list[str]
    index: list[int]
    rewards: Any                # (B,) float32 on the session's device
    mask: Any                   # (B, T) response mask
    gen_time: float             # seconds in generate()


@dataclasses.dataclass
class Experience(Rollout):
    """A rollout with everything the update needs; the added tensors are (B, T)."""

    advantages: Any
    returns: Any
    old_logp: Any | None
    ref_logp: Any | None
    values: Any | None
    kl: Any | None              # the KL estimate at sampling time (for kl_in == "reward")


def score_completions(task: Task, examples: list[Example], texts: list[str]) -> list[float]:
    """The task's reward of each completion (one ``Task.reward_batch`` call, which a task may run in parallel);
    a task that raises, or returns the wrong number of rewards, fails the run with its name."""
    try:
        rewards = [float(r) for r in task.reward_batch(examples, texts)]
    except Exception as exc:
        raise RlmError(f"task {task.name!r} failed to score a completion: {exc}") from exc
    if len(rewards) != len(texts):
        raise RlmError(f"task {task.name!r} returned {len(rewards)} rewards for {len(texts)} completions")
    return rewards


def sample_rollout(sess: Session, cfg: RLConfig, task: Task, examples: list[Example], prompts: list[str],
                   pad_id: int, step: int, backend: Any) -> Rollout:
    """Sample and score this process's share of the ``prompts_per_step`` prompts of ``step`` (a seeded
    permutation of ``prompts``, chat-formatted, parallel to ``examples``) through ``backend`` (a
    :class:`rlm.core.train.rollout_backend.RolloutBackend`: the policy itself for ``hf``)."""
    import torch

    from rlm.core.eval.generation import SamplingParams

    local_prompts = cfg.prompts_per_step // sess.world
    global_idx = take(len(examples), cfg.seed, (step - 1) * cfg.prompts_per_step, cfg.prompts_per_step)
    start = sess.rank * local_prompts
    mine = global_idx[start:start + local_prompts]
    t0 = time.perf_counter()
    with sess.generation():
        gens = backend.generate([prompts[i] for i in mine], SamplingParams(
            n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            batch_size=cfg.generation_batch_size, seed=sample_seed(cfg.seed, step, sess.rank)))
    gen_time = time.perf_counter() - t0
    chosen = [examples[mine[g.prompt_index]] for g in gens]
    texts = [g.text for g in gens]
    rewards = torch.tensor(score_completions(task, chosen, texts), dtype=torch.float32, device=sess.device)
    batch = TokenBatch([g.prompt_ids for g in gens], [g.completion_ids for g in gens], pad_id)
    mask = batch.tensors(device=sess.device)["response_mask"]
    return Rollout(batch, chosen, texts, [start + g.prompt_index for g in gens], rewards, mask, gen_time)


def no_grad_pass(sess: Session, batch: TokenBatch, micro_batch_size: int, fn: Callable[[dict[str, Any]], Any]) -> Any:
    """``fn(tensors)`` (B', T') over the micro-batches of ``batch`` without gradients, padded to the batch's
    response width and concatenated (B, T) in float32."""
    import torch

    T = max(1, batch.max_response)
    parts = []
    with torch.no_grad(), sess.autocast():
        for rows in micro_batches(list(range(len(batch))), micro_batch_size):
            out = fn(batch.tensors(rows, sess.device))
            parts.append(torch.nn.functional.pad(out.float(), (0, T - out.shape[-1])))
    return torch.cat(parts, 0)


def old_and_reference_logprobs(sess: Session, cfg: RLConfig, batch: TokenBatch) -> tuple[Any | None, Any | None]:
    """The sampling policy's log-probs (when more than one update uses the batch, or the KL sits in the
    reward) and the reference model's (unless ``kl_in`` is none); None where not needed."""
    need_old = cfg.ppo_epochs * cfg.mini_batches > 1 or (cfg.kl_in == "reward" and cfg.kl_coef > 0)
    need_ref = cfg.kl_in != "none"
    old_logp = ref_logp = None
    if need_old:
        old_logp = no_grad_pass(sess, batch, cfg.micro_batch_size,
                                lambda u: forward_response(sess.model, u, temperature=cfg.temperature)[0])
    if need_ref:
        with sess.reference_on_device():
            ref_logp = no_grad_pass(sess, batch, cfg.micro_batch_size,
                                    lambda u: sess.ref_logprobs(u, cfg.temperature))
    return old_logp, ref_logp
