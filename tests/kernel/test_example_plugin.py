"""Third-party parity: the example distribution (examples/rlm-example-plugin), installed like any package,
extends every kind of plugin with no change to rlm — its merge method with a ``paper`` preset works in
``rlm merge-eval``, its metric reaches ``report.md`` with its own section, its task trains with its RL trainer
(own advantage estimator), and one study uses all four."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "rlm-example-plugin"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An environment where the example distribution is installed (pip --target) next to rlm."""
    root = tmp_path_factory.mktemp("example")
    src, target = root / "src", root / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def rlm(env, cwd, *args, timeout=900):
    res = subprocess.run([sys.executable, "-m", "rlm.core.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=timeout)
    assert res.returncode == 0, f"rlm {' '.join(map(str, args))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_every_kind_is_registered_by_the_one_distribution(env, tmp_path):
    data = json.loads(rlm(env, tmp_path, "plugins", "--json").stdout)
    assert "sign_consensus" in data["merge_methods"] and "max_update" in data["metrics"]
    assert "letter_count" in data["tasks"] and "median_rl" in data["trainers"]
    plugin = {p["name"]: p for p in data["plugins"]}["example"]
    assert plugin["distribution"] == "rlm-example-plugin" and plugin["error"] is None
    assert sorted(plugin["registered"]) == ["letter_count", "max_update", "median_rl", "sign_consensus"]


STUDY = {
    "name": "example-study",
    "base": {"model": "tiny", "seed": 0},
    "warmup": None,
    "tasks": [
        {"name": "letter_count", "label": "short", "train_size": 8, "eval_size": 4, "max_new_tokens": 8,
         "config": {"min_length": 3, "max_length": 4}},
        {"name": "letter_count", "label": "long", "train_size": 8, "eval_size": 4, "max_new_tokens": 8,
         "config": {"min_length": 7, "max_length": 9}},
    ],
    "trainers": [{"name": "median_rl", "label": "median",
                  "config": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8}}],
    "methods": [{"name": "sign_consensus", "preset": "paper"}],
    "eval": {"max_new_tokens": 8, "batch_size": 8, "include_start": False},
    "conflicts": {"enabled": True, "metrics": ["max_update", "update_norm"]},
    "landscape": {"enabled": False},
    "curve": {"enabled": False},
    "report": {"bootstrap_resamples": 50},
    "threads": 1,
}


@pytest.fixture(scope="module")
def study(env, tmp_path_factory):
    """``rlm experiment run`` on a study that uses the plugin's trainer, task, merge method and metric."""
    root = tmp_path_factory.mktemp("study")
    (root / "study.yaml").write_text(yaml.safe_dump(STUDY))
    rlm(env, root, "experiment", "run", root / "study.yaml", "--out", root / "run", "--no-progress")
    return root / "run"


def _step_dir(run: Path, prefix: str) -> Path:
    found = sorted(p for p in (run / "steps").iterdir() if p.name.startswith(prefix) and p.is_dir())
    assert len(found) == 1, f"expected one step directory {prefix}*, found {found}"
    return found[0]


def test_a_study_uses_all_four(study):
    report = (study / "report" / "report.md").read_text()
    table1 = json.loads((study / "report" / "table1.json").read_text())
    assert "sign_consensus" in json.dumps(table1)
    # the merge step took the method's `paper` preset
    merge = _step_dir(study, "merge.median.short+long.sign_consensus")
    manifest = json.loads((merge / "model" / "merge_manifest.json").read_text())
    assert manifest["method"] == "sign_consensus" and manifest["method_params"]["scale"] == 0.8
    # the trainer trained with its own advantage estimator, on the plugin's task
    train = _step_dir(study, "train.median.short")
    run_manifest = json.loads((train / "run" / "manifest.json").read_text())
    assert run_manifest["trainer"] == "median_rl" and run_manifest["task"] == "letter_count"
    assert run_manifest["config"]["advantage"] == "median_baseline"
    # the metric is in the conflicts step and in the study report (Table 2 column and its figure)
    conflicts = _step_dir(study, "conflicts.median")
    assert "Largest single update" in (conflicts / "report.md").read_text()
    assert (conflicts / "max_update.png").is_file()
    assert "max abs τ" in report
    assert "max_update" in report


def test_merge_eval_uses_the_method_preset(env, study, tmp_path):
    base = json.loads((_step_dir(study, "init") / "step.json").read_text())["result"]["model"]
    base = base if Path(base).is_absolute() else _step_dir(study, "init") / base
    experts = {t: _step_dir(study, f"train.median.{t}") / "run" / "final" for t in ("short", "long")}
    rlm(env, tmp_path, "merge-eval", "--base", base,
        "--experts", f"median:short={experts['short']},median:long={experts['long']}",
        "--tasks", "short=letter_count,long=letter_count", "--methods", "sign_consensus", "--limit", "4",
        "--max-new-tokens", "8", "--no-landscape", "--no-curve", "--out", tmp_path / "me", "--no-progress")
    merge = _step_dir(tmp_path / "me", "merge.median.short+long.sign_consensus")
    manifest = json.loads((merge / "model" / "merge_manifest.json").read_text())
    assert manifest["method_params"]["scale"] == 0.8  # the preset, not the config default 1.0
    assert "sign_consensus" in (tmp_path / "me" / "report" / "table1.md").read_text()


def test_conflicts_report_has_the_metric_section(env, tmp_path):
    # tiny models from other seeds: task vectors that are far from zero
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        rlm(env, tmp_path, "model", "init", "tiny", "--seed", seed, "--out", tmp_path / name)
    rlm(env, tmp_path, "conflicts", "--base", tmp_path / "base", "--models", f"a={tmp_path / 'a'},b={tmp_path / 'b'}",
        "--metrics", "max_update,update_norm,cosine", "--out", tmp_path / "c")
    report = (tmp_path / "c" / "report.md").read_text()
    assert "## Largest single update" in report and "max abs τ" in report
    assert (tmp_path / "c" / "max_update.png").stat().st_size > 0
    data = json.loads((tmp_path / "c" / "conflicts.json").read_text())
    assert data["models"]["a"]["max_update"] > 0 and data["models"]["a"]["max_update_tensor"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["stats"]["engine"] == "eager"  # the metric reads τ blocks


def test_train_with_the_plugin_trainer_on_the_plugin_task(env, tmp_path):
    rlm(env, tmp_path, "train", "--trainer", "median_rl", "--task", "letter_count", "--model", "tiny",
        "--steps", "2", "--set", "prompts_per_step=2", "--set", "group_size=4", "--set", "max_new_tokens=8",
        "--set", "save_every=1", "--out", tmp_path / "t", "--no-progress")
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "t" / "final" / "config.json").is_file()
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["advantage"] == "median_baseline"
    # a misspelt estimator is refused at config time with the closest name
    res = subprocess.run([sys.executable, "-m", "rlm.core.cli", "train", "--trainer", "median_rl", "--task",
                          "letter_count", "--set", "advantage=median_basline", "--out", tmp_path / "t2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and "median_baseline" in res.stderr and len(res.stderr.strip().splitlines()) == 1
