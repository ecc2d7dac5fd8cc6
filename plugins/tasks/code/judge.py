"""Judge of the ``code`` task: runs a completion's program in :mod:`rlm.core.eval.sandbox` and scores it as
evalplus does; the reported metric names; parallel scoring.

Judging (:class:`CodeJudge`) follows evalplus: expected outputs come from the canonical solution run on the
same (deep-copied) inputs in a sandboxed *reference run* (no candidate code present), which also records
per-input time limits ``max(min_time_limit, time_limit_factor x reference time)``; its pickled result is cached
(memory and ``$RLM_CACHE/code_reference``) and handed to every candidate run. Outputs match exactly, or within
``atol`` (1e-6 for float outputs when ``atol`` is 0; relative 1e-7) with the same type; evalplus's special
oracles for ``find_zero`` and the MBPP set-equality / not-None / ``are_equivalent`` / ``sum_div`` tasks.
``plus`` counts only when base and plus inputs all pass. MBPP+ stores tuples, sets and complex numbers as JSON
lists and strings; the harness restores their types from the literal arguments of the task's own
``assertion`` example. The completion may be a function body (appended to the prompt) or a full solution
(fenced or not): see :mod:`rlm.plugins.tasks.code.program`. The programs run in the sandbox are in
:mod:`rlm.plugins.tasks.code.harness`.

The verdict is printed with a random nonce sent on stdin before the candidate runs, so a program that exits
early or prints "pass" does not pass; code that introspects the harness's frames could still forge it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Callable

from rlm.core.contracts import Example
from rlm.plugins.tasks.code.harness import CANDIDATE_SCRIPT, PROGRAM_SCRIPT, REFERENCE_SCRIPT
from rlm.plugins.tasks.code.program import build_solution

#: per-example score keys -> reported metric names
METRIC_NAMES = {"pass_base": "pass@1_base", "pass_plus": "pass@1_plus", "pass": "pass@1"}


def has_plus(example: Example) -> bool:
    """Whether the example has evalplus base and plus suites (scored as ``pass_base`` / ``pass_plus``)."""
    a = example.answer if isinstance(example.answer, dict) else {}
    return a.get("kind") == "io" and a.get("dataset") in ("humaneval", "mbpp")


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


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so readers never see a part."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class CodeJudge:
    """Scores completions of code examples in the sandbox; keeps the in-memory reference-output cache.

    ``config`` is read when used (so later changes count) and needs: ``sandbox`` (a
    :class:`rlm.core.eval.sandbox.SandboxConfig`), ``program_timeout``, ``min_time_limit``, ``time_limit_factor``,
    ``memory_cache_mb`` and ``digest_mb`` (see the ``code`` task's config)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self._reference_cache: dict[str, bytes] = {}

    def _reference_spec(self, example: Example) -> str:
        """The reference run's ``spec.json``: the example's test spec and the time-limit and digest settings
        (its hash is the cache key)."""
        spec = example.answer
        keep = {k: spec.get(k) for k in ("dataset", "canonical", "entry_point", "atol", "base_input", "plus_input",
                                         "assertion")}
        keep.update(min_time=self.config.min_time_limit, factor=self.config.time_limit_factor,
                    digest_bytes=int(self.config.digest_mb * 2 ** 20))
        return json.dumps(keep, sort_keys=True)

    def reference_outputs(self, example: Example) -> bytes | None:
        """The canonical solution's (pickled) inputs, outputs and per-input time limits for an evalplus-style
        example, computed once in the sandbox and cached in memory and under ``$RLM_CACHE/code_reference``
        (the parent process only stores the bytes; they are unpickled inside the candidates' sandboxes)."""
        import hashlib

        text = self._reference_spec(example)
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
            _write_atomically(path, data)
        if len(data) <= self.config.memory_cache_mb * 2 ** 20:
            self._reference_cache[key] = data
        return data

    def _verdicts(self, example: Example, solution: str) -> dict[str, str] | None:
        """The sandbox's verdicts for ``solution``: an evalplus-style candidate run against the reference
        outputs (``None`` when the reference run failed), or the test program (``check`` / asserts) run."""
        spec = example.answer
        if spec["kind"] == "io":
            ref = self.reference_outputs(example)
            if ref is None:
                return None
            small = {k: spec.get(k) for k in ("dataset", "entry_point", "atol")}
            lines, _ = run_with_nonce(CANDIDATE_SCRIPT, {"spec.json": json.dumps(small), "expected.pkl": ref,
                                                         "solution.py": solution}, self.config.sandbox)
            return lines
        if spec["kind"] == "check":
            program = f"{solution}\n\n{spec['test']}\n\ncheck({spec['entry_point']})\n"
        else:
            program = solution + "\n\n" + "\n".join(spec.get("tests") or []) + "\n"
        script = PROGRAM_SCRIPT.replace("__TIMEOUT__", repr(float(self.config.program_timeout)))
        lines, _ = run_with_nonce(script, {"program.py": program}, self.config.sandbox)
        return lines

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        """``{"pass_base", "pass_plus"}`` for evalplus-style examples, else ``{"pass"}``; never raises."""
        plus = has_plus(example)
        fail = {"pass_base": 0.0, "pass_plus": 0.0} if plus else {"pass": 0.0}
        if not isinstance(completion, str) or not completion.strip() or not isinstance(example.answer, dict):
            return fail
        try:
            lines = self._verdicts(example, build_solution(example, completion))
        except Exception:  # noqa: BLE001 - never raise on a completion
            return fail
        if lines is None:
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
