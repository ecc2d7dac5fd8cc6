"""rlm.core.train.algorithms against values computed by hand in float64 (plain Python floats, no torch on the reference side)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlm.core.errors import ConfigError
from rlm.core.train import algorithms as rl

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def flat(x):
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in flat(item)]
    return [x]


def approx(a, b, tol=1e-12):
    a, b = flat(a), flat(b)
    assert len(a) == len(b)
    return a == pytest.approx(b, abs=tol, rel=tol)


def stdev(xs):  # unbiased
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# rewards of three groups: a mixed group of 3, a group of 2 identical rewards, a one-sample group
REWARDS = [1.0, 0.0, 0.5, 1.0, 1.0, 0.7]
INDEX = [0, 0, 0, 1, 1, 2]
MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]


def broadcast(per_seq, mask=MASK):
    return [[a * m for m in row] for a, row in zip(per_seq, mask)]


def test_only_gae_needs_a_critics_values():
    estimators = [rl.grpo_advantage, rl.dr_grpo_advantage, rl.rloo_advantage, rl.reinforce_pp_advantage,
                  rl.reinforce_pp_baseline_advantage, rl.gae_advantage]
    assert [rl.reads_values(f) for f in estimators] == [False] * 5 + [True]

    @rl.needs_values
    def mine(**_):
        return None

    assert rl.reads_values(mine)


def test_grpo_hand_values_identical_group_and_single_sample():
    adv, ret = rl.grpo_advantage(rewards=t(REWARDS), mask=t(MASK), index=INDEX, single_sample_groups="zero")
    g0 = REWARDS[:3]
    m0, s0 = sum(g0) / 3, stdev(g0)
    expected = [(r - m0) / (s0 + 1e-6) for r in g0] + [0.0, 0.0, 0.0]  # identical group and one-sample group: 0
    assert approx(adv, broadcast(expected))
    assert torch.equal(adv, ret)
    # hand check of the mixed group: mean 0.5, unbiased std 0.5
    assert approx(adv[0, 0].item(), 0.5 / (0.5 + 1e-6))


def test_dr_grpo_and_grpo_without_std():
    adv, _ = rl.dr_grpo_advantage(rewards=t(REWARDS), mask=t(MASK), index=INDEX, single_sample_groups="zero")
    expected = [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    assert approx(adv, broadcast(expected))
    adv2, _ = rl.grpo_advantage(rewards=t(REWARDS), mask=t(MASK), index=INDEX, norm_by_std=False,
                                single_sample_groups="zero")
    assert torch.equal(adv, adv2)


def test_rloo_hand_values():
    adv, _ = rl.rloo_advantage(rewards=t(REWARDS), mask=t(MASK), index=INDEX, single_sample_groups="zero")
    expected = [1.0 - (0.0 + 0.5) / 2, 0.0 - (1.0 + 0.5) / 2, 0.5 - (1.0 + 0.0) / 2, 0.0, 0.0, 0.0]
    assert approx(adv, broadcast(expected))


def whiten_ref(values, mask):
    flat = [v for row, mr in zip(values, mask) for v, m in zip(row, mr) if m]
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / (len(flat) - 1)
    return [[(v - mean) / math.sqrt(var + 1e-8) * m for v, m in zip(row, mr)] for row, mr in zip(values, mask)]


def test_reinforce_pp_hand_unrolled():
    mask = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1]]  # third row: a masked token in the middle
    rewards = [1.0, 0.0, 0.5]
    k1 = [[0.1, -0.2, 0.3, 9.0], [0.05, 0.4, 9.0, 9.0], [-0.1, 9.0, 0.2, 0.1]]
    beta = 0.5
    # per-token rewards, by hand
    rt = [[-beta * 0.1, -beta * -0.2, -beta * 0.3 + 1.0, 0.0],
          [-beta * 0.05, -beta * 0.4 + 0.0, 0.0, 0.0],
          [-beta * -0.1, 0.0, -beta * 0.2, -beta * 0.1 + 0.5]]
    ret = [[rt[0][0] + rt[0][1] + rt[0][2], rt[0][1] + rt[0][2], rt[0][2], 0.0],
           [rt[1][0] + rt[1][1], rt[1][1], 0.0, 0.0],
           [rt[2][0] + rt[2][2] + rt[2][3], 0.0, rt[2][2] + rt[2][3], rt[2][3]]]
    adv, returns = rl.reinforce_pp_advantage(rewards=t(rewards), mask=t(mask), kl=t(k1), beta=beta)
    assert approx(returns, ret)
    assert approx(adv, whiten_ref(ret, mask), 1e-10)
    # whitened: zero mean over valid tokens
    assert abs(rl.masked_mean(adv, t(mask)).item()) < 1e-12


def test_reinforce_pp_baseline_subtracts_group_mean_first():
    mask = [[1, 1], [1, 0], [1, 1]]
    rewards, index = [1.0, 0.0, 0.3], [0, 0, 1]
    k1 = [[0.2, 0.1], [0.3, 0.0], [0.0, -0.4]]
    beta = 0.1
    centred = [0.5, -0.5, 0.0]  # group 0 mean 0.5; the one-sample group is centred to 0
    rt = [[-beta * 0.2, -beta * 0.1 + centred[0]], [-beta * 0.3 + centred[1], 0.0], [0.0, beta * 0.4 + centred[2]]]
    ret = [[rt[0][0] + rt[0][1], rt[0][1]], [rt[1][0], 0.0], [rt[2][0] + rt[2][1], rt[2][1]]]
    adv, returns = rl.reinforce_pp_baseline_advantage(rewards=t(rewards), mask=t(mask), index=index,
                                                      baseline_mode="openrlhf",
                                                      kl=t(k1), beta=beta)
    assert approx(returns, ret)
    assert approx(adv, whiten_ref(ret, mask), 1e-10)


def test_gae_against_hand_unrolled_recursion():
    rng = random.Random(3)
    B, T = 3, 5
    mask = [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    values = [[rng.uniform(-1, 1) for _ in range(T)] for _ in range(B)]
    tr = [[rng.uniform(-1, 1) * m for m in row] for row in mask]
    gamma, lam = 0.9, 0.8
    exp_adv, exp_ret = [], []
    for b in range(B):
        n = sum(mask[b])
        a = [0.0] * T
        for s in range(n - 1, -1, -1):  # the recursion, unrolled by hand over valid tokens
            v_next = values[b][s + 1] if s + 1 < n else 0.0
            a_next = a[s + 1] if s + 1 < n else 0.0
            delta = tr[b][s] + gamma * v_next - values[b][s]
            a[s] = delta + gamma * lam * a_next
        exp_adv.append(a)
        exp_ret.append([(a[s] + values[b][s]) * mask[b][s] for s in range(T)])
    adv, ret = rl.gae_advantage(rewards=t([0.0] * B), mask=t(mask), values=t(values), token_level_rewards=t(tr),
                                gamma=gamma, lam=lam, whiten=False)
    assert approx(adv, exp_adv)
    assert approx(ret, exp_ret)
    # explicit closed form for one position: A_0 of row 1 (two tokens)
    d1 = tr[1][1] - values[1][1]
    d0 = tr[1][0] + gamma * values[1][1] - values[1][0]
    assert approx(adv[1, 0].item(), d0 + gamma * lam * d1)
    adv_w, _ = rl.gae_advantage(rewards=t([0.0] * B), mask=t(mask), values=t(values), token_level_rewards=t(tr),
                                gamma=gamma, lam=lam)
    assert approx(adv_w, whiten_ref(exp_adv, mask), 1e-10)


def test_gae_outcome_reward_and_kl_in_reward():
    mask = [[1, 1, 1]]
    values = [[0.2, 0.4, 0.6]]
    kl = [[0.1, 0.2, 0.3]]
    beta, r = 0.5, 1.0
    rt = [-beta * 0.1, -beta * 0.2, -beta * 0.3 + r]
    # gamma = lam = 1: A_t = sum_{s>=t} r_s - V_t
    expected = [sum(rt[s:]) - values[0][s] for s in range(3)]
    adv, ret = rl.gae_advantage(rewards=t([r]), mask=t(mask), values=t(values), kl=t(kl), beta=beta, whiten=False)
    assert approx(adv, [expected])
    assert approx(ret, [[sum(rt[s:]) for s in range(3)]])


def test_positive_only_never_negative_and_keeps_positive():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rewards = torch.randint(0, 2, (12,), generator=g).to(D)
        adv, _ = rl.grpo_advantage(rewards=rewards, mask=torch.ones(12, 4, dtype=D), index=[i // 4 for i in range(12)])
        pos = rl.positive_only(adv)
        assert (pos >= 0).all()
        assert torch.equal(pos[adv > 0], adv[adv > 0])
        assert (pos[adv <= 0] == 0).all()
    # an all-correct group: every advantage 0, nothing to learn
    adv, _ = rl.grpo_advantage(rewards=t([1.0, 1.0, 1.0]), mask=torch.ones(3, 2, dtype=D), index=[0, 0, 0])
    assert (rl.positive_only(adv) == 0).all()


def test_kl_estimators_hand_values():
    logp = t([-1.0, -2.0, -0.5, -30.0])
    ref = t([-1.5, -1.0, -0.5, -1.0])
    xs = [0.5, -1.0, 0.0, -29.0]
    assert approx(rl.kl_estimate(logp, ref, "k1"), xs)
    assert approx(rl.kl_estimate(logp, ref, "k2"), [x * x / 2 for x in xs])
    k3 = []
    for x in xs:
        x = min(max(x, -20.0), 20.0)
        k3.append(min(max(math.exp(-x) + x - 1, -10.0), 10.0))
    assert approx(rl.kl_estimate(logp, ref, "k3"), k3)
    assert k3[3] == 10.0 and k3[2] == 0.0
    with pytest.raises(ConfigError):
        rl.kl_estimate(logp, ref, "k4")


def ppo_ref(logp, old, adv, eps_lo, eps_hi, c):
    rho = math.exp(logp - old)
    l = max(-adv * rho, -adv * min(max(rho, 1 - eps_lo), 1 + eps_hi))
    if adv < 0 and c is not None:
        l = min(l, -c * adv)
    return l


def test_policy_loss_clip_dual_clip_and_masked_tokens():
    logp = [[-1.0, -0.2, -3.0], [-0.5, -2.0, -0.1]]
    old = [[-1.1, -1.0, -1.0], [-0.5, -0.3, -5.0]]
    adv = [[1.0, 1.0, -2.0], [-1.0, -1.0, 0.5]]
    mask = [[1, 1, 1], [1, 1, 0]]  # the last token is masked: its huge ratio must not count
    lo, hi, c = 0.2, 0.28, 3.0
    per = [[ppo_ref(logp[b][i], old[b][i], adv[b][i], lo, hi, c) for i in range(3)] for b in range(2)]
    valid = [(b, i) for b in range(2) for i in range(3) if mask[b][i]]
    expected = sum(per[b][i] for b, i in valid) / len(valid)
    loss, stats = rl.policy_loss(t(logp), t(old), t(adv), t(mask), clip_low=lo, clip_high=hi, dual_clip=c)
    assert approx(loss.item(), expected)
    assert approx(stats["per_token"], per)
    # clipped by hand: (0,1) rho = e^0.8 > 1.28 with A > 0; (0,2) rho = e^-2 < 0.8 with A < 0 (the clipped
    # term 2 * 0.8 = 1.6 is the larger, below the dual-clip cap 6); (1,1) rho = e^-1.7 < 0.8 with A < 0
    clipped = {(0, 1), (0, 2), (1, 1)}
    assert approx(stats["clip_frac"].item(), len(clipped) / len(valid))
    # dual clip active: A < 0 and a huge ratio
    loss2, st2 = rl.policy_loss(t([[0.0]]), t([[-3.0]]), t([[-1.0]]), t([[1]]), dual_clip=3.0)
    assert approx(loss2.item(), 3.0) and st2["dual_clip_frac"].item() == 1.0
    loss3, _ = rl.policy_loss(t([[0.0]]), t([[-3.0]]), t([[-1.0]]), t([[1]]), dual_clip=None)
    assert approx(loss3.item(), math.exp(3.0))
    # ratio 1 (on-policy): loss is -mean(A) and nothing is clipped
    lp = t([[-1.0, -2.0]])
    l4, s4 = rl.policy_loss(lp, lp.clone(), t([[2.0, -1.0]]), t([[1, 1]]))
    assert approx(l4.item(), -0.5) and s4["clip_frac"].item() == 0.0


def test_policy_loss_gradient_matches_hand_derivative():
    logp = t([[-1.0, -0.7]]).requires_grad_()
    old = t([[-1.05, -0.7]])
    adv = t([[2.0, -1.0]])
    loss, _ = rl.policy_loss(logp, old, adv, t([[1, 1]]))
    loss.backward()
    # unclipped: d/dlogp of -A*rho/2 = -A*rho/2
    assert approx(logp.grad, [[-2.0 * math.exp(0.05) / 2, 1.0 * 1.0 / 2]])


def test_loss_aggregation_modes():
    loss = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    mask = [[1, 1, 0], [1, 0, 0]]
    assert approx(rl.aggregate(t(loss), t(mask), "token-mean").item(), (1 + 2 + 4) / 3)
    assert approx(rl.aggregate(t(loss), t(mask), "token-mean", num_tokens=10).item(), 7 / 10)
    assert approx(rl.aggregate(t(loss), t(mask), "seq-mean-token-mean").item(), ((1 + 2) / 2 + 4 / 1) / 2)
    # verl's form: the token sums of every sequence, summed, over norm_len (not over the number of sequences)
    assert approx(rl.aggregate(t(loss), t(mask), "seq-mean-token-sum-norm").item(), (1 + 2) / 3 + 4 / 3)
    assert approx(rl.aggregate(t(loss), t(mask), "seq-mean-token-sum-norm", norm_len=8, num_seqs=4).item(),
                  (1 + 2) / 8 + 4 / 8)
    assert approx(rl.aggregate(t(loss), t(mask), "seq-mean-token-sum-norm", norm_len=8, num_seqs=4,
                               sum_norm_by_seqs=True).item(), ((1 + 2) / 8 + 4 / 8) / 4)
    with pytest.raises(ConfigError):
        rl.aggregate(t(loss), t(mask), "mean")


def test_value_loss_hand_values():
    # token 0: V moved past the clip range towards R -> the clipped error wins; token 1: inside the range;
    # token 2: masked
    v, v_old, ret = [[1.0, 0.0, 2.0]], [[0.0, 0.2, 2.0]], [[1.0, 1.0, 9.0]]
    mask = [[1, 1, 0]]
    per = []
    for a, b, r in zip(v[0], v_old[0], ret[0]):
        clipped = b + min(max(a - b, -0.5), 0.5)
        per.append(0.5 * max((a - r) ** 2, (clipped - r) ** 2))
    assert per[:2] == [0.5 * 0.25, 0.5 * 1.0]
    loss, stats = rl.value_loss(t(v), t(v_old), t(ret), t(mask), clip=0.5)
    assert approx(loss.item(), (per[0] + per[1]) / 2)
    assert stats["vf_clip_frac"].item() == 0.5


def test_sft_loss_is_token_mean_over_response_only():
    logp = t([[-9.0, -1.0, -2.0], [-9.0, -3.0, -9.0]])
    mask = t([[0, 1, 1], [0, 1, 0]])
    assert approx(rl.sft_loss(logp, mask).item(), (1 + 2 + 3) / 3)


def test_logprobs_and_entropy_from_logits():
    logits = t([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 2]])
    z = math.log(math.exp(1) + math.exp(2) + math.exp(0.5))
    assert approx(rl.logprobs_from_logits(logits, labels), [[2.0 - z, -math.log(3)]])
    p = [math.exp(x - z) for x in (1.0, 2.0, 0.5)]
    assert approx(rl.entropy_from_logits(logits), [[-sum(q * math.log(q) for q in p), math.log(3)]])


def test_zero_std_fraction_counts_groups():
    assert rl.zero_std_fraction(t(REWARDS), INDEX) == pytest.approx(2 / 3)
