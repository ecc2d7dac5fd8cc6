"""Statements of the ``puzzle`` task's Knights and Knaves puzzles: their nested-tuple form, truth value and
brute-force solver.

Every inhabitant is a knight (always tells the truth) or a knave (always lies) and makes one statement built
from atoms ("A is a knight", "B is a knave") with not / and / or / if-then / if-and-only-if; person ``i`` is a
knight exactly when their statement is true. Statements are nested tuples: ``("is", j, True)`` (person j is a
knight; ``False``: a knave), ``("not", s)``, ``("and", s1, s2, ...)``, ``("or", s1, s2, ...)``,
``("imp", a, b)``, ``("iff", a, b)``; :func:`list_form` is their JSON form, kept in an example's meta.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

Statement = tuple
OPS = ("not", "and", "or", "imp", "iff")


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


def list_form(stmt: Statement) -> list:
    """JSON-friendly nested lists (``tuple_form`` reverses it)."""
    return [stmt[0], *[list_form(s) if isinstance(s, tuple) else s for s in stmt[1:]]]


def tuple_form(stmt: Any) -> Statement:
    return (stmt[0], *[tuple_form(s) if isinstance(s, list) else s for s in stmt[1:]])
