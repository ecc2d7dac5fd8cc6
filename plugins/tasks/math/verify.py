"""Engine of the ``math`` task: a seeded arithmetic generator, loaders for GSM8K, MATH-500 and
OpenMathInstruct-2, the math-verify reward, and GSM8K strict / flexible extraction as lm-evaluation-harness
scores it.

Answer formats stated in the prompt: ``#### ANSWER`` on the last line (``"hash"``: generator, GSM8K) or
``\\boxed{ANSWER}`` (``"boxed"``: MATH-500, OpenMathInstruct-2); an example's ``meta["format"]`` says which.
"""

from __future__ import annotations

import random
import re
import threading
from typing import Any

from rlm.core.contracts import Example
from rlm.core.io.records import load_records, require_fields, shared_data_file

HASH_FORMAT = ("Solve the problem step by step. Write the final answer as a number on the last line, "
               "in the form '#### ANSWER'.")
BOXED_FORMAT = "Solve the problem step by step. Put the final answer in \\boxed{}."

# lm-eval gsm8k.yaml: the two filters and the exact_match normalisation (regexes removed, then lower-case)
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE_RES = (",", r"\$", r"(?s).*#### ", r"\.$")
FALLBACK = "[invalid]"
CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations, removed from reference solutions


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
# math-verify reward
# --------------------------------------------------------------------------------------------------------
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
        pred = parse(text, parsing_timeout=t)
        g = parse(f"${numeric_gold(gold)}$", parsing_timeout=t)
        if not pred or not g:
            return 0.0
        return float(verify(g, pred, timeout_seconds=t))
    except BaseException as exc:  # noqa: BLE001 - the verifier never raises (timeouts included)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return 0.0


def score_answer(example: Example, completion: str, *, timeout_seconds: int, max_chars: int) -> dict[str, Any]:
    """``accuracy`` (math-verify) and, for ``#### ANSWER`` examples, lm-eval's ``strict_match`` and
    ``flexible_extract`` exact match against the gold solution text."""
    completion = completion if isinstance(completion, str) else ""
    fmt = example.meta.get("format", "hash")
    s: dict[str, Any] = {"accuracy": verify_answer(str(example.answer), completion, fmt,
                                                   timeout_seconds=timeout_seconds, max_chars=max_chars)}
    if fmt == "hash":
        gold = example.meta.get("gold_text") or f"#### {example.answer}"
        s["strict_match"] = exact_match(extract_strict(completion), gold)
        s["flexible_extract"] = exact_match(extract_flexible(completion), gold)
    return s


# --------------------------------------------------------------------------------------------------------
# data: generator and loaders
# --------------------------------------------------------------------------------------------------------
def generate_arithmetic(n: int, *, seed: int = 0, split: str = "train", min_ops: int = 1, max_ops: int = 1,
                        min_operand: int = 0, max_operand: int = 9, operators: str = "+") -> list[Example]:
    """``n`` arithmetic problems; each applies ``min_ops..max_ops`` operators (drawn from ``operators``, any of
    ``+-*``) left to right on operands in ``min_operand..max_operand``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(min_ops, max_ops)
        value = rng.randint(min_operand, max_operand)
        expr, steps = str(value), []
        for _ in range(k):
            op = rng.choice(operators)
            b = rng.randint(min_operand, max_operand)
            new = {"+": value + b, "-": value - b, "*": value * b}[op]
            steps.append(f"{value} {op} {b} = {new}")
            expr = f"({expr} {op} {b})" if len(steps) < k else f"{expr} {op} {b}"
            value = new
        out.append(Example(id=f"gen/{split}/{seed}/{i}", prompt=f"What is {expr}?\n\n{HASH_FORMAT}",
                           answer=str(value), reference="\n".join(steps) + f"\n#### {value}",
                           meta={"format": "hash", "ops": k}))
    return out


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
