"""``rlm conflicts`` warns, one stderr line naming the model, when an expert is identical to its base (an all-zero
task vector), on both engines; the statistics are still written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_conflicts import make_expert

from rlm.core.cli import main
from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.engine import compute_conflicts


@pytest.fixture(scope="module")
def same_and_moved(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    same = root / "same"
    shutil.copytree(tiny_model_dir, same)
    one = root / "one"  # a single changed entry in one tensor: not all zero
    make_expert(tiny_model_dir, one, 7, zero_frac=1.0, edit=lambda sd: sd[sorted(sd)[-1]].reshape(-1).__setitem__(
        0, sd[sorted(sd)[-1]].reshape(-1)[0] + np.float32(0.5)))
    return same, one, make_expert(tiny_model_dir, root / "moved", 1)


def test_cli_warns_once_naming_the_zero_expert(tiny_model_dir, same_and_moved, tmp_path, capsys):
    same, one, moved = same_and_moved
    out = tmp_path / "conf"
    rc = main(["conflicts", "--base", str(tiny_model_dir), "--models", f"copy={same},one={one},moved={moved}",
               "--out", str(out), "--set", "threads=1", "--set", "workers=1"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert rc == 0
    assert lines == [f"warning: model copy ({same}): its task vector is all zero (identical to the base "
                     f"{tiny_model_dir})"]
    data = json.loads((out / "conflicts.json").read_text())
    assert data["models"]["copy"]["update_norm"] == 0.0 and data["models"]["one"]["update_norm"] == pytest.approx(0.5)


@pytest.mark.parametrize("engine", ["eager", "auto"])  # auto: the fused engine where it is built
def test_engines_report_zero_task_vectors(tiny_model_dir, same_and_moved, capsys, engine):
    same, one, moved = same_and_moved
    res = compute_conflicts(tiny_model_dir, {"moved": moved, "copy": same, "one": one},
                            ConflictsConfig(engine=engine, threads=1, workers=1, metrics=["update_norm"]))
    assert res.stats["zero_task_vectors"] == ["copy"]
    assert capsys.readouterr().err.count("warning: model copy") == 1
    res = compute_conflicts(tiny_model_dir, {"moved": moved, "one": one},
                            ConflictsConfig(engine=engine, threads=1, workers=1))
    assert res.stats["zero_task_vectors"] == [] and "warning" not in capsys.readouterr().err
