"""Verifier of the ``puzzle`` task: the roles a completion states, and whether every one is right."""

from __future__ import annotations

import re
from typing import Any, Sequence


def parse_answer(text: Any, names: Sequence[str]) -> dict[str, str]:
    """Map name -> "knight"/"knave" read from a completion: the part after the last "ANSWER" marker if
    there is one (else the whole text), the last role stated for each name. Never raises."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        text = str(text or "")[-20000:]
        marks = [m.end() for m in re.finditer(r"answer\s*[:：]", text, flags=re.IGNORECASE)]
        part = text[marks[-1]:] if marks else text
        out: dict[str, str] = {}
        for nm in names:
            pat = (rf"\b{re.escape(nm)}\b\W{{0,3}}(?:is|was|are|:|=|-|–|—)?\s*(?:an?\s+|the\s+)?"
                   r"(?:\*\*)?(knights?|knaves?)\b")
            found = re.findall(pat, part, flags=re.IGNORECASE)
            if found:
                out[nm] = "knight" if found[-1].lower().startswith("knight") else "knave"
        return out
    except Exception:
        return {}


def is_correct(text: Any, solution: dict[str, str]) -> bool:
    """True only when every person's role is stated and right."""
    try:
        got = parse_answer(text, list(solution))
        return bool(solution) and all(got.get(nm) == role for nm, role in solution.items())
    except Exception:
        return False
