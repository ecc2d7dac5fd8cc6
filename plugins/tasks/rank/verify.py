"""Verifier and scoring of the ``rank`` task: the answer a completion gives ("A"/"B" or true/false) and
NevIR's **paired accuracy** (a pair counts only when both of its queries put their own passage first)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    return x if isinstance(x, str) else ("" if x is None else str(x))


def parse_choice(completion: Any) -> str | None:
    """"A" or "B" from the last "ANSWER:" line (or a bare "A"/"B" reply); ``None`` if absent. Never raises."""
    try:
        text = _text(completion)[-20000:]
        marks = list(re.finditer(r"(?i:answer)\s*(?:(?i:is)\s*[:：]?|[:：])\s*\**\s*(?:(?i:passage)\s+)?"
                                 r"\(?([AB12])\b", text))
        if marks:
            return {"A": "A", "B": "B", "1": "A", "2": "B"}[marks[-1].group(1).upper()]
        m = re.fullmatch(r"\s*(?:passage\s+)?\(?([AB])\)?\.?\s*", text, flags=re.IGNORECASE)
        return m.group(1).upper() if m else None
    except Exception:
        return None


def parse_bool(completion: Any) -> bool | None:
    """True/False from the last "ANSWER:" line, or a reply that is just true/false/yes/no. Never raises."""
    try:
        text = _text(completion)[-20000:]
        words = r"(true|false|yes|no|relevant|not relevant|irrelevant)"
        marks = list(re.finditer(r"answer\s*[:：]\s*\**\s*" + words + r"\b", text, flags=re.IGNORECASE))
        if marks:
            word = marks[-1].group(1).lower()
        else:
            m = re.fullmatch(r"\s*(?:</think>\s*)?" + words + r"\.?\s*", text.split("</think>")[-1],
                             flags=re.IGNORECASE)
            if not m:
                return None
            word = m.group(1).lower()
        return word in ("true", "yes", "relevant")
    except Exception:
        return None


def paired_accuracy(records: Iterable[tuple[Any, bool]]) -> tuple[float, int]:
    """``records``: (pair id, this query ranked its own passage first). Returns (paired accuracy, number of
    complete pairs); a pair counts only if it has two queries and both are right; incomplete pairs (e.g. cut
    by a limit) are left out."""
    pairs: dict[Any, list[bool]] = defaultdict(list)
    for pid, ok in records:
        pairs[pid].append(bool(ok))
    complete = [v for v in pairs.values() if len(v) == 2]
    return (sum(all(v) for v in complete) / len(complete) if complete else 0.0), len(complete)

