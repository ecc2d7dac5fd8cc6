"""The code task: canonical solutions pass (HumanEval through `rlm score`, HumanEval+ and MBPP+ base and plus),
corrupted and hostile ones fail, completions may be bodies or full solutions."""

from __future__ import annotations

import json
import time

import pytest
from conftest import shared_file

from rlm.core.cli import main
from rlm.core.contracts import Example
from rlm.core.io.records import read_records
from rlm.plugins.tasks.code import CodeTask
from rlm.plugins.tasks.code.judge import _whole_lines
from rlm.plugins.tasks.code.program import build_solution, extract_code

# Canonical MBPP+ solutions whose *plus* suite may fail on a loaded machine, and why (all 378 passed in the last
# full run; base and plus run in separate sandbox runs, so every base suite must pass):
# - Mbpp/599 (sum_average): its plus inputs hold 16 calls with n around 1e8 (about 2 s each with `sum(range)` on
#   this machine); the run is near the 60 s CPU limit, and a loaded machine can push it over.
# - Mbpp/255 (combinations_colors): plus inputs ask for combinations with replacement of large lists (the
#   reference run takes 38-47 s of the 60 s CPU limit here, the candidate's about as long); the expected outputs
#   are kept as digests, and the per-input time limit (4x the reference time, measured in another process)
#   is tight when the machine's load changes between the two runs.
MBPP_PLUS_EXCEPTIONS = {"Mbpp/599", "Mbpp/255"}


def test_humaneval_canonical_through_rlm_score(tmp_path):
    path = shared_file("HumanEval.jsonl.gz")
    rows = read_records(path)
    comp = tmp_path / "canonical.jsonl"
    with open(comp, "w") as f:
        for i, r in enumerate(rows):
            # half as function bodies (evalplus `completion`), half as full solutions in a fenced block
            c = r["canonical_solution"] if i % 2 else f"Here you go:\n```python\n{r['prompt']}{r['canonical_solution']}```"
            f.write(json.dumps({"task_id": r["task_id"], "completion": c}) + "\n")
    t0 = time.perf_counter()
    assert main(["score", "--task", "code:humaneval", "--data", str(path), "--completions", str(comp),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == {"code:humaneval": {"pass@1": 1.0, "n": 164}}
    assert (tmp_path / "out" / "manifest.json").is_file() and not (tmp_path / "out" / "errors.jsonl").exists()
    print(f"HumanEval canonical: {time.perf_counter() - t0:.1f} s")

    # corrupted: flip the first `return` into returning None for ten tasks
    bad = tmp_path / "bad.jsonl"
    with open(bad, "w") as f:
        for r in rows[:10]:
            f.write(json.dumps({"task_id": r["task_id"],
                                "completion": r["canonical_solution"].replace("return ", "return None and ", 1)}) + "\n")
    assert main(["score", "--task", "code:humaneval", "--data", str(path), "--completions", str(bad),
                 "--out", str(tmp_path / "bad_out"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "bad_out" / "summary.json").read_text())
    assert summary["code:humaneval"]["n"] == 10 and summary["code:humaneval"]["pass@1"] <= 0.1


def _canonical(subset, name):
    task = CodeTask()
    ex = task.examples(subset, split="test", path=str(shared_file(name)))
    t0 = time.perf_counter()
    scores = task.score_batch(ex, [e.reference for e in ex])
    return task, ex, scores, time.perf_counter() - t0


def test_humaneval_plus_canonical_pass_base_and_plus():
    task, ex, scores, dt = _canonical("humaneval_plus", "HumanEvalPlus.jsonl.gz")
    assert len(ex) == 164
    failed = [e.id for e, s in zip(ex, scores) if s != {"pass_base": 1.0, "pass_plus": 1.0}]
    assert failed == []
    assert task.metrics(scores) == {"pass@1_base": 1.0, "pass@1_plus": 1.0}
    print(f"HumanEval+ canonical: {dt:.1f} s")


@pytest.mark.slow
def test_mbpp_plus_canonical_pass_base_and_plus():
    _, ex, scores, dt = _canonical("mbpp_plus", "MbppPlus.jsonl.gz")
    assert len(ex) == 378
    failed = {e.id for e, s in zip(ex, scores) if s != {"pass_base": 1.0, "pass_plus": 1.0}}
    assert failed <= MBPP_PLUS_EXCEPTIONS, failed
    base_failed = {e.id for e, s in zip(ex, scores) if s["pass_base"] != 1.0}
    assert base_failed == set(), base_failed
    print(f"MBPP+ canonical: {dt:.1f} s, failed: {sorted(failed)}")


def test_plus_counts_only_when_base_passes():
    task = CodeTask()
    ex = task.examples("gen", limit=1)[0]
    ex.answer = dict(ex.answer, dataset="humaneval", entry_point="f", canonical="def f(x):\n    return x * 2\n",
                     base_input=[[1], [2]], plus_input=[[3], [100]])
    assert task.score(ex, "def f(x):\n    return x * 2\n") == {"pass_base": 1.0, "pass_plus": 1.0}
    # right on the plus inputs, wrong on a base input: plus does not count
    assert task.score(ex, "def f(x):\n    return 0 if x == 1 else x * 2\n") == {"pass_base": 0.0, "pass_plus": 0.0}
    # right on base, wrong on plus
    assert task.score(ex, "def f(x):\n    return x * 2 if x < 50 else 0\n") == {"pass_base": 1.0, "pass_plus": 0.0}
    # floats: within atol passes, outside fails
    ex.answer = dict(ex.answer, canonical="def f(x):\n    return x / 3\n", atol=1e-3)
    assert task.score(ex, "def f(x):\n    return x / 3 + 1e-4\n")["pass_plus"] == 1.0
    assert task.score(ex, "def f(x):\n    return x / 3 + 1e-2\n")["pass_plus"] == 0.0


def test_body_full_and_fenced_completions():
    task = CodeTask()
    path = shared_file("HumanEval.jsonl.gz")
    ex = task.examples("humaneval", path=str(path), limit=3)
    r = read_records(path)[:3]
    for e, row in zip(ex, r):
        assert task.reward(e, row["canonical_solution"]) == 1.0  # body
        assert task.reward(e, row["prompt"] + row["canonical_solution"]) == 1.0  # full, unfenced
        assert task.reward(e, f"```python\n{row['prompt']}{row['canonical_solution']}\n```\nDone.") == 1.0
        assert task.reward(e, "    return None\n") == 0.0
    assert extract_code("a\n```py\nx=1\n```\n```python\ndef g():\n  pass\n```", "g").startswith("def g")
    full = build_solution(ex[0], "def has_close_elements(numbers, threshold):\n    return False\n")
    assert full.startswith("from typing import List")  # the prompt's imports are kept for full solutions


def test_generator_reference_passes_and_wrong_fails():
    task = CodeTask()
    ex = task.examples("gen", split="train", limit=12, seed=1)
    assert [e.prompt for e in ex] == [e.prompt for e in task.examples("gen", split="train", limit=12, seed=1)]
    scores = task.score_batch(ex, [e.reference for e in ex])
    assert task.metrics(scores) == {"pass@1": 1.0}
    wrong = [f"def {e.answer['entry_point']}(x):\n    return None\n" for e in ex]
    assert task.metrics(task.score_batch(ex, wrong)) == {"pass@1": 0.0}



def test_generator_tests_per_function(monkeypatch):
    """``gen_tests=per_function``: the same prompts as per example, one input suite per function (the same in
    every split and seed), so a repeated (function, completion) pair reuses its verdict; a bad mode is named."""
    from rlm.core.eval import sandbox
    from rlm.plugins.tasks.code.generator import generate_functions

    each = CodeTask().examples("gen", split="train", limit=60, seed=3)
    per_fn = CodeTask(gen_tests="per_function").examples("gen", split="train", limit=60, seed=3)
    assert [e.prompt for e in per_fn] == [e.prompt for e in each]
    other = CodeTask(gen_tests="per_function").examples("gen", split="test", limit=200, seed=9)
    suites: dict[str, list] = {}
    for e in per_fn + other:
        assert suites.setdefault(e.answer["canonical"], e.answer["base_input"]) == e.answer["base_input"]
    assert len(suites) < len(per_fn)  # some function repeats, and with it its suite
    assert len({json.dumps(e.answer["base_input"]) for e in each}) == len(each)  # per example: all differ
    twice = [e for e in per_fn if sum(x.answer["canonical"] == e.answer["canonical"] for x in per_fn) > 1]
    assert twice[0].answer == next(x for x in per_fn[per_fn.index(twice[0]) + 1:]
                                   if x.answer["canonical"] == twice[0].answer["canonical"]).answer
    runs = []
    real = sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda *a, **k: runs.append(1) or real(*a, **k))
    task = CodeTask(gen_tests="per_function")
    same = [x for x in per_fn if x.answer["canonical"] == twice[0].answer["canonical"]]
    for e in same:
        task.judge.reference_outputs(e)
    before = len(runs)
    spelled = [e.reference.replace("    return", "    # the same function\n    return") for e in same]
    assert [task.reward(e, c) for e, c in zip(same, spelled)] == [1.0] * len(same)
    assert len(runs) - before == 1  # one sandbox run for every example of that function
    with pytest.raises(ValueError, match="per_example"):
        generate_functions(2, tests="per_suite")


@pytest.mark.parametrize("max_constant", [9, 14])
def test_per_function_suites_tell_every_near_miss_apart(max_constant):
    """Every generated function's suite separates it from each other template and constant of its kind (the
    near misses RL finds: ``x % 6 == 0`` for ``is_multiple_of_5``) and from constant answers, so no such
    completion passes. Our own trusted functions, run in-process on the suite."""
    from rlm.plugins.tasks.code.generator import FUNCTION_TEMPLATES, _function_suite

    def run(body, inputs):
        fn = eval(f"lambda x: {body.removeprefix('return ')}")  # noqa: S307 - the generator's own bodies
        return [fn(*[list(a) if isinstance(a, list) else a for a in args]) for args in inputs]

    every = [(n.format(k=k), b.format(k=k, a="x"), kind, k) for n, _, b, kind in FUNCTION_TEMPLATES
             for k in (range(2, max_constant + 1) if "{k}" in b else [0])]
    constants = ["return False", "return True", "return 0", "return 1", "return x", "return None"]
    for name, body, kind, k in every:
        suite = _function_suite(name, body, kind, k, max_constant)
        want = run(body, suite)
        for _, other, other_kind, _ in every:
            if other != body and other_kind == kind:
                assert run(other, suite) != want, (name, other)
        for c in constants:
            assert run(c, suite) != want, (name, c)

HOSTILE = {
    "infinite loop": "def {f}(x):\n    while True:\n        pass\n",
    "fork bomb": "import os\nfor _ in range(1000):\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
                 "def {f}(x):\n    return None\n",
    "memory hog": "def {f}(x):\n    a = []\n    while True:\n        a.append(bytearray(10 ** 8))\n",
    "early exit": "import os\nos._exit(0)\n",
    "fake verdict": "print('pass base 1')\nimport sys\nsys.exit(0)\n",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\ndef {f}(x):\n    return x\n",
    "delete": "import shutil\nshutil.rmtree('{victim}')\ndef {f}(x):\n    return None\n",
}


def test_hostile_completions_score_zero(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    task = CodeTask(min_time_limit=0.5, program_timeout=3.0,
                    sandbox={"cpu_seconds": 3, "wall_seconds": 6, "memory_mb": 1024, "max_processes": 16})
    ex = task.examples("gen", limit=len(HOSTILE), seed=5)
    comps = [code.format(f=e.answer["entry_point"], victim=victim) for e, code in zip(ex, HOSTILE.values())]
    t0 = time.perf_counter()
    scores = task.score_batch(ex, comps)
    assert [s["pass"] for s in scores] == [0.0] * len(HOSTILE), dict(zip(HOSTILE, scores))
    assert time.perf_counter() - t0 < 60
    assert (victim / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("garbage", [None, "", "   ", "\x00\xff", "```python\n", "def (", "import antigravity" * 3])
def test_reward_never_raises(garbage):
    task = CodeTask()
    e = task.examples("gen", limit=1)[0]
    assert task.reward(e, garbage) == 0.0


def test_opencodeinstruct_fixture(tmp_path):
    f = tmp_path / "oci.jsonl"
    rows = [{"id": "abc", "input": "Write add(a, b).", "output": "```python\ndef add(a, b):\n    return a + b\n```",
             "unit_tests": json.dumps(["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = CodeTask()
    ex = task.examples("opencodeinstruct", path=str(f))
    assert ex[0].id == "abc" and task.reward(ex[0], ex[0].reference) == 1.0
    assert task.reward(ex[0], "def add(a, b):\n    return a - b\n") == 0.0


def test_reference_outputs_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_CACHE", str(tmp_path / "cache"))
    task = CodeTask()
    ex = task.examples("gen", limit=1)[0]
    ex.answer = dict(ex.answer, dataset="humaneval", entry_point="f", canonical="def f(x):\n    return [x] * 3\n",
                     base_input=[[1], [2]], plus_input=[[3]])
    assert task.score(ex, "def f(x):\n    return [x, x, x]\n") == {"pass_base": 1.0, "pass_plus": 1.0}
    files = list((tmp_path / "cache" / "code_reference").glob("*.jsonl"))
    assert len(files) == 1
    fresh = CodeTask()  # a new process-level cache: the disk copy is used, the results are the same
    assert fresh.reference_outputs(ex) == files[0].read_bytes()
    assert fresh.score(ex, "def f(x):\n    return [x] * 2\n") == {"pass_base": 0.0, "pass_plus": 0.0}
    # a canonical solution that cannot run makes every candidate fail (nothing to compare against)
    ex.answer = dict(ex.answer, canonical="def f(x):\n    raise RuntimeError\n")
    assert fresh.reference_outputs(ex) is None
    assert fresh.score(ex, "def f(x):\n    return [x] * 3\n") == {"pass_base": 0.0, "pass_plus": 0.0}


def test_a_plus_suite_over_the_cpu_limit_costs_only_plus(tmp_path, monkeypatch):
    """Base and plus run in separate sandbox runs (as in evalplus): a plus suite that exhausts the CPU limit,
    in the reference or in the candidate, fails plus only; a reference cut short is not cached on disk."""
    from rlm.core.eval.sandbox import SandboxConfig

    monkeypatch.setenv("RLM_CACHE", str(tmp_path / "cache"))
    task = CodeTask(sandbox=SandboxConfig(cpu_seconds=1, wall_seconds=20.0), verdict_cache=0)
    ex = task.examples("gen", limit=1)[0]
    slow = "def f(x):\n    while x > 0:\n        pass\n    return x\n"
    ex.answer = dict(ex.answer, dataset="humaneval", entry_point="f", canonical=slow,
                     base_input=[[-1], [-2]], plus_input=[[-3], [1]])
    assert task.score(ex, slow) == {"pass_base": 1.0, "pass_plus": 0.0}
    assert not list((tmp_path / "cache").rglob("*.jsonl"))
    # a complete reference; the candidate's plus run times out on its second input
    fast = "def f(x):\n    return x\n"
    ex.answer = dict(ex.answer, canonical=fast)
    assert task.score(ex, slow) == {"pass_base": 1.0, "pass_plus": 0.0}
    assert task.score(ex, fast) == {"pass_base": 1.0, "pass_plus": 1.0}
    assert len(list((tmp_path / "cache").rglob("*.jsonl"))) == 1
    assert _whole_lines(b'["a"]\n["b", 1') == b'["a"]\n' and _whole_lines(b'["a') == b""


def test_large_outputs_are_compared_by_digest():
    task = CodeTask(digest_mb=0.0)  # every expected output stored as a digest of its repr
    ex = task.examples("gen", limit=1)[0]
    ex.answer = dict(ex.answer, dataset="humaneval", entry_point="f", canonical="def f(x):\n    return [(x, 'a')] * 3\n",
                     base_input=[[1], [2]], plus_input=[[3]])
    assert task.score(ex, "def f(x):\n    return [(x, 'a'), (x, 'a'), (x, 'a')]\n")["pass_plus"] == 1.0
    assert task.score(ex, "def f(x):\n    return [(x, 'b')] * 3\n")["pass_base"] == 0.0


def test_generator_argument_names_and_distinct_prompts():
    """``arg_names`` names the argument in prompt and canonical solution (one per example); ``distinct`` gives a
    200-example set 200 different prompts out of the 215 (43 functions x 5 names); the canonical solutions pass
    in the sandbox and the body of another name fails; a name that is no identifier is refused."""
    from rlm.plugins.tasks.code.generator import generate_functions

    names = ["x", "y", "z", "a", "b"]
    task = CodeTask(gen_tests="per_function", arg_names=names, distinct=True)
    exs = task.examples("gen", split="test", limit=200, seed=4)
    assert len({e.prompt for e in exs}) == 200
    plain = CodeTask(gen_tests="per_function", arg_names=names).examples("gen", split="test", limit=200, seed=4)
    assert len({e.prompt for e in plain}) < 170
    assert {e.prompt.split("(")[1].split(")")[0] for e in exs} == set(names)
    for e in exs[:6]:
        arg = e.prompt.split("(")[1].split(")")[0]
        assert e.answer["canonical"].startswith(f"def {e.answer['entry_point']}({arg}):\n    return ")
        assert f" {arg}" in e.prompt.split("` that ")[1] or f"({arg})" in e.answer["canonical"]
    picked = exs[:6]
    assert task.metrics(task.score_batch(picked, [e.reference for e in picked])) == {"pass@1": 1.0}
    other = [e.answer["canonical"].replace("(" + e.prompt.split("(")[1].split(")")[0] + ")", "(q)", 1)
             for e in picked]
    assert task.metrics(task.score_batch(picked, other)) == {"pass@1": 0.0}  # the body names an unbound argument
    with pytest.raises(ValueError, match="identifiers"):
        generate_functions(2, arg_names=["x y"])


def test_generator_constants_in_words():
    """``constants="words"``: the prompt says the constant in words, the canonical body has its digits; the
    words are checked by hand; a completion that writes the word as a name fails in the sandbox."""
    import re

    from rlm.plugins.tasks.code.generator import generate_functions, number_words

    assert [number_words(k) for k in (2, 7, 12, 19, 20, 23, 99)] == [
        "two", "seven", "twelve", "nineteen", "twenty", "twenty_three", "ninety_nine"]
    with pytest.raises(ValueError, match="0..99"):
        number_words(100)
    with pytest.raises(ValueError, match="'digits' or 'words'"):
        generate_functions(2, constants="roman")
    task = CodeTask(gen_tests="per_function", constants="words", max_constant=23, distinct=True)
    exs = [e for e in task.examples("gen", split="test", limit=60, seed=2)
           if not e.answer["entry_point"].endswith("_list")][:8]
    named = []
    for e in exs:
        body = e.answer["canonical"].split("return ")[1]
        k = re.findall(r"\d+", body)[0]
        word = number_words(int(k))
        assert e.answer["entry_point"].endswith("_" + word) and not re.search(r"\d", e.prompt)
        assert re.search(rf" {word.replace('_', '-')}[ .,]", e.prompt.split("` that ")[1])
        named.append(e.answer["canonical"].replace(body, body.replace(k, word, 1)))
    assert task.metrics(task.score_batch(exs, [e.reference for e in exs])) == {"pass@1": 1.0}
    assert task.metrics(task.score_batch(exs, named)) == {"pass@1": 0.0}  # `return x + seven`: a NameError


def test_canonical_gen_program_passes_without_a_run_of_its_own(monkeypatch):
    """A ``gen`` completion whose program is the canonical text passes with only the reference run; the same
    function written differently, or wrong, still runs in the sandbox; an evalplus example never takes the
    shortcut."""
    from rlm.core.eval import sandbox

    runs = []
    real = sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda *a, **k: runs.append(1) or real(*a, **k))
    task = CodeTask(gen_tests="per_function", verdict_cache=0)
    e = next(x for x in task.examples("gen", limit=40, seed=11) if x.answer["entry_point"].startswith("add_"))
    k = int(e.answer["canonical"].split("+ ")[1])
    task.judge.reference_outputs(e)  # run (or read from the cache) once
    runs.clear()
    assert task.reward(e, e.reference) == 1.0 and len(runs) == 0
    assert task.reward(e, f"```python\n{e.answer['canonical']}\n\n```") == 1.0 and len(runs) == 0
    other = f"```python\ndef {e.answer['entry_point']}(x):\n    return {k} + x\n```"
    assert task.reward(e, other) == 1.0 and len(runs) == 1
    wrong = f"```python\ndef {e.answer['entry_point']}(x):\n    return x + {k + 1}\n```"
    assert task.reward(e, wrong) == 0.0 and len(runs) == 2
    monkeypatch.setattr(task.judge, "_reference", lambda *a: None)  # the reference failed: nothing passes
    assert task.reward(e, e.reference) == 0.0
    he = dict(e.answer, dataset="humaneval")
    assert task.judge._canonical_verdicts(Example(id="h", prompt=e.prompt, answer=he, reference=e.reference),
                                          e.answer["canonical"]) is None
