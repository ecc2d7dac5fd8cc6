"""Parent-side half of the ``code`` task's judge: reading the records a sandboxed program wrote to its result
channel, and comparing a candidate's outputs with the expected ones as evalplus does.

Everything here runs in the trusted parent process on values rebuilt by :func:`rlm.plugins.tasks.code.plain.decode`
(builtin types only), so no comparison can call code the candidate wrote. Outputs match exactly (Python's
``==`` on the plain values, as evalplus's ``out == exp``: ``1 == 1.0 == True``, ``[1] != (1,)``), or within
``atol`` (1e-6 for float outputs when ``atol`` is 0; relative 1e-7) with the same type; an expected output too
large to send is a :class:`~rlm.plugins.tasks.code.plain.Digest` of its canonical encoding and matches only
the same digest; evalplus's special oracles for HumanEval's ``find_zero``, the MBPP set-equality / not-None /
``are_equivalent`` / ``sum_div`` tasks and the second accepted readings of ``surface_Area`` (Mbpp/581) and
``digit_distance_nums`` (Mbpp/558). These mirror evalplus 0.3.1 rather than call it: evalplus pulls in the
openai / anthropic / google-generativeai clients, whose protobuf pin conflicts with tensorboard's, for a few pure
functions; ``tests/tasks/test_code_oracles.py`` pins the agreement case by case.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from rlm.plugins.tasks.code.plain import Digest, NotPlain, decode, encode

SET_EQ = frozenset({"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
                    "intersection_array", "find_dissimilar", "Diff"})
NOT_NONE = frozenset({"check_str", "text_match_three", "text_starta_endb"})


def parse_records(data: bytes) -> list[list[Any]] | None:
    """The channel's JSON records (one per line, each a JSON array), or ``None`` when any line is malformed
    (a program that writes garbage to its own channel only fails itself)."""
    out = []
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if type(rec) is not list or not rec:
            return None
        out.append(rec)
    return out


def suite_values(records: list[list[Any]], suite: str, *, with_limits: bool = False) -> tuple[list[Any], list[float]]:
    """The decoded values of ``suite``'s records ``[suite, i, "ok", value(, limit)]`` in order; stops at the first
    record out of sequence, not ``ok`` or malformed (so a shorter list than the inputs means failure)."""
    vals: list[Any] = []
    lims: list[float] = []
    for rec in (r for r in records if r[0] == suite):
        if len(rec) != (5 if with_limits else 4) or type(rec[1]) is not int or rec[1] != len(vals) or rec[2] != "ok":
            break
        try:
            v = decode(rec[3])
        except NotPlain:
            break
        if with_limits:
            if type(rec[4]) is not float or not 0 < rec[4] < 1e6:
                break
            lims.append(rec[4])
        vals.append(v)
    return vals, lims


def canonical_text(v: Any) -> str:
    """The canonical encoding of a decoded plain value (a digest record for a :class:`Digest`)."""
    if type(v) is Digest:
        return '{"~":"h","v":"' + str(v) + '"}'
    return encode(v)


def templates(assertion: str, entry_point: str) -> str | None:
    """MBPP+: the encoded literal arguments of the first ``entry_point(...)`` call in the task's ``assertion``
    example (``None`` for a non-literal argument), used to restore argument types; ``None`` when there is none."""
    for line in (assertion or "").splitlines():
        try:
            tree = ast.parse(line.strip())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == entry_point:
                out = []
                for a in node.args:
                    try:
                        out.append(ast.literal_eval(a))
                    except Exception:  # noqa: BLE001 - any non-literal argument
                        out.append(None)
                try:
                    return encode(out)
                except (NotPlain, RecursionError):
                    return None
    return None


def _is_floats(x: Any) -> bool:
    if type(x) is float:
        return True
    return type(x) in (list, tuple) and len(x) > 0 and all(type(i) is float for i in x)


def _close(o: Any, e: Any, atol: float) -> bool:
    if type(o) is not type(e):
        return False
    if type(e) in (int, float):
        return abs(o - e) <= atol + 1e-7 * abs(e)
    if type(e) in (list, tuple):
        return len(o) == len(e) and all(_close(a, b, atol) for a, b in zip(o, e))
    return o == e


def _find_zero_ok(xs: Any, x: Any, atol: float) -> bool:
    """HumanEval ``find_zero``: ``x`` is a root of the polynomial with coefficients ``xs`` (any root counts)."""
    if type(x) not in (bool, int, float) or (type(x) is not float and abs(x) > 2 ** 4096):
        return False
    return abs(sum(c * x ** i for i, c in enumerate(xs))) <= (atol or 1e-6)


def _pyramid_surface_perpendicular(base_edge: Any, height: Any) -> int:
    """Mbpp/581's second reading (evalplus accepts both): ``height`` as the perpendicular height of the square
    pyramid, so the slant height is ``sqrt((base_edge / 2)² + height²)``; the total surface, rounded."""
    slant = math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 2 * base_edge * slant)


def _digit_distance_padded(a: Any, b: Any) -> int:
    """Mbpp/558's second reading (evalplus accepts both): the shorter number left-padded with zeros, then the
    sum of the digit-wise absolute differences."""
    x, y = str(a), str(b)
    width = max(len(x), len(y))
    return sum(abs(int(p) - int(q)) for p, q in zip(x.zfill(width), y.zfill(width)))


def _mbpp_oracle(ep: str, inp: list[Any], o: Any, e: Any, atol: float) -> bool | None:
    """evalplus's special MBPP+ oracles, or ``None`` when ``ep`` has none (or it does not decide)."""
    if ep == "surface_Area" and o != e and abs(o - _pyramid_surface_perpendicular(*inp)) <= atol:
        return True
    if ep == "digit_distance_nums" and o != e and o == _digit_distance_padded(*inp):
        return True
    if ep == "are_equivalent":
        return True
    if ep == "sum_div" and o == 0:
        return True
    if ep in SET_EQ:
        try:
            return set(o) == set(e)
        except TypeError:
            return False
    if ep in NOT_NONE:
        ob = o if type(o) is bool else o is not None
        eb = e if type(e) is bool else e is not None
        return ob == eb
    return None


def match(dataset: str | None, ep: str, inp: list[Any], o: Any, e: Any, atol: float) -> bool:
    """Whether output ``o`` of the candidate on input ``inp`` matches the expected output ``e`` (both plain)."""
    if type(e) is Digest or type(o) is Digest:
        return type(e) is type(o) and o == e
    try:
        if dataset == "mbpp":
            r = _mbpp_oracle(ep, inp, o, e, atol)
            if r is not None:
                return r
        if dataset == "humaneval" and ep == "find_zero":
            return _find_zero_ok(inp[0], o, atol)
        if o == e:
            return True
        if atol == 0 and _is_floats(e):
            atol = 1e-6
        return atol != 0 and _close(o, e, atol)
    except (TypeError, ValueError, ArithmeticError, RecursionError, IndexError):
        return False


def suite_passes(dataset: str | None, ep: str, inputs: list[Any], outputs: list[Any], expected: list[Any],
                 atol: float) -> bool:
    """Whether the candidate produced an output for every input and each matches the expected one."""
    return len(outputs) == len(expected) == len(inputs) and all(
        match(dataset, ep, i, o, e, atol) for i, o, e in zip(inputs, outputs, expected))
