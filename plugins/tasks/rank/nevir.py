"""Negation-sensitive ranking: NevIR and Rank1-format loaders, a negation-pair generator, answer parsing and
NevIR's paired accuracy.

A NevIR pair is two queries (q1, q2) and two passages (p1, p2) that differ mostly by a negation; q1's relevant
passage is p1 and q2's is p2. rlm asks the model, for each query, which of the two passages is relevant (the
pairwise form of "rank the two passages"); both queries of a pair see the passages in the same order, so a
model that ignores the query gets paired accuracy 0. **Paired accuracy**: a pair counts only when both of
its queries put their own passage first.

Rank1-format data (pointwise: query, passage, relevance true/false, optional reasoning) becomes pointwise
examples: "is this passage relevant?" answered true or false.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from rlm.core.errors import RlmError
from rlm.core.io.records import numbered_records, record_field

PAIR_FORMAT = ("Which passage is relevant to the query? Think it through, then end with one line "
               "\"ANSWER: A\" or \"ANSWER: B\".")
POINT_FORMAT = ("Is the passage relevant to the query? Think it through, then end with one line "
                "\"ANSWER: true\" or \"ANSWER: false\".")


def pair_prompt(query: str, passage_a: str, passage_b: str) -> str:
    return f"Query: {query}\n\nPassage A: {passage_a}\n\nPassage B: {passage_b}\n\n{PAIR_FORMAT}"


def point_prompt(query: str, passage: str) -> str:
    return f"Query: {query}\n\nPassage: {passage}\n\n{POINT_FORMAT}"


# --------------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------
# pairs -> examples
# --------------------------------------------------------------------------------------------------------
def pair_examples(pair_id: str, q1: str, q2: str, p1: str, p2: str, rng: random.Random,
                  explain: tuple[str, str, str, str] | None = None) -> list[dict[str, Any]]:
    """Two pairwise examples (one per query) with the passages in one shared, randomly drawn order.
    ``explain`` = (what q1 asks for, what q2 asks for, what p1 claims, what p2 claims) adds references."""
    swap = rng.random() < 0.5
    a, b = (p2, p1) if swap else (p1, p2)
    own = {1: "B" if swap else "A", 2: "A" if swap else "B"}
    out = []
    for k, q in ((1, q1), (2, q2)):
        ref = None
        if explain is not None:
            claim_a, claim_b = (explain[3], explain[2]) if swap else (explain[2], explain[3])
            ref = (f"The query asks for {explain[k - 1]}. Passage A says that {claim_a}, while Passage B says "
                   f"that {claim_b}. Only Passage {own[k]} matches the query, negation included.\n"
                   f"ANSWER: {own[k]}")
        out.append({"id": f"{pair_id}-q{k}", "prompt": pair_prompt(q, a, b), "answer": own[k],
                    "reference": ref, "pair": pair_id, "query": k})
    return out


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


# --------------------------------------------------------------------------------------------------------
# generator
# --------------------------------------------------------------------------------------------------------
# (kind, names, positive predicate, negative predicate, filler about the subject)
FACTS = (
    ("lake", ("Marrow", "Silverpine", "Kettle", "Aldwin", "Brightwater"), "freezes over every winter",
     "does not freeze over in winter", "It lies in a wide valley and is popular with walkers."),
    ("bridge", ("Harlow", "Eastgate", "Corran", "Millbrook", "Tessel"), "allows cars to cross",
     "does not allow cars to cross", "It was built of stone more than a century ago."),
    ("museum", ("Orchard", "Vale", "Northfield", "Copperleaf", "Linden"), "charges an entry fee",
     "does not charge an entry fee", "Its collection covers local history and old tools."),
    ("bakery", ("Rosehill", "Fenwick", "Calder", "Moss Lane", "Greystone"), "opens on Sundays",
     "does not open on Sundays", "It is known for rye bread and small pastries."),
    ("train line", ("Westmoor", "Ashby", "Kingsford", "Redcliff", "Elm Valley"), "runs at night",
     "does not run at night", "It links several market towns along the coast."),
    ("plant", ("sun lily", "marsh fern", "rock clover", "dusk vine", "pale sedge"), "needs direct sunlight",
     "does not need direct sunlight", "Gardeners grow it in pots and borders."),
    ("school", ("Hollin", "Brackenridge", "Oakhurst", "Sutter", "Lowmere"), "requires uniforms",
     "does not require uniforms", "It teaches around four hundred pupils."),
    ("island", ("Skerra", "Illan", "Corvo Minor", "Tarrow", "Buna"), "has a ferry service",
     "does not have a ferry service", "Seabirds nest along its rocky shore."),
    ("library", ("Fairhaven", "Dunmore", "Pellworth", "Stanton", "Ivybridge"), "lends books to visitors",
     "does not lend books to visitors", "Its reading room has tall windows."),
    ("medicine", ("Cortalin", "Vexaprin", "Lumidol", "Serafen", "Oxtrel"), "is safe to take with food",
     "is not safe to take with food", "Doctors prescribe it for mild pain."),
    ("park", ("Birchwood", "Heron", "Kestrel", "Meadowbank", "Saltmarsh"), "allows dogs off the lead",
     "does not allow dogs off the lead", "It has a pond, a playground and a café."),
    ("mountain pass", ("Grisdale", "Torran", "Hallam", "Ravensgill", "Culver"), "stays open all year",
     "does not stay open all year", "Hikers use it to cross between two valleys."),
)
QUERY_FORMS = ("Which {kind} {pred}?", "a {kind} that {pred}", "find the {kind} which {pred}")


def generate_pairs(n_pairs: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n_pairs`` negation pairs as pairwise examples (two per pair), each with a reference response."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n_pairs):
        kind, names, pos, neg, filler = rng.choice(FACTS)
        name = rng.choice(names)
        subject = f"The {name} {kind}" if kind not in ("plant", "medicine") else f"The {kind} {name}"
        form = rng.choice(QUERY_FORMS)
        q1, q2 = form.format(kind=kind, pred=pos), form.format(kind=kind, pred=neg)
        p1, p2 = f"{subject} {pos}. {filler}", f"{subject} {neg}. {filler}"
        subj = "t" + subject[1:]
        explain = (f"a {kind} that {pos}", f"a {kind} that {neg}", f"{subj} {pos}", f"{subj} {neg}")
        out += pair_examples(f"gen-{seed}-{i}", q1, q2, p1, p2, rng, explain)
    return out
