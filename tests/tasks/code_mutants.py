"""Program mutants of HumanEval+ / MBPP+ canonical solutions, for the differential test against evalplus.

Each mutant changes one site of the canonical solution's syntax tree with one operator (the classic
mutation-testing set): a comparison swapped (``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``in``/``not in``,
``is``/``is not``), ``and``/``or`` swapped, an integer constant off by one, ``min``/``max`` swapped, ``+``/``-``
and ``*``/``//`` swapped, a ``not`` dropped, a statement dropped from a block of several, a returned value
replaced (``None``, or reversed by ``[::-1]``), a slice bound dropped. Mutants that do not compile, or that
unparse to the canonical text, are left out. Everything is deterministic for a given seed.

Run as a script to write a candidate set (evalplus's ``samples.jsonl`` layout: ``task_id``, ``solution``)::

    python tests/tasks/code_mutants.py ../shared/data/HumanEvalPlus.jsonl.gz --per-task 3 --seed 7 > samples.jsonl
"""

from __future__ import annotations

import ast
import copy
import gzip
import json
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult}


def _sites(tree: ast.AST) -> list[tuple[str, ast.AST, Any]]:
    """Every (operator, node, detail) the mutation operators can apply to, in tree order."""
    out: list[tuple[str, ast.AST, Any]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            out += [("cmp", node, i) for i, op in enumerate(node.ops) if type(op) in _CMP_SWAP]
        elif isinstance(node, ast.BoolOp):
            out.append(("boolop", node, None))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            out += [("const", node, +1), ("const", node, -1)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            out.append(("minmax", node, None))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            out.append(("binop", node, None))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append(("not", node, None))
        elif isinstance(node, ast.Return) and node.value is not None:
            out.append(("return", node, "none"))
            if not isinstance(node.value, ast.Constant):
                out.append(("return", node, "reverse"))
        elif isinstance(node, ast.Slice):
            out += [("slice", node, f) for f in ("lower", "upper") if getattr(node, f) is not None]
        for field in ("body", "orelse"):
            block = getattr(node, field, None)
            if isinstance(block, list) and len(block) > 1 and not isinstance(node, ast.Module):
                out += [("drop", node, (field, i)) for i in range(len(block))]
    return out


def _apply(tree: ast.Module, k: int) -> ast.Module:
    """A copy of ``tree`` with site ``k`` (an index into :func:`_sites` of the copy) mutated."""
    tree = copy.deepcopy(tree)
    kind, node, detail = _sites(tree)[k]
    if kind == "cmp":
        node.ops[detail] = _CMP_SWAP[type(node.ops[detail])]()
    elif kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "const":
        node.value += detail
    elif kind == "minmax":
        node.func.id = "max" if node.func.id == "min" else "min"
    elif kind == "binop":
        node.op = _BIN_SWAP[type(node.op)]()
    elif kind == "not":
        _replace(tree, node, node.operand)
    elif kind == "return":
        node.value = (ast.Constant(None) if detail == "none" else
                      ast.Subscript(node.value, ast.Slice(None, None, ast.Constant(-1)), ast.Load()))
    elif kind == "slice":
        setattr(node, detail, None)
    elif kind == "drop":
        field, i = detail
        del getattr(node, field)[i]
    return ast.fix_missing_locations(tree)


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is old:
                        value[i] = new
                        return


def mutants(code: str, *, rng: random.Random, limit: int) -> list[str]:
    """Up to ``limit`` distinct compiling mutants of ``code``, sites drawn by ``rng`` without replacement."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    base = ast.unparse(tree)
    order = list(range(len(_sites(tree))))
    rng.shuffle(order)
    out: list[str] = []
    for k in order:
        if len(out) >= limit:
            break
        try:
            text = ast.unparse(_apply(tree, k))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)
                compile(text, "mutant.py", "exec")
        except (SyntaxError, ValueError, TypeError, AttributeError, RecursionError):
            continue
        if text != base and text not in out:
            out.append(text)
    return out


def read_problems(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an evalplus ``.jsonl`` / ``.jsonl.gz`` file, in file order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def full_solution(problem: dict[str, Any]) -> str:
    """The canonical solution as a whole program (HumanEval's prompt holds the signature and helpers)."""
    if problem["task_id"].startswith("HumanEval/"):
        return problem["prompt"] + problem["canonical_solution"]
    return problem["canonical_solution"]


def candidate_set(problems: list[dict[str, Any]], *, seed: int, per_task: int) -> Iterator[dict[str, str]]:
    """For every problem: its canonical solution, then up to ``per_task`` mutants (``kind`` says which)."""
    for p in problems:
        canonical = full_solution(p)
        rng = random.Random(f"{seed}/{p['task_id']}")
        yield {"task_id": p["task_id"], "solution": canonical, "kind": "canonical"}
        for m in mutants(canonical, rng=rng, limit=per_task):
            yield {"task_id": p["task_id"], "solution": m, "kind": "mutant"}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="an evalplus .jsonl(.gz) file")
    ap.add_argument("--per-task", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for row in candidate_set(read_problems(a.data), seed=a.seed, per_task=a.per_task):
        print(json.dumps(row))
