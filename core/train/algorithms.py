"""Pure tensor functions of the RL trainers: advantage estimators, KL estimators, the PPO clipped policy loss,
the value loss, loss aggregation and log-prob / entropy helpers. Definitions follow ``DESIGN.md`` exactly;
every function here is tested against hand-computed float64 values in ``tests/train/test_rl.py``. Used by the
training engines (:mod:`rlm.core.train.forward`, :mod:`rlm.core.train.sft`, :mod:`rlm.core.train.rl`,
:mod:`rlm.core.train.rl_engine`, :mod:`rlm.core.train.critic`), by the RL trainer plugins, which list the
estimators they offer (``RLTrainer.advantages``), and by third-party trainers.

Shapes: ``B`` sequences, ``T`` response positions. ``mask`` (B, T) is 1 on response tokens and 0 on padding;
``rewards`` (B,) is the outcome reward of each sequence; ``index`` (B,) says which prompt (group) a sequence was
sampled from. An advantage estimator is a pure function ``fn(*, rewards, mask, index, kl, beta, gamma, lam, values,
eps, whiten_stats, single_sample_groups, baseline_mode, **_) -> (advantages, returns)``, both (B, T) and zero on
padding; it takes the inputs it uses and ignores the rest. One that reads the critic's ``values`` is marked with
:func:`needs_values`.

Conventions where ``DESIGN.md`` leaves a corner open (documented here and in the tests):

- a one-sample group has no baseline: GRPO / Dr. GRPO / RLOO give it an advantage of 0 (its deviation from its
  own mean is 0 and its std is taken as 0; verl instead uses the raw reward);
- "whiten" is ``(x - mean) / sqrt(var + 1e-8)`` over all valid tokens with the unbiased variance (verl's
  ``masked_whiten``), its statistics in float64 and two passes (verl's one-pass float32 form cancels
  catastrophically when the values sit on a large offset); a batch with a single valid token is only centred;
- group statistics are float64, and a group whose rewards are all equal gets exactly zero advantage (verl's float32
  mean of 16 x 0.97 leaves -0.106 after dividing by its epsilon-sized std);
- the log-ratio is clamped to ±20 before ``exp`` in the policy loss (overflow guard only).

torch is imported inside the functions: the trainer plugins import this module when ``rlm --help`` loads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from rlm.core.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
#: RL-Pos: ``incorrect`` zeroes the advantages of the samples below the correctness threshold (the paper's "sets
#: the advantage values of all negative samples to zero"); ``clamp`` sets every negative advantage to 0
POSITIVE_MODES = ("incorrect", "clamp")

Estimator = TypeVar("Estimator", bound=Callable[..., Any])
#: ``whiten_stats(x, mask) -> (count, mean, sum of squared deviations)`` over the valid entries of every process,
#: in float64 and in two passes (the mean first, then the deviations from it): the RL engine's
WhitenStats = Callable[["Tensor", "Tensor"], tuple["Tensor", "Tensor", "Tensor"]]


def needs_values(estimator: Estimator) -> Estimator:
    """Mark an advantage estimator that reads the critic's ``values``: only an RL trainer with a critic
    (``RLTrainer.critic = True``) may use it."""
    estimator.needs_values = True  # type: ignore[attr-defined]
    return estimator


def reads_values(estimator: Callable[..., Any]) -> bool:
    """Whether ``estimator`` was marked with :func:`needs_values`."""
    return bool(getattr(estimator, "needs_values", False))


# -- helpers ---------------------------------------------------------------------------------------------

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` is 1 (0 when nothing is valid)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def whiten_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, sum of squared deviations) of ``x`` over valid entries, in float64 and two passes: no
    cancellation, whatever the dtype and offset of ``x``."""
    import torch

    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    n = m.sum()
    mean = (x64 * m).sum() / n.clamp(min=1)
    return n, mean, (((x64 - mean) * m) ** 2).sum()


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8,
                  stats: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over valid entries, unbiased variance; zero on padding. The statistics are
    float64 and two-pass (:func:`whiten_moments`); the result has ``x``'s dtype.

    ``stats`` = (count, mean, sum of squared deviations) lets a caller pass statistics reduced over several
    processes (:data:`WhitenStats`)."""
    import torch

    n, mean, m2 = whiten_moments(x, mask) if stats is None else (s.to(torch.float64) for s in stats)
    m = mask.to(torch.float64)
    centred = (x.to(torch.float64) - mean) * m
    if float(n) < 2:
        return centred.to(x.dtype)
    var = m2 / (n - 1)
    return (centred * torch.rsqrt(var.clamp(min=0) + eps)).to(x.dtype)


def _f64(*xs: Tensor | None) -> tuple[Tensor | None, ...]:
    """``xs`` in float64 (None stays None): the estimators accumulate in float64 whatever the inputs' dtype."""
    import torch

    return tuple(None if x is None else x.to(torch.float64) for x in xs)


def _groups(index: Sequence[Any] | Tensor) -> dict[Any, list[int]]:
    import torch

    ids = index.tolist() if isinstance(index, torch.Tensor) else list(index)
    out: dict[Any, list[int]] = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return out


def group_stats(rewards: Tensor, index: Sequence[Any] | Tensor,
                single: str = "zero") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sequence group mean, unbiased group std (0 for a one-sample group), leave-one-out mean (the reward
    itself for a one-sample group) and group size, computed in float64 and returned in ``rewards``' dtype. A
    group whose rewards are all equal gets its reward as its mean exactly and std 0 (so ``r - mean`` is exactly 0
    even when the rewards are not representable in the dtype, e.g. 16 x 0.97 in float32). ``single="verl"``
    gives a one-sample group verl's statistics instead: mean 0, std 1, leave-one-out baseline 0 (its advantage is
    then its reward, over ``1 + eps`` for GRPO)."""
    import torch

    r64 = rewards.to(torch.float64)
    mean = torch.zeros_like(r64)
    std = torch.zeros_like(r64)
    loo = torch.zeros_like(r64)
    size = torch.zeros_like(r64)
    for members in _groups(index).values():
        r = r64[members]
        g = len(members)
        size[members] = g
        if g == 1 and single == "verl":
            std[members] = 1.0
            continue
        if bool((r == r[0]).all()):
            mean[members] = r[0]
            loo[members] = r[0]
            continue
        mean[members] = r.mean()
        if g > 1:
            std[members] = r.std(unbiased=True)
            loo[members] = (r.sum() - r) / (g - 1)
    dt = rewards.dtype
    # an all-equal group's mean is one of its own rewards, so it casts back exactly
    return mean.to(dt), std.to(dt), loo.to(dt), size.to(dt)


def zero_std_fraction(rewards: Tensor, index: Sequence[Any] | Tensor) -> float:
    """Share of groups whose rewards are all equal (they give GRPO no signal)."""
    groups = list(_groups(index).values())
    if not groups:
        return 0.0
    same = sum(1 for m in groups if bool((rewards[m] == rewards[m][0]).all()))
    return same / len(groups)


def token_rewards(rewards: Tensor, mask: Tensor, kl: Tensor | None = None, beta: float = 0.0) -> Tensor:
    """Per-token reward: ``-beta * kl_t`` on every response token plus the outcome reward on the last one."""
    import torch

    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(mask)
    if kl is not None and beta:
        out = out - beta * kl * mask
    lengths = mask.sum(-1).long()
    rows = torch.nonzero(lengths > 0).flatten()
    # the last valid position of each row (responses may hold masked tokens in the middle)
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, pos, torch.full_like(pos, -1)).max(-1).values
    out[rows, last[rows]] += rewards[rows]
    return out


def returns_to_go(rewards_t: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over valid tokens (masked tokens are skipped), zero on padding."""
    import torch

    mask = mask.to(rewards_t.dtype)
    out = torch.zeros_like(rewards_t)
    running = torch.zeros_like(rewards_t[:, 0])
    for t in reversed(range(rewards_t.shape[-1])):
        m = mask[:, t]
        new = rewards_t[:, t] + gamma * running
        running = m * new + (1 - m) * running
        out[:, t] = new * m
    return out


# -- advantage estimators --------------------------------------------------------------------------------

def grpo_advantage(*, rewards: Tensor, mask: Tensor, index: Sequence[Any] | Tensor, norm_by_std: bool = True,
                   eps: float = 1e-6, single_sample_groups: str = "verl", **_: Any) -> tuple[Tensor, Tensor]:
    """GRPO: ``A_i = (r_i - mean_g) / (std_g + eps)`` (unbiased std), broadcast over the response tokens.
    ``norm_by_std=False`` is Dr. GRPO (``A_i = r_i - mean_g``). A one-sample group gets ``r / (1 + eps)`` (Dr.
    GRPO: ``r``) with ``single_sample_groups="verl"``, 0 with ``"zero"``."""
    mean, std, _, _ = group_stats(rewards, index, single_sample_groups)
    score = rewards - mean
    if norm_by_std:
        score = score / (std + eps)
    adv = score.unsqueeze(-1) * mask.to(rewards.dtype)
    return adv, adv


def dr_grpo_advantage(*, rewards: Tensor, mask: Tensor, index: Sequence[Any] | Tensor,
                      single_sample_groups: str = "verl", **_: Any) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: ``A_i = r_i - mean_g`` (no division by the group std)."""
    return grpo_advantage(rewards=rewards, mask=mask, index=index, norm_by_std=False,
                          single_sample_groups=single_sample_groups)


def rloo_advantage(*, rewards: Tensor, mask: Tensor, index: Sequence[Any] | Tensor,
                   single_sample_groups: str = "verl", **_: Any) -> tuple[Tensor, Tensor]:
    """RLOO: ``A_i = r_i - mean of the other G-1 rewards of the group`` (a one-sample group: ``r`` with
    ``single_sample_groups="verl"``, 0 with ``"zero"``)."""
    _, _, loo, _ = group_stats(rewards, index, single_sample_groups)
    adv = (rewards - loo).unsqueeze(-1) * mask.to(rewards.dtype)
    return adv, adv


def reinforce_pp_advantage(*, rewards: Tensor, mask: Tensor, kl: Tensor | None = None, beta: float = 0.0,
                           gamma: float = 1.0, whiten_stats: WhitenStats | None = None,
                           **_: Any) -> tuple[Tensor, Tensor]:
    """REINFORCE++: per-token reward ``-beta * k1_t`` plus ``r`` at the last token, return-to-go with
    ``gamma``, whitened over every valid token of the batch. Returns (whitened advantages, returns), computed in
    float64 and returned in ``rewards``' dtype."""
    dt = rewards.dtype
    r64, m64, kl64 = _f64(rewards, mask, kl)
    rt = token_rewards(r64, m64, kl64, beta)
    ret = returns_to_go(rt, m64, gamma)
    stats = whiten_stats(ret, m64) if whiten_stats is not None else None
    return masked_whiten(ret, m64, stats=stats).to(dt), ret.to(dt)


def reinforce_pp_baseline_advantage(*, rewards: Tensor, mask: Tensor, index: Sequence[Any] | Tensor,
                                    kl: Tensor | None = None, beta: float = 0.0, gamma: float = 1.0,
                                    whiten_stats: WhitenStats | None = None, baseline_mode: str = "verl",
                                    single_sample_groups: str = "verl", **_: Any) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline. ``baseline_mode="verl"`` (verl's estimator): the sequence score
    ``s_i = r_i - beta * sum_t kl_t``, minus its group's mean score (a one-sample group: minus 0 with
    ``single_sample_groups="verl"``, itself with ``"zero"``), broadcast over the response tokens and whitened
    over the batch. ``"openrlhf"``: the group mean of ``r`` subtracted from ``r`` first, then the per-token
    KL and return-to-go of :func:`reinforce_pp_advantage`."""
    if baseline_mode == "openrlhf":
        mean, _, _, _ = group_stats(rewards, index, "zero")
        return reinforce_pp_advantage(rewards=rewards - mean, mask=mask, kl=kl, beta=beta, gamma=gamma,
                                      whiten_stats=whiten_stats)
    if baseline_mode != "verl":
        raise ConfigError(f"unknown REINFORCE++-baseline mode {baseline_mode!r} (known: verl, openrlhf)")
    dt = rewards.dtype
    r64, m64, kl64 = _f64(rewards, mask, kl)
    score = token_rewards(r64, m64, kl64, beta).sum(-1)
    mean, _, _, _ = group_stats(score, index, single_sample_groups)
    scores = (score - mean).unsqueeze(-1) * m64
    stats = whiten_stats(scores, m64) if whiten_stats is not None else None
    return masked_whiten(scores, m64, stats=stats).to(dt), scores.to(dt)


@needs_values
def gae_advantage(*, rewards: Tensor, mask: Tensor, values: Tensor, kl: Tensor | None = None, beta: float = 0.0,
                  gamma: float = 1.0, lam: float = 1.0, token_level_rewards: Tensor | None = None,
                  whiten: bool = True, whiten_stats: WhitenStats | None = None, **_: Any) -> tuple[Tensor, Tensor]:
    """GAE: ``delta_t = r~_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}`` (V and A are 0
    after the last token; masked tokens are skipped), ``returns = A + V``, then A is whitened."""
    import torch

    dt = values.dtype
    values, m, kl, rewards, token_level_rewards = _f64(values, mask, kl, rewards, token_level_rewards)
    rt = token_level_rewards if token_level_rewards is not None else token_rewards(rewards, m, kl, beta)
    adv = torch.zeros_like(values)
    next_v = torch.zeros_like(values[:, 0])
    next_a = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[-1])):
        delta = rt[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_a
        mt = m[:, t]
        next_v = mt * values[:, t] + (1 - mt) * next_v
        next_a = mt * a + (1 - mt) * next_a
        adv[:, t] = a * mt
    returns = (adv + values) * m
    if whiten:
        stats = whiten_stats(adv, m) if whiten_stats is not None else None
        adv = masked_whiten(adv, m, stats=stats)
    return adv.to(dt), returns.to(dt)


def positive_only(advantages: Tensor, rewards: Tensor | None = None, threshold: float | None = None,
                  mode: str = "clamp") -> Tensor:
    """RL-Pos. ``mode="incorrect"``: the advantages of the samples whose reward is below ``threshold`` (the
    negative samples) set to 0, every other sample's kept as it is; ``mode="clamp"``: every negative advantage set
    to 0. With 0/1 rewards and threshold 1 they agree; with continuous rewards they do not (rewards .3/.9/.5/.7,
    threshold 1, GRPO: ``incorrect`` zeroes all four, ``clamp`` keeps .9's and .7's positive push)."""
    if mode == "clamp":
        return advantages.clamp(min=0)
    if mode != "incorrect":
        raise ConfigError(f"unknown RL-Pos mode {mode!r} (known: {', '.join(POSITIVE_MODES)})")
    if rewards is None or threshold is None:
        raise ConfigError("RL-Pos mode 'incorrect' needs the rewards and the correctness threshold")
    keep = (rewards >= threshold).to(advantages.dtype)
    return advantages * keep.unsqueeze(-1)


# -- KL estimators ---------------------------------------------------------------------------------------

def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate with ``x = logp - ref_logp``: k1 = x, k2 = x²/2,
    k3 (low-variance) = e^(-x) + x - 1 with x clamped to ±20 and the value to ±10."""
    import torch

    x = logp - ref_logp
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        x = x.clamp(-20, 20)
        return (torch.exp(-x) + x - 1).clamp(-10, 10)
    raise ConfigError(f"unknown KL estimator {kind!r} (known: {', '.join(KL_ESTIMATORS)})")


# -- losses ----------------------------------------------------------------------------------------------

def aggregate(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", *, num_tokens: float | Tensor | None = None,
              num_seqs: float | Tensor | None = None, norm_len: float | None = None,
              sum_norm_by_seqs: bool = False) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    - ``token-mean``: sum over valid tokens / ``num_tokens`` (default: valid tokens here; pass the global
      count of the mini-batch when it is split into micro-batches or processes);
    - ``seq-mean-token-mean`` (original GRPO): per-sequence token mean, summed / ``num_seqs`` (default B);
    - ``seq-mean-token-sum``: per-sequence token sum, summed / ``num_seqs``;
    - ``seq-mean-token-sum-norm`` (Dr. GRPO, verl): per-sequence token sums, summed, / ``norm_len`` (default T,
      set it to the generation budget); ``sum_norm_by_seqs=True`` also divides by ``num_seqs`` (rlm's earlier
      form, a mean over sequences).
    """
    import torch

    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        n = mask.sum() if num_tokens is None else num_tokens
        return (loss_mat * mask).sum() / (n.clamp(min=1) if isinstance(n, torch.Tensor) else max(float(n), 1.0))
    nseq = loss_mat.shape[0] if num_seqs is None else num_seqs
    nseq = nseq.clamp(min=1) if isinstance(nseq, torch.Tensor) else max(float(nseq), 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / nseq
    if mode == "seq-mean-token-sum":
        return (loss_mat * mask).sum(-1).sum() / nseq
    if mode == "seq-mean-token-sum-norm":
        L = float(norm_len if norm_len is not None else loss_mat.shape[-1])
        total = ((loss_mat * mask).sum(-1) / L).sum()
        return total / nseq if sum_norm_by_seqs else total
    raise ConfigError(f"unknown loss aggregation {mode!r} (known: {', '.join(LOSS_AGG_MODES)})")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = 3.0, agg: str = "token-mean",
                **agg_kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped policy loss: ``l = max(-A rho, -A clip(rho, 1-eps_lo, 1+eps_hi))``; for ``A < 0`` the dual
    clip ``l = min(l, -c A)``. Returns (aggregated loss, {"per_token", "clip_frac", "dual_clip_frac",
    "approx_kl"}); ``clip_frac`` counts valid tokens where the clipped term is the larger one."""
    import torch

    log_ratio = (logp - old_logp).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    l1 = -advantages * ratio
    l2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    m = mask.to(loss.dtype)
    stats = {"clip_frac": masked_mean((l2 > l1).to(loss.dtype), m).detach(),
             "approx_kl": masked_mean(-log_ratio, m).detach()}
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1, got {dual_clip}")
        l3 = -dual_clip * advantages
        dual = torch.minimum(loss, l3)
        hit = (advantages < 0) & (l3 < loss)
        loss = torch.where(advantages < 0, dual, loss)
        stats["dual_clip_frac"] = masked_mean(hit.to(loss.dtype), m).detach()
    else:
        stats["dual_clip_frac"] = torch.zeros((), dtype=loss.dtype)
    stats["per_token"] = loss
    return aggregate(loss, mask, agg, **agg_kwargs), stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float = 0.5,
               agg: str = "token-mean", **agg_kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``½ max((V - R)², (clip(V, V_old ± clip) - R)²)``, aggregated like the policy loss."""
    import torch

    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a = (values - returns) ** 2
    b = (clipped - returns) ** 2
    loss = 0.5 * torch.maximum(a, b)
    stats = {"vf_clip_frac": masked_mean((b > a).to(loss.dtype), mask.to(loss.dtype)).detach()}
    return aggregate(loss, mask, agg, **agg_kwargs), stats


def sft_loss(logp: Tensor, mask: Tensor, **agg_kwargs: Any) -> Tensor:
    """Token-mean negative log-likelihood over the response tokens only (``mask`` 0 on prompt and padding)."""
    return aggregate(-logp, mask, "token-mean", **agg_kwargs)


# -- log-probs and entropy -------------------------------------------------------------------------------

def _upcast(x: Tensor) -> Tensor:
    import torch

    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per position, computed without materialising the full log-softmax twice."""
    import torch

    logits = _upcast(logits)
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position."""
    import torch

    logits = _upcast(logits)
    p = torch.softmax(logits, -1)
    return torch.logsumexp(logits, -1) - (p * logits).sum(-1)
