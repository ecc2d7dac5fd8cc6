"""Task-conflict statistics: every pure statistic and every metric plugin against an independent float64
NumPy computation on small random task vectors, with zeros and exact ties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rlm.core.conflicts import stats as S
from rlm.core.conflicts.chunk import Chunk
from rlm.core.conflicts.config import ConflictsConfig
from rlm.plugins.metrics.conflict_norm import ConflictNorm
from rlm.plugins.metrics.cosine import Cosine
from rlm.plugins.metrics.fraction_updated import FractionUpdated
from rlm.plugins.metrics.sign_conflict import SignConflict
from rlm.plugins.metrics.topk_overlap import TopkOverlap
from rlm.plugins.metrics.update_norm import UpdateNorm

RATES = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def task_vector(rng: np.random.Generator, n: int, zero_frac: float = 0.3, tie_frac: float = 0.2) -> np.ndarray:
    """Random τ with exact zeros and exact magnitude ties (values ±0.01, ±0.02)."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-7, -1, n)
    x[rng.random(n) < zero_frac] = 0.0
    ties = rng.random(n) < tie_frac
    x[ties] = rng.choice([-0.02, -0.01, 0.01, 0.02], ties.sum())
    return x


# -- NumPy references of the documented definitions ----------------------------------------------------------

def np_bins(x: np.ndarray, bits: int) -> np.ndarray:
    return (np.abs(x).astype(np.float32).view(np.int32) >> (32 - bits)).astype(np.int64)


def np_kept(x: np.ndarray, k: float, bits: int) -> np.ndarray:
    """Top-k mask by the documented rule: bins at or above the bin of the n_keep-th largest |τ|, τ ≠ 0."""
    q = np_bins(x, bits)
    need = max(1, math.floor(k * x.size + 0.5))
    thr = np.sort(q)[::-1][need - 1]
    return (q >= thr) & (q > 0)


def np_exact_kept(x: np.ndarray, k: float) -> np.ndarray:
    """Exact top-k by |τ| (ties at the threshold kept), τ ≠ 0."""
    need = max(1, math.floor(k * x.size + 0.5))
    t = np.sort(np.abs(x))[::-1][need - 1]
    return (np.abs(x) >= t) & (x != 0)


def np_sign_rate(a: np.ndarray, b: np.ndarray, ka: np.ndarray, kb: np.ndarray) -> float | None:
    both = ka & kb
    den = both.sum()
    return None if den == 0 else float((both & (np.sign(a) * np.sign(b) < 0)).sum() / den)


# -- pure functions ----------------------------------------------------------------------------------------

def test_reductions_match_numpy_float64():
    rng = np.random.default_rng(0)
    a, b = task_vector(rng, 5000), task_vector(rng, 5000)
    b[:50] = -a[:50]  # exact opposite values
    b[50:100] = a[50:100]  # exact equal values
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    assert S.sum_squares(ta) == pytest.approx(np.sum(a * a), rel=1e-12)
    assert S.dot(ta, tb) == pytest.approx(np.dot(a, b), rel=1e-12)
    prod = a * b
    assert S.conflict_sum_squares(ta, tb) == pytest.approx(np.sum(prod[prod < 0] ** 2), rel=1e-12)
    assert bool(S.conflict_mask(ta, tb).numpy().sum() == (prod < 0).sum())
    # tiny values whose product underflows in float32 still count as conflicts
    tiny = torch.tensor([1e-30, -1e-30, 0.0, -0.0], dtype=torch.float32)
    other = torch.tensor([-1e-30, -1e-30, -1.0, 1.0], dtype=torch.float32)
    assert S.conflict_mask(tiny, other).tolist() == [True, False, False, False]
    # strict ">" at the threshold
    x = torch.tensor([1e-5, -1e-5, 2e-5, 0.0, -3e-5], dtype=torch.float64)
    assert S.count_above(x, 1e-5) == 2


def test_log10_histogram_matches_numpy():
    rng = np.random.default_rng(1)
    x = task_vector(rng, 20000).astype(np.float32).astype(np.float64)  # float32 values: exact bin edges
    x[:4] = [2.0 ** -20, -(2.0 ** -20) * 1.25, 1.5, 2.0 ** -20 * (1.25 - 2 ** -23)]  # on edges, just below
    fu = FractionUpdated(sub_bits=2)
    fu.update("t", {"m": torch.from_numpy(x[:7000])})
    fu.update("t", {"m": torch.from_numpy(x[7000:])})
    h = fu.result()["models"]["m"]["log10_abs_histogram"]
    edges = np.asarray(h["edges"])
    nz = np.abs(x[x != 0])
    # reference: x = m·2^e with m in [1, 2): bin (e, floor((m − 1)·4)), from frexp in float64
    m, e = np.frexp(nz)
    idx = (e - 1) * 4 + np.floor((2 * m - 1) * 4).astype(int)
    ref = np.bincount(idx - idx.min())
    assert h["counts"] == ref.tolist()
    assert h["zeros"] == int((x == 0).sum())
    lower = [2.0 ** (i // 4) * (1 + (i % 4) / 4) for i in range(idx.min(), idx.max() + 2)]
    assert np.allclose(edges, np.log10(lower), rtol=0, atol=1e-12)
    assert len(edges) == len(h["counts"]) + 1


def test_magnitude_bins_are_monotone_and_match_float32_bits():
    rng = np.random.default_rng(2)
    x = task_vector(rng, 3000)
    for bits in (9, 16, 20, 24):
        q = S.magnitude_bins(torch.from_numpy(x), bits).numpy()
        assert (q == np_bins(x, bits)).all()
        order = np.argsort(np.abs(x), kind="stable")
        assert (np.diff(q[order]) >= 0).all()
        assert q.max() < S.n_bins(bits)


@pytest.mark.parametrize("bits", [12, 20, 24])
def test_topk_levels_and_pair_counts_match_numpy(bits):
    rng = np.random.default_rng(3)
    a, b = task_vector(rng, 20000), task_vector(rng, 20000)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ba, bb = S.magnitude_bins(ta, bits), S.magnitude_bins(tb, bits)
    thr_a = S.threshold_bins(S.bin_histogram(ba, bits), a.size, RATES)
    fa = S.first_kept(ba, thr_a, bits)
    fb = S.first_kept(bb, S.threshold_bins(S.bin_histogram(bb, bits), b.size, RATES), bits)
    # the binary-search path (small blocks) and the lookup-table path agree
    assert torch.equal(fa, S.first_kept(ba, thr_a, bits, table=S.first_kept_table(thr_a, bits)))
    assert torch.equal(S.first_kept(ba[:100], thr_a, bits), fa[:100])
    both, union, conf = S.pair_counts(fa, fb, S.conflict_mask(ta, tb), len(RATES))
    kept_a = S.kept_counts(fa, len(RATES))
    kept_hist = S.kept_from_histogram(S.bin_histogram(ba, bits), thr_a)
    for g, k in enumerate(RATES):
        ka, kb = np_kept(a, k, bits), np_kept(b, k, bits)
        assert int(kept_a[g]) == ka.sum() == int(kept_hist[g])
        assert int(both[g]) == (ka & kb).sum()
        assert int(union[g]) == (ka | kb).sum()
        assert int(conf[g]) == (ka & kb & (a * b < 0)).sum()
        assert ka.sum() >= min(max(1, math.floor(k * a.size + 0.5)), (a != 0).sum())  # never fewer than asked


def test_binned_topk_is_close_to_exact_topk():
    """The documented approximation: the kept set exceeds the exact top-k only by positions in the threshold
    bin (relative width 2^-11 at 20 bits); on continuous data the rates agree closely."""
    rng = np.random.default_rng(4)
    n = 200_000
    a = rng.standard_normal(n) * 1e-3
    b = 0.5 * a + rng.standard_normal(n) * 1e-3
    for k in (0.01, 0.1, 0.3, 0.7):
        ka, kb = np_kept(a, k, 20), np_kept(b, k, 20)
        ea, eb = np_exact_kept(a, k), np_exact_kept(b, k)
        assert (ea & ~ka).sum() == 0  # binned set contains the exact set
        t = np.sort(np.abs(a))[::-1][max(1, math.floor(k * n + 0.5)) - 1]
        extra = np.abs(a[ka & ~ea])
        assert extra.size == 0 or extra.min() >= t * (1 - 2.0 ** -11)  # within one bin of the threshold
        assert (ka.sum() - ea.sum()) / n < 2e-3
        assert abs(np_sign_rate(a, b, ka, kb) - np_sign_rate(a, b, ea, eb)) < 2e-3


def test_exact_ties_are_kept_together():
    x = np.array([0.5, -0.5, 0.5, 0.25, 0.0, 0.0, -0.25, 0.5, 0.1, 0.0])
    t = torch.from_numpy(x)
    bins = S.magnitude_bins(t, 20)
    thr = S.threshold_bins(S.bin_histogram(bins, 20), x.size, [0.1, 0.2, 0.5, 0.9, 1.0])
    kept = S.kept_counts(S.first_kept(bins, thr, 20), 5).tolist()
    # k=0.1 asks for 1 of 10 but four values tie at 0.5; k=0.5 asks 5 -> 0.5s and both 0.25s;
    # k=0.9 and 1.0 reach the zeros, which are never kept
    assert kept == [4, 4, 6, 7, 7]


# -- metric plugins fed block by block ----------------------------------------------------------------------

def _feed(metrics, tensors: dict[str, dict[str, np.ndarray]], bits: int, modes: list[str], block: int):
    """Drive metrics the way the engine does: global thresholds from a histogram of everything, per-tensor
    thresholds per tensor, then blocks of ``block`` elements."""
    names = list(next(iter(tensors.values())))
    total = sum(v[names[0]].size for v in tensors.values())
    thresholds: dict[str, dict[str, torch.Tensor]] = {}
    if "global" in modes:
        hists = {n: sum(S.bin_histogram(S.magnitude_bins(torch.from_numpy(v[n]), bits), bits)
                        for v in tensors.values()) for n in names}
        thresholds["global"] = {n: S.threshold_bins(h, total, RATES) for n, h in hists.items()}
    for tname, per_model in tensors.items():
        size = per_model[names[0]].size
        if "per_tensor" in modes:
            thresholds["per_tensor"] = {n: S.threshold_bins(
                S.bin_histogram(S.magnitude_bins(torch.from_numpy(per_model[n]), bits), bits), size, RATES)
                for n in names}
        for s in range(0, size, block):
            deltas = {n: torch.from_numpy(per_model[n][s:s + block]) for n in names}
            chunk = Chunk(tname, deltas, numel=size, kept_rates=RATES, bits=bits, thresholds=thresholds,
                            modes=modes)
            for m in metrics:
                m.update(tname, deltas, context=chunk)
    return [m.result() for m in metrics]


def test_metric_plugins_match_numpy():
    rng = np.random.default_rng(5)
    names = ["math", "code", "if"]
    shapes = {"model.layers.0.self_attn.q_proj.weight": 3000, "model.layers.0.mlp.up_proj.weight": 5000,
              "model.layers.1.self_attn.q_proj.weight": 3000, "model.embed_tokens.weight": 4000,
              "model.norm.weight": 7}
    tensors = {t: {n: task_vector(rng, size) for n in names} for t, size in shapes.items()}
    tensors["model.norm.weight"]["code"][:] = 0.0  # an all-zero tensor
    metrics = [UpdateNorm(), FractionUpdated(threshold=1e-4, sub_bits=3), ConflictNorm(), Cosine(), SignConflict(),
               TopkOverlap()]
    results = _feed(metrics, tensors, bits=20, modes=["global", "per_tensor"], block=1000)
    merged: dict = {"models": {}, "pairs": {}}
    for r in results:
        for key in ("models", "pairs"):
            for k, v in r.get(key, {}).items():
                merged[key].setdefault(k, {}).update(v)
    full = {n: np.concatenate([tensors[t][n] for t in shapes]) for n in names}
    for n in names:
        m = merged["models"][n]
        x = full[n]
        assert m["update_norm"] == pytest.approx(np.sqrt(np.sum(x * x)), rel=1e-12)
        assert m["fraction_updated"] == pytest.approx((np.abs(x) > 1e-4).mean(), abs=0)
        layer0 = np.concatenate([tensors[t][n] for t in shapes if ".layers.0." in t])
        assert m["update_norm_per_layer"]["0"] == pytest.approx(np.linalg.norm(layer0), rel=1e-12)
        assert m["update_norm_per_layer"]["model.embed_tokens"] == pytest.approx(
            np.linalg.norm(tensors["model.embed_tokens.weight"][n]), rel=1e-12)
        q = np.concatenate([tensors[t][n] for t in shapes if "q_proj" in t])
        assert m["update_norm_per_module"]["self_attn.q_proj"] == pytest.approx(np.linalg.norm(q), rel=1e-12)
        assert sum(m["log10_abs_histogram"]["counts"]) + m["log10_abs_histogram"]["zeros"] == x.size
        alone = FractionUpdated(threshold=1e-4, sub_bits=3)  # without the engine's bins: same histogram
        alone.update("all", {n: torch.from_numpy(x)})
        assert alone.result()["models"][n]["log10_abs_histogram"] == m["log10_abs_histogram"]
    for a, b in itertools.combinations(names, 2):
        p = merged["pairs"][f"{a}|{b}"]
        xa, xb = full[a], full[b]
        prod = xa * xb
        assert p["conflict_norm"] == pytest.approx(np.sqrt(np.sum(prod[prod < 0] ** 2)), rel=1e-12)
        assert p["cosine"] == pytest.approx(np.dot(xa, xb) / np.linalg.norm(xa) / np.linalg.norm(xb), rel=1e-10)
        sc = p["sign_conflict"]
        assert sc["kept_rate"] == RATES and sc["topk"] == "global"
        ov = p["topk_overlap"]
        for g, k in enumerate(RATES):
            ka, kb = np_kept(xa, k, 20), np_kept(xb, k, 20)
            ref = np_sign_rate(xa, xb, ka, kb)
            assert sc["rate"][g] == pytest.approx(ref, abs=1e-15)
            assert sc["both_kept"][g] == (ka & kb).sum()
            assert ov["jaccard"][g] == pytest.approx((ka & kb).sum() / (ka | kb).sum(), abs=1e-15)
            # per-tensor top-k: masks built tensor by tensor
            pa = np.concatenate([np_kept(tensors[t][a], k, 20) for t in shapes])
            pb = np.concatenate([np_kept(tensors[t][b], k, 20) for t in shapes])
            assert sc["per_tensor"]["rate"][g] == pytest.approx(np_sign_rate(xa, xb, pa, pb), abs=1e-15)
            assert ov["per_tensor"]["jaccard"][g] == pytest.approx((pa & pb).sum() / (pa | pb).sum(), abs=1e-15)


def test_sign_rate_is_null_when_nothing_is_kept_by_both():
    a = np.array([1.0, 0.0, 0.0, 0.0])
    b = np.array([0.0, 0.0, 0.0, -1.0])
    (res,) = _feed([SignConflict()], {"t": {"a": a, "b": b}}, bits=20, modes=["global"], block=4)
    sc = res["pairs"]["a|b"]["sign_conflict"]
    assert sc["rate"] == [None] * len(RATES) and sc["both_kept"] == [0] * len(RATES)
    a2 = np.array([1.0, -2.0, 3.0, 0.0])
    b2 = np.array([-1.0, -2.0, -3.0, 0.0])
    (res,) = _feed([SignConflict()], {"t": {"a": a2, "b": b2}}, bits=20, modes=["global"], block=3)
    # k = 1.0: the three non-zero positions are kept by both and two of them disagree
    assert res["pairs"]["a|b"]["sign_conflict"]["rate"][-1] == pytest.approx(2 / 3)


def test_config_validation():
    from rlm.core.config import validate
    from rlm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="kept_rates"):
        validate(ConflictsConfig, {"kept_rates": [0.0, 0.5]})
    with pytest.raises(ConfigError, match="unknown field"):
        validate(ConflictsConfig, {"no_such": 1})
    assert validate(ConflictsConfig, {"kept_rates": [1.0, 0.1, 0.1]}).kept_rates == [0.1, 1.0]
