"""The five built-in merge methods against values computed independently in float64 (numpy loops and a few
literal hand-worked numbers), with the edge cases: all-zero deltas, tied sign votes, density 1.0, density near
0, one-element tensors, negative weights; and DARE's statistical properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_merge_engine import merge_whole

from rlm.core.contracts import MergeContext, tensor_seed
from rlm.core.errors import ConfigError
from rlm.plugins.mergers.averaging import Averaging
from rlm.plugins.mergers.dare_linear import DareLinear
from rlm.plugins.mergers.dare_ties import DareTies
from rlm.plugins.mergers.task_arithmetic import TaskArithmetic
from rlm.plugins.mergers.ties import Ties


def run(method, base, deltas, params, *, name="w", seed=0):
    """What the engine does for one whole tensor: prepare per model, then merge (fp32)."""
    base_t = torch.as_tensor(np.asarray(base), dtype=torch.float32)
    d = torch.as_tensor(np.asarray(deltas), dtype=torch.float32)
    mp = [method.ModelParams(**p) for p in params]
    return merge_whole(method, base_t, d, mp, name=name, seed=seed).double().numpy()


# ---------------------------------------------------------------------------------------------- references
def ref_trim(tau, density):
    """Keep exactly the top-k |τ| (k = floor(d n), at least 1 for d > 0); among equal magnitudes the lower
    flat index wins (a stable sort on −|τ|)."""
    flat = np.abs(tau).ravel()
    n = flat.size
    if density >= 1:
        return tau.copy()
    if density <= 0:
        return np.zeros_like(tau)
    k = max(1, int(density * n))
    order = np.argsort(-flat, kind="stable")[:k]
    keep = np.zeros(n, dtype=bool)
    keep[order] = True
    return np.where(keep.reshape(tau.shape), tau, 0.0)


def ref_elect(base, taus, weights, lam, normalize):
    taus = np.asarray(taus, dtype=np.float64)
    out = np.array(base, dtype=np.float64).copy()
    flat_out = out.reshape(-1)
    u = [w * t.reshape(-1) for w, t in zip(weights, taus)]
    for j in range(flat_out.size):
        s = sum(x[j] for x in u)
        gamma = 1.0 if s >= 0 else -1.0
        num, den = 0.0, 0.0
        for w, x in zip(weights, u):
            if x[j] != 0 and np.sign(x[j]) == gamma:
                num += x[j]
                den += w
        if normalize:
            num /= den if den != 0 else 1.0
        flat_out[j] += lam * num
    return out


def ref_linear(base, taus, weights, lam, normalize):
    mixed = sum(w * np.asarray(t, dtype=np.float64) for w, t in zip(weights, taus))
    if normalize:
        s = sum(weights)
        mixed = mixed / (s if abs(s) >= 1e-8 else 1.0)
    return np.asarray(base, dtype=np.float64) + lam * mixed


rng = np.random.default_rng(0)
BASE = rng.normal(size=(6, 5))
TAUS = rng.normal(scale=0.1, size=(3, 6, 5))


# ---------------------------------------------------------------------------------------------- averaging
def test_averaging_is_weighted_mean_of_models():
    w = [0.2, 0.3, 0.5]
    thetas = BASE + TAUS
    expect = sum(wi * t for wi, t in zip(w, thetas)) / sum(w)
    got = run(Averaging(), BASE, TAUS, [{"weight": x} for x in w])
    np.testing.assert_allclose(got, expect, atol=1e-6)


def test_averaging_hand_values_and_unnormalized():
    base, taus = [1.0, 2.0], [[1.0, -2.0], [3.0, 0.0]]  # θ1 = [2, 0], θ2 = [4, 2]
    np.testing.assert_allclose(run(Averaging(), base, taus, [{"weight": 1}, {"weight": 3}]), [3.5, 1.5])
    got = run(Averaging(normalize=False), base, taus, [{"weight": 1}, {"weight": 3}])
    np.testing.assert_allclose(got, [14.0, 6.0])


def test_averaging_negative_weights_and_zero_sum_refused():
    w = [1.5, -0.5]
    expect = (1.5 * (BASE + TAUS[0]) - 0.5 * (BASE + TAUS[1])) / 1.0
    np.testing.assert_allclose(run(Averaging(), BASE, TAUS[:2], [{"weight": x} for x in w]), expect, atol=1e-5)
    with pytest.raises(ConfigError, match="sum to 0"):
        Averaging().check([Averaging.ModelParams(weight=1), Averaging.ModelParams(weight=-1)])


# ---------------------------------------------------------------------------------------------- task arithmetic
@pytest.mark.parametrize("lam,normalize,w", [(1.0, False, [1, 1, 1]), (0.7, False, [0.5, -0.3, 1.2]),
                                             (0.7, True, [0.5, 0.25, 0.25]), (2.0, True, [1, -1, 0])])
def test_task_arithmetic(lam, normalize, w):
    m = TaskArithmetic({"lambda": lam, "normalize": normalize})
    got = run(m, BASE, TAUS, [{"weight": x} for x in w])
    np.testing.assert_allclose(got, ref_linear(BASE, TAUS, w, lam, normalize), atol=1e-5)


def test_task_arithmetic_hand_values():
    got = run(TaskArithmetic({"lambda": 0.5}), [1.0], [[2.0], [-6.0]], [{"weight": 1}, {"weight": 0.5}])
    np.testing.assert_allclose(got, [1.0 + 0.5 * (2.0 - 3.0)])  # 0.5


def test_all_zero_deltas_give_the_base_for_every_method():
    zeros = np.zeros((2, 4, 3))
    base = rng.normal(size=(4, 3))
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    for m in (Ties(), DareTies(), DareLinear()):
        np.testing.assert_allclose(run(m, base, zeros, params), base, atol=1e-7, err_msg=m.name)
    np.testing.assert_allclose(run(TaskArithmetic(), base, zeros, [{"weight": 0.5}] * 2), base, atol=1e-7)
    np.testing.assert_allclose(run(Averaging(), base, zeros, [{"weight": 0.5}] * 2), base, atol=1e-7)


# ---------------------------------------------------------------------------------------------- TIES
@pytest.mark.parametrize("density", [1.0, 0.8, 0.5, 0.1, 0.01, 0.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_float64_reference(density, normalize):
    w = [0.5, 0.3, -0.4]
    m = Ties({"lambda": 0.9, "normalize": normalize})
    got = run(m, BASE, TAUS, [{"weight": x, "density": density} for x in w])
    trimmed = [ref_trim(t, density) for t in TAUS]
    np.testing.assert_allclose(got, ref_elect(BASE, trimmed, w, 0.9, normalize), atol=1e-6)


def test_ties_keeps_exactly_k_with_tied_magnitudes():
    # |τ| = [1, 2, 2, 2, 1, 2]; density 0.5 keeps k = 3 of the four 2s: the three lowest indices
    tau = np.array([[1.0, -2.0, 2.0, 2.0, -1.0, -2.0]])
    got = run(Ties(), np.zeros(6), tau, [{"weight": 1.0, "density": 0.5}])
    np.testing.assert_allclose(got, [0.0, -2.0, 2.0, 2.0, 0.0, 0.0])
    q = np.round(np.random.default_rng(2).normal(size=(2, 7, 9)) * 4) / 4  # many equal magnitudes
    got = run(Ties(), np.zeros((7, 9)), q, [{"weight": 1.0, "density": 0.4}] * 2)
    ref = ref_elect(np.zeros((7, 9)), [ref_trim(t, 0.4) for t in q], [1.0, 1.0], 1.0, True)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert all(np.count_nonzero(ref_trim(t, 0.4)) == int(0.4 * 63) for t in q)


def test_ties_hand_values():
    # τ1 = [3, -1, 0.5, 2], τ2 = [-1, -2, 0.25, 4], density 0.5 keeps 2 of 4 per model:
    # τ̂1 = [3, 0, 0, 2], τ̂2 = [0, -2, 0, 4]; weights 1: sums [3, -2, 0, 6] -> γ = [+, -, + (zero sum), +]
    # agree: pos0 {1}, pos1 {2}, pos2 {} (zeros never agree), pos3 {1, 2}
    base = [0.0, 0.0, 10.0, 0.0]
    taus = [[3.0, -1.0, 0.5, 2.0], [-1.0, -2.0, 0.25, 4.0]]
    params = [{"weight": 1.0, "density": 0.5}] * 2
    np.testing.assert_allclose(run(Ties(), base, taus, params), [3.0, -2.0, 10.0, 3.0])
    np.testing.assert_allclose(run(Ties({"normalize": False}), base, taus, params), [3.0, -2.0, 10.0, 6.0])


def test_ties_tied_sign_vote_elects_plus():
    # weighted sum exactly 0: γ = +1, only the positive entry counts
    got = run(Ties(), [0.0], [[0.5], [-0.5]], [{"weight": 1.0, "density": 1.0}] * 2)
    np.testing.assert_allclose(got, [0.5])


def test_ties_negative_weight_flips_the_vote():
    # u = [0.5*1, -1*0.4] = [0.5, -0.4] -> γ = +, keep model 0: 0.5 / 0.5 = 1.0
    got = run(Ties(), [0.0], [[1.0], [0.4]], [{"weight": 0.5, "density": 1}, {"weight": -1.0, "density": 1}])
    np.testing.assert_allclose(got, [1.0])
    # u = [0.5, -1.0] -> γ = −, keep model 1: −1.0 / −1.0 = 1.0 (divided by its own weight)
    got = run(Ties(), [0.0], [[1.0], [1.0]], [{"weight": 0.5, "density": 1}, {"weight": -1.0, "density": 1}])
    np.testing.assert_allclose(got, [1.0])


def test_ties_one_element_tensor_keeps_its_entry_at_low_density():
    # floor(0.3 * 1) = 0 would drop everything; a positive density keeps at least one entry
    got = run(Ties(), [1.0], [[0.2], [0.4]], [{"weight": 1.0, "density": 0.3}] * 2)
    np.testing.assert_allclose(got, [1.3])
    got = run(Ties(), [1.0], [[0.2], [0.4]], [{"weight": 1.0, "density": 0.0}] * 2)
    np.testing.assert_allclose(got, [1.0])


def test_ties_density_near_zero_keeps_only_the_largest():
    tau = np.zeros((1, 100))
    tau[0, :] = np.linspace(0.01, 1.0, 100)
    got = run(Ties(), np.zeros(100), tau, [{"weight": 1.0, "density": 1e-6}])
    expect = np.zeros(100)
    expect[-1] = 1.0
    np.testing.assert_allclose(got, expect)


def test_ties_rescale_restores_l1():
    m = Ties({"rescale": True, "normalize": False})
    got = run(m, np.zeros((6, 5)), TAUS[:1], [{"weight": 1.0, "density": 0.3}])
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(TAUS[0]).sum(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- DARE
def _dare_reference(taus, densities, seed, name, rescale):
    """DARE drop with the documented generator rule, recomputed independently in float64."""
    out = []
    for i, (t, d) in enumerate(zip(taus, densities)):
        g = torch.Generator().manual_seed(tensor_seed(seed, name, i))
        keep = (torch.rand(t.shape, generator=g, dtype=torch.float32) < d).numpy() if d < 1 else np.ones(t.shape, bool)
        kept = np.where(keep, t, 0.0)
        if rescale and np.abs(kept).sum() > 1e-7 and np.abs(t).sum() > 1e-7:
            kept = kept * (np.abs(t).sum() / np.abs(kept).sum())
        out.append(kept)
    return out


@pytest.mark.parametrize("cls,elect", [(DareTies, True), (DareLinear, False)])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_float64_reference(cls, elect, rescale):
    w, dens = [0.5, 0.7, -0.2], [0.8, 0.5, 0.3]
    m = cls({"lambda": 0.8, "rescale": rescale})
    got = run(m, BASE, TAUS, [{"weight": a, "density": b} for a, b in zip(w, dens)], seed=3, name="layer.w")
    kept = _dare_reference(TAUS, dens, 3, "layer.w", rescale)
    ref = ref_elect(BASE, kept, w, 0.8, False) if elect else ref_linear(BASE, kept, w, 0.8, False)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_dare_statistics_kept_fraction_l1_and_seeds():
    t = np.random.default_rng(1).normal(size=(1, 400, 250))
    p = [{"weight": 1.0, "density": 0.3}]
    got = run(DareLinear(), np.zeros((400, 250)), t, p, seed=0)
    frac = np.count_nonzero(got) / got.size
    assert abs(frac - 0.3) < 0.01  # 100k Bernoulli(0.3) draws: sd 0.0014
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(t).sum(), rtol=1e-5)  # L1 preserved
    np.testing.assert_array_equal(got, run(DareLinear(), np.zeros((400, 250)), t, p, seed=0))
    other = run(DareLinear(), np.zeros((400, 250)), t, p, seed=1)
    assert not np.array_equal(got, other)
    assert abs(np.count_nonzero(other) / other.size - 0.3) < 0.01
    # a different tensor name gives an independent mask
    assert not np.array_equal(got != 0, run(DareLinear(), np.zeros((400, 250)), t, p, seed=0, name="x") != 0)
    # density 1.0: nothing dropped, no rescale
    full = run(DareTies(), np.zeros((400, 250)), t, [{"weight": 1.0, "density": 1.0}])
    np.testing.assert_allclose(full, t[0], atol=1e-6)


def test_paper_presets():
    assert Ties.presets["paper"]["model_params"] == {"weight": 0.5, "density": 0.8}
    assert DareTies.presets["paper"]["model_params"] == {"weight": 0.5, "density": 0.8}
    assert DareLinear.presets["paper"]["model_params"] == {"weight": 0.5, "density": 0.8}
    assert TaskArithmetic.presets["paper"]["params"] == {"lambda": 0.7}


def test_mergekit_default_flags():
    assert (Ties().config.normalize, Ties().config.rescale) == (True, False)
    assert (DareTies().config.normalize, DareTies().config.rescale) == (False, True)
    assert (DareLinear().config.normalize, DareLinear().config.rescale) == (False, True)
    assert TaskArithmetic().config.normalize is False and Averaging().config.normalize is True
    assert TaskArithmetic({"lambda": 0.3}).config.lambda_ == 0.3
    with pytest.raises(Exception):
        Ties({"lamda": 1.0})
    with pytest.raises(Exception):
        Ties.ModelParams(density=1.5)


@pytest.mark.parametrize("density", [0.8, 0.37, 0.01, 1e-9, 0.999])
@pytest.mark.parametrize("quantized", [False, True])
def test_streaming_magnitude_cut_equals_whole_tensor_cut(density, quantized):
    from rlm.core.merge.ops import magnitude_keep, magnitude_threshold, magnitude_threshold_blocks

    g = torch.Generator().manual_seed(7)
    t = torch.randn(37, 29, generator=g)
    if quantized:  # many equal magnitudes, as in bf16 task vectors
        t = torch.round(t * 3) / 3
    whole = magnitude_threshold(t, density)

    def blocks():
        for s in range(0, 37, 5):
            yield (s, min(s + 5, 37)), t[s:s + 5]

    assert magnitude_threshold_blocks(blocks, t.numel(), density) == whole
    k = max(1, int(density * t.numel()))
    keep = magnitude_keep(t, whole)
    assert int(keep.sum()) == k
    # the same mask assembled block by block
    parts = [magnitude_keep(b, whole, MergeContext("w", (37, 29), rows=r)) for r, b in blocks()]
    assert torch.equal(torch.cat(parts), keep)
    # and it is the top-k by (|τ| descending, flat index ascending)
    order = np.argsort(-np.abs(t.numpy()).ravel(), kind="stable")[:k]
    ref = np.zeros(t.numel(), dtype=bool)
    ref[order] = True
    np.testing.assert_array_equal(keep.numpy().ravel(), ref)
