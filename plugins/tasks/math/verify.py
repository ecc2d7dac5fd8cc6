"""Verifier and scoring of the ``math`` task: the answer formats a prompt asks for, the math-verify reward, and
GSM8K strict / flexible extraction with exact match as lm-evaluation-harness scores it.

Answer formats stated in the prompt: ``#### ANSWER`` on the last line (``"hash"``: generator, GSM8K) or
``\\boxed{ANSWER}`` (``"boxed"``: MATH-500, OpenMathInstruct-2); an example's ``meta["format"]`` says which.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from rlm.core.contracts import Example

HASH_FORMAT = ("Solve the problem step by step. Write the final answer as a number on the last line, "
               "in the form '#### ANSWER'.")
#: the ``gen`` subset's prompt when ``solution: answer`` (the reference is the final line alone)
ANSWER_FORMAT = "Write only the final answer as a number, in the form '#### ANSWER'."
BOXED_FORMAT = "Solve the problem step by step. Put the final answer in \\boxed{}."

# lm-eval gsm8k.yaml: the two filters and the exact_match normalisation (regexes removed, then lower-case)
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_RES = (",", r"\$", r"(?s).*#### ", r"\.$")
FALLBACK = "[invalid]"


# --------------------------------------------------------------------------------------------------------
# GSM8K extraction and exact match (lm-eval)
# --------------------------------------------------------------------------------------------------------
def extract_strict(text: str) -> str:
    """First ``#### N`` number, as lm-eval's strict-match filter (regex, group 0, take_first)."""
    found = STRICT_RE.findall(text if isinstance(text, str) else "")
    return found[0].strip() if found else FALLBACK


def extract_flexible(text: str) -> str:
    """Last number-like token, as lm-eval's flexible-extract filter (group_select -1, first non-empty group)."""
    found = FLEXIBLE_RE.findall(text if isinstance(text, str) else "")
    if not found:
        return FALLBACK
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else FALLBACK


def normalize_em(text: str) -> str:
    for pat in IGNORE_RES:
        text = re.sub(pat, "", text)
    return text.lower()


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_em(pred) == normalize_em(gold))


# --------------------------------------------------------------------------------------------------------
# the derivation of a generated problem
# --------------------------------------------------------------------------------------------------------
STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


def steps_match(steps: list[list[Any]], completion: str) -> bool:
    """True when the lines before the last ``####`` are exactly the derivation ``steps`` (``[left, op, right,
    result]`` rows): one ``a op b = c`` line per operation, in order, operands as the question gives them and
    each result right. Blank lines are ignored; any other line fails."""
    if not isinstance(completion, str) or "####" not in completion:
        return False
    lines = [ln for ln in completion.rsplit("####", 1)[0].splitlines() if ln.strip()]
    if len(lines) != len(steps):
        return False
    for line, (a, op, b, c) in zip(lines, steps):
        m = STEP_RE.match(line)
        if m is None or (int(m[1]), m[2], int(m[3]), int(m[4])) != (int(a), op, int(b), int(c)):
            return False
    return True


# --------------------------------------------------------------------------------------------------------
# math-verify reward
# --------------------------------------------------------------------------------------------------------
INT_RE = re.compile(r"-?(?:0|[1-9]\d{0,29})")  # canonical integers: the fast path below


def numeric_gold(ans: str) -> str:
    """A plain number without thousands separators (``1,000`` -> ``1000``); anything else unchanged."""
    s = str(ans).strip()
    return s.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", s) else s


def verify_answer(gold: str, completion: str, fmt: str, *, timeout_seconds: int, max_chars: int) -> float:
    """1.0 if math-verify finds the completion's answer equal to ``gold``, else 0.0; never raises.

    Only the last ``max_chars`` characters are parsed; for ``fmt == "hash"`` the first line after the last
    ``####`` (if any). The timeout applies on the main thread only (math-verify uses SIGALRM)."""
    try:
        from math_verify import parse, verify

        main = threading.current_thread() is threading.main_thread()
        t = timeout_seconds if main else None
        text = completion[-max_chars:]
        if fmt == "hash" and "####" in text:
            tail = text.rsplit("####", 1)[1].strip()
            text = tail.splitlines()[0] if tail else ""
        gold = numeric_gold(gold)
        if INT_RE.fullmatch(text.strip()) and INT_RE.fullmatch(gold):
            return float(int(text) == int(gold))  # what math-verify decides, 2 ms sooner
        pred = parse(text, parsing_timeout=t)
        g = parse(f"${gold}$", parsing_timeout=t)
        if not pred or not g:
            return 0.0
        return float(verify(g, pred, timeout_seconds=t))
    except BaseException as exc:  # noqa: BLE001 - the verifier never raises (timeouts included)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return 0.0


def score_answer(example: Example, completion: str, *, timeout_seconds: int, max_chars: int,
                 check_steps: bool = False) -> dict[str, Any]:
    """``accuracy`` (math-verify) and, for ``#### ANSWER`` examples, lm-eval's ``strict_match`` and
    ``flexible_extract`` exact match against the gold solution text. A generated steps example also gets
    ``steps_correct`` (:func:`steps_match`) and ``answer_accuracy`` (the final answer alone); with
    ``check_steps`` its ``accuracy`` requires both."""
    completion = completion if isinstance(completion, str) else ""
    fmt = example.meta.get("format", "hash")
    s: dict[str, Any] = {"accuracy": verify_answer(str(example.answer), completion, fmt,
                                                   timeout_seconds=timeout_seconds, max_chars=max_chars)}
    if example.meta.get("steps"):
        s["answer_accuracy"] = s["accuracy"]
        s["steps_correct"] = float(steps_match(example.meta["steps"], completion))
        if check_steps:
            s["accuracy"] = s["accuracy"] * s["steps_correct"]
    if fmt == "hash":
        gold = example.meta.get("gold_text") or f"#### {example.answer}"
        s["strict_match"] = exact_match(extract_strict(completion), gold)
        s["flexible_extract"] = exact_match(extract_flexible(completion), gold)
    return s
