"""Judge of the ``code`` task: runs a completion's program in :mod:`rlm.core.eval.sandbox` and scores it as
evalplus does; the reported metric names; parallel scoring.

Design: the sandbox only computes, the parent judges. A sandboxed program sends back plain data only — the
return values of the functions under test, encoded by :mod:`rlm.plugins.tasks.code.plain` (canonical JSON of
``None``/``bool``/``int``/``float``/``complex``/``str``/``bytes`` and exact ``list``/``tuple``/``set``/
``frozenset``/``dict``; ``collections`` / ``numpy`` values such as ``defaultdict`` or ``np.int64`` are first
converted to their plain equivalents, any other type, the program's own subclasses included, is an error in
the sandbox, and the parent rebuilds what it receives from builtin types only) on the sandbox's result
channel (file descriptor 3, separate from stdout/stderr, so output of any size neither hides nor forges it). The parent
(:mod:`rlm.plugins.tasks.code.verdict`) compares those values with the expected ones. Expected outputs never
enter a sandbox that runs candidate code: no file, variable or argument there holds them, and there is no
verdict protocol left to forge — what a candidate writes to the channel counts only as its outputs, so forging
them is solving the problem.

- evalplus-style examples (HumanEval+, MBPP+, the ``gen`` subset): a *reference run* (trusted, no candidate
  code) executes the canonical solution on the same inputs (deep-copied; sent as plain encodings, so MBPP+ arguments keep the types evalplus's loader
  gives them) and returns its outputs and per-input time limits
  ``max(min_time_limit, time_limit_factor x reference time)``; its channel text is cached (memory and
  ``$RLM_CACHE/code_reference``; parsed as JSON, never unpickled). The candidate run returns one output per
  input, each under its limit (a ``SIGALRM`` handler), stopping at the first error or timeout; the parent also
  bounds the whole run to the sum of the limits plus ``OVERHEAD_SECONDS``. Outputs match as evalplus's
  comparison does (see :mod:`~rlm.plugins.tasks.code.verdict`); an output encoding longer than ``digest_mb``
  is sent as a SHA-256 digest of the canonical encoding (equal only to the same digest). ``plus`` counts only
  when base and plus inputs all pass.
- test-program examples (HumanEval's ``check``, OpenCodeInstruct's assert lines): a trusted *record run*
  executes the test against the canonical / reference solution, its tested functions wrapped by a recorder,
  with ``random`` seeded, and returns the arguments of every call the test made (calls nested inside a
  tested function are not recorded); the candidate run calls the candidate's functions on those arguments
  and returns the outputs; a trusted *replay run* (no candidate code, only its plain outputs) re-executes the
  test with the same seed, the tested functions replaced by a replayer that returns the candidate's outputs
  and fails on any call whose arguments were not recorded, so every original assert (``==``, ``abs(...) <
  tol``, ``find_zero``'s ``poly(xs, x)``, round trips like ``decode_cyclic(encode_cyclic(s))``) is evaluated
  unchanged, but on data. An example whose tests use the reference's classes (objects carry behaviour), whose
  test makes no call, or whose reference does not pass its own tests cannot be judged and scores 0.

Guarantee: a candidate passes only when the values it returns, as plain data, satisfy the comparison the
parent (or the trusted replay) makes; nothing the candidate does inside its sandbox — equality tricks,
frame / ``gc`` / ``__main__`` introspection, tracing, early exits, monkeypatching, writing to any descriptor —
can change that comparison. Limits: the candidate can read whatever the sandbox leaves readable on the host
filesystem (see :mod:`rlm.core.eval.sandbox`); a program that disables its own alarm gains at most the
run's wall-clock bound. The completion may be a function body (appended to the prompt) or a full solution
(fenced or not): see :mod:`rlm.plugins.tasks.code.program`. The sandboxed programs are in
:mod:`rlm.plugins.tasks.code.harness`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlm.core.contracts import Example
from rlm.plugins.tasks.code.verdict import (
    canonical_text,
    not_none_tasks,
    parse_records,
    suite_passes,
    suite_values,
)
from rlm.plugins.tasks.code.harness import (
    CALLS_SCRIPT,
    CANDIDATE_SCRIPT,
    RECORD_SCRIPT,
    REFERENCE_SCRIPT,
    REPLAY_SCRIPT,
)
from rlm.plugins.tasks.code.plain import NotPlain, decode, encode
from rlm.plugins.tasks.code.program import build_solution, extract_code

#: per-example score keys -> reported metric names
METRIC_NAMES = {"pass_base": "pass@1_base", "pass_plus": "pass@1_plus", "pass": "pass@1"}
#: seconds a candidate run may take beyond the sum of its time limits (start-up, imports, encoding outputs)
OVERHEAD_SECONDS = 10.0
SUITES = ("base_input", "plus_input")
CACHE_VERSION = 3  # part of the reference cache key (with the reference script's text)

# Verdicts already computed in this process, most recently used last: an RL run meets the same (example,
# completion) pair at many steps and a study's evaluations meet it in many cells. The key covers everything a
# verdict depends on (prompt, answer with its inputs, completion, limits); a sandboxed program cannot reach it.
_VERDICTS: OrderedDict[str, dict[str, Any]] = OrderedDict()
_VERDICTS_LOCK = threading.Lock()


def has_plus(example: Example) -> bool:
    """Whether the example has evalplus base and plus suites (scored as ``pass_base`` / ``pass_plus``)."""
    a = example.answer if isinstance(example.answer, dict) else {}
    return a.get("kind") == "io" and a.get("dataset") in ("humaneval", "mbpp")


def _one_suite(spec: dict[str, Any], suite: str) -> dict[str, Any]:
    """``spec`` for a sandbox run of ``suite`` alone (the other suite's inputs left out)."""
    return dict(spec, suites=[suite], **{k: None for k in SUITES if k != suite})


def _whole_lines(channel: bytes) -> bytes:
    """The channel's complete lines: a run killed by its limits while writing a record loses only that
    record (the records before it still count)."""
    return channel[:channel.rfind(b"\n") + 1]


def _complete(parsed: Any) -> bool:
    """Whether a parsed reference covers every suite (test programs: always)."""
    return not isinstance(parsed, dict) or all(v is not None for v in parsed.values())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so readers never see a part."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def program_spec(example: Example) -> dict[str, Any] | None:
    """The record / replay runs' spec for a test-program example: ``canonical`` (the trusted solution),
    ``test`` (the test program), ``names`` (the functions under test); ``None`` when it cannot be judged on
    data (no reference, unparsable code, tests that use the reference's classes)."""
    spec = example.answer
    if spec["kind"] == "check":
        ep = spec["entry_point"]
        return {"canonical": (spec.get("prompt_code") or "") + spec.get("canonical", ""),
                "test": f"{spec['test']}\n\ncheck({ep})\n", "names": [ep]}
    canonical = extract_code(example.reference or "", None)
    test = "\n".join(spec.get("tests") or []) + "\n"
    try:
        body = ast.parse(canonical).body
        used = {n.id for n in ast.walk(ast.parse(test)) if isinstance(n, ast.Name)}
    except (SyntaxError, ValueError, RecursionError):
        return None
    names = [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    classes = {n.name for n in body if isinstance(n, ast.ClassDef)}
    if not names or used & classes:
        return None
    return {"canonical": canonical, "test": test, "names": names}


class CodeJudge:
    """Scores completions of code examples in the sandbox; keeps the in-memory cache of reference runs.

    ``config`` is read when used (so later changes count) and needs: ``sandbox`` (a
    :class:`rlm.core.eval.sandbox.SandboxConfig`), ``program_timeout``, ``min_time_limit``, ``time_limit_factor``,
    ``memory_cache_mb``, ``digest_mb`` and ``channel_mb`` (see the ``code`` task's config)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._reference_cache: dict[str, Any] = {}

    def _run(self, script: str, spec: dict[str, Any], solution: str | None = None,
             wall: float | None = None) -> list[list[Any]] | None:
        """Run ``script`` in the sandbox with ``spec.json`` (and ``solution.py``); the records on its result
        channel (``None`` when it overflowed or holds a malformed line). ``wall`` lowers the wall-clock limit."""
        from rlm.core.eval.sandbox import run_python

        cfg = self.config.sandbox
        if wall is not None and wall < cfg.wall_seconds:
            cfg = cfg.model_copy(update={"wall_seconds": wall})
        files: dict[str, str | bytes] = {"spec.json": json.dumps(spec)}
        if solution is not None:
            files["solution.py"] = solution
        res = run_python(script, config=cfg, files=files, channel_bytes=max(1, int(self.config.channel_mb * 2 ** 20)))
        return None if res.channel_overflow else parse_records(_whole_lines(res.channel))

    def _digest_bytes(self) -> int:
        return int(self.config.digest_mb * 2 ** 20)

    def _reference_spec(self, example: Example) -> dict[str, Any] | None:
        """The trusted reference (io) or record (test programs) run's spec; its JSON's hash is the cache key."""
        spec = example.answer
        common = {"version": CACHE_VERSION, "digest_bytes": self._digest_bytes()}
        if spec["kind"] == "io":
            ds, ep = spec.get("dataset"), spec["entry_point"]
            return dict(common, kind="io", dataset=ds, entry_point=ep, canonical=spec.get("canonical"),
                        base_input=encode(list(spec.get("base_input") or [])),
                        plus_input=encode(list(spec.get("plus_input") or [])),
                        counts={k: len(spec.get(k) or []) for k in SUITES},
                        not_none=not_none_tasks() if ds == "mbpp" else [],
                        min_time=self.config.min_time_limit, factor=self.config.time_limit_factor)
        prog = program_spec(example)
        return None if prog is None else dict(common, kind="test", timeout=float(self.config.program_timeout), **prog)

    def _parse_reference(self, rspec: dict[str, Any], data: bytes) -> Any:
        """The parsed reference: io ``{suite: (outputs, limits)}``; test programs the recorded ``[name, args
        encoding, kwargs encoding]`` calls. ``None`` when the run did not complete (io: when the base suite's
        did not; a plus suite that did not complete is ``None`` inside)."""
        records = parse_records(data)
        if records is None:
            return None
        if rspec["kind"] == "io":  # a suite whose run did not complete is None (nothing passes it)
            got = {k: suite_values(records, k, with_limits=True) for k in SUITES}
            out = {k: got[k] if len(got[k][0]) == rspec["counts"][k] else None for k in SUITES}
            return None if out["base_input"] is None else out
        if records[-1:] != [["done"]]:
            return None
        calls = []
        for rec in records[:-1]:
            if len(rec) != 4 or rec[0] != "call" or rec[1] not in rspec["names"]:
                return None
            try:
                args, kwargs = decode(rec[2]), decode(rec[3])
            except NotPlain:
                return None
            if type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
                return None
            calls.append([rec[1], canonical_text(args), canonical_text(kwargs)])
        return calls or None  # a test that calls nothing cannot tell solutions apart

    def reference_outputs(self, example: Example) -> bytes | None:
        """The trusted reference / record run's channel text for an example, computed once in the sandbox and
        cached in memory (parsed) and under ``$RLM_CACHE/code_reference`` (the text: JSON records, never
        unpickled); ``None`` when the reference itself fails (then nothing can pass)."""
        got = self._reference(example)
        return None if got is None else got[0]

    def _reference(self, example: Example, rspec: dict[str, Any] | None = None) -> tuple[bytes, Any] | None:
        """(channel text, parsed) of the reference run for ``example``; ``rspec``: its spec when the caller has
        it already (building one encodes every input)."""
        import hashlib

        rspec = rspec if rspec is not None else self._reference_spec(example)
        if rspec is None:
            return None
        script = REFERENCE_SCRIPT if rspec["kind"] == "io" else RECORD_SCRIPT
        text = json.dumps(rspec, sort_keys=True) + script  # a changed harness is a new cache entry
        key = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        if key in self._reference_cache:
            return self._reference_cache[key]
        from rlm.core.models.hf import cache_dir

        path = cache_dir() / "code_reference" / f"{key}.jsonl"
        data = path.read_bytes() if path.is_file() else None
        parsed = self._parse_reference(rspec, data) if data is not None else None
        if parsed is None or not _complete(parsed):
            res = self._run_reference(script, rspec)
            if res is None:
                return None  # the canonical solution itself failed here (limits): nothing can pass
            data, parsed = res
            if _complete(parsed):  # a suite cut short (limits) is retried by the next process, not cached
                _write_atomically(path, data)
        if len(data) <= self.config.memory_cache_mb * 2 ** 20:
            self._reference_cache[key] = (data, parsed)
        return data, parsed

    def _run_reference(self, script: str, rspec: dict[str, Any]) -> tuple[bytes, Any] | None:
        """(channel text, parsed) of a fresh reference run; io examples run one suite per sandbox run (base,
        then plus only when base completed), so a slow plus suite cannot cost the base verdicts."""
        from rlm.core.eval.sandbox import run_python

        if rspec["kind"] == "io":
            specs = [_one_suite(rspec, k) for k in SUITES if k == SUITES[0] or rspec["counts"][k]]
        else:
            specs = [rspec]
        data, parsed = b"", None
        for spec in specs:
            res = run_python(script, config=self.config.sandbox, files={"spec.json": json.dumps(spec)},
                             channel_bytes=max(1, int(self.config.channel_mb * 2 ** 20)))
            if not res.channel_overflow:
                data += _whole_lines(res.channel)
            parsed = self._parse_reference(rspec, data)
            if parsed is None:  # base did not complete: plus is not run
                return None
        return data, parsed

    def _io_verdicts(self, example: Example, solution: str) -> dict[str, bool] | None:
        """evalplus-style: the candidate's outputs on the base and plus inputs against the reference's. As in
        evalplus, each suite runs on its own (its own CPU budget) and plus runs only when base passed."""
        rspec = self._reference_spec(example)
        ref = self._reference(example, rspec)
        if ref is None:
            return None
        spec, (_, suites) = example.answer, ref
        ds, ep = spec.get("dataset"), spec["entry_point"]
        atol = spec.get("atol") or 0
        verdicts: dict[str, bool] = {}
        for k in SUITES:
            inputs = list(spec.get(k) or [])
            if suites[k] is None or (k != SUITES[0] and not verdicts[SUITES[0]]):
                verdicts[k] = False
                continue
            outputs: list[Any] = []
            if inputs:
                cspec = _one_suite({x: rspec[x] for x in ("entry_point", "not_none", "digest_bytes", *SUITES)}, k)
                cspec["limits"] = {k: suites[k][1]}
                records = self._run(CANDIDATE_SCRIPT, cspec, solution, sum(suites[k][1]) + OVERHEAD_SECONDS)
                outputs = [] if records is None else suite_values(records, k)[0]
            verdicts[k] = suite_passes(ds, ep, inputs, outputs, suites[k][0], atol)
        return verdicts

    def _canonical_verdicts(self, example: Example, solution: str) -> dict[str, bool] | None:
        """A ``gen`` program that is the canonical solution's text passes without a run of its own: the
        reference outputs are that program's outputs on the same inputs (its functions are pure, with integer and
        list values). Decided here, outside the sandbox, from the text alone; the reference still runs once, and
        if it failed nothing passes. Any other program (``None``) runs."""
        spec = example.answer
        if spec.get("dataset") != "gen" or solution.strip() != (spec.get("canonical") or "").strip():
            return None
        if self._reference(example, self._reference_spec(example)) is None:
            return {k: False for k in SUITES}
        return {k: True for k in SUITES}

    def _test_verdict(self, example: Example, solution: str) -> bool:
        """Test programs: the candidate's outputs on the recorded calls, replayed through the test (trusted)."""
        rspec = self._reference_spec(example)
        ref = self._reference(example, rspec)
        if ref is None:
            return False
        calls = ref[1]
        timeout = float(self.config.program_timeout)
        records = self._run(CALLS_SCRIPT, {"calls": calls, "timeout": timeout, "digest_bytes": self._digest_bytes()},
                            solution, timeout + OVERHEAD_SECONDS)
        if records is None:
            return False
        outs = suite_values(records, "call")[0]
        if len(outs) != len(calls):
            return False
        replay = {k: rspec[k] for k in ("canonical", "test", "names", "timeout", "digest_bytes")}
        replay.update(calls=calls, outputs=[canonical_text(v) for v in outs])
        return self._run(REPLAY_SCRIPT, replay) == [["pass"]]

    def _verdict_key(self, example: Example, completion: str) -> str:
        c = self.config
        limits = [c.sandbox.model_dump(), c.program_timeout, c.min_time_limit, c.time_limit_factor, c.digest_mb,
                  c.channel_mb, CACHE_VERSION]
        text = json.dumps([example.prompt, example.answer, completion, limits], sort_keys=True, default=repr)
        return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        """``{"pass_base", "pass_plus"}`` for evalplus-style examples, else ``{"pass"}``; never raises. The
        same path serves evaluation (``rlm score`` / ``rlm eval``) and RL rewards (``CodeTask.reward``). A pair
        judged before in this process (under the same limits) gets that verdict without running again
        (``verdict_cache`` entries are kept)."""
        size = int(self.config.verdict_cache)
        key = self._verdict_key(example, completion) if size > 0 and isinstance(completion, str) else None
        if key is not None:
            with _VERDICTS_LOCK:
                hit = _VERDICTS.get(key)
                if hit is not None:
                    _VERDICTS.move_to_end(key)
                    return dict(hit)
        verdict = self._judge(example, completion)
        if key is not None:
            with _VERDICTS_LOCK:
                _VERDICTS[key] = dict(verdict)
                while len(_VERDICTS) > size:
                    _VERDICTS.popitem(last=False)
        return verdict

    def _judge(self, example: Example, completion: str) -> dict[str, Any]:
        plus = has_plus(example)
        fail = {"pass_base": 0.0, "pass_plus": 0.0} if plus else {"pass": 0.0}
        if not isinstance(completion, str) or not completion.strip() or not isinstance(example.answer, dict):
            return fail
        try:
            solution = build_solution(example, completion)
            if example.answer["kind"] != "io":
                return {"pass": float(self._test_verdict(example, solution))}
            v = self._canonical_verdicts(example, solution) or self._io_verdicts(example, solution)
        except Exception:  # noqa: BLE001 - never raise on a completion
            return fail
        if v is None:
            return fail
        base = float(v["base_input"])
        if plus:
            return {"pass_base": base, "pass_plus": float(base == 1.0 and v["plus_input"])}
        return {"pass": base}


def score_in_parallel(score: Callable[[Example, str], dict[str, Any]], examples: list[Example],
                      completions: list[str], *, workers: int, progress: bool = False) -> list[dict[str, Any]]:
    """``score(example, completion)`` for every pair on ``workers`` threads (each sandbox run is a process),
    in input order, with a progress bar. A pair repeated in the batch (the same example id, prompt and
    completion: an RL group's identical samples, pass@k's repeats) runs once and every copy gets its verdict."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from rlm.core.io.progress import progress_bar

    first: dict[tuple[str, str, str], int] = {}
    source = [first.setdefault((str(e.id), str(e.prompt), c), i)
              for i, (e, c) in enumerate(zip(examples, completions))]
    unique = sorted(set(source))
    scored: dict[int, dict[str, Any]] = {}
    with progress_bar(len(unique), progress, "testing") as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futs = {pool.submit(score, examples[i], completions[i]): i for i in unique}
        for f in as_completed(futs):
            scored[futs[f]] = f.result()
            bar.advance(1)
    return [scored[i] if i == j else dict(scored[j]) for i, j in enumerate(source)]
