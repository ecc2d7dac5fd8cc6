"""The fused engine of ``rlm conflicts`` (``rlm.core.conflicts.fused`` + the C kernels): on bf16 safetensors
inputs it must give the eager engine's counts exactly and its sums to float64 rounding, match an independent
float64 NumPy computation, not depend on the number of workers or the block size, refuse what it cannot
run with a reason, name the model and tensor of bad input, and never index out of bounds."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_conflicts import np_kept
from test_conflicts_fast import make_bf16_experts, np_tv, np_tv_per_tensor, write_bf16

from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.engine import ConflictsResult, compute_conflicts
from rlm.core.contracts import Metric
from rlm.core.errors import ModelError, RlmError

K = pytest.importorskip("rlm.core.conflicts._kernels")
RATES = [0.01, 0.05, 0.2, 0.5, 0.9, 1.0]


@pytest.fixture(scope="module")
def bf16_three(tiny_model_dir, tmp_path_factory):
    """A bf16 base and three bf16 experts: dense large, sparse small, and one with all-zero tensors."""
    return make_bf16_experts(tiny_model_dir, tmp_path_factory.mktemp("bf16x3"), 17,
                             [("sft", 3e-3, 0.2), ("rl", 2e-4, 0.8), ("pos", 1e-3, 0.5)], untouched_every={"pos": 3})


def run(base: Path, experts: dict[str, Path], **cfg) -> ConflictsResult:
    return compute_conflicts(base, experts, ConflictsConfig(**cfg))


def assert_same(fused: dict, eager: dict) -> None:
    """Counts and histograms identical; sums within float64 rounding of float32 products (eager rounds each
    product to float32, fused forms it exactly)."""
    def walk(a, b, path):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), path
            for k in a:
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, float) and isinstance(b, float):
            assert a == pytest.approx(b, rel=2e-7, abs=1e-12), path
        else:
            assert a == b, path

    walk(fused, eager, "")


@pytest.mark.parametrize("modes", [["global"], ["per_tensor"], ["global", "per_tensor"], ["per_tensor", "global"]])
def test_fused_matches_eager(bf16_three, modes):
    base, experts = bf16_three
    fused = run(base, experts, kept_rates=RATES, topk_modes=modes)
    eager = run(base, experts, kept_rates=RATES, topk_modes=modes, engine="eager")
    assert fused.stats["engine"] == "fused" and eager.stats["engine"] == "eager"
    assert_same(fused.data, eager.data)


@pytest.mark.parametrize("modes", [["global", "per_tensor"], ["per_tensor"]])
def test_fused_matches_eager_on_float32_models(tiny_model_dir, modes, tmp_path):
    """float32 inputs: τ in float64 on both engines, so even the sums agree to float64 rounding."""
    from test_conflicts import make_expert

    experts = {n: make_expert(tiny_model_dir, tmp_path / n, seed, scale=scale, zero_frac=zero)
               for n, seed, scale, zero in (("sft", 1, 3e-3, 0.2), ("rl", 2, 1e-4, 0.8), ("pos", 3, 1e-3, 0.5))}
    fused = run(tiny_model_dir, experts, kept_rates=RATES, topk_modes=modes, fused_block_elements=3000)
    eager = run(tiny_model_dir, experts, kept_rates=RATES, topk_modes=modes, engine="eager")
    assert fused.stats["engine"] == "fused"
    assert_same(fused.data, eager.data)
    tv = np_tv(tiny_model_dir, experts)
    for n, x in tv.items():
        assert fused.data["models"][n]["update_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-13)
        assert fused.data["models"][n]["num_updated"] == int((np.abs(x) > 1e-5).sum())


def test_fused_matches_numpy_float64(bf16_three):
    base, experts = bf16_three
    res = run(base, experts, kept_rates=RATES, engine="fused").data
    tv = np_tv(base, experts)
    per = np_tv_per_tensor(base, experts)
    for n, x in tv.items():
        m = res["models"][n]
        assert m["update_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-12)  # exact products, float64 sums
        assert m["num_updated"] == int((np.abs(x) > 1e-5).sum())
        assert m["kept_fraction"]["global"] == [np_kept(x, k).sum() / x.size for k in RATES]
    for a, b in itertools.combinations(experts, 2):
        p = res["pairs"][f"{a}|{b}"]
        prod = tv[a] * tv[b]
        assert p["conflict_norm"] == pytest.approx(np.sqrt(np.sum(prod[prod < 0] ** 2)), rel=1e-12)
        assert p["cosine"] == pytest.approx(np.dot(tv[a], tv[b]) / np.linalg.norm(tv[a]) / np.linalg.norm(tv[b]),
                                            rel=1e-10)
        for gi, k in enumerate(RATES):
            ka, kb = np_kept(tv[a], k), np_kept(tv[b], k)
            assert p["sign_conflict"]["both_kept"][gi] == (ka & kb).sum()
            assert p["sign_conflict"]["conflicts"][gi] == (ka & kb & (prod < 0)).sum()
            assert p["topk_overlap"]["union"][gi] == (ka | kb).sum()
            ta = {t: np_kept(v, k) for t, v in per[a].items()}
            tb = {t: np_kept(v, k) for t, v in per[b].items()}
            assert p["sign_conflict"]["per_tensor"]["both_kept"][gi] == sum((ta[t] & tb[t]).sum() for t in ta)
            assert p["sign_conflict"]["per_tensor"]["conflicts"][gi] == sum(
                (ta[t] & tb[t] & (per[a][t] * per[b][t] < 0)).sum() for t in ta)


def test_workers_and_block_size_do_not_change_results(bf16_three):
    base, experts = bf16_three
    ref = run(base, experts, kept_rates=RATES, workers=1).data
    for workers, block in ((2, 1 << 22), (3, 1000), (1, 7)):
        assert run(base, experts, kept_rates=RATES, workers=workers, fused_block_elements=block).data == ref


def test_long_grid_uses_wide_tables_and_coarse_bins(bf16_three):
    """21 kept rates over two scopes need 16-bit table entries; 12-bit bins without top-k metrics."""
    base, experts = bf16_three
    rates = [round(0.05 * i, 2) for i in range(1, 21)]
    fused = run(base, experts, kept_rates=rates)
    assert fused.stats["engine"] == "fused"
    assert_same(fused.data, run(base, experts, kept_rates=rates, engine="eager").data)
    norms = ["update_norm", "fraction_updated", "conflict_norm", "cosine"]
    assert_same(run(base, experts, metrics=norms).data, run(base, experts, metrics=norms, engine="eager").data)


def test_fused_refuses_what_it_cannot_run_and_auto_falls_back(tiny_model_dir, bf16_three):
    base, experts = bf16_three
    # a float32 base under bf16 experts: the eager engine forms τ in float64 there
    with pytest.raises(RlmError, match=r"engine .fused. cannot run.*is base F32, sft BF16"):
        run(tiny_model_dir, {"sft": experts["sft"], "rl": experts["rl"]}, engine="fused")
    res = run(tiny_model_dir, {"sft": experts["sft"], "rl": experts["rl"]})
    assert res.stats["engine"] == "eager" and "F32" in res.stats["eager_because"]
    with pytest.raises(RlmError, match="delta_dtype"):
        run(base, experts, engine="fused", delta_dtype="float64")

    class Peek(Metric):  # a third-party metric that reads τ blocks itself
        name = "peek"

        def __init__(self):
            self.seen = 0

        def update(self, tensor_name, deltas, context=None):
            self.seen += sum(d.numel() for d in deltas.values())

        def result(self):
            return {"models": {}}

    from rlm.core.conflicts import fused as F
    from rlm.core.models.validate import TensorPlan

    huge = TensorPlan("model.embed_tokens.weight", (2 ** 20, 2 ** 11), torch.bfloat16)
    assert "int32" in F.unavailable_reason(ConflictsConfig(), [], None, {}, [huge], 20)
    peek = Peek()
    res = compute_conflicts(base, experts, ConflictsConfig(metrics=["update_norm"]), metrics=[peek])
    assert res.stats["engine"] == "eager" and "peek" in res.stats["eager_because"]
    assert peek.seen == 3 * res.stats["parameters"]


def test_without_the_compiled_kernels_auto_runs_eager(bf16_three, monkeypatch):
    """An install without a C compiler has no rlm.core.conflicts._kernels: 'auto' says why and runs eager."""
    import sys

    base, experts = bf16_three
    import rlm.core.conflicts

    monkeypatch.setitem(sys.modules, "rlm.core.conflicts._kernels", None)  # import now raises ImportError
    monkeypatch.delattr(rlm.core.conflicts, "_kernels", raising=False)
    res = run(base, experts, metrics=["update_norm", "cosine"])
    assert res.stats["engine"] == "eager" and "not built" in res.stats["eager_because"]
    with pytest.raises(RlmError, match="not built"):
        run(base, experts, engine="fused")


def test_fused_names_the_model_and_tensor_of_non_finite_input(bf16_three, tmp_path):
    from safetensors.torch import load_file

    base, experts = bf16_three
    sd = {k: v.to(torch.float32) for k, v in load_file(str(experts["rl"] / "model.safetensors")).items()}
    sd["model.layers.1.mlp.up_proj.weight"][2, 5] = float("nan")
    bad = write_bf16(tmp_path / "nan", sd, experts["rl"])
    with pytest.raises(ModelError, match=r"nan.*model\.layers\.1\.mlp\.up_proj\.weight.*non-finite"):
        run(base, {"sft": experts["sft"], "bad": bad}, engine="fused")


def test_truncated_shard_is_named_before_reading(bf16_three, tmp_path):
    """A shard cut short: named with model, tensor and file before anything is read (the reader checks every
    tensor's byte range against the file when it opens it; if a file shrinks later, the kernels raise EOFError,
    named by the engine with the tensor and the inputs — see test_kernels_refuse_bad_input)."""
    base, experts = bf16_three
    cut = tmp_path / "cut"
    shutil.copytree(experts["rl"], cut)
    f = cut / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    with pytest.raises(ModelError, match=r"cut: tensor .* in model\.safetensors is truncated or corrupt"):
        run(base, {"sft": experts["sft"], "cut": cut}, engine="fused")


def test_files_are_closed_after_a_run(bf16_three):
    base, experts = bf16_three
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        run(base, experts, workers=2)
    assert len(os.listdir("/proc/self/fd")) <= before + 1  # the readers' own descriptors at most


# ------------------------------------------------------------------------------------------------------
# the C kernels directly: bounds are checked before anything is touched
# ------------------------------------------------------------------------------------------------------

def write_inputs(tmp_path: Path, arrays: list[np.ndarray], lead: int = 24) -> tuple[tuple[int, ...], np.ndarray]:
    """The arrays one after another in one file, after ``lead`` bytes: file descriptors and byte offsets."""
    path = tmp_path / "inputs.bin"
    with open(path, "wb") as f:
        f.write(b"\x00" * lead)
        for a in arrays:
            f.write(a.tobytes())
    fd = os.open(path, os.O_RDONLY)
    offsets = np.cumsum([lead] + [a.nbytes for a in arrays[:-1]]).astype(np.int64)
    return tuple([fd] * len(arrays)), offsets


def _stats_args(tmp_path: Path, n: int = 100, m: int = 2, bits: int = 12):
    rng = np.random.default_rng(0)

    def patterns():  # every finite bf16 magnitude below ~8.5e37 (differences stay finite), either sign
        return (rng.integers(0, 0x7E80, n) | (rng.integers(0, 2, n) << 15)).astype(np.uint16)

    arrays = [patterns() for _ in range(m + 1)]
    fds, offsets = write_inputs(tmp_path, arrays)
    stride = 1 << (bits - 1)
    args = [fds, offsets, n, np.array([[0, 1]], np.int64), np.array([0x3727C5AC], np.uint32), 32 - bits,
            np.zeros((m, 4, stride), np.int32), stride, 4, np.zeros(m), np.zeros((1, 2)), np.zeros((m, 1), np.int64),
            np.array([[0xFFFFFFFF, 0]] * m, np.int64)]
    return args, arrays


def test_kernels_match_numpy_on_random_bits(tmp_path):
    """Arbitrary bf16 patterns (huge, tiny, subnormal values, zeros of both signs) read from a file, over
    several read chunks, against float64 NumPy."""
    n = 3 * K.READ + 1234
    args, arrays = _stats_args(tmp_path, n=n)
    K.stats_block(*args)
    base, xs = arrays[0], arrays[1:]
    f = lambda u: (u.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    tau = [f(x) - f(base) for x in xs]  # float32, as the kernel forms it
    ss, pair, above, lohi, hist = args[9], args[10], args[11], args[12], args[6]
    for j, t in enumerate(tau):
        assert ss[j] == pytest.approx(np.sum(t.astype(np.float64) ** 2), rel=1e-12)
        assert above[j, 0] == int(((t.view(np.uint32) & 0x7FFFFFFF) > 0x3727C5AC).sum())
        bins = (t.view(np.uint32) & 0x7FFFFFFF) >> 20
        h = hist[j].sum(axis=0)
        assert (h[:len(np.bincount(bins))] == np.bincount(bins)).all() and h.sum() == t.size
        nz = bins[bins > 0]
        assert lohi[j].tolist() == [nz.min(), nz.max()]
    p = tau[0].astype(np.float64) * tau[1].astype(np.float64)
    assert pair[0, 0] == pytest.approx(p.sum(), rel=1e-9, abs=1e-300)
    assert pair[0, 1] == pytest.approx(np.sum(p[p < 0] ** 2), rel=1e-12)
    # the top-k kernel on the same data: one scope, thresholds at a few bins
    thr = np.array([[1500, 1100, 700, 1]], np.int32)
    lo = [int(lohi[j, 0]) for j in range(2)]
    hi = [int(lohi[j, 1]) for j in range(2)]
    tables = np.zeros((2, max(hi[j] - lo[j] for j in range(2)) + 3), np.uint8)
    for j in range(2):
        K.first_kept_table(thr, 1, lo[j], hi[j], tables[j], 1)
    joint = np.zeros((1, 4, 5 * 5 * 2), np.int64)
    K.topk_block(args[0], args[1], n, 20, np.array(lo, np.int64), tables, 1, args[3], 5, joint)
    first = [np.where((t.view(np.uint32) & 0x7FFFFFFF) >> 20 > 0,
                      (((t.view(np.uint32) & 0x7FFFFFFF) >> 20)[:, None] < thr[0][None, :]).sum(1), 4) for t in tau]
    sign = [t.view(np.uint32) >> 31 for t in tau]
    ref = np.bincount((first[0] * 5 + first[1]) * 2 + (sign[0] ^ sign[1]), minlength=50)
    assert (joint.sum(axis=(0, 1)) == ref).all()


def test_kernels_refuse_bad_input(tmp_path):
    args, _ = _stats_args(tmp_path)
    bad = list(args)
    bad[2] = 10_000  # more elements than the file holds
    with pytest.raises(EOFError, match="ends before"):
        K.stats_block(*bad)
    bad = list(args)
    bad[1] = args[1][:2]
    with pytest.raises(ValueError, match="offsets has 16 bytes, expected 24"):
        K.stats_block(*bad)
    bad = list(args)
    bad[0] = (args[0][0], 987654, args[0][2])  # not an open file
    with pytest.raises(OSError):
        K.stats_block(*bad)
    bad = list(args)
    bad[3] = np.array([[0, 2]], np.int64)
    with pytest.raises(ValueError, match="pair index 2 out of range"):
        K.stats_block(*bad)
    bad = list(args)
    bad[7] = 10  # rows too short for the bins
    with pytest.raises(ValueError, match="cannot hold 2048 bins"):
        K.stats_block(*bad)
    bad = list(args)
    bad[9] = np.zeros(1)
    with pytest.raises(ValueError, match="ss has 8 bytes"):
        K.stats_block(*bad)
    table = np.zeros((2, 10), np.uint8)
    with pytest.raises(ValueError, match="cannot hold bins"):
        K.first_kept_table(np.array([[5, 3]], np.int32), 1, 1, 20, table[0], 1)
    with pytest.raises(ValueError, match="do not fit"):
        K.first_kept_table(np.ones((2, 20), np.int32), 2, 1, 3, table[0], 1)
    with pytest.raises(ValueError, match="must not increase"):
        K.first_kept_table(np.array([[3, 5]], np.int32), 1, 1, 3, table[0], 1)
    table[1, 3] = 200  # an entry the joint counts cannot hold
    joint = np.zeros((1, 4, 9 * 2), np.int64)
    with pytest.raises(ValueError, match="table entry 200 outside"):
        K.topk_block(args[0], args[1], args[2], 20, np.array([1, 1]), table, 1, args[3], 3, joint)
    with pytest.raises(ValueError, match="joint has"):
        K.topk_block(args[0], args[1], args[2], 20, np.array([1, 1]), np.zeros((2, 10), np.uint8), 1, args[3], 4,
                     joint)


def test_first_kept_table_matches_the_definition():
    thr = np.array([[40, 30, 30, 12], [35, 20, 10, 1]], np.int32)  # two scopes, non-increasing
    table = np.full(60, 99, np.uint8)
    K.first_kept_table(thr, 2, 5, 50, table, 1)
    never = 5 * 5 - 1
    assert table[0] == never and (table[47:] == never).all()
    for b in range(5, 51):
        first = [int((b < thr[s]).sum()) for s in range(2)]
        assert table[b - 5 + 1] == first[0] * 5 + first[1]


def test_cli_config_reports_the_engine(bf16_three, tmp_path):
    from rlm.core.cli import main

    base, experts = bf16_three
    out = tmp_path / "c"
    code = main(["conflicts", "--base", str(base), "--models", f"sft={experts['sft']},rl={experts['rl']}",
                 "--out", str(out), "--set", "workers=2"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.dumps(manifest).count('"engine": "fused"') >= 1
