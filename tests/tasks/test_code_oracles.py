"""rlm's comparison of outputs against evalplus (0.3.1) case by case: the same outputs fed to evalplus's own
``untrusted_check`` (through a program that returns them) and to rlm's :func:`suite_passes`; evalplus's special
oracles (the second accepted readings of Mbpp/581 ``surface_Area`` and Mbpp/558 ``digit_distance_nums``) checked
by hand and end to end on MBPP+; the ``find_zero`` deviation."""

from __future__ import annotations

import pytest
from conftest import shared_file

from rlm.plugins.tasks.code import CodeTask
from rlm.plugins.tasks.code.verdict import match, suite_passes

#: (dataset, entry point, inputs, candidate outputs, expected outputs, atol)
CASES = [
    ("humaneval", "f", [[1], [2]], [3, 4], [3, 4], 0),
    ("humaneval", "f", [[1]], [1.0], [1], 0),  # 1 == 1.0
    ("humaneval", "f", [[1]], [True], [1], 0),  # True == 1
    ("humaneval", "f", [[1]], [[1, 2]], [(1, 2)], 0),  # list != tuple
    ("humaneval", "f", [[1]], [0.30000000000000004], [0.3], 0),  # float output: atol raised to 1e-6
    ("humaneval", "f", [[1]], [0.3001], [0.3], 0),
    ("humaneval", "f", [[1]], [[0.1, 0.2000001]], [[0.1, 0.2]], 0),  # all-float list
    ("humaneval", "f", [[1]], [[0.1, 2.0000001]], [[0.1, 2]], 0),  # mixed list: no tolerance
    ("humaneval", "f", [[1], [2]], [0.5, [1.0000001, 2]], [0.5, [1.0, 2]], 0),  # the raised atol carries on
    ("humaneval", "f", [[1]], [1], [1.0000001], 0),  # int for float: type differs
    ("humaneval", "f", [[1]], [float("nan")], [float("nan")], 0),  # NaN never matches
    ("humaneval", "f", [[1]], [1.05], [1.0], 0.1),  # the task's atol
    ("humaneval", "f", [[1]], [[1.05, 2]], [[1.0, 2.0]], 0.1),
    ("humaneval", "f", [[1]], [[1.0, 2.0, 3.0]], [[1.0, 2.0]], 0.1),  # length differs
    ("humaneval", "f", [[1]], ["a"], ["a"], 0.1),
    ("humaneval", "f", [[1]], ["a"], ["b"], 0.1),
    ("mbpp", "similar_elements", [[(1, 2), (2, 3)]], [(2, 1)], [(1, 2)], 0),  # set equality
    ("mbpp", "similar_elements", [[(1, 2), (2, 3)]], [[2, 2, 1]], [(1, 2)], 0),
    ("mbpp", "similar_elements", [[(1, 2), (2, 3)]], [[[1]]], [(1, 2)], 0),  # unhashable: fails
    ("mbpp", "check_str", [["abc"]], [True], [True], 0),  # not-None task: a bool is compared as is
    ("mbpp", "check_str", [["abc"]], [False], [True], 0),
    ("mbpp", "check_str", [["abc"]], ["match"], [True], 0),  # anything else: "returned something"
    ("mbpp", "check_str", [["abc"]], [None], [False], 0),
    ("mbpp", "are_equivalent", [[1, 2]], [42], [False], 0),
    ("mbpp", "sum_div", [[8]], [0], [7], 0),
    ("mbpp", "sum_div", [[8]], [6], [7], 0),
    ("mbpp", "surface_Area", [[3, 4]], [35], [33], 0),
    ("mbpp", "surface_Area", [[3, 4]], [34], [33], 0),
    ("mbpp", "digit_distance_nums", [[123, 45]], [5], [15], 0),
    ("mbpp", "f", [[1]], [{1, 2}], [{2, 1}], 0),
    ("mbpp", "f", [[1]], [{"a": 1}], [{"a": 1.0}], 0),
    ("mbpp", "f", [[1]], [complex(1, 2)], [complex(1, 2)], 0),
]


def _evalplus_passes(dataset, ep, inputs, outputs, expected, atol):
    """evalplus's own verdict for a candidate that returns ``outputs`` in order."""
    from evalplus.eval import PASS, untrusted_check

    code = f"_outputs = iter({outputs!r})\n\ndef {ep}(*args):\n    return next(_outputs)\n"
    code = code.replace("nan", "float('nan')")
    stat, _ = untrusted_check(dataset, code, inputs, ep, expected, atol, [0.01] * len(inputs))
    return stat == PASS


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_suite_verdict_equals_evalplus_untrusted_check(case):
    dataset, ep, inputs, outputs, expected, atol = case
    assert suite_passes(dataset, ep, inputs, outputs, expected, atol) == _evalplus_passes(*case)


def test_surface_area_accepts_the_perpendicular_height_reading():
    # canonical (slant height s): 2*b*s + b^2 = 2*3*4 + 9 = 33; perpendicular height 4: slant sqrt(1.5^2 + 16),
    # 9 + 2*3*4.2720 = 34.63, rounded 35
    assert match("mbpp", "surface_Area", [3, 4], 33, 33, 0)
    assert match("mbpp", "surface_Area", [3, 4], 35, 33, 0)
    assert not match("mbpp", "surface_Area", [3, 4], 34, 33, 0)
    assert not match("humaneval", "surface_Area", [3, 4], 35, 33, 0)  # MBPP only


def test_digit_distance_accepts_the_zero_padded_reading():
    # canonical: digits of |123 - 45| = 78 -> 15; zero-padded 123 vs 045: 1 + 2 + 2 = 5
    assert match("mbpp", "digit_distance_nums", [123, 45], 15, 15, 0)
    assert match("mbpp", "digit_distance_nums", [123, 45], 5, 15, 0)
    assert not match("mbpp", "digit_distance_nums", [123, 45], 6, 15, 0)
    assert not match("mbpp", "digit_distance_nums", [-1, 45], 7, 15, 0)  # evalplus's oracle fails on a sign too


@pytest.mark.parametrize("pid, solution", [
    ("Mbpp/581", "import math\n\ndef surface_Area(b, h):\n"
                 "    return round(b * b + 2 * b * math.sqrt((b / 2) ** 2 + h * h))\n"),
    ("Mbpp/558", "def digit_distance_nums(a, b):\n    x, y = str(a), str(b)\n    n = max(len(x), len(y))\n"
                 "    return sum(abs(int(p) - int(q)) for p, q in zip(x.zfill(n), y.zfill(n)))\n"),
])
def test_second_readings_pass_mbpp_plus_end_to_end(pid, solution):
    """Valid solutions that evalplus accepts (the issue's finding: rlm failed 581 on base and plus, 558 on plus)."""
    task = CodeTask()
    examples = task.examples("mbpp_plus", split="test", path=str(shared_file("MbppPlus.jsonl.gz")))
    ex = next(e for e in examples if e.id == pid)
    assert task.score(ex, solution) == {"pass_base": 1.0, "pass_plus": 1.0}
    wrong = solution.replace("return ", "return 1 + ", 1)
    assert task.score(ex, wrong)["pass_base"] == 0.0


def test_find_zero_accepts_any_root_unlike_evalplus_0_3_1():
    """HumanEval/32 (find_zero): any x with |poly(xs, x)| <= atol passes. evalplus 0.3.1 fails every solution
    here, the canonical one included: the ``continue`` after its oracle skips recording the passed input, so rlm
    deviates on purpose (docs/README.md)."""
    task = CodeTask()
    examples = task.examples("humaneval_plus", split="test", path=str(shared_file("HumanEvalPlus.jsonl.gz")))
    ex = next(e for e in examples if e.id == "HumanEval/32")
    assert task.score(ex, ex.answer["canonical"] if isinstance(ex.answer, dict) and "canonical" in ex.answer
                      else ex.reference) == {"pass_base": 1.0, "pass_plus": 1.0}
    assert match("humaneval", "find_zero", [[-6, 11, -6, 1]], 2.0, 1.0, 1e-6)  # roots 1, 2, 3: any counts
    assert not match("humaneval", "find_zero", [[-6, 11, -6, 1]], 1.5, 1.0, 1e-6)
    assert not match("humaneval", "find_zero", [[-6, 11, -6, 1]], 10 ** 400, 1.0, 1e-6)  # overflow: a failure
    assert not _evalplus_passes("humaneval", "find_zero", [[[-6, 11, -6, 1]]], [1.0], [1.0], 1e-4)  # the bug
