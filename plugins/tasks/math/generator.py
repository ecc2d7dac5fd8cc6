"""Offline generator of the ``math`` task's ``gen`` subset: seeded arithmetic problems with step-by-step
reference solutions, answered in the ``#### ANSWER`` format."""

from __future__ import annotations

import random

from rlm.core.contracts import Example, draw_distinct
from rlm.plugins.tasks.math.verify import ANSWER_FORMAT, HASH_FORMAT


def generate_arithmetic(n: int, *, seed: int = 0, split: str = "train", min_ops: int = 1, max_ops: int = 1,
                        min_operand: int = 0, max_operand: int = 9, operators: str = "+",
                        solution: str = "steps", distinct: bool = False) -> list[Example]:
    """``n`` arithmetic problems; each applies ``min_ops..max_ops`` operators (drawn from ``operators``, any of
    ``+-*``) left to right on operands in ``min_operand..max_operand``. ``solution="steps"`` asks for (and
    references) one line per operation before ``#### ANSWER``; ``"answer"`` asks for the final line alone.
    A steps example's ``meta["steps"]`` holds the derivation as ``[left, op, right, result]`` rows, for
    :func:`~rlm.plugins.tasks.math.verify.steps_match`. ``distinct``: no problem repeats within the set while
    the space allows (:func:`~rlm.core.contracts.draw_distinct`), so a greedy evaluation scores ``n`` different
    problems."""
    if solution not in ("steps", "answer"):
        raise ValueError(f"math solution: expected 'steps' or 'answer', got {solution!r}")
    instruction = HASH_FORMAT if solution == "steps" else ANSWER_FORMAT
    rng = random.Random(seed)

    def draw() -> tuple[str, int, list]:
        k = rng.randint(min_ops, max_ops)
        value = rng.randint(min_operand, max_operand)
        expr, chain = str(value), []
        for _ in range(k):
            op = rng.choice(operators)
            b = rng.randint(min_operand, max_operand)
            new = {"+": value + b, "-": value - b, "*": value * b}[op]
            chain.append([value, op, b, new])
            expr = f"({expr} {op} {b})" if len(chain) < k else f"{expr} {op} {b}"
            value = new
        return expr, value, chain

    problems = draw_distinct(n, draw, key=lambda p: p[0]) if distinct else [draw() for _ in range(n)]
    out = []
    for i, (expr, value, chain) in enumerate(problems):
        lines = "".join(f"{a} {o} {b} = {c}\n" for a, o, b, c in chain) if solution == "steps" else ""
        out.append(Example(id=f"gen/{split}/{seed}/{i}", prompt=f"What is {expr}?\n\n{instruction}",
                           answer=str(value), reference=f"{lines}#### {value}",
                           meta={"format": "hash", "ops": len(chain),
                                 **({"steps": chain} if solution == "steps" else {})}))
    return out
