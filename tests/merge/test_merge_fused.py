"""The fused merge path (``rlm.core.merge.fused`` + ``_kernels``) against the torch path: bit-identical outputs for
every built-in method on bf16 and float32 inputs (ties in magnitude at the TIES cut, density edge cases,
negative weights, λ, normalize and rescale on and off, tensors across the kernels' read and block sizes), the exact
cut against ``magnitude_threshold``, the L1-rescale guard, and the fallbacks with their reasons in the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fused_models import SHAPES, make_set, write

from rlm.core.errors import ConfigError, ModelError
from rlm.core.merge import fused
from rlm.core.merge.engine import MergeRunConfig, merge_models
from rlm.core.merge.ops import magnitude_threshold
from rlm.core.merge.params import DensityParams
from rlm.core.models.reader import ModelReader

pytest.importorskip("rlm.core.merge._kernels")

#: (method, params, model_params per model) covering the kernels' options
CASES = [
    ("ties", {}, [{"weight": 0.5, "density": 0.8}, {"weight": 0.5, "density": 0.8}]),
    ("ties", {"rescale": True, "lambda": 0.9}, [{"weight": 0.7, "density": 0.3}, {"weight": -0.4, "density": 0.55}]),
    ("ties", {"normalize": False}, [{"weight": 1.0, "density": 0.0}, {"weight": 0.6, "density": 1.0}]),
    ("ties", {"rescale": True}, [{"weight": 0.5, "density": 1e-9}, {"weight": 0.5, "density": 0.999999}]),
    ("dare_ties", {}, [{"weight": 0.5, "density": 0.8}, {"weight": 0.5, "density": 0.8}]),
    ("dare_ties", {"normalize": True, "lambda": 1.3}, [{"weight": 0.3, "density": 0.25}, {"weight": 0.9, "density": 1.0}]),
    ("dare_linear", {}, [{"weight": 0.5, "density": 0.6}, {"weight": -0.2, "density": 0.0}]),
    ("dare_linear", {"normalize": True, "rescale": False}, [{"weight": 0.4, "density": 0.7}, {"weight": 0.4, "density": 0.7}]),
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": 1.0}, {"weight": 0.35}]),
    ("task_arithmetic", {"normalize": True}, [{"weight": 0.8}, {"weight": -0.3}]),
    ("averaging", {}, [{"weight": 0.3}, {"weight": 0.9}]),
    ("averaging", {"normalize": False}, [{"weight": 0.3}, {"weight": 0.9}]),
]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {(dtype, ties): make_set(root / f"{str(dtype)[6:]}-{ties}", dtype=dtype, ties=ties, seed=int(ties))
            for dtype in (torch.bfloat16, torch.float32) for ties in (False, True)}


def merged(base: Path, experts: list[Path], out: Path, method: str, params: dict, mps: list[dict], engine: str,
           **extra) -> tuple[dict[str, torch.Tensor], dict]:
    models = [{"path": str(e), **mp} for e, mp in zip(experts, mps)]
    run = MergeRunConfig(method=method, base=str(base), models=models, params=params, engine=engine, seed=3,
                         check_descent=False, **extra)
    summary = merge_models(run, out)
    r = ModelReader(out)
    return {n: r.get(n) for n in r.tensor_names()}, summary


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n, x in a.items():
        assert x.dtype == b[n].dtype and x.shape == b[n].shape, n
        assert torch.equal(x, b[n]), n
        assert torch.equal(x.reshape(-1).view(torch.uint8), b[n].reshape(-1).view(torch.uint8)), n  # ±0 too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("ties", [False, True], ids=["gauss", "tied"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_is_bit_identical_to_torch(sets, tmp_path, dtype, ties, case):
    method, params, mps = CASES[case]
    base, experts = sets[(dtype, ties)]
    ref, s_ref = merged(base, experts, tmp_path / "torch", method, params, mps, "torch")
    got, s_got = merged(base, experts, tmp_path / "fused", method, params, mps, "fused")
    assert s_ref["engine"] == {"path": "torch", "because": "engine: torch was asked for"}
    assert s_got["engine"]["path"] == "fused"
    assert s_got["engine"]["tensors_fused"] == len(SHAPES) and s_got["engine"]["tensors_torch"] == 0
    assert_bit_identical(got, ref)
    manifest = json.loads((tmp_path / "fused" / "merge_manifest.json").read_text())
    assert manifest["result"]["engine"]["tensors_fused"] == len(SHAPES)


def test_fused_matches_the_streamed_torch_path(sets, tmp_path):
    """Tensors above whole_elements take torch's streamed cut and mask (prepare_blocks): the same numbers."""
    base, experts = sets[(torch.bfloat16, True)]
    for method, params, mps in (CASES[1], CASES[5]):
        ref, _ = merged(base, experts, tmp_path / f"t-{method}", method, params, mps, "torch", whole_elements=1000,
                        chunk_elements=7000)
        got, _ = merged(base, experts, tmp_path / f"f-{method}", method, params, mps, "auto")
        assert_bit_identical(got, ref)


def test_three_models_and_float32_output(tmp_path):
    base, experts = make_set(tmp_path / "m", dtype=torch.bfloat16, experts=3, ties=True, seed=5)
    mps = [{"weight": 0.2, "density": 0.4}, {"weight": 0.5, "density": 0.9}, {"weight": 0.3, "density": 0.6}]
    for method in ("ties", "dare_ties"):
        ref, _ = merged(base, experts, tmp_path / f"t-{method}", method, {}, mps, "torch", dtype="float32")
        got, s = merged(base, experts, tmp_path / f"f-{method}", method, {}, mps, "fused", dtype="float32")
        assert s["engine"]["tensors_torch"] == 0
        assert_bit_identical(got, ref)


def test_cut_equals_magnitude_threshold(tmp_path):
    """The radix cut (bits of the threshold, last tied index kept) is magnitude_threshold's, ties included."""
    shapes = {"a": (300, 257)}
    base, experts = make_set(tmp_path / "c", dtype=torch.float32, ties=True, shapes=shapes, experts=2)
    readers = [ModelReader(p) for p in [base, *experts]]
    b = readers[0].get("a").float()
    deltas = [r.get("a").float() - b for r in readers[1:]]
    t = SimpleNamespace(name="a", numel=300 * 257, shape=(300, 257))
    io = fused._Tensor(t, readers[0], readers[1:])
    split = 0
    for densities in ([0.5, 0.8], [1e-9, 0.999], [0.0, 1.0], [0.123, 0.9999999]):
        params = [DensityParams(density=d) for d in densities]
        engine = SimpleNamespace(method=SimpleNamespace(config=None), params=params)
        cuts = fused.FusedMerge(engine, lambda t: None, lambda t: None)._ties_cuts(io)
        for d, delta, (bits, last) in zip(densities, deltas, cuts):
            want = magnitude_threshold(delta, d)
            if want is None:
                assert (bits, last) == (0, t.numel - 1)
            elif want[1] == -1:
                assert (bits, last) == fused.NO_CUT
            else:
                assert np.float32(want[0]).view(np.uint32) == bits and want[1] == last
                split += last < t.numel - 1
    assert split >= 3  # equal magnitudes at the cut split by flat index: the find_tie pass ran


@pytest.mark.parametrize("route", ["sampled", "missed"])
def test_cut_by_sampled_window_and_by_passes(sets, tmp_path, monkeypatch, route):
    """Large tensors collect only the bins a sample predicts; where it misses, the low-bits and tie passes run:
    both give the torch path's output."""
    monkeypatch.setattr(fused, "COLLECT_ALL", 1000)
    if route == "missed":  # a window far from the cut: every cut by passes
        orig = fused.FusedMerge._windows

        def wrong(self, io, ks, todo):
            wlo, whi, cap = orig(self, io, ks, todo)
            wlo[todo], whi[todo] = 0, 1
            return wlo, whi, cap

        monkeypatch.setattr(fused.FusedMerge, "_windows", wrong)
    for dtype in (torch.bfloat16, torch.float32):
        base, experts = sets[(dtype, True)]
        for case in (0, 1, 3):
            method, params, mps = CASES[case]
            ref, _ = merged(base, experts, tmp_path / f"t{dtype}{case}", method, params, mps, "torch")
            got, s = merged(base, experts, tmp_path / f"f{dtype}{case}", method, params, mps, "fused")
            assert s["engine"]["tensors_torch"] == 0
            assert_bit_identical(got, ref)


def test_exact_scale_guard():
    assert fused.exact_scale(2.0, 1.0, 0.5) == np.float32(1.0)
    assert fused.exact_scale(1e-9, 1.0, 0.7) == np.float32(0.7)  # ‖τ‖₁ below L1_EPS: no rescale
    assert fused.exact_scale(1.0, 0.0, 0.7) == np.float32(0.7)
    midpoint = 1.0 + 2.0 ** -24  # halfway between two float32: torch's sums could round either way
    assert fused.exact_scale(midpoint, 1.0, 1.0) is None
    assert fused.exact_scale(1e-7, 1.0, 1.0) is None  # at L1_EPS: skipped or not depends on the last bit


def test_rescale_guard_falls_back_to_torch(sets, tmp_path, monkeypatch):
    """Where the L1 factor can't be certified the tensor takes the torch path (same output, reason recorded)."""
    monkeypatch.setattr(fused, "SCALE_TOL", 0.25)
    base, experts = sets[(torch.bfloat16, False)]
    method, params, mps = CASES[4]
    ref, _ = merged(base, experts, tmp_path / "t", method, params, mps, "torch")
    got, s = merged(base, experts, tmp_path / "f", method, params, mps, "auto")
    assert_bit_identical(got, ref)
    assert s["engine"]["tensors_torch"] > 0
    assert any("rescale" in r for r in s["engine"]["torch_because"])


def test_fallbacks_and_their_reasons(sets, tmp_path):
    base, experts = make_set(tmp_path / "h", dtype=torch.float16, ties=False, seed=2)
    mps = [{"weight": 0.5, "density": 0.7}] * 2
    ref, _ = merged(base, experts, tmp_path / "t", "ties", {}, mps, "torch", dtype="bfloat16")
    got, s = merged(base, experts, tmp_path / "f", "ties", {}, mps, "auto", dtype="bfloat16")
    assert_bit_identical(got, ref)
    assert s["engine"]["tensors_fused"] == 0 and "stored dtype F16" in " ".join(s["engine"]["torch_because"])
    base, experts = sets[(torch.bfloat16, False)]
    _, s = merged(base, experts, tmp_path / "o", "ties", {}, mps, "auto", dtype="float16")
    assert s["engine"]["tensors_fused"] == 0 and any("float16" in r for r in s["engine"]["torch_because"])


def test_not_built_in_methods_keep_the_torch_path():
    from rlm.plugins.mergers.ties import Ties

    class MyTies(Ties):
        name = "my_ties"

    assert fused.method_recipe(Ties()) == "ties"
    assert fused.method_recipe(MyTies()) is None
    patched = Ties()
    patched.merge = lambda *a, **k: None
    assert fused.method_recipe(patched) is None


def test_a_replaced_merge_keeps_the_torch_path(monkeypatch):
    from rlm.plugins.mergers.dare_linear import DareLinear
    from rlm.plugins.mergers.ties import Ties

    assert fused.method_recipe(DareLinear()) == "dare_linear"  # DareTies.merge, inherited
    monkeypatch.setattr(Ties, "prepare", lambda self, *a, **k: None)
    assert fused.method_recipe(Ties()) is None


def test_engine_fused_refuses_what_it_cannot_run(sets):
    from rlm.core.merge.engine import _Engine
    from rlm.plugins.mergers.ties import Ties

    base, experts = sets[(torch.bfloat16, False)]
    readers = [ModelReader(p) for p in [base, *experts]]
    run = MergeRunConfig(method="ties", base=str(base), models=[str(e) for e in experts], engine="fused")
    meta = torch.device("meta")
    assert "device is meta" in fused.unavailable_reason(run, Ties(), readers[0], readers[1:], meta)
    with pytest.raises(ConfigError, match="engine 'fused' cannot run this merge: device is meta"):
        _Engine(run, Ties(), [], readers[0], readers[1:], None, None, None, meta)
    auto = run.model_copy(update={"engine": "auto"})
    assert _Engine(auto, Ties(), [], readers[0], readers[1:], None, None, None, meta).summary() == \
        {"path": "torch", "because": "device is meta (the kernels compute on the CPU)"}


def test_non_finite_input_is_named_as_on_the_torch_path(tmp_path):
    shapes = {"model.layers.0.mlp.up_proj.weight": (64, 600)}
    base, experts = make_set(tmp_path / "n", dtype=torch.bfloat16, shapes=shapes)
    name = next(iter(shapes))
    bad = ModelReader(experts[1]).get(name).clone()
    bad[40, 7] = float("inf")
    write(tmp_path / "bad", {name: bad}, torch.bfloat16)
    msgs = []
    for engine in ("torch", "fused"):
        with pytest.raises(ModelError) as exc:
            merged(base, [experts[0], tmp_path / "bad"], tmp_path / f"o-{engine}", "ties", {},
                   [{"density": 0.5}] * 2, engine)
        msgs.append(str(exc.value))
    assert msgs[0] == msgs[1] and "bad" in msgs[0]
