"""Readers of the ``instruction_following`` task's data: IFEval / IFBench format, and Tulu-3 / RLVR-IF formats
(with open-instruct's RLVR-IF ground truth mapped to IFEval registry ids), as normalised rows (``key``,
``prompt``, ``instruction_id_list``, ``kwargs``, ``reference``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError
from rlm.core.io.records import numbered_records, record_field

# --------------------------------------------------------------------------------------------------------
# RLVR-IF (open-instruct style ``{"func_name": ..., ...}``) ground truth -> IFEval registry ids
# --------------------------------------------------------------------------------------------------------
# func_name -> (IFEval id, {their kwarg: IFEval kwarg}); quantifiers are mapped below. Only functions whose
# IFEval checker has the same meaning are listed; anything else is kept as an unsupported id "rlvr:<name>".
RLVR_FUNCTIONS: dict[str, tuple[str, dict[str, str]]] = {
    "verify_keywords": ("keywords:existence", {"keyword_list": "keywords"}),
    "validate_forbidden_words": ("keywords:forbidden_words", {"forbidden_words": "forbidden_words"}),
    "validate_response_language": ("language:response_language", {"language": "language"}),
    "verify_paragraph_count": ("length_constraints:number_paragraphs", {"N": "num_paragraphs"}),
    "validate_word_constraint": ("length_constraints:number_words", {"N": "num_words", "quantifier": "relation"}),
    "verify_sentence_constraint": ("length_constraints:number_sentences",
                                   {"N": "num_sentences", "quantifier": "relation"}),
    "validate_paragraphs": ("length_constraints:nth_paragraph_first_word",
                            {"N": "num_paragraphs", "i": "nth_paragraph", "first_word": "first_word"}),
    "verify_postscript": ("detectable_content:postscript", {"postscript_marker": "postscript_marker"}),
    "validate_placeholders": ("detectable_content:number_placeholders", {"N": "num_placeholders"}),
    "verify_bullet_points": ("detectable_format:number_bullet_lists", {"N": "num_bullets"}),
    "validate_title": ("detectable_format:title", {}),
    "validate_highlighted_sections": ("detectable_format:number_highlighted_sections", {"N": "num_highlights"}),
    "validate_sections": ("detectable_format:multiple_sections",
                          {"N": "num_sections", "section_splitter": "section_spliter"}),
    "validate_json_format": ("detectable_format:json_format", {}),
    "validate_repeat_prompt": ("combination:repeat_prompt", {"original_prompt": "prompt_to_repeat"}),
    "validate_two_responses": ("combination:two_responses", {}),
    "validate_uppercase": ("change_case:english_capital", {}),
    "validate_lowercase": ("change_case:english_lowercase", {}),
    "validate_frequency_capital_words": ("change_case:capital_word_frequency",
                                         {"N": "capital_frequency", "quantifier": "capital_relation"}),
    "validate_end": ("startend:end_checker", {"end_phrase": "end_phrase"}),
    "validate_quotation": ("startend:quotation", {}),
    "validate_no_commas": ("punctuation:no_comma", {}),
}
_COUNT_KEYS = {"num_words", "num_sentences", "capital_frequency"}


def rlvr_to_ifeval(gt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Map one open-instruct RLVR-IF ground truth to (IFEval id, kwargs); unknown ones to ``rlvr:<name>``."""
    name = str(gt.get("func_name", ""))
    args = {k: v for k, v in gt.items() if k != "func_name" and v is not None}
    spec = RLVR_FUNCTIONS.get(name)
    if spec is None or any(k not in spec[1] for k in args):
        return f"rlvr:{name}", args
    iid, rename = spec
    kw = {rename[k]: v for k, v in args.items()}
    for rel_key in ("relation", "capital_relation"):
        if rel_key in kw:
            rel = str(kw[rel_key]).strip().lower()
            count_key = next((k for k in kw if k in _COUNT_KEYS), None)
            if rel in ("at least", "less than"):
                kw[rel_key] = rel
            elif rel == "at most" and count_key is not None:
                kw[rel_key], kw[count_key] = "less than", int(kw[count_key]) + 1
            else:
                return f"rlvr:{name}", args
    return iid, kw


# --------------------------------------------------------------------------------------------------------
# loaders: IFEval / IFBench format, RLVR-IF and Tulu-3 IF formats -> normalised rows
# --------------------------------------------------------------------------------------------------------
def _kwargs_list(value: Any, n: int, where: str) -> list[dict[str, Any]]:
    if value is None:
        return [{} for _ in range(n)]
    if not isinstance(value, list) or len(value) != n or not all(isinstance(k, (dict, type(None))) for k in value):
        raise RlmError(f"{where}: 'kwargs' must be a list of {n} objects (one per instruction id)")
    return [{k: v for k, v in (kw or {}).items() if v is not None} for kw in value]


def ifeval_row(row: dict[str, Any], where: str, index: int = 0) -> dict[str, Any]:
    """One IFEval/IFBench-format record (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) checked and
    normalised (null kwargs dropped, as lm-eval drops them before ``build_description``)."""
    prompt = record_field(row, ("prompt",), where)
    ids = record_field(row, ("instruction_id_list",), where, list)
    if not all(isinstance(i, str) for i in ids):
        raise RlmError(f"{where}: 'instruction_id_list' must be a list of strings")
    kwargs = _kwargs_list(row.get("kwargs"), len(ids), where)
    key = row.get("key", row.get("id", index))
    return {"key": str(key), "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs,
            "reference": row.get("response") if isinstance(row.get("response"), str) else None}


def _parse_literal(text: str, where: str) -> Any:
    import ast
    import json

    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise RlmError(f"{where}: 'ground_truth' is neither JSON nor a Python literal") from None


def _ground_truth(gt: Any, where: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Instruction ids and kwargs from an RLVR-IF ``ground_truth`` (string or parsed, one dict or a list)."""
    if isinstance(gt, str):
        gt = _parse_literal(gt, where)
    items = gt if isinstance(gt, list) else [gt]
    ids: list[str] = []
    kws: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            sub_ids, sub_kws = _ground_truth(item, where)
            ids += sub_ids
            kws += sub_kws
        elif isinstance(item, dict) and "func_name" in item:
            iid, kw = rlvr_to_ifeval(item)
            ids.append(iid)
            kws.append(kw)
        elif isinstance(item, dict) and ("instruction_id" in item or "instruction_id_list" in item):
            sub = item.get("instruction_id", item.get("instruction_id_list"))
            sub = sub if isinstance(sub, list) else [sub]
            ids += [str(i) for i in sub]
            kws += _kwargs_list(item.get("kwargs"), len(sub), where)
        else:
            raise RlmError(f"{where}: unrecognised ground_truth item {str(item)[:80]!r}")
    return ids, kws


def rlvr_row(row: dict[str, Any], where: str, index: int = 0) -> dict[str, Any]:
    """One Tulu-3 / RLVR-IF record. Accepted shapes: IFEval format; ``messages`` (or ``prompt``) with a
    ``ground_truth`` (open-instruct ``{"func_name": ...}``, or ``[{"instruction_id": [...], "kwargs": [...]}]``);
    or Tulu-3 SFT rows (``messages`` with an assistant turn, ``constraints`` in words): SFT only, no
    verifiable ids."""
    if "instruction_id_list" in row:
        return ifeval_row(row, where, index)
    msgs = row.get("messages")
    prompt = row.get("prompt")
    reference = None
    if isinstance(msgs, list):
        users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        assistants = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
        if prompt is None and users and isinstance(users[0], str):
            prompt = users[0]
        if assistants and isinstance(assistants[-1], str):
            reference = assistants[-1]
    if not isinstance(prompt, str):
        raise RlmError(f"{where}: no prompt (expected 'prompt' or a user turn in 'messages')")
    ids: list[str] = []
    kws: list[dict[str, Any]] = []
    if row.get("ground_truth") is not None:
        ids, kws = _ground_truth(row["ground_truth"], where)
    key = row.get("key", row.get("id", index))
    return {"key": str(key), "prompt": prompt, "instruction_id_list": ids, "kwargs": kws, "reference": reference}


def load(source: str | Path, fmt: str = "ifeval", *, split: str = "train") -> list[dict[str, Any]]:
    """Normalised rows of an IFEval/IFBench (``fmt="ifeval"``) or Tulu-3/RLVR-IF (``fmt="rlvr"``) source."""
    parse = ifeval_row if fmt == "ifeval" else rlvr_row
    return [parse(row, loc, i) for i, (loc, row) in enumerate(numbered_records(source, split))]
