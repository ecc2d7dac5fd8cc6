"""Offline generator of the ``code`` task's ``gen`` subset: one-line Python functions from templates, each
with generated test inputs (judged like evalplus, base inputs only: outputs compared with the canonical
solution's)."""

from __future__ import annotations

import random

from rlm.core.contracts import Example
from rlm.plugins.tasks.code.program import FORMAT

# (name template, description, body, input kind) for the generator; ``k`` is a random constant
FUNCTION_TEMPLATES = [
    ("add_{k}", "returns x plus {k}", "return x + {k}", "int"),
    ("times_{k}", "returns x multiplied by {k}", "return x * {k}", "int"),
    ("sub_{k}", "returns x minus {k}", "return x - {k}", "int"),
    ("is_multiple_of_{k}", "returns True if x is divisible by {k}, else False", "return x % {k} == 0", "int"),
    ("sum_list", "returns the sum of the list x", "return sum(x)", "list"),
    ("max_list", "returns the largest number in the non-empty list x", "return max(x)", "list"),
    ("count_{k}", "returns how many times the number {k} occurs in the list x", "return x.count({k})", "list"),
    ("reverse_list", "returns the list x reversed", "return x[::-1]", "list"),
]


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
                       tests: str = "per_example") -> list[Example]:
    """``n`` one-line function tasks with generated test inputs (checked like evalplus, base inputs only).

    ``tests="per_function"``: every example of one function (same name and body) carries the same inputs (random
    ones seeded by the function alone, and inputs that tell the constants apart: :func:`_function_suite`), as a
    benchmark problem has one test suite; the prompts are the same as with ``per_example``. Repeated (prompt,
    completion) pairs then reuse the judge's verdicts across examples, steps and evaluations instead of running
    again."""
    if tests not in ("per_example", "per_function"):
        raise ValueError(f"code gen tests: {tests!r} is not 'per_example' or 'per_function'")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name_t, desc_t, body_t, kind = rng.choice(FUNCTION_TEMPLATES)
        k = rng.randint(2, max_constant)
        name, desc, body = name_t.format(k=k), desc_t.format(k=k), body_t.format(k=k)
        inputs = _test_inputs(rng, kind)  # drawn in both modes, so the prompts do not depend on the mode
        if tests == "per_function":
            inputs = _function_suite(name, body, kind, k if "{k}" in body_t else 0, max_constant)
        canon = f"def {name}(x):\n    {body}\n"
        out.append(Example(
            id=f"gen/{split}/{seed}/{i}", prompt=f"Write a Python function `{name}(x)` that {desc}.\n\n{FORMAT}",
            answer={"kind": "io", "dataset": "gen", "canonical": canon, "entry_point": name, "atol": 0,
                    "base_input": inputs, "plus_input": [], "prompt_code": ""},
            reference=f"```python\n{canon}```", meta={"dataset": "gen"}))
    return out
