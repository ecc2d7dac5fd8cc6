"""The programs that run inside the sandbox for the ``code`` task's judge (:mod:`rlm.plugins.tasks.code.judge`).

``SCRIPT_PRELUDE`` is shared by the reference and candidate runs: it reads the nonce from stdin and the test
spec from ``spec.json``, restores MBPP+ argument types from the task's ``assertion`` example, and compares an
output with the expected one as evalplus does (exact, ``atol``, digests of large outputs, evalplus's special
oracles). ``REFERENCE_SCRIPT`` runs the trusted canonical solution and pickles its inputs, outputs and
per-input time limits to ``expected.pkl``; ``CANDIDATE_SCRIPT`` tests a candidate against them;
``PROGRAM_SCRIPT`` runs a test program (HumanEval's ``check``, assert lines) under a wall-clock limit
(``__TIMEOUT__`` is replaced with it). Each prints its verdicts as ``NONCE KEY VALUE`` lines.
"""

SCRIPT_PRELUDE = r'''
import ast, copy, hashlib, json, os, pickle, signal, sys, time
_out = os.dup(1)
_nonce = sys.stdin.readline().strip()
_spec = json.load(open("spec.json"))
_ep = _spec["entry_point"]

def _say(k, v):
    os.write(_out, f"{_nonce} {k} {v}\n".encode())

def _templates():
    for line in (_spec.get("assertion") or "").splitlines():
        try:
            tree = ast.parse(line.strip())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == _ep:
                out = []
                for a in node.args:
                    try:
                        out.append(ast.literal_eval(a))
                    except Exception:
                        out.append(None)
                return out
    return None

def _pick(ts, x, i, n, parent):
    want = isinstance(x, (list, dict))
    for t in ([ts[i]] if len(ts) == n else []) + ts:
        if isinstance(t, (tuple, list, set, dict)) == want:
            return t
    return parent if want else None  # deeper nesting than the example shows: same container type

def _conform(v, t):
    if t is None:
        return v
    if isinstance(t, (int, float, complex)) and not isinstance(t, bool) and isinstance(v, str):
        try:
            return complex(v) if isinstance(t, complex) else float(v)
        except ValueError:
            try:
                return complex(v)
            except ValueError:
                return v
    if isinstance(t, (tuple, list, set)) and isinstance(v, list):
        ts = list(t)
        items = [_conform(x, _pick(ts, x, i, len(v), t)) for i, x in enumerate(v)]
        return tuple(items) if isinstance(t, tuple) else set(items) if isinstance(t, set) else items
    if isinstance(t, dict) and isinstance(v, dict) and t:
        tv = next(iter(t.values()))
        return {k: _conform(x, tv) for k, x in v.items()}
    return v

def _inputs(key):
    rows = _spec.get(key) or []
    tm = _templates() if _spec.get("dataset") == "mbpp" else None
    if tm:
        rows = [[_conform(a, tm[i] if i < len(tm) else None) for i, a in enumerate(r)] for r in rows]
    return rows

def _is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(i, float) for i in x)

def _close(o, e, atol):
    if type(o) != type(e):
        return False
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        return abs(o - e) <= atol + 1e-7 * abs(e)
    if isinstance(e, (list, tuple)):
        return len(o) == len(e) and all(_close(a, b, atol) for a, b in zip(o, e))
    return o == e

def _poly(xs, x):
    return sum(c * x ** i for i, c in enumerate(xs))

_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
           "intersection_array", "find_dissimilar", "Diff"}
_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}

def _match(inp, o, e, atol):
    if type(e) is tuple and len(e) == 2 and e[0] == "__rlm_digest__":
        return hashlib.sha256(repr(o).encode("utf-8", "backslashreplace")).hexdigest() == e[1]
    ds = _spec.get("dataset")
    if ds == "mbpp":
        if _ep == "are_equivalent":
            return True
        if _ep == "sum_div" and o == 0:
            return True
        if _ep in _SET_EQ:
            try:
                return set(o) == set(e)
            except TypeError:
                return False
        if _ep in _NOT_NONE:
            ob = o if isinstance(o, bool) else o is not None
            eb = e if isinstance(e, bool) else e is not None
            return ob == eb
    if ds == "humaneval" and _ep == "find_zero":
        try:
            return abs(_poly(inp[0], o)) <= (atol or 1e-6)
        except Exception:
            return False
    try:
        if o == e:
            return True
    except Exception:
        return False
    if atol == 0 and _is_floats(e):
        atol = 1e-6
    return atol != 0 and _close(o, e, atol)

'''

# Reference run: only the canonical solution (trusted) runs; its outputs and per-input time limits are pickled
# for the candidate runs (and cached by the parent, which never unpickles them).
REFERENCE_SCRIPT = SCRIPT_PRELUDE + r'''
_ref = {"__name__": "rlm_reference"}
exec(compile(_spec["canonical"], "reference.py", "exec"), _ref)
_suites = {}
for _k in ("base_input", "plus_input"):
    _rows = _inputs(_k)
    _exp, _lim = [], []
    for _r in _rows:
        _t0 = time.perf_counter()
        _v = _ref[_ep](*copy.deepcopy(_r))
        if _spec.get("dataset") == "mbpp" and _ep in _NOT_NONE and not isinstance(_v, bool):
            _v = _v is not None  # evalplus: only "returned something" counts (re.Match objects do not pickle)
        try:
            _big = len(pickle.dumps(_v, protocol=4)) > _spec.get("digest_bytes", 1 << 23)
        except Exception:
            _big = True  # an output that does not pickle
        if _big:  # keep a digest of its repr instead: compared by repr (stricter than ==, never looser)
            _v = ("__rlm_digest__", hashlib.sha256(repr(_v).encode("utf-8", "backslashreplace")).hexdigest())
        _exp.append(_v)
        _lim.append(max(_spec["min_time"], _spec["factor"] * (time.perf_counter() - _t0)))
    _suites[_k] = (_rows, _exp, _lim)
with open("expected.pkl", "wb") as _f:
    pickle.dump(_suites, _f, protocol=4)
_say("reference", 1)
'''

# Candidate run: load the reference's inputs, outputs and limits, then define and test the candidate.
CANDIDATE_SCRIPT = SCRIPT_PRELUDE + r'''
with open("expected.pkl", "rb") as _f:
    _suites = pickle.load(_f)
_cand = {"__name__": "rlm_solution"}
exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), _cand)
_fn = _cand[_ep]
for _k, _name in (("base_input", "base"), ("plus_input", "plus")):
    _rows, _exp, _lims = _suites[_k]
    _ok = 1
    for _r, _e, _l in zip(_rows, _exp, _lims):
        try:
            # per-input limit max(min_time, factor x reference time); SIGALRM's default action ends the program,
            # so a timeout fails this suite (and the plus suite after it)
            signal.setitimer(signal.ITIMER_REAL, _l)
            try:
                _o = _fn(*copy.deepcopy(_r))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if not _match(_r, _o, _e, _spec.get("atol") or 0):
                _ok = 0
        except BaseException:
            _ok = 0
        if not _ok:
            break
    _say(_name, _ok)
'''

PROGRAM_SCRIPT = r'''
import os, sys
_out = os.dup(1)
_nonce = sys.stdin.readline().strip()
import signal
signal.setitimer(signal.ITIMER_REAL, __TIMEOUT__)  # SIGALRM's default action ends the program
exec(compile(open("program.py", encoding="utf-8").read(), "program.py", "exec"), {"__name__": "rlm_program"})
os.write(_out, f"{_nonce} base 1\n".encode())
'''
