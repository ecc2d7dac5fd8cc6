"""RL numerics against independent float64 references (numpy loops written here, not verl's code): stable
whitening on float32 inputs, exact zeros for equal-reward groups, RL-Pos's two definitions, the aggregation
modes and the entropy bonus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlm.core.train import algorithms as rl


def whiten64(x: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    v = x[mask > 0].astype(np.float64)
    mean = v.mean()
    var = ((v - mean) ** 2).sum() / (len(v) - 1)
    return (x - mean) / np.sqrt(var + eps) * mask


def reinforce_pp64(r: np.ndarray, mask: np.ndarray, kl: np.ndarray, beta: float) -> np.ndarray:
    B, T = mask.shape
    ret = np.zeros((B, T))
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t] > 0]
        g = 0.0
        for t in reversed(valid):
            g += -beta * kl[i, t] + (r[i] if t == valid[-1] else 0.0)
            ret[i, t] = g
    return whiten64(ret, mask)


def test_reinforce_pp_on_float32_matches_float64_when_every_reward_is_one():
    """The case that exposed one-pass float32 whitening: 64 x 64, every reward 1, beta 1e-3."""
    g = torch.Generator().manual_seed(0)
    B = T = 64
    mask = torch.ones(B, T)
    mask[::3, 50:] = 0  # ragged lengths
    kl = torch.randn(B, T, generator=g) * 0.02
    r = torch.ones(B)
    adv, _ = rl.reinforce_pp_advantage(rewards=r, mask=mask, kl=kl, beta=1e-3)
    assert adv.dtype == torch.float32
    ref = reinforce_pp64(r.double().numpy(), mask.double().numpy(), kl.double().numpy(), 1e-3)
    assert np.abs(adv.double().numpy() - ref).max() < 1e-5
    valid = ref[mask.numpy() > 0]
    assert adv[mask > 0].double().std().item() == pytest.approx(valid.std(ddof=1), rel=1e-5)


def test_whitening_is_two_pass_on_a_large_offset():
    g = torch.Generator().manual_seed(1)
    x = (1e4 + torch.randn(40, 7, generator=g) * 1e-2).float()
    mask = (torch.rand(40, 7, generator=g) > 0.3).float()
    got = rl.masked_whiten(x, mask).double().numpy()
    ref = whiten64(x.double().numpy(), mask.double().numpy())
    assert np.abs(got - ref).max() < 1e-4
    # statistics reduced elsewhere (several processes) give the same result
    halves = [rl.whiten_moments(x[:20], mask[:20]), rl.whiten_moments(x[20:], mask[20:])]
    n = halves[0][0] + halves[1][0]
    mean = (halves[0][0] * halves[0][1] + halves[1][0] * halves[1][1]) / n
    m2 = sum(h[2] + h[0] * (h[1] - mean) ** 2 for h in halves)  # Chan's parallel combination
    assert np.abs(rl.masked_whiten(x, mask, stats=(n, mean, m2)).double().numpy() - ref).max() < 1e-4


def test_equal_reward_groups_get_exactly_zero_advantage():
    mask = torch.ones(32, 4)
    rewards = torch.tensor([0.97] * 16 + [0.3, 0.9, 0.5, 0.7] * 4)
    index = [0] * 16 + [1] * 16
    for est in (rl.grpo_advantage, rl.dr_grpo_advantage, rl.rloo_advantage):
        adv, _ = est(rewards=rewards, mask=mask, index=index)
        assert (adv[:16] == 0).all(), est.__name__
        assert (adv[16:] != 0).any()
    assert rl.zero_std_fraction(rewards, index) == 0.5
    # GRPO's non-trivial group against float64 by hand
    r = np.array([0.3, 0.9, 0.5, 0.7] * 4)
    expect = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    adv, _ = rl.grpo_advantage(rewards=rewards, mask=mask, index=index)
    assert np.abs(adv[16:, 0].double().numpy() - expect).max() < 1e-6


def test_rl_pos_definitions_differ_with_continuous_rewards():
    rewards = torch.tensor([0.3, 0.9, 0.5, 0.7])
    mask = torch.ones(4, 2)
    adv, _ = rl.grpo_advantage(rewards=rewards, mask=mask, index=[0] * 4)
    # (r - 0.6) / std(ddof=1) = (r - .6) / 0.2582: -1.162, 1.162, -0.387, 0.387
    clamp = rl.positive_only(adv, mode="clamp")
    assert torch.allclose(clamp[:, 0], torch.tensor([0.0, 1.1619, 0.0, 0.3873]), atol=1e-4)
    incorrect = rl.positive_only(adv, rewards, threshold=1.0, mode="incorrect")
    assert (incorrect == 0).all()  # every sample is below the correctness threshold
    some = rl.positive_only(adv, rewards, threshold=0.6, mode="incorrect")
    assert torch.equal(some[:, 0], torch.tensor([0.0, adv[1, 0].item(), 0.0, adv[3, 0].item()]))
    binary = torch.tensor([1.0, 0.0, 1.0, 0.0])
    a2, _ = rl.grpo_advantage(rewards=binary, mask=mask, index=[0] * 4)
    assert torch.equal(rl.positive_only(a2, binary, 1.0, "incorrect"), rl.positive_only(a2, mode="clamp"))


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    assert rl.aggregate(loss, mask, "token-mean").item() == pytest.approx(15 / 5)
    assert rl.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4.5) / 2)
    assert rl.aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 9) / 2)
    assert rl.aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx(6 / 4 + 9 / 4)
    assert rl.aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=4, sum_norm_by_seqs=True).item() == \
        pytest.approx((6 / 4 + 9 / 4) / 2)


def verl_rpp_baseline64(r, mask, kl, beta, index):
    """verl's REINFORCE++-baseline, recomputed in float64: score = r - beta * sum kl, minus the group mean score
    (0 for a one-sample group), broadcast and whitened."""
    score = r - beta * (kl * mask).sum(-1)
    out = score.copy()
    for g in set(index):
        members = [i for i, x in enumerate(index) if x == g]
        if len(members) > 1:
            out[members] = score[members] - score[members].mean()
    return whiten64(out[:, None] * mask, mask)


def test_reinforce_pp_baseline_follows_verl_by_default():
    g = torch.Generator().manual_seed(3)
    B, T = 10, 6
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    kl = torch.randn(B, T, generator=g) * 0.1
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.2, 0.9, 0.3, 1.0])
    index = [0, 0, 0, 1, 1, 1, 2, 2, 3, 4]  # groups 3 and 4 have one sample each
    adv, _ = rl.reinforce_pp_baseline_advantage(rewards=r, mask=mask, index=index, kl=kl, beta=0.05)
    ref = verl_rpp_baseline64(r.double().numpy(), mask.double().numpy(), kl.double().numpy(), 0.05, index)
    assert np.abs(adv.double().numpy() - ref).max() < 1e-5
    old, _ = rl.reinforce_pp_baseline_advantage(rewards=r, mask=mask, index=index, kl=kl, beta=0.05,
                                                baseline_mode="openrlhf")
    assert not torch.allclose(old, adv)


def test_one_sample_groups_keep_their_reward_as_verl():
    r = torch.tensor([0.8, 1.0, 0.0])
    mask = torch.ones(3, 2)
    index = [0, 1, 1]
    a, _ = rl.grpo_advantage(rewards=r, mask=mask, index=index)
    assert a[0, 0].item() == pytest.approx(0.8 / (1 + 1e-6))
    assert rl.dr_grpo_advantage(rewards=r, mask=mask, index=index)[0][0, 0].item() == pytest.approx(0.8)
    assert rl.rloo_advantage(rewards=r, mask=mask, index=index)[0][0, 0].item() == pytest.approx(0.8)
    for est in (rl.grpo_advantage, rl.dr_grpo_advantage, rl.rloo_advantage):
        assert est(rewards=r, mask=mask, index=index, single_sample_groups="zero")[0][0, 0].item() == 0.0


def test_entropy_bonus_changes_the_update(tmp_path):
    """entropy_coef > 0 differentiates through the entropy: the same run with and without it ends elsewhere."""
    from test_train_support import rlm_cli

    finals = []
    with rlm_cli() as cli:
        for coef in (0.0, 0.5):
            out = tmp_path / f"e{coef}"
            assert cli("train", "--trainer", "grpo", "--task", "digits", "--model", "tiny", "--steps", "1",
                       "--out", out, "--no-progress", "--set", "num_threads=1", "--set", "prompts_per_step=2",
                       "--set", "group_size=4", "--set", "max_new_tokens=6", "--set", "lr=1e-3",
                       "--set", f"entropy_coef={coef}") == 0
            from safetensors.torch import load_file

            finals.append(load_file(str(out / "final" / "model.safetensors")))
    assert any(not torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
