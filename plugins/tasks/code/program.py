"""Completion -> program for the ``code`` task: the answer format its prompts ask for, the code a completion
holds, and the full program the judge runs (a full solution, or the prompt's code plus a function body)."""

from __future__ import annotations

import re

from rlm.core.contracts import Example

FORMAT = "Answer with the complete Python function in a ```python code block."
FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


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
