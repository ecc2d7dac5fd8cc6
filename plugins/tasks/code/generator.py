"""Offline generator of the ``code`` task's ``gen`` subset: one-line Python functions from templates, each
with generated test inputs (judged like evalplus, base inputs only: outputs compared with the canonical
solution's)."""

from __future__ import annotations

import random
from typing import Sequence

from rlm.core.contracts import Example, draw_distinct
from rlm.plugins.tasks.code.program import FORMAT

# (name template, description, body, input kind) for the generator; ``k`` is a random constant
# and ``a`` the argument's name
FUNCTION_TEMPLATES = [
    ("add_{k}", "returns {a} plus {k}", "return {a} + {k}", "int"),
    ("times_{k}", "returns {a} multiplied by {k}", "return {a} * {k}", "int"),
    ("sub_{k}", "returns {a} minus {k}", "return {a} - {k}", "int"),
    ("is_multiple_of_{k}", "returns True if {a} is divisible by {k}, else False", "return {a} % {k} == 0", "int"),
    ("sum_list", "returns the sum of the list {a}", "return sum({a})", "list"),
    ("max_list", "returns the largest number in the non-empty list {a}", "return max({a})", "list"),
    ("count_{k}", "returns how many times the number {k} occurs in the list {a}", "return {a}.count({k})", "list"),
    ("reverse_list", "returns the list {a} reversed", "return {a}[::-1]", "list"),
]


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(k: int) -> str:
    """``k`` (0..99) in English words, as a name part: ``23`` -> ``twenty_three``."""
    if not 0 <= k <= 99:
        raise ValueError(f"code gen: constant {k} has no words here (0..99)")
    return _ONES[k] if k < 20 else _TENS[k // 10 - 2] + ("" if k % 10 == 0 else "_" + _ONES[k % 10])


def _test_inputs(rng: random.Random, kind: str) -> list[list]:
    if kind == "int":
        return [[rng.randint(-20, 50)] for _ in range(5)]
    return [[[rng.randint(0, 9) for _ in range(rng.randint(1, 6))]] for _ in range(5)]


def _function_suite(name: str, body: str, kind: str, k: int, max_constant: int) -> list[list]:
    """One function's test suite (``per_function``): the five random inputs of its own seed, plus inputs that
    tell every constant in 2..``max_constant`` apart: each of 0..2 x ``max_constant`` for an integer argument;
    for a list, lists holding ``k`` (0 for the templates without a constant) once, twice and never, and every
    digit. So no near miss (``x % 6`` for ``x % 5``, ``x.count(2)`` for ``x.count(3)``) and no constant answer
    (``return False``) passes."""
    base = _test_inputs(random.Random(f"code-gen-tests/{name}/{body}"), kind)
    if kind == "int":
        return base + [[v] for v in range(0, 2 * max_constant + 1)] + [[-k], [-2 * k - 1]]
    other = (k + 1) % 10
    return base + [[[k]], [[other, k, k]], [[other, other]], [list(range(10))], [list(range(9, -1, -1))]]


def generate_functions(n: int, *, seed: int = 0, split: str = "train", max_constant: int = 9,
                       tests: str = "per_example", arg_names: Sequence[str] = ("x",),
                       distinct: bool = False, constants: str = "digits") -> list[Example]:
    """``n`` one-line function tasks with generated test inputs (checked like evalplus, base inputs only).

    ``tests="per_function"``: every example of one function (same name and body) carries the same inputs (random
    ones seeded by the function alone, and inputs that tell the constants apart: :func:`_function_suite`), as a
    benchmark problem has one test suite; the prompts are the same as with ``per_example``. Repeated (prompt,
    completion) pairs then reuse the judge's verdicts across examples, steps and evaluations instead of running
    again. ``arg_names``: the argument is named by one of these, drawn per example (only ``x``: the draw is
    skipped). ``constants="words"``: the prompt names the constant in words (``add_seven(x)`` "returns x plus
    seven"), the solution needs it in digits (``return x + 7``). ``distinct``: no prompt repeats within the set
    while the space allows (8 templates, constants 2..``max_constant``, the argument names: 43 x 5 = 215 prompts
    for 9 and five names)."""
    if tests not in ("per_example", "per_function"):
        raise ValueError(f"code gen tests: {tests!r} is not 'per_example' or 'per_function'")
    if constants not in ("digits", "words"):
        raise ValueError(f"code gen constants: {constants!r} is not 'digits' or 'words'")
    if not arg_names or any(not a.isidentifier() for a in arg_names):
        raise ValueError(f"code gen arg_names: {list(arg_names)!r} must be Python identifiers")
    rng = random.Random(seed)

    def draw() -> tuple[str, str, str, str, list]:
        name_t, desc_t, body_t, kind = rng.choice(FUNCTION_TEMPLATES)
        k = rng.randint(2, max_constant)
        a = rng.choice(arg_names) if len(arg_names) > 1 else arg_names[0]
        said = number_words(k) if constants == "words" else k
        name, desc = name_t.format(k=said), desc_t.format(k=str(said).replace("_", "-"), a=a)
        body = body_t.format(k=k, a=a)
        inputs = _test_inputs(rng, kind)  # drawn in both modes, so the prompts do not depend on the mode
        if tests == "per_function":
            inputs = _function_suite(name, body, kind, k if "{k}" in body_t else 0, max_constant)
        return name, desc, body, a, inputs

    drawn = draw_distinct(n, draw, key=lambda d: d[:2]) if distinct else [draw() for _ in range(n)]
    out = []
    for i, (name, desc, body, a, inputs) in enumerate(drawn):
        canon = f"def {name}({a}):\n    {body}\n"
        out.append(Example(
            id=f"gen/{split}/{seed}/{i}", prompt=f"Write a Python function `{name}({a})` that {desc}.\n\n{FORMAT}",
            answer={"kind": "io", "dataset": "gen", "canonical": canon, "entry_point": name, "atol": 0,
                    "base_input": inputs, "plus_input": [], "prompt_code": ""},
            reference=f"```python\n{canon}```", meta={"dataset": "gen"}))
    return out
