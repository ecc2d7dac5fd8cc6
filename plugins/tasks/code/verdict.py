"""Parent-side half of the ``code`` task's judge: reading the records a sandboxed program wrote to its result
channel, and comparing a candidate's outputs with the expected ones by evalplus's rules.

Everything here runs in the trusted parent process on values rebuilt by :func:`rlm.plugins.tasks.code.plain.decode`
(builtin types only), so no comparison can call code the candidate wrote. evalplus (0.3.1) is the reference and
is called for what can be called without running a candidate in-process: its special oracles and task lists
(``evalplus.eval._special_oracle``: ``_surface_Area``, ``_digit_distance_nums``, ``_poly``, the set-equality
and not-None MBPP tasks) and ``is_floats``; the tolerance is ``numpy.allclose(rtol=1e-7)`` as in evalplus.
The few lines that chain them sit inside evalplus's ``unsafe_execute``, which executes the candidate in the
calling process, so :func:`match_step` mirrors them line for line (``tests/tasks/test_code_oracles.py`` and the
differential test against ``evalplus.evaluate`` pin the agreement). Order per input: exact ``==``; the MBPP
oracles; HumanEval ``find_zero``; a zero ``atol`` becomes 1e-6 at the first float (or all-float sequence)
expected output, for the rest of the suite; then same type, same length and ``allclose``. An expected output
too large to send is a :class:`~rlm.plugins.tasks.code.plain.Digest` of its canonical encoding and matches
only the same digest. One deliberate deviation: ``find_zero`` (HumanEval/32) passes when every input's output is a
root within ``atol``, as evalplus's oracle intends; evalplus 0.3.1 fails every solution there, the canonical
one included, because the ``continue`` after its oracle skips the bookkeeping that records a passed input.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from rlm.plugins.tasks.code.plain import Digest, NotPlain, decode, encode


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


@functools.cache
def _evalplus():
    """evalplus's comparison pieces (imported on first use: ``evalplus.eval`` loads numpy and psutil)."""
    from evalplus.eval import _special_oracle as oracle
    from evalplus.eval import is_floats

    return oracle, is_floats


def not_none_tasks() -> list[str]:
    """evalplus's MBPP+ entry points whose output only counts as "returned something" (not ``None``)."""
    return sorted(_evalplus()[0].MBPP_OUTPUT_NOT_NONE_TASKS)


def _find_zero_ok(poly: Any, xs: Any, x: Any, atol: float) -> bool:
    """HumanEval ``find_zero``: ``x`` is a root of the polynomial with coefficients ``xs`` within the task's
    ``atol`` (evalplus's oracle: ``abs(_poly(xs, x)) <= atol``; any root counts)."""
    if type(x) not in (bool, int, float):
        return False
    return abs(poly(xs, x)) <= atol


def _allclose(o: Any, e: Any, atol: float) -> bool:
    """evalplus's tolerance rule: same type (and length for sequences), then ``numpy.allclose`` with
    ``rtol=1e-7``."""
    import numpy as np

    if type(o) is not type(e) or (isinstance(e, (list, tuple)) and len(o) != len(e)):
        return False
    return bool(np.allclose(o, e, rtol=1e-07, atol=atol))


def _special(dataset: str | None, ep: str, inp: list[Any], o: Any, e: Any, exact: bool, atol: float) -> bool:
    """evalplus's special MBPP+ oracles applied to the exact-match verdict ``exact``."""
    oracle, _ = _evalplus()
    if dataset != "mbpp":
        return exact
    if ep == "are_equivalent":  # Mbpp/164
        return True
    if ep == "sum_div":  # Mbpp/295
        return exact or o == 0
    if ep == "surface_Area":  # Mbpp/581: the perpendicular-height reading too
        return exact or abs(o - oracle._surface_Area(*inp)) <= atol
    if ep == "digit_distance_nums":  # Mbpp/558: the zero-padded reading too
        return exact or o == oracle._digit_distance_nums(*inp)
    if ep in oracle.MBPP_OUTPUT_SET_EQ_TASKS:
        return set(o) == set(e)
    if ep in oracle.MBPP_OUTPUT_NOT_NONE_TASKS:
        return o == e if isinstance(o, bool) else e == (o is not None)
    return exact


def match_step(dataset: str | None, ep: str, inp: list[Any], o: Any, e: Any, atol: float) -> tuple[bool, float]:
    """One input of evalplus's check: whether output ``o`` (plain) on input ``inp`` matches the expected ``e``,
    and the ``atol`` that later inputs of the same suite use (evalplus raises a zero ``atol`` to 1e-6 at the
    first float output and keeps it for the rest of the suite)."""
    oracle, is_floats = _evalplus()
    if type(e) is Digest or type(o) is Digest:
        return type(e) is type(o) and o == e, atol
    try:
        exact = _special(dataset, ep, inp, o, e, o == e, atol)
        if dataset == "humaneval" and ep == "find_zero":
            return _find_zero_ok(oracle._poly, inp[0], o, atol), atol
        if atol == 0 and is_floats(e):
            atol = 1e-6
        if not exact and atol != 0:
            return _allclose(o, e, atol), atol
        return bool(exact), atol
    except (TypeError, ValueError, ArithmeticError, RecursionError, IndexError, AttributeError):
        return False, atol


def match(dataset: str | None, ep: str, inp: list[Any], o: Any, e: Any, atol: float) -> bool:
    """Whether output ``o`` of the candidate on input ``inp`` matches the expected output ``e`` (both plain)."""
    return match_step(dataset, ep, inp, o, e, atol)[0]


def suite_passes(dataset: str | None, ep: str, inputs: list[Any], outputs: list[Any], expected: list[Any],
                 atol: float) -> bool:
    """Whether the candidate produced an output for every input and each matches the expected one."""
    if not len(outputs) == len(expected) == len(inputs):
        return False
    for i, o, e in zip(inputs, outputs, expected):
        ok, atol = match_step(dataset, ep, i, o, e, atol)
        if not ok:
            return False
    return True
