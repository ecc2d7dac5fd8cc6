"""Readers of the ``math`` task's benchmark and training data: GSM8K, MATH-500 and OpenMathInstruct-2, each
row turned into an :class:`~rlm.core.contracts.Example` whose prompt states the answer format."""

from __future__ import annotations

import re

from rlm.core.contracts import Example
from rlm.core.io.records import load_records, require_fields, shared_data_file
from rlm.plugins.tasks.math.verify import BOXED_FORMAT, HASH_FORMAT

CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations, removed from reference solutions


def load_gsm8k(spec: str | None, split: str) -> list[Example]:
    """GSM8K (``question``, ``answer`` ending in ``#### N``); ``spec`` ``None``: ../shared/data, then the
    Hugging Face dataset ``openai/gsm8k``."""
    if spec is None:
        spec = shared_data_file(f"gsm8k_{split}.jsonl") or "openai/gsm8k:main"
    rows = load_records(spec, split=split, dir_patterns=("gsm8k_{split}.jsonl", "{split}.jsonl"))
    require_fields(rows, ("question", "answer"), str(spec))
    return [Example(id=f"gsm8k/{split}/{i}", prompt=f"{r['question']}\n\n{HASH_FORMAT}",
                    answer=r["answer"].split("####")[-1].strip(),
                    reference=CALC_RE.sub("", r["answer"]), meta={"format": "hash", "gold_text": r["answer"]})
            for i, r in enumerate(rows)]


def load_math500(spec: str) -> list[Example]:
    """MATH-500 (``problem``, ``answer``; ``solution``, ``level``, ``subject`` kept where present)."""
    rows = load_records(spec, split="test", dir_patterns=("test.jsonl", "math500.jsonl"))
    require_fields(rows, ("problem", "answer"), str(spec))
    return [Example(id=str(r.get("unique_id") or f"math500/{i}"), prompt=f"{r['problem']}\n\n{BOXED_FORMAT}",
                    answer=str(r["answer"]), reference=r.get("solution"),
                    meta={"format": "boxed", "level": r.get("level"), "subject": r.get("subject")})
            for i, r in enumerate(rows)]


def load_openmath(spec: str, split: str, limit: int | None = None) -> list[Example]:
    """OpenMathInstruct-2 (``problem``, ``expected_answer``; ``generated_solution`` as the reference)."""
    rows = load_records(spec, split=split, dir_patterns=("{split}.jsonl", "train.jsonl"), limit=limit)
    require_fields(rows, ("problem", "expected_answer"), str(spec))
    return [Example(id=f"openmath/{i}", prompt=f"{r['problem']}\n\n{BOXED_FORMAT}", answer=str(r["expected_answer"]),
                    reference=r.get("generated_solution"), meta={"format": "boxed"})
            for i, r in enumerate(rows)]
