"""The fast float32 path of the task-conflict engine (bf16/fp16 inputs, ``delta_dtype: auto``): τ formed in
float32 and sums accumulated in float64 must match an independent float64 NumPy computation to float32
rounding, with top-k counts identical; tiny task vectors (whose float32 squares underflow) fall back to
float64; the block-level building blocks match the reference functions."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_conflicts import np_kept

from rlm.core.conflicts import stats as S
from rlm.core.conflicts.chunk import Chunk
from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.engine import compute_conflicts

RATES = [0.01, 0.1, 0.3, 0.5, 1.0]


def write_bf16(out: Path, tensors: dict[str, torch.Tensor], config_from: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((config_from / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def make_bf16_experts(tiny_model_dir: Path, root: Path, seed: int, specs: list[tuple[str, float, float]],
                      untouched_every: dict[str, int] | None = None) -> tuple[Path, dict[str, Path]]:
    """The tiny model as a bf16 base plus one bf16 expert per ``(name, scale, zero_frac)``: τ = scale·N(0,1) on
    a random (1 − zero_frac) share of each tensor; ``untouched_every[name] = k`` leaves every k-th tensor of
    that expert equal to the base."""
    from safetensors.torch import load_file

    sd = {k: v.to(torch.float32) for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    g = torch.Generator().manual_seed(seed)
    base = write_bf16(root / "base", sd, tiny_model_dir)
    experts = {}
    for name, scale, zero in specs:
        every = (untouched_every or {}).get(name)
        new = {}
        for i, (k, v) in enumerate(sd.items()):
            d = torch.randn(v.shape, generator=g) * scale
            d[torch.rand(v.shape, generator=g) < zero] = 0
            if every and i % every == 0:
                d.zero_()
            new[k] = v + d
        experts[name] = write_bf16(root / name, new, tiny_model_dir)
    return base, experts


@pytest.fixture(scope="module")
def bf16_models(tiny_model_dir, tmp_path_factory):
    return make_bf16_experts(tiny_model_dir, tmp_path_factory.mktemp("bf16"), 7,
                             [("sft", 3e-3, 0.2), ("rl", 2e-4, 0.8)])


def np_tv(base: Path, experts: dict[str, Path]) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    b = load_file(str(base / "model.safetensors"))
    names = sorted(b)
    out = {}
    for n, p in experts.items():
        sd = load_file(str(p / "model.safetensors"))
        out[n] = np.concatenate([sd[t].to(torch.float64).numpy().ravel() - b[t].to(torch.float64).numpy().ravel()
                                 for t in names])
    return out


def test_bf16_float32_path_matches_numpy_float64(bf16_models, monkeypatch):
    base, experts = bf16_models
    cfg = ConflictsConfig(kept_rates=RATES, topk_modes=["global"], chunk_elements=30000, engine="eager")
    seen = set()
    init = Chunk.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.update(d.dtype for d in self.deltas.values())

    monkeypatch.setattr(Chunk, "__init__", spy)
    res = compute_conflicts(base, experts, cfg).data
    assert seen == {torch.float32}  # bf16 inputs take the float32 path
    monkeypatch.undo()
    ref64 = compute_conflicts(base, experts, cfg.model_copy(update={"delta_dtype": "float64"})).data
    tv = np_tv(base, experts)
    for n, x in tv.items():
        m = res["models"][n]
        # squares rounded to float32 (relative 2^-24 each), summed in float64
        assert m["update_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-7)
        assert m["fraction_updated"] == pytest.approx((np.abs(x) > 1e-5).mean(), abs=1e-15)
        assert m["kept_fraction"]["global"] == [np_kept(x, k).sum() / x.size for k in RATES]
        assert m["log10_abs_histogram"] == ref64["models"][n]["log10_abs_histogram"]
        assert m["update_norm_per_layer"].keys() == ref64["models"][n]["update_norm_per_layer"].keys()
        for key, v in m["update_norm_per_module"].items():
            assert v == pytest.approx(ref64["models"][n]["update_norm_per_module"][key], rel=1e-7)
    for a, b in itertools.combinations(experts, 2):
        p = res["pairs"][f"{a}|{b}"]
        prod = tv[a] * tv[b]
        assert p["conflict_norm"] == pytest.approx(np.sqrt(np.sum(prod[prod < 0] ** 2)), rel=1e-7)
        cos = np.dot(tv[a], tv[b]) / np.linalg.norm(tv[a]) / np.linalg.norm(tv[b])
        assert p["cosine"] == pytest.approx(cos, rel=1e-6, abs=1e-7)  # |error| <= 2^-24 by Cauchy-Schwarz
        for g, k in enumerate(RATES):
            ka, kb = np_kept(tv[a], k), np_kept(tv[b], k)
            both = ka & kb
            assert p["sign_conflict"]["both_kept"][g] == both.sum()
            assert p["sign_conflict"]["conflicts"][g] == (both & (prod < 0)).sum()
            assert p["topk_overlap"]["union"][g] == (ka | kb).sum()
        assert p["sign_conflict"] == ref64["pairs"][f"{a}|{b}"]["sign_conflict"]
        assert p["topk_overlap"] == ref64["pairs"][f"{a}|{b}"]["topk_overlap"]


def test_bf16_per_tensor_topk_single_and_multi_block_match_float64(bf16_models):
    base, experts = bf16_models
    for chunk in (1 << 18, 5000):  # one pass (one block per tensor) and a deferred second pass
        cfg = ConflictsConfig(kept_rates=RATES, topk_modes=["per_tensor"], chunk_elements=chunk, engine="eager")
        res = compute_conflicts(base, experts, cfg).data
        ref = compute_conflicts(base, experts, cfg.model_copy(update={"delta_dtype": "float64"})).data
        assert res["pairs"]["sft|rl"]["sign_conflict"] == ref["pairs"]["sft|rl"]["sign_conflict"]
        assert res["pairs"]["sft|rl"]["topk_overlap"] == ref["pairs"]["sft|rl"]["topk_overlap"]
        for n in experts:
            assert res["models"][n]["kept_fraction"] == ref["models"][n]["kept_fraction"]
            assert res["models"][n]["num_updated"] == ref["models"][n]["num_updated"]
        # independent NumPy per-tensor masks
        per = np_tv_per_tensor(base, experts)
        total = sum(v.size for v in per["sft"].values())
        sc = res["pairs"]["sft|rl"]["sign_conflict"]
        for gi, k in enumerate(RATES):
            ka = {t: np_kept(x, k) for t, x in per["sft"].items()}
            kb = {t: np_kept(x, k) for t, x in per["rl"].items()}
            assert res["models"]["sft"]["kept_fraction"]["per_tensor"][gi] == sum(m.sum() for m in ka.values()) / total
            assert sc["both_kept"][gi] == sum((ka[t] & kb[t]).sum() for t in ka)
            assert sc["conflicts"][gi] == sum((ka[t] & kb[t] & (per["sft"][t] * per["rl"][t] < 0)).sum() for t in ka)


def np_tv_per_tensor(base: Path, experts: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.torch import load_file

    b = load_file(str(base / "model.safetensors"))
    out = {}
    for n, p in experts.items():
        sd = load_file(str(p / "model.safetensors"))
        out[n] = {t: sd[t].to(torch.float64).numpy().ravel() - b[t].to(torch.float64).numpy().ravel() for t in b}
    return out


@pytest.mark.parametrize("engine", ["eager", "fused"])
def test_tiny_task_vectors_fall_back_to_float64(bf16_models, tmp_path, engine):
    """τ ~ 1e-25: float32 squares and products underflow to zero; the eager engine must fall back to float64
    and the fused one (float64 products of float32 τ) must get the norms directly."""
    if engine == "fused":
        pytest.importorskip("rlm.core.conflicts._kernels")
    base, _ = bf16_models
    from safetensors.torch import load_file

    sd = {k: v.to(torch.float32) for k, v in load_file(str(base / "model.safetensors")).items()}
    zero = {k: torch.zeros_like(v) for k, v in sd.items()}
    g = torch.Generator().manual_seed(3)
    zbase = write_bf16(tmp_path / "zbase", zero, base)
    ex = {n: write_bf16(tmp_path / n, {k: torch.randn(v.shape, generator=g) * 1e-25 for k, v in zero.items()}, base)
          for n in ("a", "b")}
    res = compute_conflicts(zbase, ex, ConflictsConfig(metrics=["update_norm", "conflict_norm", "cosine"],
                                                           engine=engine)).data
    tv = np_tv(zbase, ex)
    for n, x in tv.items():
        assert res["models"][n]["update_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-12)
    prod = tv["a"] * tv["b"]
    assert res["pairs"]["a|b"]["conflict_norm"] == pytest.approx(np.sqrt(np.sum(prod[prod < 0] ** 2)), rel=1e-12)
    assert res["pairs"]["a|b"]["cosine"] == pytest.approx(
        np.dot(tv["a"], tv["b"]) / np.linalg.norm(tv["a"]) / np.linalg.norm(tv["b"]), rel=1e-9)


def test_chunk_float32_quantities_match_float64_references():
    rng = np.random.default_rng(11)
    n = 3000
    x = [rng.standard_normal(n) * 10.0 ** rng.uniform(-6, -1, n) for _ in range(2)]
    for v in x:
        v[rng.random(n) < 0.3] = 0.0
    x[1][:40] = -x[0][:40]
    x32 = [v.astype(np.float32) for v in x]  # the float32 values are the data
    x64 = [v.astype(np.float64) for v in x32]
    bits, modes = 20, ["global"]
    thr = {"global": {nm: S.threshold_bins(S.bin_histogram(S.magnitude_bins(torch.from_numpy(v), bits), bits),
                                           n, RATES) for nm, v in zip("ab", x64)}}
    c32 = Chunk("t", {"a": torch.from_numpy(x32[0]), "b": torch.from_numpy(x32[1])}, numel=n, kept_rates=RATES,
                  bits=bits, thresholds=thr, modes=modes)
    a, b = x64
    assert c32.sum_squares("a") == pytest.approx(np.sum(a * a), rel=1e-7)
    assert c32.dot("a", "b") == pytest.approx(np.dot(a, b), rel=1e-6, abs=1e-7 * np.sqrt(np.sum(a * a) * np.sum(b * b)))
    p = a * b
    assert c32.conflict_sum_squares("a", "b") == pytest.approx(np.sum(p[p < 0] ** 2), rel=1e-7)
    for t in (0.0, 1e-5, 1e-3, float(x32[0][5]) if x32[0][5] else 1e-4):
        assert c32.count_above("a", t) == int((np.abs(a) > t).sum())  # exact, also at a float32 value
    ref = S.pair_counts(S.first_kept(S.magnitude_bins(torch.from_numpy(a), bits), thr["global"]["a"], bits),
                        S.first_kept(S.magnitude_bins(torch.from_numpy(b), bits), thr["global"]["b"], bits),
                        S.conflict_mask(torch.from_numpy(a), torch.from_numpy(b)), len(RATES))
    got = c32.pair_counts("a", "b", "global")
    for r, g_ in zip(ref, got):
        assert r.tolist() == g_.tolist()


def test_first_kept_table_scaled_matches_binary_search():
    bits = 12
    thr = torch.tensor([900, 700, 700, 300, 0, 0], dtype=torch.int64)
    bins = torch.arange(S.n_bins(bits), dtype=torch.int32)
    ref = S.first_kept(bins[:10], thr, bits)  # binary-search path on a small block
    assert ref.tolist() == S.first_kept_table(thr, bits)[:10].tolist()
    table = S.first_kept_table(thr, bits, scale=3)
    expect = [3 * next((k for k, t in enumerate(thr.tolist()) if b >= t and b > 0), len(thr)) for b in range(len(bins))]
    assert table.tolist() == expect
    hist = torch.bincount(torch.randint(0, S.n_bins(bits), (5000,), generator=torch.Generator().manual_seed(1)),
                          minlength=S.n_bins(bits))
    hist[0] += 700
    for k in (0.001, 0.2, 0.9, 1.0):
        tb = int(S.threshold_bins(hist, int(hist.sum()), [k])[0])
        need = S.n_keep(k, int(hist.sum()))
        assert int(hist[tb:].sum()) >= need and (tb == S.n_bins(bits) - 1 or int(hist[tb + 1:].sum()) < need)


@pytest.mark.parametrize("seed", range(6))
def test_histogram_thresholds_match_full_cumulative_sums(seed):
    g = torch.Generator().manual_seed(seed)
    nb = 1 << 12
    hist = torch.zeros(nb, dtype=torch.int32)
    if seed == 0:
        hist[0] = 1000  # only zeros
    elif seed == 1:
        hist[nb - 1] = 5  # everything in the last bin
        hist[0] = 3
    else:
        idx = torch.randint(0, nb, (int(torch.randint(1, 4000, (1,), generator=g)),), generator=g)
        hist.index_add_(0, idx.to(torch.int32), torch.ones(len(idx), dtype=torch.int32))
        hist[0] += seed * 100
    total = int(hist.sum())
    rates = [1e-4, 0.01, 0.1, 0.33, 0.5, 0.9, 1.0]
    for block in (64, 512, 4096):
        thr, kept = S.histogram_thresholds(hist, total, rates, block=block)
        ref = S.threshold_bins(hist, total, rates)
        assert thr.tolist() == ref.tolist()
        assert kept.tolist() == S.kept_from_histogram(hist, ref).tolist()
        for k, t in zip(rates, thr.tolist()):  # the documented rule, by hand
            need = S.n_keep(k, total)
            at_or_above = [int(hist[b:].sum()) for b in (t, t + 1)]
            assert at_or_above[0] >= need and (t == nb - 1 or at_or_above[1] < need)
