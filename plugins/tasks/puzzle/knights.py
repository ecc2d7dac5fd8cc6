"""Knights and Knaves puzzles: generator, brute-force solver, natural-language rendering, answer parsing.

In the spirit of Xie et al. (2024), "On Memorization of Large Language Models in Logical Reasoning": every
inhabitant is a knight (always tells the truth) or a knave (always lies) and makes one statement built from
atoms ("A is a knight", "B is a knave") with not / and / or / if-then / if-and-only-if. Person ``i`` is a
knight exactly when their statement is true. The generator draws a hidden assignment, draws statements whose
truth value under it matches each speaker's role, and keeps a puzzle only when brute force over all ``2**n``
assignments finds exactly one consistent assignment (statements are redrawn until then).

Statements are nested tuples: ``("is", j, True)`` (person j is a knight; ``False``: a knave), ``("not", s)``,
``("and", s1, s2, ...)``, ``("or", s1, s2, ...)``, ``("imp", a, b)``, ``("iff", a, b)``.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

import numpy as np

from rlm.core.errors import RlmError

Statement = tuple
NAMES = ("Alice", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Liam",
         "Mia", "Noah", "Olivia", "Paul", "Quinn", "Rose", "Sam", "Tara", "Uma", "Victor", "Wendy", "Xavier",
         "Yara", "Zoe")
OPS = ("not", "and", "or", "imp", "iff")


# --------------------------------------------------------------------------------------------------------
# evaluation and brute force
# --------------------------------------------------------------------------------------------------------
def evaluate(stmt: Statement, roles: Any) -> Any:
    """Truth value of ``stmt`` given ``roles`` (True = knight); ``roles`` may be a tuple of bools or a
    (2**n, n) boolean array, in which case the result is one value per row."""
    op = stmt[0]
    if op == "is":
        col = roles[..., stmt[1]] if isinstance(roles, np.ndarray) else roles[stmt[1]]
        return col if stmt[2] else ~col if isinstance(roles, np.ndarray) else not col
    if op == "not":
        v = evaluate(stmt[1], roles)
        return ~v if isinstance(roles, np.ndarray) else not v
    vals = [evaluate(s, roles) for s in stmt[1:]]
    if op == "and":
        return np.logical_and.reduce(vals) if isinstance(roles, np.ndarray) else all(vals)
    if op == "or":
        return np.logical_or.reduce(vals) if isinstance(roles, np.ndarray) else any(vals)
    a, b = vals
    if op == "imp":
        return (~a | b) if isinstance(roles, np.ndarray) else (not a) or b
    if op == "iff":
        return (a == b)
    raise ValueError(f"unknown operator {op!r}")


def all_assignments(n: int) -> np.ndarray:
    """(2**n, n) boolean array; row r assigns person i the role ``bit i of r`` (1 = knight)."""
    rows = np.arange(2 ** n, dtype=np.int64)[:, None]
    return ((rows >> np.arange(n, dtype=np.int64)[None, :]) & 1).astype(bool)


def solve(statements: Sequence[Statement], n: int | None = None) -> list[tuple[bool, ...]]:
    """Every assignment (tuple of bools, True = knight) under which each speaker's statement is true exactly
    when the speaker is a knight."""
    n = len(statements) if n is None else n
    roles = all_assignments(n)
    ok = np.ones(len(roles), dtype=bool)
    for i, s in enumerate(statements):
        ok &= roles[:, i] == evaluate(s, roles)
    return [tuple(bool(x) for x in roles[r]) for r in np.flatnonzero(ok)]


# --------------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------
def role_word(knight: bool) -> str:
    return "knight" if knight else "knave"


def render(stmt: Statement, names: Sequence[str], speaker: int, top: bool = True) -> str:
    op = stmt[0]
    if op == "is":
        who = "I am" if stmt[1] == speaker else f"{names[stmt[1]]} is"
        return f"{who} a {role_word(stmt[2])}"
    if op == "not":
        inner = stmt[1]
        if inner[0] == "is":
            who = "I am" if inner[1] == speaker else f"{names[inner[1]]} is"
            return f"{who} not a {role_word(inner[2])}"
        else:
            text = f"it is false that {render(inner, names, speaker, False)}"
    elif op in ("and", "or"):
        text = f" {op} ".join(render(s, names, speaker, False) for s in stmt[1:])
    elif op == "imp":
        text = f"if {render(stmt[1], names, speaker, False)} then {render(stmt[2], names, speaker, False)}"
    else:
        text = f"{render(stmt[1], names, speaker, False)} if and only if {render(stmt[2], names, speaker, False)}"
    return text if top else f"({text})"


INTRO = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, and "
         "knaves always lie. You meet {n} inhabitants: {people}.")
FORMAT = ("Who is a knight and who is a knave? Reason step by step, then end with one line of the form "
          "\"ANSWER: {example}\" naming every inhabitant.")


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def prompt(statements: Sequence[Statement], names: Sequence[str]) -> str:
    n = len(statements)
    people = ", ".join(names[:-1]) + f" and {names[-1]}" if n > 1 else names[0]
    lines = [INTRO.format(n=n, people=people)]
    lines += [f'{names[i]} says: "{_sentence(render(s, names, i))}."' for i, s in enumerate(statements)]
    example = ", ".join(f"{nm} is a {'knight' if k % 2 == 0 else 'knave'}" for k, nm in enumerate(names[:2]))
    lines.append(FORMAT.format(example=example + (", ..." if n > 2 else "")))
    return "\n".join(lines)


def answer_line(truth: Sequence[bool], names: Sequence[str]) -> str:
    return "ANSWER: " + ", ".join(f"{nm} is a {role_word(k)}" for nm, k in zip(names, truth))


def reference(statements: Sequence[Statement], truth: Sequence[bool], names: Sequence[str]) -> str:
    """An SFT response: the candidate assignment, each statement checked against it, uniqueness, answer."""
    lines = ["Each knight's statement must be true and each knave's statement must be false. "
             "Consider the assignment: " + ", ".join(f"{nm} is a {role_word(k)}" for nm, k in zip(names, truth))
             + "."]
    for i, s in enumerate(statements):
        val = bool(evaluate(s, tuple(truth)))
        lines.append(f'- {names[i]} says "{_sentence(render(s, names, i))}". Under this assignment the statement '
                     f"is {'true' if val else 'false'}, so {names[i]} is a {role_word(val)}, which is consistent.")
    lines.append(f"Every other assignment of the {len(names)} roles makes at least one statement contradict its "
                 "speaker's role, so this is the only solution.")
    lines.append(answer_line(truth, names))
    return "\n".join(lines)


def make(n: int, rng: random.Random, depth: int = 2, width: int = 2) -> dict[str, Any]:
    """One puzzle as a dict: names, statements, solution (role words), prompt and reference."""
    names = rng.sample(NAMES, n)
    statements, truth = generate_puzzle(n, rng, depth, width)
    return {"names": names, "statements": [list_form(s) for s in statements],
            "solution": {nm: role_word(k) for nm, k in zip(names, truth)},
            "prompt": prompt(statements, names), "reference": reference(statements, truth, names)}


def list_form(stmt: Statement) -> list:
    """JSON-friendly nested lists (``tuple_form`` reverses it)."""
    return [stmt[0], *[list_form(s) if isinstance(s, tuple) else s for s in stmt[1:]]]


def tuple_form(stmt: Any) -> Statement:
    return (stmt[0], *[tuple_form(s) if isinstance(s, list) else s for s in stmt[1:]])


# --------------------------------------------------------------------------------------------------------
# answer parsing
# --------------------------------------------------------------------------------------------------------
def parse_answer(text: Any, names: Sequence[str]) -> dict[str, str]:
    """Map name -> "knight"/"knave" read from a completion: the part after the last "ANSWER" marker if
    there is one (else the whole text), the last role stated for each name. Never raises."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        text = str(text or "")[-20000:]
        marks = [m.end() for m in re.finditer(r"answer\s*[:：]", text, flags=re.IGNORECASE)]
        part = text[marks[-1]:] if marks else text
        out: dict[str, str] = {}
        for nm in names:
            pat = (rf"\b{re.escape(nm)}\b\W{{0,3}}(?:is|was|are|:|=|-|–|—)?\s*(?:an?\s+|the\s+)?"
                   r"(?:\*\*)?(knights?|knaves?)\b")
            found = re.findall(pat, part, flags=re.IGNORECASE)
            if found:
                out[nm] = "knight" if found[-1].lower().startswith("knight") else "knave"
        return out
    except Exception:
        return {}


def is_correct(text: Any, solution: dict[str, str]) -> bool:
    """True only when every person's role is stated and right."""
    try:
        got = parse_answer(text, list(solution))
        return bool(solution) and all(got.get(nm) == role for nm, role in solution.items())
    except Exception:
        return False
