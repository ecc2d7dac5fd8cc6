"""Prompts of the ``rank`` task: the pairwise question ("which passage is relevant?"), the pointwise one ("is
this passage relevant?"), and the two pairwise examples of a negation pair.

A negation pair is two queries (q1, q2) and two passages (p1, p2) that differ mostly by a negation; q1's
relevant passage is p1 and q2's is p2. rlm asks the model, for each query, which of the two passages is
relevant (the pairwise form of "rank the two passages"); both queries of a pair see the passages in the same
order, so a model that ignores the query gets paired accuracy 0.
"""

from __future__ import annotations

import random
from typing import Any

PAIR_FORMAT = ("Which passage is relevant to the query? Think it through, then end with one line "
               "\"ANSWER: A\" or \"ANSWER: B\".")
POINT_FORMAT = ("Is the passage relevant to the query? Think it through, then end with one line "
                "\"ANSWER: true\" or \"ANSWER: false\".")


def pair_prompt(query: str, passage_a: str, passage_b: str) -> str:
    return f"Query: {query}\n\nPassage A: {passage_a}\n\nPassage B: {passage_b}\n\n{PAIR_FORMAT}"


def point_prompt(query: str, passage: str) -> str:
    return f"Query: {query}\n\nPassage: {passage}\n\n{POINT_FORMAT}"


def pair_examples(pair_id: str, q1: str, q2: str, p1: str, p2: str, rng: random.Random | None,
                  explain: tuple[str, str, str, str] | None = None, *,
                  swap: bool | None = None) -> list[dict[str, Any]]:
    """Two pairwise examples (one per query) with the passages in one shared order, drawn from ``rng`` unless
    ``swap`` gives it (True: p2 first). ``explain`` = (what q1 asks for, what q2 asks for, what p1 claims, what
    p2 claims) adds references."""
    if swap is None:
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

