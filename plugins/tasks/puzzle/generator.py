"""Offline generator of the ``puzzle`` task's Knights and Knaves puzzles, in the spirit of Xie et al. (2024),
"On Memorization of Large Language Models in Logical Reasoning".

The generator draws a hidden assignment of roles, draws statements whose truth value under it matches each
speaker's role, and keeps a puzzle only when brute force over all ``2**n`` assignments
(:func:`rlm.plugins.tasks.puzzle.logic.solve`) finds exactly one consistent assignment (statements are redrawn
until then).
"""

from __future__ import annotations

import random
from typing import Any

from rlm.core.errors import RlmError
from rlm.plugins.tasks.puzzle.logic import OPS, Statement, evaluate, list_form, solve
from rlm.plugins.tasks.puzzle.render import prompt, reference, role_word

NAMES = ("Alice", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Liam",
         "Mia", "Noah", "Olivia", "Paul", "Quinn", "Rose", "Sam", "Tara", "Uma", "Victor", "Wendy", "Xavier",
         "Yara", "Zoe")


def random_statement(rng: random.Random, n: int, speaker: int, depth: int, width: int,
                     p_compound: float = 0.7) -> Statement:
    """A random statement over ``n`` people; ``depth`` = maximum operator nesting, ``width`` = maximum
    operands of and/or."""
    if depth <= 0 or rng.random() > p_compound:
        others = [j for j in range(n) if j != speaker] or [speaker]
        j = rng.choice(others) if rng.random() < 0.85 else speaker
        return ("is", j, rng.random() < 0.5)
    op = rng.choice(OPS)
    if op == "not":
        return ("not", random_statement(rng, n, speaker, depth - 1, width, p_compound))
    k = rng.randint(2, max(2, width)) if op in ("and", "or") else 2
    return (op, *(random_statement(rng, n, speaker, depth - 1, width, p_compound) for _ in range(k)))


def generate_puzzle(n: int, rng: random.Random, depth: int = 2, width: int = 2, max_rounds: int = 1000
                    ) -> tuple[list[Statement], tuple[bool, ...]]:
    """Statements for ``n`` people with exactly one consistent assignment, and that assignment."""
    if n < 1:
        raise RlmError(f"a puzzle needs at least one person, got {n}")
    truth = tuple(rng.random() < 0.5 for _ in range(n))

    def draw(i: int) -> Statement:
        while True:  # a statement whose truth value matches speaker i's role
            s = random_statement(rng, n, i, depth, width)
            if evaluate(s, truth) == truth[i]:
                return s

    statements = [draw(i) for i in range(n)]
    for _ in range(max_rounds):
        sols = solve(statements, n)
        if len(sols) == 1:
            assert sols[0] == truth
            return statements, truth
        # redraw the statement of someone whose role is not yet pinned down
        free = [i for i in range(n) if len({s[i] for s in sols}) > 1]
        i = rng.choice(free) if free and rng.random() < 0.8 else rng.randrange(n)
        statements[i] = draw(i)
    raise RlmError(f"no unique-solution puzzle with {n} people after {max_rounds} rounds")


def make(n: int, rng: random.Random, depth: int = 2, width: int = 2) -> dict[str, Any]:
    """One puzzle as a dict: names, statements, solution (role words), prompt and reference."""
    names = rng.sample(NAMES, n)
    statements, truth = generate_puzzle(n, rng, depth, width)
    return {"names": names, "statements": [list_form(s) for s in statements],
            "solution": {nm: role_word(k) for nm, k in zip(names, truth)},
            "prompt": prompt(statements, names), "reference": reference(statements, truth, names)}
