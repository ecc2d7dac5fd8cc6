"""Readers of the ``rank`` task's data: NevIR pairs (two pairwise examples each) and Rank1-format pointwise
relevance data (query, passage, relevance true/false, optional reasoning), which becomes "is this passage
relevant?" examples answered true or false."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError
from rlm.core.io.records import numbered_records, record_field
from rlm.plugins.tasks.rank.prompts import pair_examples, point_prompt


def load_nevir(source: str | Path, *, split: str = "test", seed: int = 0) -> list[dict[str, Any]]:
    """NevIR rows (``q1``, ``q2``, ``doc1``, ``doc2``, optional ``id``) -> pairwise examples."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i, (loc, row) in enumerate(numbered_records(source, split)):
        q1 = record_field(row, ("q1", "query1", "query_1"), loc)
        q2 = record_field(row, ("q2", "query2", "query_2"), loc)
        d1 = record_field(row, ("doc1", "passage1", "doc_1", "document1"), loc)
        d2 = record_field(row, ("doc2", "passage2", "doc_2", "document2"), loc)
        pid = str(row.get("id", i))
        out += pair_examples(f"nevir-{pid}", q1, q2, d1, d2, rng)
    return out


_LABEL_TRUE = {"true", "1", "yes", "relevant", "positive"}
_LABEL_FALSE = {"false", "0", "no", "irrelevant", "not relevant", "negative"}


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, str):
        v = value.strip().lower()
        tail = re.findall(r"(true|false)\s*\W*$", v.split("</think>")[-1])
        if v in _LABEL_TRUE or (tail and tail[-1] == "true"):
            return True
        if v in _LABEL_FALSE or (tail and tail[-1] == "false"):
            return False
    raise RlmError(f"{where}: cannot read a relevance label from {str(value)[:60]!r}")


def load_rank1(source: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """Rank1-format rows (``query``, ``passage``/``doc``/``text``, a label ``answer``/``label``/``relevance``
    or a ``generated`` response ending in true/false, optional ``reasoning``) -> pointwise examples."""
    out = []
    for i, (loc, row) in enumerate(numbered_records(source, split)):
        query = record_field(row, ("query", "question", "q"), loc)
        passage = record_field(row, ("passage", "doc", "document", "text", "doc_text", "passage_text"), loc)
        raw = next((row[k] for k in ("answer", "label", "relevance", "relevant", "generated", "response")
                    if row.get(k) is not None), None)
        if raw is None:
            raise RlmError(f"{loc}: missing relevance label ('answer', 'label', 'relevance' or 'generated')")
        label = _label(raw, loc)
        reasoning = row.get("reasoning") or row.get("thinking")
        if not isinstance(reasoning, str) and isinstance(row.get("generated"), str):
            m = re.search(r"<think>(.*?)</think>", row["generated"], flags=re.DOTALL)
            reasoning = m.group(1).strip() if m else None
        ref = (f"{reasoning.strip()}\n" if isinstance(reasoning, str) and reasoning.strip() else "") + \
              f"ANSWER: {'true' if label else 'false'}"
        rid = str(row.get("id", f"{row.get('query_id', i)}-{row.get('doc_id', i)}"))
        out.append({"id": f"rank1-{rid}", "prompt": point_prompt(query, passage), "answer": label,
                    "reference": ref, "pair": None, "query": None})
    return out

