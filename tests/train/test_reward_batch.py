"""RL rollouts score a batch through ``Task.reward_batch``: the default is ``reward`` pair by pair, the code task
runs the sandboxed tests on its worker threads, and both give exactly what ``reward`` gives."""

from __future__ import annotations

import pytest

from rlm.core.contracts import Example
from rlm.core.errors import RlmError
from rlm.core.train.rollout import score_completions
from rlm.plugins.tasks.code import CodeTask
from rlm.plugins.tasks.math import MathTask


def test_default_reward_batch_is_reward_in_order():
    task = MathTask(MathTask.Config())
    exs = task.examples("gen", limit=6)
    texts = [f"#### {e.answer}" if i % 2 else "#### -1" for i, e in enumerate(exs)]
    assert task.reward_batch(exs, texts) == [task.reward(e, t) for e, t in zip(exs, texts)] == [0.0, 1.0] * 3
    assert score_completions(task, exs, texts) == [0.0, 1.0] * 3


def test_code_reward_batch_runs_in_parallel_and_equals_reward():
    task = CodeTask(CodeTask.Config(workers=3))
    exs = task.examples("gen", split="test", limit=8)
    wrong = "```python\ndef f(x):\n    return None\n```"
    texts = [e.reference if i % 3 else wrong for i, e in enumerate(exs)]
    expected = [task.reward(e, t) for e, t in zip(exs, texts)]
    assert expected == [0.0 if i % 3 == 0 else 1.0 for i in range(8)]
    assert task.reward_batch(exs, texts) == expected
    assert score_completions(task, exs, texts) == expected


class _Broken(MathTask):
    def reward_batch(self, examples, completions):
        return [1.0]


def test_a_short_reward_batch_fails_the_run_naming_the_task():
    task = _Broken(MathTask.Config())
    exs = [Example(id="a", prompt="p", answer="1"), Example(id="b", prompt="p", answer="2")]
    with pytest.raises(RlmError, match="'math' returned 1 rewards for 2 completions"):
        score_completions(task, exs, ["#### 1", "#### 2"])


def test_repeated_pairs_run_once_and_each_copy_gets_the_verdict():
    from rlm.plugins.tasks.code.judge import score_in_parallel

    task = CodeTask(CodeTask.Config(workers=2))
    a, b = task.examples("gen", split="test", limit=2)
    wrong = "```python\ndef f(x):\n    return None\n```"
    # an RL batch: two groups of four samples, identical samples within each group
    pairs = [(a, a.reference), (a, wrong), (a, a.reference), (a, a.reference),
             (b, wrong), (b, b.reference), (b, wrong), (b, a.reference)]
    calls: list[tuple[str, str]] = []

    def score(e, c):
        calls.append((e.id, c))
        return {"reward": task.reward(e, c)}

    out = score_in_parallel(score, [p[0] for p in pairs], [p[1] for p in pairs], workers=2)
    assert [o["reward"] for o in out] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert sorted(calls) == sorted({(e.id, c) for e, c in pairs})  # 5 distinct pairs, each run once
    assert len(calls) == 5
    out[0]["reward"] = -1.0  # copies are separate dicts
    assert out[2]["reward"] == 1.0
    # the same completion for two examples with the same id but another prompt is run for each
    twin = Example(id=a.id, prompt=b.prompt, answer=b.answer, reference=b.reference, meta=b.meta)
    calls.clear()
    out = score_in_parallel(score, [a, twin], [b.reference, b.reference], workers=2)
    assert len(calls) == 2 and [o["reward"] for o in out] == [0.0, 1.0]


def test_a_pair_judged_before_in_the_process_is_not_run_again(monkeypatch):
    """The verdict cache: a repeated (example, completion) pair, in a later batch or through another task
    instance, gets the same verdict without a sandbox run; other limits, a full cache or size 0 run again."""
    from collections import OrderedDict

    from rlm.core.eval import sandbox
    from rlm.plugins.tasks.code import judge

    monkeypatch.setattr(judge, "_VERDICTS", OrderedDict())
    runs: list[str] = []
    real = sandbox.run_python

    def counting(script, **kw):
        runs.append("solution.py" in kw.get("files", {}))
        return real(script, **kw)

    monkeypatch.setattr(sandbox, "run_python", counting)
    task = CodeTask(CodeTask.Config(workers=1))
    a, b = task.examples("gen", split="test", limit=2)
    for e in (a, b):  # a right program other than the canonical text (which passes without a run of its own)
        e.reference = e.reference.replace("    return", "    # right, in other words\n    return")
    wrong = "```python\ndef f(x):\n    return None\n```"
    assert task.score(a, a.reference) == {"pass": 1.0} and task.score(a, wrong) == {"pass": 0.0}
    assert runs.count(True) == 2  # two candidate runs (and the reference run, cached on its own)
    again = CodeTask(CodeTask.Config(workers=1))
    first = again.score(a, a.reference)
    assert first == {"pass": 1.0} and again.reward_batch([a, a, b], [wrong, a.reference, b.reference]) == [0., 1., 1.]
    assert runs.count(True) == 3  # only (b, its reference) was new
    first["pass"] = -1.0  # a hit is a copy
    assert again.score(a, a.reference) == {"pass": 1.0}
    slower = CodeTask(CodeTask.Config(workers=1, time_limit_factor=5.0))
    assert slower.score(a, a.reference) == {"pass": 1.0} and runs.count(True) == 4  # other limits: run again
    off = CodeTask(CodeTask.Config(workers=1, verdict_cache=0))
    off.score(a, a.reference), off.score(a, a.reference)
    assert runs.count(True) == 6
    one = CodeTask(CodeTask.Config(workers=1, verdict_cache=1, time_limit_factor=6.0))
    one.score(a, a.reference), one.score(b, b.reference), one.score(a, a.reference)
    assert runs.count(True) == 9 and len(judge._VERDICTS) == 1  # (a) was evicted by (b)
