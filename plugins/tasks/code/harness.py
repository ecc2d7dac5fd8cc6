"""The programs that run inside the sandbox for the ``code`` task's judge (:mod:`rlm.plugins.tasks.code.judge`).

Every script reads its job from ``spec.json`` and writes plain data only, one JSON record per line, to the
sandbox's result channel (file descriptor :data:`rlm.core.eval.sandbox.CHANNEL_FD`); values are encoded
with :mod:`rlm.plugins.tasks.code.plain`, whose source is pasted into ``PRELUDE``. No script decides whether
a candidate passes, and no script that runs candidate code is given an expected output:

``REFERENCE_SCRIPT`` (trusted: only the canonical solution runs)
    runs the canonical solution on the evalplus-style inputs of the suites named in ``spec["suites"]`` (the
    judge runs each suite on its own, so each has the sandbox's whole CPU budget, as in evalplus); records
    ``[suite, i, "ok", value, limit]`` (``limit`` the per-input time limit ``max(min_time, factor x reference
    time)``), or ``[suite, i, "error"]``.
``CANDIDATE_SCRIPT`` (untrusted; its stdout and stderr go to /dev/null, so printing costs nothing)
    runs the candidate on the same inputs (of ``spec["suites"]``) under the per-input limits; records
    ``[suite, i, "ok", value]`` or ``[suite, i, "error"]`` and stops at the first error (plus is skipped when
    base errs).
``RECORD_SCRIPT`` (trusted)
    runs a test program (HumanEval's ``check``, assert lines) against the canonical solution with its
    functions wrapped by a recorder, under a fixed ``random`` seed; records ``["call", name, args, kwargs]`` for each
    call, then ``["done"]`` when the test passed.
``CALLS_SCRIPT`` (untrusted)
    calls the candidate's functions on those recorded arguments (one wall-clock limit for all); records
    ``["call", i, "ok", value]`` / ``["call", i, "error"]``.
``REPLAY_SCRIPT`` (trusted: no candidate code, only its plain outputs)
    reruns the test program with the same seed, the candidate's functions replaced by a replayer that returns
    the candidate's recorded outputs (and fails when the test asks for arguments that were not recorded);
    records ``["pass"]`` when every assert holds and the test made exactly the recorded calls.

Inputs arrive as plain encodings (:mod:`rlm.plugins.tasks.code.plain`) of the values the loader produced,
so MBPP+'s tuples, sets and complex numbers keep the types evalplus's loader gives them. Timers raise :class:`_Timeout` from a ``SIGALRM`` handler (the program may be PID 1 of its
PID namespace, where a signal's default action is ignored).
"""

from pathlib import Path

_PLAIN_SOURCE = (Path(__file__).with_name("plain.py")).read_text(encoding="utf-8")

PRELUDE = _PLAIN_SOURCE + r'''
import copy as _copy, os as _os, signal as _signal, sys as _sys, time as _time
_spec = _json.load(open("spec.json"))
_CH = _os.dup(3)  # the channel, at a descriptor the program is unlikely to touch
_os.close(3)


def _emit(*parts):
    data = ("[" + ",".join(parts) + "]\n").encode("ascii")
    while data:
        data = data[_os.write(_CH, data):]


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


_signal.signal(_signal.SIGALRM, _alarm)
_sys.set_int_max_str_digits(0)


def _inputs(key):
    return decode(_json.loads(_spec[key])) if _spec.get(key) else []


_NOT_NONE = frozenset(_spec.get("not_none") or ())


def _quiet():
    """Send the untrusted program's stdout and stderr to /dev/null: the judge reads neither, and a program that
    prints more than the sandbox's file-size limit would otherwise be killed (or fail to write) for it."""
    _sys.stdout.flush()
    _sys.stderr.flush()
    _null = _os.open("/dev/null", _os.O_WRONLY)
    _os.dup2(_null, 1)
    _os.dup2(_null, 2)
    _os.close(_null)


_BASES = (bool, int, float, complex, str, bytes, tuple, list, dict, frozenset, set)


def _to_plain(v, depth=0):
    """``v`` with library values that honest programs return converted to their plain equivalent (as ``==``
    sees them): subclasses of builtins from ``collections`` / ``numpy`` (``defaultdict``, ``Counter``,
    ``np.float64``, ...) and named tuples to their base type, numpy scalars via ``.item()``. Anything else is
    left as is, so that encoding rejects it (a class the program defined). Whatever this returns is checked
    again by the encoder: it only decides which values count as data, never what they compare equal to."""
    t = type(v)
    if depth > 200 or t in (bool, int, float, complex, str, bytes, type(None)):
        return v
    if t in (list, tuple, set, frozenset):
        return t(_to_plain(x, depth + 1) for x in v)
    if t is dict:
        return {_to_plain(k, depth + 1): _to_plain(x, depth + 1) for k, x in v.items()}
    mod = str(getattr(t, "__module__", "")).split(".")[0]
    if isinstance(v, tuple) and hasattr(t, "_fields"):
        return _to_plain(tuple(v), depth + 1)
    if mod in ("collections", "numpy"):
        for b in _BASES:
            if isinstance(v, b):
                return _to_plain(b(v), depth + 1)
        if mod == "numpy" and hasattr(v, "item") and getattr(v, "ndim", None) == 0:
            return _to_plain(v.item(), depth + 1)
    return v


def _plain_output(v, reference=False):
    if _spec.get("entry_point") in _NOT_NONE and (reference or type(v) is not bool):
        v = v is not None  # evalplus: only "returned something" counts (re.Match objects are not data); its
        # expected outputs are ``out is not None`` even for a bool, a candidate's bool is compared as is
    try:
        return encode_bounded(v, _spec["digest_bytes"])
    except NotPlain:
        return encode_bounded(_to_plain(v), _spec["digest_bytes"])

'''

REFERENCE_SCRIPT = PRELUDE + r'''
_ns = {"__name__": "rlm_reference"}
exec(compile(_spec["canonical"], "reference.py", "exec"), _ns)
_f = _ns[_spec["entry_point"]]
for _k in _spec["suites"]:
    for _i, _r in enumerate(_inputs(_k)):
        _t0 = _time.perf_counter()
        try:
            _v = _plain_output(_f(*_copy.deepcopy(_r)), reference=True)
        except BaseException:
            _emit(_json.dumps(_k), str(_i), '"error"')
            raise
        _lim = max(_spec["min_time"], _spec["factor"] * (_time.perf_counter() - _t0))
        _emit(_json.dumps(_k), str(_i), '"ok"', _v, repr(float(_lim)))
'''

CANDIDATE_SCRIPT = PRELUDE + r'''
_lims = _spec["limits"]
_suites = [(_k, _inputs(_k)) for _k in _spec["suites"]]
_ns = {"__name__": "rlm_solution"}
_quiet()
exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), _ns)
_f = _ns[_spec["entry_point"]]
for _k, _rows in _suites:
    _bad = False
    for _i, _r in enumerate(_rows):
        try:
            _signal.setitimer(_signal.ITIMER_REAL, _lims[_k][_i])
            try:
                _o = _f(*_copy.deepcopy(_r))
            finally:
                _signal.setitimer(_signal.ITIMER_REAL, 0)
            _v = _plain_output(_o)
        except BaseException:
            _bad = True
            _emit(_json.dumps(_k), str(_i), '"error"')
            break
        _emit(_json.dumps(_k), str(_i), '"ok"', _v)
    if _bad:
        break
'''

_TEST_PRELUDE = PRELUDE + r'''
import random as _random
_names = _spec["names"]
_ns = {"__name__": "rlm_program"}
exec(compile(_spec["canonical"], "reference.py", "exec"), _ns)


def _run_test(wrap, names):
    """Replace each tested function by ``wrap(name)``, then run the test under a fixed seed and the time limit."""
    for n in names:
        _ns[n] = wrap(n)
    _random.seed(0)
    _signal.setitimer(_signal.ITIMER_REAL, _spec["timeout"])
    exec(compile(_spec["test"], "test.py", "exec"), _ns)
    _signal.setitimer(_signal.ITIMER_REAL, 0)
'''

RECORD_SCRIPT = _TEST_PRELUDE + r'''
_orig = {n: _ns[n] for n in _names if callable(_ns.get(n))}


_depth = [0]


def _recorder(name):
    def call(*args, **kwargs):
        if _depth[0]:  # a call made by a tested function itself (recursion, helpers): not the test's
            return _orig[name](*args, **kwargs)
        _emit('"call"', _json.dumps(name), encode(list(args)), encode(kwargs))
        _depth[0] += 1
        try:
            return _orig[name](*args, **kwargs)
        finally:
            _depth[0] -= 1
    return call


_run_test(_recorder, list(_orig))
_emit('"done"')
'''

CALLS_SCRIPT = PRELUDE + r'''
_calls = [(n, decode(_json.loads(a)), decode(_json.loads(k))) for n, a, k in _spec["calls"]]
_ns = {"__name__": "rlm_solution"}
_quiet()
exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), _ns)
_signal.setitimer(_signal.ITIMER_REAL, _spec["timeout"])
for _i, (_n, _a, _k) in enumerate(_calls):
    try:
        _v = _plain_output(_ns[_n](*_a, **_k))
    except BaseException:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _emit('"call"', str(_i), '"error"')
        break
    _emit('"call"', str(_i), '"ok"', _v)
_signal.setitimer(_signal.ITIMER_REAL, 0)
'''

REPLAY_SCRIPT = _TEST_PRELUDE + r'''
_calls = _spec["calls"]
_outs = _spec["outputs"]
_next = [0]
_mismatch = [False]


class _Mismatch(BaseException):
    pass


def _replayer(name):
    def call(*args, **kwargs):
        i = _next[0]
        _next[0] += 1
        if i >= len(_calls) or i >= len(_outs) or _calls[i] != [name, encode(list(args)), encode(kwargs)]:
            _mismatch[0] = True  # remembered, in case the test swallows the exception
            raise _Mismatch()
        return decode(_json.loads(_outs[i]))
    return call


_run_test(_replayer, _names)
if not _mismatch[0] and _next[0] == len(_calls):
    _emit('"pass"')
'''
