"""Plain-data codec of the ``code`` task: the only format in which values leave a sandboxed program.

A value is *plain* when it is built only from objects whose type is exactly (``type(v) is ...``, no
subclasses) ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``list``, ``tuple``,
``set``, ``frozenset`` or ``dict``. :func:`encode` writes a plain value as JSON text, and raises
:class:`NotPlain` for anything else (objects with custom ``__eq__``, subclasses of builtins, generators, ...):

- ``None``, ``bool``, ``str`` (ASCII-escaped, so lone surrogates survive), ``float`` (``NaN``, ``Infinity``,
  ``-Infinity`` as Python's ``json`` writes them) and ``int`` are JSON scalars (an ``int`` of more than 12000
  bits is ``{"~": "i", "v": HEX}``, ``HEX`` with a leading ``-`` when negative: decimal conversion of such
  numbers is limited in Python 3.11+);
- ``list`` is a JSON array; every other container is an object ``{"~": TAG, "v": ...}``: ``t`` tuple,
  ``s`` set and ``f`` frozenset (elements sorted by their encoding, so the text is canonical), ``d`` dict
  (``[[key, value], ...]`` in insertion order, which programs may observe), ``c`` complex
  (``[real, imag]``), ``b`` bytes (hex).

JSON was chosen over ``repr`` + ``ast.literal_eval`` because its parser is a small C state machine with no
expression evaluation (``literal_eval`` folds ``+``/``-`` on numbers and recurses in the compiler), because
``NaN``/``Infinity`` and every container get one explicit spelling, and because the encoding is canonical:
equal plain values of equal types (and equal dict insertion order) encode to the same text, so a digest of
the text stands in for a huge value.

This module's source is also pasted into the sandbox harnesses (:mod:`rlm.plugins.tasks.code.harness`), so
the sandbox and the parent encode with the same code. :func:`decode` (parent side) parses the text and
rebuilds the value from builtin types only, rejecting anything malformed, so what the parent compares cannot
carry behaviour, whatever the sandboxed program wrote.
"""

import hashlib as _hashlib
import json as _json
import math as _math


class NotPlain(Exception):
    """A value is not plain data (or its text is not a valid encoding)."""


_BIG_BITS = 12000
_dumps_str = _json.JSONEncoder(ensure_ascii=True).encode
_float_repr = float.__repr__
_int_str = int.__repr__


def _scalar(v):
    """The JSON text of a scalar plain value, or ``None`` when ``v`` is not a scalar."""
    t = type(v)
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    if t is int:
        if v.bit_length() > _BIG_BITS:
            return '{"~":"i","v":"' + format(v, "x") + '"}'
        return _int_str(v)
    if t is float:
        if _math.isnan(v):
            return "NaN"
        if _math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return _float_repr(v)
    if t is str:
        return _dumps_str(v)
    if t is complex:
        return '{"~":"c","v":[' + _scalar(v.real) + "," + _scalar(v.imag) + "]}"
    if t is bytes:
        return '{"~":"b","v":"' + v.hex() + '"}'
    return None


def _enc(v, depth):
    if depth > 200:
        raise NotPlain("nested too deeply")
    s = _scalar(v)
    if s is not None:
        return s
    t = type(v)
    if t is list:
        return "[" + ",".join([_enc(x, depth + 1) for x in v]) + "]"
    if t is tuple:
        return '{"~":"t","v":[' + ",".join([_enc(x, depth + 1) for x in v]) + "]}"
    if t is set or t is frozenset:
        items = sorted([_enc(x, depth + 1) for x in v])
        return '{"~":"' + ("s" if t is set else "f") + '","v":[' + ",".join(items) + "]}"
    if t is dict:
        pairs = [(_enc(k, depth + 1), _enc(x, depth + 1)) for k, x in v.items()]
        return '{"~":"d","v":[' + ",".join(["[" + k + "," + x + "]" for k, x in pairs]) + "]}"
    raise NotPlain("not plain data: " + t.__name__)


def encode(v):
    """The canonical JSON text of the plain value ``v``; raises :class:`NotPlain` (or ``RecursionError``)."""
    return _enc(v, 0)


def encode_bounded(v, limit):
    """``encode(v)``, or ``{"~": "h", "v": SHA256}`` (a digest of that text) when it is longer than ``limit``."""
    text = encode(v)
    if len(text) > limit:
        return '{"~":"h","v":"' + _hashlib.sha256(text.encode("ascii")).hexdigest() + '"}'
    return text


class Digest(str):
    """The decoded form of a digest record (the SHA-256 of an encoding too large to send)."""


_HEX = frozenset("0123456789abcdef")


def _dec(j, depth):
    if depth > 200:
        raise NotPlain("nested too deeply")
    t = type(j)
    if j is None or t is bool or t is int or t is float or t is str:
        return j
    if t is list:
        return [_dec(x, depth + 1) for x in j]
    if t is not dict or set(j) != {"~", "v"}:
        raise NotPlain("malformed value")
    tag, v = j["~"], j["v"]
    if tag in ("i", "b", "h"):
        neg = tag == "i" and type(v) is str and v.startswith("-")
        digits = v[1:] if neg else v
        if type(v) is not str or not set(digits) <= _HEX or tag == "h" and len(v) != 64:
            raise NotPlain("malformed hex")
        return int(v, 16) if tag == "i" else bytes.fromhex(v) if tag == "b" else Digest(v)
    if type(v) is not list:
        raise NotPlain("malformed container")
    if tag == "t":
        return tuple(_dec(x, depth + 1) for x in v)
    if tag in ("s", "f"):
        items = [_dec(x, depth + 1) for x in v]
        return set(items) if tag == "s" else frozenset(items)
    if tag == "c":
        if len(v) != 2 or not all(type(x) in (int, float) for x in v):
            raise NotPlain("malformed complex")
        return complex(float(v[0]), float(v[1]))
    if tag == "d":
        if not all(type(p) is list and len(p) == 2 for p in v):
            raise NotPlain("malformed dict")
        return {_dec(k, depth + 1): _dec(x, depth + 1) for k, x in v}
    raise NotPlain("unknown tag")


def decode(j):
    """The plain value of an already JSON-parsed encoding ``j`` (a :class:`Digest` for a digest record); raises
    :class:`NotPlain` for anything that is not an encoding :func:`encode` could have written."""
    try:
        return _dec(j, 0)
    except (TypeError, ValueError, RecursionError) as exc:  # unhashable set elements / dict keys, bad hex
        raise NotPlain(str(exc)) from None
