"""``--task-set``: task plugin config fields from the command line of ``rlm eval`` and ``rlm train``."""

from __future__ import annotations

import json

import pytest

from rlm.core.cli import main
from rlm.core.config import task_config_sets
from rlm.core.errors import ConfigError


def test_task_config_sets_by_task_name_or_alone():
    assert task_config_sets(["math"], ["solution=answer", "max_operand=99"]) == {
        "math": {"solution": "answer", "max_operand": 99}}
    assert task_config_sets(["math", "code"], ["math.solution=answer", "code.workers=2"]) == {
        "math": {"solution": "answer"}, "code": {"workers": 2}}
    assert task_config_sets(["math", "code"], []) == {}
    with pytest.raises(ConfigError, match="name the task first"):
        task_config_sets(["math", "code"], ["solution=answer"])


def test_eval_uses_the_task_config(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", "--no-progress", "--model", str(tiny_model_dir), "--task", "math", "--task-set",
               "solution=answer", "--task-set", "max_operand=3", "--limit", "4", "--max-new-tokens", "4",
               "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert "Write only the final answer" in r["prompt"]
        a, b = (int(x) for x in r["prompt"].split("What is ")[1].split("?")[0].split(" + "))
        assert max(a, b) <= 3


def test_a_bad_task_field_is_refused_naming_it(tiny_model_dir, tmp_path, capsys):
    rc = main(["eval", "--no-progress", "--model", str(tiny_model_dir), "--task", "math", "--task-set",
               "solutio=answer", "--limit", "1", "--out", str(tmp_path / "ev")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "solutio: unknown field" in err and "'math'" in err
    assert not (tmp_path / "ev").exists()
    rc = main(["train", "--no-progress", "--trainer", "sft", "--task", "math", "--model", str(tiny_model_dir),
               "--task-set", "solution=bad", "--steps", "1", "--out", str(tmp_path / "tr")])
    assert rc != 0
    assert "solution: Input should be 'steps' or 'answer'" in capsys.readouterr().err
    assert not (tmp_path / "tr").exists()


def test_train_uses_the_task_config(tiny_model_dir, tmp_path):
    out = tmp_path / "tr"
    rc = main(["train", "--no-progress", "--trainer", "sft", "--task", "math", "--model", str(tiny_model_dir),
               "--task-set", "solution=answer", "--steps", "1", "--set", "batch_size=2", "--out", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "math" and manifest["task_config"]["solution"] == "answer"
