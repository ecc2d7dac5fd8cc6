"""Bad input is refused before any compute, with a message naming the model and tensor; nothing half-written
is ever left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge_engine import make_llama

from rlm.core.cli import main
from rlm.core.errors import ConfigError, ModelError, RlmError, UnknownPluginError
from rlm.core.merge.engine import MergeRunConfig, merge_models


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-bad")
    base = make_llama(root / "base", 0)
    e1 = make_llama(root / "e1", 1, base=base)
    e2 = make_llama(root / "e2", 2, base=base)
    return root, base, e1, e2


def edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def go(base, models, out, **kw):
    return merge_models(MergeRunConfig(method=kw.pop("method", "ties"), base=str(base),
                                       models=[str(m) for m in models], **kw), out)


def no_leftovers(parent: Path, out: Path):
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_path(trio, tmp_path):
    root, base, e1, _ = trio
    with pytest.raises(ModelError, match=r"model path .*nope does not exist"):
        go(base, [e1, root / "nope"], tmp_path / "out")
    with pytest.raises(ModelError, match=r"nope2 does not exist"):
        go(root / "nope2", [e1], tmp_path / "out")
    no_leftovers(tmp_path, tmp_path / "out")


def test_directory_that_is_not_a_model(trio, tmp_path):
    _, base, e1, _ = trio
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty is not a model directory"):
        go(base, [e1, tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"cfgonly is not a model directory: no model.safetensors"):
        go(base, [tmp_path / "cfgonly"], tmp_path / "out")
    no_leftovers(tmp_path, tmp_path / "out")


def test_mismatched_shapes_name_model_and_tensor(trio, tmp_path):
    _, base, e1, _ = trio
    bad = edited(e1, tmp_path / "bad", lambda sd: sd.__setitem__(
        "model.layers.1.mlp.up_proj.weight", torch.zeros(60, 32)))
    with pytest.raises(ModelError, match=r"model .*bad: tensor model.layers.1.mlp.up_proj.weight has shape "
                                         r"\[60, 32\] but the base .* has \[64, 32\]"):
        go(base, [bad], tmp_path / "out")
    other = make_llama(tmp_path / "wide", 3, hidden_size=48)
    with pytest.raises(ModelError, match=r"wide: tensor lm_head.weight has shape \[64, 48\] but the base"):
        go(base, [e1, other], tmp_path / "out")
    no_leftovers(tmp_path, tmp_path / "out")


def test_different_architecture(trio, tmp_path):
    _, base, e1, _ = trio
    odd = tmp_path / "odd"
    shutil.copytree(e1, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"odd has model_type='mistral' but the base .* has model_type='llama'"):
        go(base, [odd], tmp_path / "out")


def test_tensor_missing_from_one_model(trio, tmp_path):
    _, base, e1, e2 = trio
    bad = edited(e2, tmp_path / "holey", lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ModelError, match=r"holey: tensor model.layers.0.self_attn.k_proj.weight .* is missing"):
        go(base, [e1, bad], tmp_path / "out")
    extra = edited(e2, tmp_path / "extra", lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(ModelError, match=r"extra: tensor model.extra.weight is not in the base"):
        go(base, [extra], tmp_path / "out")
    no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("value,kind", [(float("nan"), r"1 NaN, 0 Inf"), (float("inf"), r"0 NaN, 1 Inf")])
def test_nan_or_inf_names_model_and_tensor_and_leaves_nothing(trio, tmp_path, value, kind):
    _, base, e1, e2 = trio

    def poison(sd):
        sd["model.layers.1.self_attn.o_proj.weight"][3, 4] = value

    bad = edited(e2, tmp_path / "poison", poison)
    for workers in (0, 2):
        with pytest.raises(ModelError, match=rf"model .*poison: tensor model.layers.1.self_attn.o_proj.weight "
                                             rf"contains non-finite values \({kind}\)"):
            go(base, [e1, bad], tmp_path / "out", workers=workers)
        no_leftovers(tmp_path, tmp_path / "out")
    bad_base = edited(base, tmp_path / "poison_base", poison)
    with pytest.raises(ModelError, match=r"poison_base: tensor model.layers.1.self_attn.o_proj.weight"):
        go(bad_base, [e1], tmp_path / "out")


def test_existing_output_refused_unless_overwrite(trio, tmp_path):
    _, base, e1, e2 = trio
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RlmError, match="already exists.*--overwrite"):
        go(base, [e1, e2], out)
    assert (out / "keep.txt").read_text() == "precious"
    merge_models(MergeRunConfig(method="ties", base=str(base), models=[str(e1), str(e2)]), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_write_failure_part_way_leaves_no_partial_output(trio, tmp_path, monkeypatch):
    from rlm.core.models import writer as safetensors_writer

    _, base, e1, e2 = trio
    original = safetensors_writer.ShardedWriter.write
    calls = {"n": 0}

    def failing(self, name, tensor, rows_offset=0):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return original(self, name, tensor, rows_offset)

    monkeypatch.setattr(safetensors_writer.ShardedWriter, "write", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        go(base, [e1, e2], out, max_shard_bytes=20_000)
    assert calls["n"] > 3
    no_leftovers(tmp_path, out)
    # an existing output survives a failed --overwrite run untouched
    out.mkdir()
    (out / "old.txt").write_text("old")
    calls["n"] = 0
    with pytest.raises(OSError):
        merge_models(MergeRunConfig(method="ties", base=str(base), models=[str(e1), str(e2)]), out, overwrite=True)
    assert (out / "old.txt").read_text() == "old"


def test_bad_parameters_are_config_errors(trio, tmp_path):
    _, base, e1, e2 = trio
    with pytest.raises(ConfigError, match="density"):
        merge_models(MergeRunConfig(method="ties", base=str(base), models=[{"path": str(e1), "density": 2}]),
                     tmp_path / "o")
    with pytest.raises(ConfigError, match="lamda"):
        merge_models(MergeRunConfig(method="ties", base=str(base), models=[str(e1)], params={"lamda": 1}),
                     tmp_path / "o")
    with pytest.raises(UnknownPluginError, match="did you mean 'ties'"):
        merge_models(MergeRunConfig(method="tie", base=str(base), models=[str(e1)]), tmp_path / "o")
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        merge_models(MergeRunConfig(method="ties", base=str(base), models=[str(e1)], preset="nope"), tmp_path / "o")


def test_cli_errors_are_one_line_exit_2(trio, tmp_path, capsys):
    root, base, e1, e2 = trio
    rc = main(["merge", "--method", "ties", "--base", str(base), "--models", f"{e1},{root / 'missing'}",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing does not exist" in err and len(err.strip().splitlines()) == 1
    rc = main(["merge", "--method", "ties", "--base", str(base), "--models", f"{e1},{e2}", "--weights", "1,2,3",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--weights has 3 values but there are 2 models" in capsys.readouterr().err
