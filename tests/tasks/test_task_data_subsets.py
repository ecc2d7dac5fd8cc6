"""``--data`` given for a subset that reads no file (a generated one) is an error naming the subset, in
``rlm eval``, ``rlm score`` and ``rlm train``, before anything is written; tasks declare the subsets that read
files in ``Task.file_subsets`` (``None``, the default, declares nothing and keeps ``--data`` for every subset)."""

from __future__ import annotations

import json

import pytest

from rlm.core.cli import main
from rlm.core.contracts import Example, Task
from rlm.core.errors import RlmError
from rlm.core.plugins import get_plugin


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    return path


def run(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize("spec,subset,takes", [
    ("math:gen", "gen", "gsm8k, math500, openmath"),
    ("math", "gen", "gsm8k, math500, openmath"),  # the default subset
    ("code:gen", "gen", "humaneval, humaneval_plus, mbpp_plus, opencodeinstruct"),
])
def test_eval_refuses_data_for_a_generated_subset(tiny_model_dir, data_file, tmp_path, capsys, spec, subset, takes):
    task = spec.partition(":")[0]
    rc, err = run(capsys, "eval", "--model", tiny_model_dir, "--task", spec, "--data", data_file,
                  "--out", tmp_path / "out")
    assert rc == 2
    assert err == [f"error: --data {data_file}: subset {subset!r} of task {task!r} reads no data file (its examples "
                   f"are generated); --data applies to subsets {takes}"]
    only(tmp_path, "data.jsonl")


def test_score_refuses_data_for_a_generated_subset(data_file, tmp_path, capsys):
    comp = tmp_path / "comp.jsonl"
    comp.write_text(json.dumps({"id": "x", "completion": "2"}) + "\n")
    rc, err = run(capsys, "score", "--task", "math:gen", "--data", data_file, "--completions", comp,
                  "--out", tmp_path / "out")
    assert rc == 2 and len(err) == 1 and "subset 'gen' of task 'math' reads no data file" in err[0]
    only(tmp_path, "data.jsonl", "comp.jsonl")


@pytest.mark.parametrize("spec,message", [
    ("puzzle:ood", "subset 'ood' of task 'puzzle' reads no data file (its examples are generated); no subset of it "
                   "reads data files"),
    ("math:gen", "subset 'gen' of task 'math' reads no data file"),
])
def test_train_refuses_data_for_a_generated_subset(tiny_model_dir, data_file, tmp_path, capsys, spec, message):
    rc, err = run(capsys, "train", "--trainer", "sft", "--task", spec, "--model", tiny_model_dir, "--data", data_file,
                  "--out", tmp_path / "out", "--steps", "1", "--set", "num_threads=1")
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --data {data_file}: {message}")
    only(tmp_path, "data.jsonl")


def test_file_subsets_declarations():
    math = get_plugin("task", "math")()
    math.check_data("gsm8k", "x.jsonl")  # reads the file
    math.check_data("gen", None)  # no --data: nothing to check
    with pytest.raises(RlmError, match=r"subset 'gen' of task 'math'"):
        math.check_data(None, "x.jsonl")
    for name in ("instruction_following", "rank"):  # every subset of these reads --data (generated: as rows)
        task = get_plugin("task", name)()
        assert set(task.file_subsets) == set(task.subsets)
        for subset in task.subsets:
            task.check_data(subset, "x.jsonl")
    for name in ("math", "code", "puzzle"):
        task = get_plugin("task", name)()
        assert set(task.file_subsets) < set(task.subsets)


def test_a_task_declaring_nothing_keeps_data_for_every_subset():
    class ThirdParty(Task):
        name = "third_party"
        subsets = {"a": "one", "b": "two"}

        def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
            return [Example(id="0", prompt=str(path))]

        def reward(self, example, completion):
            return 0.0

    task = ThirdParty()
    assert task.file_subsets is None
    for subset in (None, "a", "b"):
        task.check_data(subset, "anything")
