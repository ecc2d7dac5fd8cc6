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


# -- hostile parameters and OS errors: one line, a non-zero exit, nothing written --------------------------------


def cli(capsys, *args):
    """``rlm merge ARGS`` in-process: (exit code, stderr lines)."""
    rc = main(["merge", *map(str, args)])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra,message", [
    (["--method", "task_arithmetic", "--lambda", "inf"], "params of merge method 'task_arithmetic': lambda is inf"),
    (["--method", "ties", "--lambda", "nan"], "params of merge method 'ties': lambda is nan"),
    (["--method", "ties", "--weights", "nan,0.5"], r"parameters of model 0 (E1): weight is nan"),
    (["--method", "averaging", "--weights", "0.5,-inf"], r"parameters of model 1 (E2): weight is -inf"),
    (["--method", "dare_linear", "--weights", "1e39,0.5"], "parameters of model 0 (E1): weight = 1e+39 is beyond "
                                                           "float32's range"),
    (["--method", "task_arithmetic", "--lambda", "1e38", "--weights", "3,1"],
     "merge method 'task_arithmetic': lambda 1e+38 times the weights (3, 1) overflows float32"),
])
def test_non_finite_or_huge_parameters_refused_before_any_read(trio, tmp_path, capsys, monkeypatch, extra, message):
    from rlm.core.models import reader

    _, base, e1, e2 = trio
    opened = []
    monkeypatch.setattr(reader.ModelReader, "__init__", lambda self, *a, **k: opened.append(a))
    out = tmp_path / "o"
    rc, err = cli(capsys, "--base", base, "--models", f"{e1},{e2}", "--out", out, *extra)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: " + message.replace("E1", str(e1)).replace("E2", str(e2)))
    assert opened == []  # refused before any model was opened
    no_leftovers(tmp_path, out)


@pytest.mark.parametrize("density", ["-0.1", "1.5", "nan", "inf"])
def test_density_must_be_in_0_1(trio, tmp_path, capsys, density):
    _, base, e1, e2 = trio
    out = tmp_path / "o"
    rc, err = cli(capsys, "--method", "ties", "--base", base, "--models", f"{e1},{e2}", "--density", density,
                  "--out", out)
    assert rc == 2 and err[0].startswith("error: invalid parameters of model 0") and "density" in err[1]
    no_leftovers(tmp_path, out)


def test_a_third_party_methods_own_parameters_are_checked(trio, tmp_path):
    from rlm.core.contracts import MergeMethod, PluginConfig
    from rlm.core.merge.engine import build_method

    class Scaled(MergeMethod):
        name = "scaled"

        class Config(PluginConfig):
            gain: float = 1.0

        class ModelParams(MergeMethod.ModelParams):
            gamma: float = 0.0

        def merge(self, base, deltas, params, *, context=None):
            return base

    class System:
        def registry(self, kind):
            return {"merge_methods": {"scaled": Scaled}}[kind]

    _, base, e1, _ = trio
    for run, message in [
        (dict(params={"gain": float("inf")}), "params of merge method 'scaled': gain is inf"),
        (dict(model_params={"gamma": -4e38}), f"parameters of model 0 ({e1}): gamma = -4e+38 is beyond"),
        (dict(models=[{"path": str(e1), "gamma": float("nan")}]), f"parameters of model 0 ({e1}): gamma is nan"),
    ]:
        cfg = MergeRunConfig(method="scaled", base=str(base), **{"models": [str(e1)], **run})
        with pytest.raises(ConfigError) as info:
            build_method(cfg, System())
        assert str(info.value).startswith(message)
    method, params, _ = build_method(MergeRunConfig(method="scaled", models=[str(e1)], model_params={"gamma": 2}),
                                     System())
    assert params[0].gamma == 2.0


def test_non_finite_output_in_its_dtype_is_not_written(trio, tmp_path, capsys):
    """Finite parameters whose result overflows the output dtype (fp16 max 65504): refused, naming the tensor."""
    _, base, e1, e2 = trio
    out = tmp_path / "o"
    for workers in ("0", "2"):
        rc, err = cli(capsys, "--method", "task_arithmetic", "--base", base, "--models", f"{e1},{e2}",
                      "--lambda", "1e9", "--set", "dtype=float16", "--workers", workers, "--out", out)
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith("error: merge method 'task_arithmetic' produced non-finite values in tensor ")
        assert "Inf as float16); nothing was written" in err[0]
        no_leftovers(tmp_path, out)
    # the same merge in the base's fp32 is finite and written
    rc, _ = cli(capsys, "--method", "task_arithmetic", "--base", base, "--models", f"{e1},{e2}", "--lambda", "1e9",
                "--out", out)
    assert rc == 0 and all(torch.isfinite(v).all() for v in load_file(out / "model.safetensors").values())


def test_method_returning_nan_names_the_tensor(trio, tmp_path, monkeypatch):
    from rlm.plugins.mergers.task_arithmetic import TaskArithmetic

    _, base, e1, e2 = trio
    original = TaskArithmetic.merge

    def poisoned(self, b, deltas, params, *, context=None):
        merged = original(self, b, deltas, params, context=context)
        if context.tensor_name == "model.layers.0.mlp.down_proj.weight":
            merged[0, 0] = float("nan")
        return merged

    monkeypatch.setattr(TaskArithmetic, "merge", poisoned)
    with pytest.raises(RlmError, match=r"non-finite values in tensor model.layers.0.mlp.down_proj.weight \(1 NaN, "
                                       r"0 Inf as float32\)"):
        go(base, [e1, e2], tmp_path / "o", method="task_arithmetic")
    no_leftovers(tmp_path, tmp_path / "o")


def test_disk_full_is_one_line_naming_the_output(trio, tmp_path, capsys, monkeypatch):
    """ENOSPC from the positional writes (a file descriptor: no file name) names the output directory."""
    import errno
    import os

    from rlm.core.models import writer as writer_mod

    _, base, e1, e2 = trio
    calls = {"n": 0}
    real = os.pwrite

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", full)
    out = tmp_path / "o"
    rc, err = cli(capsys, "--method", "ties", "--base", base, "--models", f"{e1},{e2}", "--out", out)
    assert calls["n"] > 5
    assert rc == 1 and err == [f"error: cannot write {out}: no space left on device"]
    no_leftovers(tmp_path, out)


def test_out_below_a_regular_file_or_too_long(trio, tmp_path, capsys):
    """Real OS conditions for everyone, root included: a path through a regular file, a name over 255 bytes."""
    _, base, e1, e2 = trio
    (tmp_path / "file").write_text("x")
    rc, err = cli(capsys, "--method", "ties", "--base", base, "--models", f"{e1},{e2}",
                  "--out", tmp_path / "file" / "o")
    assert rc in (1, 2) and len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / "file") in err[0]
    assert (tmp_path / "file").read_text() == "x"
    long = tmp_path / ("n" * 300)
    rc, err = cli(capsys, "--method", "ties", "--base", base, "--models", f"{e1},{e2}", "--out", long)
    assert rc in (1, 2) and len(err) == 1 and err[0].startswith("error: ") and "n" * 300 in err[0]
    assert "name too long" in err[0].lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    # the engine itself (no command-line lock in front): the OSError names the path
    with pytest.raises(OSError) as info:
        go(base, [e1, e2], tmp_path / "file" / "o")
    assert str(tmp_path / "file") in str(info.value.filename)
    no_leftovers(tmp_path, tmp_path / "file" / "o")


@pytest.mark.parametrize("exc,line", [
    (OSError(30, "Read-only file system", "/x/y"), "error: cannot write /x/y: read-only file system"),
    (OSError(28, "No space left on device", "/x/out"), "error: cannot write /x/out: no space left on device"),
    (PermissionError(13, "Permission denied", "/x"), "error: cannot access /x: permission denied"),
    (NotADirectoryError(20, "Not a directory", "/f/o"), "error: cannot access /f/o: not a directory"),
    (RuntimeError("saving failed"), None),
])
def test_root_turns_os_errors_into_one_line(trio, tmp_path, capsys, monkeypatch, exc, line):
    """Any command's OSError (or one that caused another exception) ends in one line and exit code 1."""
    from rlm.core.merge import engine

    _, base, e1, e2 = trio

    def failing(*a, **k):
        try:
            raise exc
        except RuntimeError:
            raise
        except OSError as os_exc:
            if line.endswith("not a directory"):  # wrapped: the cause is found
                raise RuntimeError("writing failed") from os_exc
            raise

    monkeypatch.setattr(engine, "merge_models", failing)
    args = ["--method", "ties", "--base", base, "--models", f"{e1},{e2}", "--out", tmp_path / "o"]
    if line is None:  # not an OS error: still a traceback for a bug
        with pytest.raises(RuntimeError):
            cli(capsys, *args)
        return
    rc, err = cli(capsys, *args)
    assert rc == 1 and err == [line]


def test_read_only_output_directory(trio, tmp_path, capsys):
    import os

    _, base, e1, e2 = trio
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe = ro / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            pass
        else:  # root: permissions do not stop writes here
            probe.rmdir()
            pytest.skip("running as root, a 0o555 directory is writable")
        rc, err = cli(capsys, "--method", "ties", "--base", base, "--models", f"{e1},{e2}", "--out", ro / "o")
        assert rc == 1 and len(err) == 1 and err[0].startswith(f"error: cannot access {ro}")
        assert err[0].endswith(": permission denied")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_failed_rename_into_place_restores_the_old_output(trio, tmp_path, monkeypatch):
    """An OSError renaming the finished merge into place (--overwrite): the old output is put back and the
    temporary directory removed."""
    import errno
    import os

    from rlm.core.io import atomic

    _, base, e1, e2 = trio
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="Read-only file system"):
        merge_models(MergeRunConfig(method="ties", base=str(base), models=[str(e1), str(e2)]), out, overwrite=True)
    assert (out / "old.txt").read_text() == "old" and sorted(os.listdir(out)) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
