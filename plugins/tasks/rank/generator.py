"""Offline generator of the ``rank`` task's ``generated`` subset: negation pairs about invented places and
things ("the Marrow lake freezes over every winter" / "does not freeze over"), each as two pairwise examples
with reference responses.

Two styles of reference (``reasoning``):

- ``claims``: restate what the query asks for and what each passage claims, then name the passage that matches
  ("The query asks for a lake that ... Passage A says that ..., while Passage B says that ... Only Passage A
  matches the query, negation included.");
- ``compare``: copy the query's predicate and Passage A's, say whether the two are the same, and answer A if they
  are and B if not. Each step looks at a few tokens just written, and the response is about a third as long.
"""

from __future__ import annotations

import random
from typing import Any

from rlm.core.contracts import draw_distinct
from rlm.plugins.tasks.rank.prompts import pair_examples

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


REASONING = ("claims", "compare")


def compare_reference(query_pred: str, passage_a_pred: str) -> str:
    """The ``compare`` reference: the query's predicate, Passage A's, whether they are the same, the answer."""
    same = query_pred == passage_a_pred
    return (f"Query: {query_pred}.\nPassage A: {passage_a_pred}.\nSame: {'yes' if same else 'no'}.\n"
            f"ANSWER: {'A' if same else 'B'}")


def generate_pairs(n_pairs: int, seed: int = 0, *, distinct: bool = False,
                   reasoning: str = "claims") -> list[dict[str, Any]]:
    """``n_pairs`` negation pairs as pairwise examples (two per pair), each with a reference response in the
    style ``reasoning`` (module docstring). ``distinct``: no pair (subject, query form and passage order)
    repeats while the space allows (12 kinds x 5 names x 3 forms x 2 orders = 360 pairs, 720 prompts)."""
    if reasoning not in REASONING:
        raise ValueError(f"rank: reasoning must be one of {', '.join(REASONING)}, not {reasoning!r}")
    rng = random.Random(seed)

    def draw() -> tuple[tuple, str, str, bool]:
        fact = rng.choice(FACTS)
        name, form = rng.choice(fact[1]), rng.choice(QUERY_FORMS)
        return fact, name, form, rng.random() < 0.5  # the order pair_examples would draw

    drawn = draw_distinct(n_pairs, draw, key=lambda d: (d[0][0], *d[1:])) if distinct else \
        [draw() for _ in range(n_pairs)]
    out: list[dict[str, Any]] = []
    for i, ((kind, _, pos, neg, filler), name, form, swap) in enumerate(drawn):
        subject = f"The {name} {kind}" if kind not in ("plant", "medicine") else f"The {kind} {name}"
        q1, q2 = form.format(kind=kind, pred=pos), form.format(kind=kind, pred=neg)
        p1, p2 = f"{subject} {pos}. {filler}", f"{subject} {neg}. {filler}"
        subj = "t" + subject[1:]
        explain = (f"a {kind} that {pos}", f"a {kind} that {neg}", f"{subj} {pos}", f"{subj} {neg}")
        pair = pair_examples(f"gen-{seed}-{i}", q1, q2, p1, p2, None, explain if reasoning == "claims" else None,
                             swap=swap)
        if reasoning == "compare":
            for example, query_pred in zip(pair, (pos, neg)):
                example["reference"] = compare_reference(query_pred, neg if swap else pos)
        out += pair
    return out
