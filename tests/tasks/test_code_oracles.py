"""evalplus's special oracles as rlm's judge mirrors them, case by case (evalplus 0.3.1's rules, read in its
``evalplus/eval/__init__.py`` and ``_special_oracle.py``): the second accepted readings of Mbpp/581
(``surface_Area``) and Mbpp/558 (``digit_distance_nums``), checked by hand and end to end on MBPP+."""

from __future__ import annotations

import pytest
from conftest import shared_file

from rlm.plugins.tasks.code import CodeTask
from rlm.plugins.tasks.code.verdict import match


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
    """HumanEval/32 (find_zero): any x with |poly(xs, x)| <= atol passes. evalplus 0.3.1 rejects every solution
    here, the canonical one included (a known evalplus bug), so rlm deviates on purpose (docs/README.md)."""
    task = CodeTask()
    examples = task.examples("humaneval_plus", split="test", path=str(shared_file("HumanEvalPlus.jsonl.gz")))
    ex = next(e for e in examples if e.id == "HumanEval/32")
    assert task.score(ex, ex.answer["canonical"] if isinstance(ex.answer, dict) and "canonical" in ex.answer
                      else ex.reference) == {"pass_base": 1.0, "pass_plus": 1.0}
    assert match("humaneval", "find_zero", [[-6, 11, -6, 1]], 2.0, 1.0, 1e-6)  # roots 1, 2, 3: any counts
    assert not match("humaneval", "find_zero", [[-6, 11, -6, 1]], 1.5, 1.0, 1e-6)
