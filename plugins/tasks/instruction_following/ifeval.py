"""IFEval scoring through lm-eval's IFEval instruction registry, offline, plus a verifiable-constraint generator.

Scoring calls lm-eval's own ``test_instruction_following_strict`` / ``_loose`` (``lm_eval.tasks.ifeval.utils``)
one instruction at a time, so results are those of lm-eval (and of the official IFEval scorer).

**Offline NLTK data**: :mod:`rlm.core.eval.nltk_data` (lm-eval's checkers need ``punkt_tab``).

**Unsupported instruction ids** (IFBench's 58 constraint types, unmapped RLVR-IF functions): they are kept
in the example and reported as ``None`` by :func:`check`; the reward and metrics count only supported
instructions (``unsupported="skip"``) or count them as not followed (``unsupported="fail"``); the number of
unsupported instructions and of prompts with none supported is reported in the metrics.
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlm.core.errors import RlmError
from rlm.core.eval.nltk_data import ensure_punkt_tab
from rlm.core.io.records import numbered_records, record_field

_LOCK = threading.RLock()
_REGISTRY: Any = None


def registry() -> Any:
    """lm-eval's ``instructions_registry`` module, imported after the offline punkt_tab is in place."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None:
            ensure_punkt_tab()
            from lm_eval.tasks.ifeval import instructions_registry

            _REGISTRY = instructions_registry
    return _REGISTRY


# --------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------
def _as_text(response: Any) -> str:
    if response is None:
        return ""
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    if not isinstance(response, str):
        response = str(response)
    # lone surrogates (from bad decoding) break langdetect/regex users downstream: replace them
    return response.encode("utf-8", errors="replace").decode("utf-8")


@contextlib.contextmanager
def _deterministic(seed: int = 0):
    """Fix the randomness some checkers use: ``build_description`` draws from the global ``random`` when a
    kwarg is invalid (IFEval key 1122 asks for the letter '#'), and langdetect reseeds from the OS on every
    call unless ``DetectorFactory.seed`` is set. The global ``random`` state is restored afterwards."""
    import langdetect

    with _LOCK:
        state = random.getstate()
        old_seed = langdetect.DetectorFactory.seed
        random.seed(seed)
        langdetect.DetectorFactory.seed = seed
        try:
            yield
        finally:
            random.setstate(state)
            langdetect.DetectorFactory.seed = old_seed


def check(prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any] | None],
          response: Any, *, loose: bool = False) -> list[bool | None]:
    """Per instruction: True (followed), False (not followed or the checker failed) or None (unsupported id).

    Never raises on a bad response; each supported instruction is checked exactly as lm-eval checks it.
    """
    reg = registry()
    from lm_eval.tasks.ifeval import utils as lm_utils

    text = _as_text(response)
    fn = lm_utils.test_instruction_following_loose if loose else lm_utils.test_instruction_following_strict
    out: list[bool | None] = []
    kwargs = list(kwargs) + [{}] * (len(instruction_ids) - len(kwargs))
    for iid, kw in zip(instruction_ids, kwargs):
        if iid not in reg.INSTRUCTION_DICT:
            out.append(None)
            continue
        inp = lm_utils.InputExample(key=0, instruction_id_list=[iid], prompt=prompt, kwargs=[dict(kw or {})])
        try:
            with _deterministic():
                res = fn(inp, text)
            out.append(bool(res.follow_instruction_list[0]))
        except Exception:  # a checker crashing on odd text counts as not followed
            out.append(False)
    return out


def _scored(flags: Sequence[bool | None], unsupported: str) -> list[bool]:
    """The flags that count: unsupported (``None``) ones left out under ``"skip"``, else counted as not followed."""
    return [bool(f) for f in flags if f is not None] if unsupported == "skip" else [bool(f) for f in flags]


def fraction_followed(flags: Sequence[bool | None], unsupported: str = "skip") -> float:
    """Reward: fraction of (supported) instructions followed; 0.0 when nothing can be scored."""
    vals = _scored(flags, unsupported)
    return sum(vals) / len(vals) if vals else 0.0


def aggregate(strict: Iterable[Sequence[bool | None]], loose: Iterable[Sequence[bool | None]],
              unsupported: str = "skip") -> dict[str, Any]:
    """IFEval metrics: prompt- and instruction-level accuracy, strict and loose (as lm-eval aggregates)."""
    result: dict[str, Any] = {}
    n_unsup = n_unscored = n_prompts = 0
    for mode, rows in (("strict", list(strict)), ("loose", list(loose))):
        prompt_ok: list[bool] = []
        inst_ok: list[bool] = []
        unsup = unscored = 0
        for flags in rows:
            unsup += sum(f is None for f in flags)
            vals = _scored(flags, unsupported)
            if not vals:
                unscored += 1
                continue
            prompt_ok.append(all(vals))
            inst_ok.extend(vals)
        result[f"prompt_level_{mode}_acc"] = sum(prompt_ok) / len(prompt_ok) if prompt_ok else 0.0
        result[f"inst_level_{mode}_acc"] = sum(inst_ok) / len(inst_ok) if inst_ok else 0.0
        n_unsup, n_unscored, n_prompts = unsup, unscored, len(rows)
    result["n_unsupported_instructions"] = n_unsup
    result["n_unscored_prompts"] = n_unscored
    result["n"] = n_prompts
    return result


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


# --------------------------------------------------------------------------------------------------------
# generator: a topic prompt plus 1-3 verifiable constraints, and a reference response that meets them
# --------------------------------------------------------------------------------------------------------
TOPICS = ("the water cycle", "honey bees", "the history of bicycles", "volcanoes", "learning a new language",
          "city gardens", "the moon", "public libraries", "recycling plastic", "the first computers",
          "sleep and memory", "coral reefs", "trains in winter", "the printing press", "desert plants",
          "rainforests", "chess openings", "the human heart", "wind energy", "ancient maps",
          "healthy breakfasts", "deep sea fish", "mountain hiking", "the invention of paper", "bird migration",
          "solar eclipses", "small businesses", "jazz music", "glaciers", "the internet")
TEMPLATES = ("Write a short essay about {t}.", "Explain {t} to a curious teenager.",
             "Write a blog post about {t}.", "Describe {t} for a school newsletter.",
             "Give an overview of {t}.", "Write a brief report on {t}.")
_SENTENCES = ("{T} is a subject that many people find interesting.",
              "There are several facts about {t} that are worth knowing.",
              "Scientists and writers have studied {t} for a long time.",
              "One useful way to think about {t} is to look at small details.",
              "Many people learn about {t} at school or from books.",
              "The story of {t} shows how the world keeps changing.",
              "It is easy to see why {t} matters in daily life.",
              "Learning more about {t} can be fun and rewarding.",
              "Some questions about {t} still have no final answer.",
              "Anyone can explore {t} with a little patience.")
_WORDS = ("river", "lantern", "harvest", "compass", "meadow", "signal", "window", "garden", "pocket", "thunder",
          "marble", "ladder", "orbit", "canyon", "feather", "puzzle", "candle", "harbor", "velvet", "anchor")
_ENDINGS = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
            "Any other questions?")

# constraint ids the generator draws from (each has a builder below)
GENERATOR_IDS = ("punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital",
                 "startend:end_checker", "startend:quotation", "detectable_content:postscript",
                 "detectable_format:title", "keywords:existence", "keywords:forbidden_words",
                 "detectable_format:number_highlighted_sections", "detectable_format:number_bullet_lists",
                 "length_constraints:number_paragraphs", "detectable_content:number_placeholders",
                 "length_constraints:number_words", "keywords:letter_frequency", "keywords:frequency")


def _conflicts(a: str, b: str) -> bool:
    c = registry().INSTRUCTION_CONFLICTS
    return a == b or b in c.get(a, ()) or a in c.get(b, ())


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The registry's own description text for an instruction with these kwargs."""
    inst = registry().INSTRUCTION_DICT[instruction_id](instruction_id)
    return inst.build_description(**{k: v for k, v in kwargs.items() if v is not None})


def _build(ids: list[str], rng: random.Random, topic: str, n_sent: int) -> tuple[str, list[dict[str, Any]]]:
    """Build a response meeting all ``ids`` and the kwargs describing them (one per id, in order)."""
    sents = [s.format(t=topic, T=topic[0].upper() + topic[1:]) for s in rng.sample(_SENTENCES, n_sent)]
    kw: dict[str, dict[str, Any]] = {i: {} for i in ids}
    words = rng.sample(_WORDS, 6)
    if "keywords:existence" in kw:
        keys = words[:2]
        kw["keywords:existence"] = {"keywords": keys}
        sents.insert(1, f"It reminds me of the {keys[0]} and the {keys[1]}.")
    if "keywords:frequency" in kw:
        key, freq = words[2], rng.randint(2, 3)
        kw["keywords:frequency"] = {"keyword": key, "frequency": freq, "relation": "at least"}
        sents.extend(f"The word {key} appears here too." for _ in range(freq))
    if "keywords:forbidden_words" in kw:
        kw["keywords:forbidden_words"] = {"forbidden_words": words[4:6]}
    if "detectable_content:number_placeholders" in kw:
        n = rng.randint(1, 3)
        kw["detectable_content:number_placeholders"] = {"num_placeholders": n}
        sents.append("You can visit " + " or ".join(f"[place {i + 1}]" for i in range(n)) + ".")
    if "detectable_format:number_highlighted_sections" in kw:
        n = rng.randint(1, 3)
        kw["detectable_format:number_highlighted_sections"] = {"num_highlights": n}
        for i in range(n):
            sents[i] = f"*{sents[i]}*"
    if "detectable_format:number_bullet_lists" in kw:
        n = min(rng.randint(2, 5), len(sents))
        kw["detectable_format:number_bullet_lists"] = {"num_bullets": n}
        head, tail = sents[:-n], sents[-n:]
        blocks = [" ".join(head)] if head else []
        blocks.append("\n".join(f"* {s}" for s in tail))
        body = "\n\n".join(blocks)
    elif "length_constraints:number_paragraphs" in kw:
        n = rng.randint(2, min(4, len(sents)))
        kw["length_constraints:number_paragraphs"] = {"num_paragraphs": n}
        size = -(-len(sents) // n)
        paras = [" ".join(sents[i * size:(i + 1) * size]) for i in range(n)]
        paras = [p for p in paras if p]
        if len(paras) != n:
            paras = [" ".join(sents[:len(sents) - n + 1])] + sents[len(sents) - n + 1:]
        body = "\n\n***\n\n".join(paras)
    else:
        body = " ".join(sents)
    if "detectable_format:title" in kw:
        body = f"<<{topic.title()}>>\n\n{body}"
    if "detectable_content:postscript" in kw:
        marker = rng.choice(("P.S.", "P.P.S"))
        kw["detectable_content:postscript"] = {"postscript_marker": marker}
        body += f"\n\n{marker} Thank you for reading about {topic}."
    if "startend:end_checker" in kw:
        end = rng.choice(_ENDINGS)
        kw["startend:end_checker"] = {"end_phrase": end}
        body += f"\n\n{end}"
    if "punctuation:no_comma" in kw:
        body = body.replace(",", "")
    if "change_case:english_lowercase" in kw:
        body = body.lower()
    if "change_case:english_capital" in kw:
        body = body.upper()
    if "startend:quotation" in kw:
        body = f'"{body}"'
    if "length_constraints:number_words" in kw:
        n_words = len(re.findall(r"\w+", body))
        if rng.random() < 0.5:
            kw["length_constraints:number_words"] = {"relation": "at least", "num_words": max(5, n_words // 10 * 10)}
        else:
            kw["length_constraints:number_words"] = {"relation": "less than", "num_words": (n_words // 10 + 2) * 10}
    if "keywords:letter_frequency" in kw:
        letter = rng.choice("etaoinsrh")
        count = body.lower().count(letter)
        if rng.random() < 0.5 and count >= 2:
            kw["keywords:letter_frequency"] = {"letter": letter, "let_frequency": max(1, count // 2),
                                               "let_relation": "at least"}
        else:
            kw["keywords:letter_frequency"] = {"letter": letter, "let_frequency": count + rng.randint(3, 10),
                                               "let_relation": "less than"}
    return body, [kw[i] for i in ids]


def generate(n: int, seed: int = 0, min_constraints: int = 1, max_constraints: int = 3,
             min_sentences: int = 4, max_sentences: int = 7, max_tries: int = 50) -> list[dict[str, Any]]:
    """``n`` IFEval-format rows (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) plus ``reference``,
    a response that the registry's strict checker accepts for every constraint (checked here; rows whose
    reference fails are redrawn)."""
    if not 1 <= min_constraints <= max_constraints:
        raise RlmError(f"need 1 <= min_constraints <= max_constraints, got {min_constraints}, {max_constraints}")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for idx in range(n):
        for _ in range(max_tries):
            k = rng.randint(min_constraints, max_constraints)
            ids: list[str] = []
            for cand in rng.sample(GENERATOR_IDS, len(GENERATOR_IDS)):
                if len(ids) == k:
                    break
                if not any(_conflicts(cand, other) for other in ids):
                    ids.append(cand)
            topic = rng.choice(TOPICS)
            task = rng.choice(TEMPLATES).format(t=topic)
            reference, kwargs = _build(ids, rng, topic, rng.randint(min_sentences, max_sentences))
            prompt = " ".join([task] + [describe(i, kw) for i, kw in zip(ids, kwargs)])
            if all(check(prompt, ids, kwargs, reference)):
                rows.append({"key": f"gen-{seed}-{idx}", "prompt": prompt, "instruction_id_list": ids,
                             "kwargs": kwargs, "reference": reference})
                break
        else:  # pragma: no cover - the builders are designed to succeed
            raise RlmError(f"could not generate a consistent constraint example after {max_tries} tries")
    return rows
