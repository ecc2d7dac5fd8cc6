"""``rlm merge --device``: the merge arithmetic on a torch device. On this CPU-only suite: ``--device cpu`` gives
the default's bytes; an unavailable or unknown device is one line (exit 2, nothing written); and with the
availability check monkeypatched, a ``cuda`` merge moves every base block and task-vector stack through the
engine's one device hook, whole and streamed, and gives the CPU's result (benchmarks/gpu_check.py compares a
real GPU merge with the CPU's)."""

from __future__ import annotations

import json

import pytest
import torch
from test_merge_engine import load, make_llama

from rlm.core.merge import device as merge_device
from rlm.core.merge.engine import MergeRunConfig, merge_models


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    base = make_llama(root / "base", 0)
    return {"base": base, "e1": make_llama(root / "e1", 1, base=base), "e2": make_llama(root / "e2", 2, base=base)}


def rlm_merge(capsys, *args):
    from rlm.core.cli import main

    capsys.readouterr()
    rc = main(["merge", *map(str, args)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_explicit_cpu_equals_the_default(family, tmp_path, capsys):
    common = ["--method", "dare_ties", "--base", family["base"], "--models", f"{family['e1']},{family['e2']}",
              "--weights", "0.6,0.4", "--density", "0.5"]
    assert rlm_merge(capsys, *common, "--out", tmp_path / "default")[0] == 0
    assert rlm_merge(capsys, *common, "--device", "cpu", "--out", tmp_path / "cpu")[0] == 0
    a, b = load(tmp_path / "default"), load(tmp_path / "cpu")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "cpu" / "merge_manifest.json").read_text())["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name,message", [
    ("cuda", "error: device cuda is not available in this process"),
    ("cuda:3", "error: device cuda:3 is not available in this process"),
    ("gpu", "error: device 'gpu' is not a torch device (e.g. cpu, cuda, cuda:1)"),
])
def test_unavailable_or_unknown_device_is_one_line(family, tmp_path, capsys, name, message):
    out = tmp_path / "out"
    rc, err = rlm_merge(capsys, "--method", "ties", "--base", family["base"], "--models", family["e1"],
                        "--device", name, "--out", out)
    assert rc == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()


def test_device_availability_check():
    assert merge_device.device_available(torch.device("cpu"))
    assert merge_device.device_available(torch.device("cuda")) == torch.cuda.is_available()
    assert merge_device.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("method", ["averaging", "task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_device_plumbing_moves_every_block_and_keeps_the_result(family, tmp_path, monkeypatch, method):
    """With ``cuda`` reported available and the move recorded (the tensors stay on the CPU here), the merge
    sends each read block through :func:`rlm.core.merge.device.to_device`, whole and in streamed row blocks,
    and writes what the CPU merge writes."""
    moved: list[tuple[str, tuple[int, ...]]] = []

    def record(tensor, device):
        assert device == torch.device("cuda")
        moved.append((device.type, tuple(tensor.shape)))
        return tensor

    params = [{"weight": 0.6, "density": 0.7}, {"weight": 0.4, "density": 0.5}]
    if method in ("averaging", "task_arithmetic"):
        params = [{"weight": 0.6}, {"weight": 0.4}]
    entries = [{"path": str(family["e1"]), **params[0]}, {"path": str(family["e2"]), **params[1]}]
    for extra in ({"workers": 0}, {"workers": 2, "chunk_elements": 100, "whole_elements": 100}):
        run = MergeRunConfig(method=method, base=str(family["base"]), models=entries, seed=3, **extra)
        merge_models(run, tmp_path / f"cpu-{extra['workers']}")
        with monkeypatch.context() as m:
            m.setattr(merge_device, "device_available", lambda d: d.type in ("cpu", "cuda"))
            m.setattr(merge_device, "to_device", record)
            merge_models(run.model_copy(update={"device": "cuda"}), tmp_path / f"cuda-{extra['workers']}")
        a, b = load(tmp_path / f"cpu-{extra['workers']}"), load(tmp_path / f"cuda-{extra['workers']}")
        assert all(torch.equal(a[n], b[n]) for n in a)
        man = json.loads((tmp_path / f"cuda-{extra['workers']}" / "merge_manifest.json").read_text())
        assert man["device"] == "cuda"
    assert moved and {d for d, _ in moved} == {"cuda"}
    assert any(len(s) >= 2 and s[0] == 2 for _, s in moved)  # stacked task vectors of both models
    if method in ("ties", "dare_ties", "dare_linear"):  # the streamed prepare moves one model's blocks
        assert any(len(s) == 2 and s[0] * s[1] <= 100 for _, s in moved)


def test_dare_masks_come_from_the_cpu_generator_whatever_the_device():
    """A DARE mask asked for on a device is the CPU generator's draw placed there (so a GPU merge keeps rlm's
    seeded masks), block by block as whole; the streamed magnitude cut keeps its histogram on the blocks'
    device and still keeps exactly k entries."""
    from rlm.core.contracts import MergeContext
    from rlm.core.merge.ops import SequentialMask, dare_mask, magnitude_keep, magnitude_threshold_blocks

    ctx = MergeContext(tensor_name="w", shape=(4, 5), seed=1)
    whole = dare_mask((4, 5), 0.5, ctx.generator(0), torch.device("cpu"))
    assert torch.equal(whole, dare_mask((4, 5), 0.5, ctx.generator(0)))
    seq = SequentialMask(ctx, 0, 0.5)
    assert torch.equal(torch.cat([seq.block(0, (2, 5), torch.device("cpu")), seq.block(10, (2, 5))]), whole)
    delta = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    cut = magnitude_threshold_blocks(lambda: [((0, 2), delta[:2]), ((2, 4), delta[2:])], 20, 0.3)
    assert int(magnitude_keep(delta, cut).sum()) == 6
    assert magnitude_keep(delta, None).device == delta.device
