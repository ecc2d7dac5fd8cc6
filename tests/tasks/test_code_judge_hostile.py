"""The code task's judge against programs written to collect a pass without solving: every trick scores 0,
honest programs that print a lot or make noise still score 1. Offline examples (the ``gen`` subset and a
hand-written HumanEval-style ``check`` test) always run; HumanEval(+) / MBPP+ ones when ../shared/data has them."""

from __future__ import annotations

import json
import math
import time

import pytest
from conftest import shared_file

from rlm.plugins.tasks.code import CodeTask, judge
from rlm.plugins.tasks.code.plain import NotPlain, decode, encode

# Each program defines `f` wrongly (the right answer is x * 3 + 1) and tries to pass anyway.
EQ_TRICKS = {
    "__eq__ always True": "class A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                          "    __hash__ = object.__hash__\ndef f(x):\n    return A()\n",
    "int subclass": "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\n"
                    "def f(x):\n    return I(0)\n",
    "str subclass with repr": "class S(str):\n    def __eq__(self, o): return True\n"
                              "    def __repr__(self): return '7'\n"
                              "    __hash__ = str.__hash__\ndef f(x):\n    return S('7')\n",
    "list subclass": "class L(list):\n    def __eq__(self, o): return True\n    def __repr__(self): return '4'\n"
                     "def f(x):\n    return L()\n",
    "bool-like object": "class B:\n    def __bool__(self): return True\n    def __index__(self): return 4\n"
                        "def f(x):\n    return B()\n",
    "tag lookalike dict": "def f(x):\n    return {'~': 'h', 'v': '0' * 64}\n",
    "generator": "def f(x):\n    return (i for i in [x * 3 + 1])\n",
    "del raises": "class D(int):\n    def __del__(self): raise SystemExit(0)\ndef f(x):\n    return D(x)\n",
    "huge wrong output": "def f(x):\n    return 'x' * 30_000_000\n",
    "deep nesting": "def f(x):\n    v = []\n    for _ in range(100000):\n        v = [v]\n    return v\n",
}
INTROSPECTION = {
    "frames": "import sys\ndef f(x):\n    fr = sys._getframe(1)\n    while fr is not None:\n"
              "        for d in (fr.f_locals, fr.f_globals):\n"
              "            for k in ('_e', '_exp', '_expected', '_suites', 'expected'):\n"
              "                if k in d:\n                    return d[k]\n        fr = fr.f_back\n    return 0\n",
    "gc scan": "import gc\ndef f(x):\n    for o in gc.get_objects():\n"
               "        if isinstance(o, dict) and ('expected' in o or '_suites' in o or 'outputs' in o):\n"
               "            return o.get('expected') or o.get('outputs')\n    return 0\n",
    "__main__ harness state + forged verdicts": (
        "import __main__, os, sys\ng = vars(__main__)\nn = g.get('_nonce', '')\n"
        "for k in ('base', 'plus'):\n    print(n, k, 1)\n"
        "if '_emit' in g:\n    for s in ('base_input', 'plus_input'):\n        for i in range(200):\n"
        "            g['_emit']('\"' + s + '\"', str(i), '\"ok\"', '0')\n"
        "sys.stdout.flush()\nos._exit(0)\n"),
    "settrace": "import sys\ndef tr(frame, ev, arg):\n    if '_e' in frame.f_locals:\n"
                "        frame.f_locals['_o'] = frame.f_locals['_e']\n    return tr\n"
                "sys.settrace(tr)\nsys._getframe(1).f_trace = tr\ndef f(x):\n    return 0\n",
    "bytecode constants": "import sys\ndef f(x):\n    fr = sys._getframe(1)\n"
                          "    consts = [c for c in fr.f_code.co_consts if type(c) is int and c != x]\n"
                          "    return consts[0] if consts else 0\n",
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "sys.exit(0) in the function": "import sys\ndef f(x):\n    sys.exit(0)\n",
    "monkeypatched builtins and json": (
        "import builtins, json, __main__\nbuiltins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\n"
        "builtins.repr = lambda *a: '1'\njson.dumps = lambda *a, **k: '1'\njson.loads = lambda *a, **k: 1\n"
        "for k in ('encode', 'encode_bounded', '_plain_output', '_match'):\n"
        "    if hasattr(__main__, k):\n        setattr(__main__, k, lambda *a, **k: '1')\n"
        "def f(x):\n    return 0\n"),
    "forged lines on fd 3, stdout, stderr": (
        "import os, sys\nfor fd in (1, 2, 3, 4):\n    try:\n"
        "        os.write(fd, b'[\"pass\"]\\n[\"done\"]\\n[\"base_input\",0,\"ok\",1]\\nPASS base 1\\n')\n"
        "    except OSError:\n        pass\ndef f(x):\n    return 0\n"),
    "thread spamming fd 3": (
        "import os, threading\ndef spam():\n    while True:\n        try:\n"
        "            os.write(3, b'[\"base_input\",0,\"ok\",4]\\n')\n        except OSError:\n            return\n"
        "threading.Thread(target=spam, daemon=True).start()\ndef f(x):\n    return 0\n"),
    "alarm disabled, loops forever": "import signal\ndef f(x):\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                                     "    signal.setitimer(signal.ITIMER_REAL, 0)\n    while True:\n        pass\n",
}
HONEST = {
    "correct": "def f(x):\n    return x * 3 + 1\n",
    "correct, prints 2.4 MB": "def f(x):\n    print('y' * 2_400_000)\n    return x * 3 + 1\n",
    "correct, prints more than the file-size limit": "print('y' * 70_000_000)\ndef f(x):\n    return x * 3 + 1\n",
    "correct, library types": "import numpy\ndef f(x):\n    return numpy.int64(x * 3 + 1)\n",
    "correct and noisy": "import sys, warnings\nprint('[\"base_input\",0,\"error\"]')\nsys.stderr.write('E' * 100000)\n"
                         "open('junk.txt', 'w').write('z' * 1000)\n"
                         "def f(x):\n    warnings.warn('hm')\n    print(x, file=sys.stderr)\n    return x * 3 + 1\n",
}


@pytest.fixture(scope="module")
def task():
    return CodeTask(min_time_limit=0.3, program_timeout=3.0, workers=2,
                    sandbox={"cpu_seconds": 20, "wall_seconds": 30, "memory_mb": 1024, "file_size_mb": 64})


def _io_example(task, dataset):
    ex = task.examples("gen", limit=1)[0]
    ex.answer = dict(ex.answer, dataset=dataset, entry_point="f", canonical="def f(x):\n    return x * 3 + 1\n",
                     base_input=[[1], [2], [5], [-4]], plus_input=[[10], [7]] if dataset == "humaneval" else [])
    return ex


CHECK_BYTECODE = ("import sys\ndef f(x):\n    c = sys._getframe(1).f_code.co_consts\n"  # the constant after x
                  "    return next((c[i + 1] for i, v in enumerate(c[:-1]) if type(v) is int and v == x), 0)\n")


def _check_example(task, simple=False):
    """A HumanEval-style example judged by its ``check`` function (asserts with expected constants)."""
    ex = task.examples("gen", limit=1)[0]
    test = ("def check(candidate):\n    assert candidate(1) == 4\n    assert candidate(2) == 7\n"
            "    assert abs(candidate(5) - 16) < 1e-6\n    assert candidate(candidate(0)) == 4\n")
    if simple:
        test = "def check(candidate):\n    assert candidate(1) == 4\n    assert candidate(2) == 7\n"
    ex.answer = {"kind": "check", "entry_point": "f", "test": test, "canonical": "    return x * 3 + 1\n",
                 "prompt_code": "def f(x):\n"}
    return ex


def test_plain_codec_round_trips_and_rejects_objects():
    vals = [None, True, 3, -2 ** 20000, 1.5, float("inf"), -0.0, 2j + 1, "a\ud800", b"\x00", [1, (2, 3)], set(),
            frozenset({1}), {"b": 1, "a": [set()]}, {(1, 2): None}]
    for v in vals:
        assert decode(json.loads(encode(v))) == v and type(decode(json.loads(encode(v)))) is type(v)
    assert list(decode(json.loads(encode({"b": 1, "a": 2})))) == ["b", "a"]  # insertion order kept
    assert math.isnan(decode(json.loads(encode(float("nan")))))
    for bad in (type("I", (int,), {})(1), [object()], {1: range(3)}, (i for i in ()), bytearray(b"x")):
        with pytest.raises(NotPlain):
            encode(bad)
    for text in ('{"~":"x","v":[]}', '{"~":"s","v":[[1]]}', '{"~":"h","v":"zz"}', '{"a":1}'):
        with pytest.raises(NotPlain):
            decode(json.loads(text))


@pytest.mark.parametrize("dataset", ["gen", "humaneval"])
def test_io_tricks_score_zero_honest_programs_pass(task, dataset, monkeypatch):
    monkeypatch.setattr(judge, "OVERHEAD_SECONDS", 4.0)  # bounds the run whose program disables its alarm
    ex = _io_example(task, dataset)
    progs = {**EQ_TRICKS, **INTROSPECTION, **HONEST}
    t0 = time.perf_counter()
    scores = dict(zip(progs, task.score_batch([ex] * len(progs), list(progs.values()))))
    key = "pass_plus" if dataset == "humaneval" else "pass"
    got = {name: s[key] for name, s in scores.items()}
    assert got == {name: float(name in HONEST) for name in progs}
    assert time.perf_counter() - t0 < 40


def test_library_containers_count_as_their_plain_values(task):
    ex = _io_example(task, "humaneval")
    ex.answer = dict(ex.answer, canonical="def f(x):\n    return {'a': [x, (x, 1.5)]}\n")
    progs = {"import collections\nT = collections.namedtuple('T', 'a b')\ndef f(x):\n"
             "    d = collections.defaultdict(list)\n    d['a'] = [x, T(x, 1.5)]\n    return d\n": 1.0,
             "import collections\ndef f(x):\n    return collections.OrderedDict(a=[x, (x, 1.5)])\n": 1.0,
             "class D(dict):\n    pass\ndef f(x):\n    return D(a=[x, (x, 1.5)])\n": 0.0,  # a class of its own
             "def f(x):\n    return {'a': [x, [x, 1.5]]}\n": 0.0}  # list for tuple: != as in evalplus
    scores = task.score_batch([ex] * len(progs), list(progs))
    assert [s["pass_plus"] for s in scores] == list(progs.values())


def test_check_tests_tricks_score_zero(task):
    ex = _check_example(task)
    progs = {**{k: EQ_TRICKS[k] for k in ("__eq__ always True", "int subclass", "str subclass with repr")},
             **{k: INTROSPECTION[k] for k in ("frames", "bytecode constants", "settrace", "os._exit(0) at import",
                                              "__main__ harness state + forged verdicts",
                                              "forged lines on fd 3, stdout, stderr")},
             **HONEST}
    scores = task.score_batch([ex] * len(progs), list(progs.values()))
    assert {k: s["pass"] for k, s in zip(progs, scores)} == {k: float(k in HONEST) for k in progs}
    # the record run keeps the test's own calls only: candidate(candidate(0)) is replayed, not re-derived
    calls = task.judge._reference(ex)[1]
    assert calls == [["f", f"[{x}]", '{"~":"d","v":[]}'] for x in (1, 2, 5, 0, 1)]
    # equality-only asserts: the constants in check's bytecode, or an object equal to anything, used to pass
    simple = _check_example(task, simple=True)
    progs = [CHECK_BYTECODE, EQ_TRICKS["__eq__ always True"], HONEST["correct"]]
    assert [s["pass"] for s in task.score_batch([simple] * 3, progs)] == [0.0, 0.0, 1.0]


def test_assert_lines_with_classes_cannot_be_judged(task):
    ex = task.examples("gen", limit=1)[0]
    ex.answer = {"kind": "asserts", "entry_point": None, "tests": ["assert C().v == 1"]}
    ex.reference = "```python\nclass C:\n    v = 1\n```"
    assert task.score(ex, "class C:\n    v = 1\n") == {"pass": 0.0}
    ex.answer = {"kind": "asserts", "entry_point": None, "tests": ["assert add(1, 2) == 3", "assert add(0, b=0) == 0"]}
    ex.reference = "```python\ndef add(a, b):\n    return a + b\n```"
    assert task.score(ex, "def add(a, b):\n    return a + b\n") == {"pass": 1.0}
    assert task.score(ex, EQ_TRICKS["__eq__ always True"].replace("def f(x)", "def add(a, b)")) == {"pass": 0.0}


def test_shared_benchmarks_tricks_score_zero(task):
    cases = []
    path = shared_file("HumanEvalPlus.jsonl.gz")
    hp = {e.id: e for e in task.examples("humaneval_plus", path=str(path))}
    he = {e.id: e for e in task.examples("humaneval", path=str(shared_file("HumanEval.jsonl.gz")))}
    mp = {e.id: e for e in task.examples("mbpp_plus", path=str(shared_file("MbppPlus.jsonl.gz")))}
    for ex in (hp["HumanEval/55"], he["HumanEval/55"], he["HumanEval/32"], mp["Mbpp/2"]):
        ep = ex.answer["entry_point"]
        args = "xs" if ep == "find_zero" else "*a"
        for name in ("__eq__ always True", "bytecode constants", "frames", "__main__ harness state + forged verdicts",
                     "settrace"):
            prog = (EQ_TRICKS | INTROSPECTION)[name].replace("def f(x)", f"def {ep}({args})").replace("!= x", "!= 0")
            cases.append((ex, prog, 0.0))
        cases.append((ex, ex.reference.replace("```python\n", "```python\nprint('y' * 2_400_000)\n"), 1.0))
    scores = task.score_batch([c[0] for c in cases], [c[1] for c in cases])
    got = [s.get("pass_plus", s.get("pass")) for s in scores]
    assert got == [c[2] for c in cases], [(c[0].id, c[1][:40], g) for c, g in zip(cases, got) if g != c[2]]
