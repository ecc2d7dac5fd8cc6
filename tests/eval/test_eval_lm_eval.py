"""The lm-eval bridge's pure parts (local task files, the summary in rlm's layout) and the ``rlm eval`` /
``rlm score`` commands: module-level functions that arrive through ``register_commands`` like any plugin's."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from rlm.core.eval.lm_eval import LM_EVAL_LOCAL, lm_eval_local_tasks, lm_eval_summary
from rlm.core.plugins import PluginSystem


def test_local_tasks_point_lm_eval_at_files_that_exist(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in LM_EVAL_LOCAL["gsm8k"][1].values():
        (data / name).write_text("{}\n")
    work = tmp_path / "work"
    work.mkdir()
    names, include = lm_eval_local_tasks(["gsm8k", "ifeval", "arc_easy"], data, work)
    assert names == ["gsm8k_rlm_local", "ifeval", "arc_easy"]  # no local IFEval file: lm-eval's own dataset
    assert include == str(work)
    cfg = yaml.safe_load((work / "gsm8k_rlm_local.yaml").read_text())
    assert cfg["task"] == "gsm8k_rlm_local" and cfg["dataset_path"] == "json"
    assert Path(cfg["include"]).name == "gsm8k.yaml" and Path(cfg["include"]).is_file()
    assert cfg["dataset_kwargs"]["data_files"] == {s: str(data / f) for s, f in LM_EVAL_LOCAL["gsm8k"][1].items()}


def test_local_tasks_without_data_dir_or_files_are_unchanged(tmp_path):
    assert lm_eval_local_tasks(["gsm8k"], None, tmp_path) == (["gsm8k"], None)
    assert lm_eval_local_tasks(["gsm8k"], tmp_path / "empty", tmp_path) == (["gsm8k"], None)
    assert list(tmp_path.iterdir()) == []


def test_summary_keeps_metric_filter_values_without_stderr():
    res = {"results": {"gsm8k_rlm_local": {"alias": "gsm8k", "exact_match,strict-match": 0.5,
                                           "exact_match_stderr,strict-match": 0.1, "exact_match,flexible-extract": 1,
                                           "samples": 4}},
           "n-samples": {"gsm8k_rlm_local": {"original": 1319, "effective": 4}}}
    assert lm_eval_summary(res, ["gsm8k_rlm_local", "ifeval"], ["gsm8k", "ifeval"]) == {
        "lm-eval:gsm8k": {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 1.0, "n": 4},
        "lm-eval:ifeval": {"n": None}}


def test_eval_and_score_are_module_level_and_register_through_the_hook():
    import rlm.core.cli.eval as eval_cli
    from rlm.core.cli.eval import eval, score

    system = PluginSystem(load_entry_points=False)
    system.add_plugin(eval_cli, name="commands.eval")
    app = typer.Typer()
    system.register_commands(app)
    assert [(c.name, c.callback) for c in app.registered_commands] == [("eval", eval), ("score", score)]
    runner = CliRunner()
    assert "--harness" in runner.invoke(app, ["eval", "--help"]).output
    assert "--completions" in runner.invoke(app, ["score", "--help"]).output
