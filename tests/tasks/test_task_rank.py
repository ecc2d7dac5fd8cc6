"""Rank: NevIR paired accuracy on hand-made cases, loaders from fixtures, the negation-pair generator."""

from __future__ import annotations

import json

import pytest

from rlm.core.contracts import Example
from rlm.core.errors import RlmError
from rlm.plugins.tasks.rank import Rank
from rlm.plugins.tasks.rank.verify import paired_accuracy, parse_choice

NEVIR_ROWS = [
    {"id": "1", "version": "1", "q1": "Which city has a subway?", "q2": "Which city does not have a subway?",
     "doc1": "Arden has a subway that runs all night.", "doc2": "Arden does not have a subway; buses run all night."},
    {"id": "2", "version": "1", "q1": "a bird that can fly", "q2": "a bird that cannot fly",
     "doc1": "The kestrel can fly and hover.", "doc2": "The kiwi cannot fly and lives on the ground."},
    {"id": "3", "version": "1", "q1": "tea with caffeine", "q2": "tea without caffeine",
     "doc1": "Black tea contains caffeine.", "doc2": "Rooibos contains no caffeine."},
]


@pytest.fixture
def nevir_file(tmp_path):
    path = tmp_path / "nevir.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in NEVIR_ROWS))
    return path


def _own_letter(ex: Example, own_doc: str) -> str:
    a = ex.prompt.split("Passage A: ")[1].split("\n\nPassage B: ")[0]
    return "A" if a == own_doc else "B"


def test_nevir_loader_pairs_share_passage_order(nevir_file):
    exs = Rank().examples("nevir", path=str(nevir_file))
    assert len(exs) == 6
    for k, row in enumerate(NEVIR_ROWS):
        e1, e2 = exs[2 * k], exs[2 * k + 1]
        assert e1.meta["pair"] == e2.meta["pair"]
        assert f"Query: {row['q1']}" in e1.prompt and f"Query: {row['q2']}" in e2.prompt
        # the same two passages in the same order for both queries
        assert e1.prompt.split("\n\n", 1)[1] == e2.prompt.split("\n\n", 1)[1]
        assert e1.answer == _own_letter(e1, row["doc1"])
        assert e2.answer == _own_letter(e2, row["doc2"])
        assert e1.answer != e2.answer
        assert 'ANSWER: A" or "ANSWER: B' in e1.prompt


def test_paired_accuracy_hand_made_cases(nevir_file):
    t = Rank()
    exs = t.examples("nevir", path=str(nevir_file))
    right = {e.id: f"Reasoning...\nANSWER: {e.answer}" for e in exs}
    wrong = {e.id: f"ANSWER: {'B' if e.answer == 'A' else 'A'}" for e in exs}
    # pair 1: both queries right; pair 2: only q1 right; pair 3: both wrong
    choice = [right, right, right, wrong, wrong, wrong]
    scores = [t.score(e, c[e.id]) for e, c in zip(exs, choice)]
    assert [s["reward"] for s in scores] == [1, 1, 1, 0, 0, 0]
    m = t.metrics(scores)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["paired_accuracy"] == pytest.approx(1 / 3)  # only pair 1 counts
    assert m["n_pairs"] == 3
    # only-one-right in every pair: per-query accuracy 50 %, paired accuracy 0
    half = [t.score(e, (right if i % 2 == 0 else wrong)[e.id]) for i, e in enumerate(exs)]
    assert t.metrics(half) == {"accuracy": 0.5, "paired_accuracy": 0.0, "n_pairs": 3}
    # a model that always answers "A" ignores the query: exactly one query of each pair is right
    const = [t.score(e, "ANSWER: A") for e in exs]
    assert t.metrics(const)["accuracy"] == 0.5 and t.metrics(const)["paired_accuracy"] == 0.0
    # an incomplete pair (cut by a limit) is left out of the paired accuracy
    assert paired_accuracy([("p", True), ("p", True), ("q", True)]) == (1.0, 1)


def test_generator_negation_pairs():
    t = Rank()
    exs = t.examples(limit=40, seed=1)
    assert len(exs) == 40
    assert [e.prompt for e in exs] == [e.prompt for e in t.examples(limit=40, seed=1)]
    assert [e.prompt for e in exs] != [e.prompt for e in t.examples(limit=40, seed=1, split="test")]
    for e1, e2 in zip(exs[::2], exs[1::2]):
        assert e1.meta["pair"] == e2.meta["pair"] and e1.answer != e2.answer
        q1 = e1.prompt.split("\n")[0]
        q2 = e2.prompt.split("\n")[0]
        assert q1 != q2 and (" not " in q2) and (" not " not in q1)
        pa = e1.prompt.split("Passage A: ")[1].split("\n\n")[0]
        pb = e1.prompt.split("Passage B: ")[1].split("\n\n")[0]
        pos, neg = (pa, pb) if " not " not in pa else (pb, pa)
        assert " not " in neg and " not " not in pos
        assert e1.answer == ("A" if pa == pos else "B")  # q1 (no negation) matches the positive passage
        assert t.reward(e1, e1.reference) == 1.0 and t.reward(e2, e2.reference) == 1.0
    sc = [t.score(e, e.reference) for e in exs]
    assert t.metrics(sc) == {"accuracy": 1.0, "paired_accuracy": 1.0, "n_pairs": 20}
    assert t.metrics([t.score(e, "ANSWER: B") for e in exs])["paired_accuracy"] == 0.0


def test_generator_distinct_pairs():
    """``distinct``: 200 test examples are 100 different pairs (200 different prompts; drawn with repeats
    otherwise), each still a right negation pair with its reference; the first pair is the default draw's."""
    plain = Rank().examples(limit=200, split="test")
    exs = Rank(distinct=True).examples(limit=200, split="test")
    assert len({e.prompt for e in plain}) < 190 and len({e.prompt for e in exs}) == 200
    assert [e.prompt for e in exs[:2]] == [e.prompt for e in plain[:2]]
    t = Rank()
    assert t.metrics([t.score(e, e.reference) for e in exs]) == {"accuracy": 1.0, "paired_accuracy": 1.0,
                                                                 "n_pairs": 100}
    assert len({e.prompt for e in Rank(distinct=True).examples(limit=720, seed=2)}) == 720  # the whole space


def test_generator_compare_reasoning():
    """``reasoning: compare``: the same prompts and answers as ``claims``; each reference copies the query's
    predicate (the query's ending, which one passage's first sentence ends with) and Passage A's (its first
    sentence's ending, negation kept), says "Same: yes" exactly when they are equal and answers A then, B
    otherwise; the verifier gives every reference reward 1; the default stays ``claims``."""
    claims = Rank().examples(limit=120, seed=3)
    exs = Rank(reasoning="compare").examples(limit=120, seed=3)
    assert [(e.prompt, e.answer) for e in exs] == [(e.prompt, e.answer) for e in claims]
    assert claims[0].reference.startswith("The query asks for ")
    t = Rank()
    for e in exs:
        query = e.prompt.split("\n")[0][len("Query: "):].rstrip("?")
        first = {k: e.prompt.split(f"Passage {k}: ")[1].split(". ")[0] for k in "AB"}
        lines = e.reference.split("\n")
        assert len(lines) == 4 and lines[0].startswith("Query: ") and lines[1].startswith("Passage A: ")
        q_pred, a_pred = lines[0][len("Query: "):-1], lines[1][len("Passage A: "):-1]
        assert query.endswith(" " + q_pred) and any(first[k].endswith(" " + q_pred) for k in "AB")
        assert first["A"].endswith(" " + a_pred) and not first["B"].endswith(" " + a_pred)
        assert (" not " in f" {q_pred} ") == (" not " in query) and not q_pred.startswith("The ")
        assert (" not " in f" {a_pred} ") == (" not " in first["A"]) and not a_pred.startswith("The ")
        same = q_pred == a_pred
        assert lines[2:] == [f"Same: {'yes' if same else 'no'}.", f"ANSWER: {e.answer}"]
        assert e.answer == ("A" if same else "B") and t.reward(e, e.reference) == 1.0
    assert {e.reference.split("\n")[2] for e in exs} == {"Same: yes.", "Same: no."}
    with pytest.raises(Exception, match="reasoning"):
        Rank(reasoning="short")


@pytest.mark.parametrize("completion,expected", [
    ("ANSWER: A", "A"), ("answer: b", None), ("The answer is B.", "B"), ("Answer: Passage B", "B"),
    ("**Answer:** A", "A"), ("Answer: **A**", "A"), ("B", "B"), ("(A)", "A"), ("ANSWER: 2", "B"),
    ("I will answer a question first. ANSWER: B", "B"), ("Let me answer a few things", None),
    ("ANSWER: A\nwait, ANSWER: B", "B"), ("", None), (None, None), ("\udcff\x00", None), (b"\xffA", None),
])
def test_parse_choice(completion, expected):
    assert parse_choice(completion) == expected


@pytest.mark.parametrize("completion", [None, "", "\udcff", "A" * 100000, "ANSWER:", 7, b"\xfe"])
def test_reward_never_raises(completion, nevir_file):
    t = Rank()
    for ex in t.examples("nevir", path=str(nevir_file))[:2] + t.examples(limit=2):
        assert t.reward(ex, completion) in (0.0, 1.0)
    assert t.reward(Example(id="z", prompt="", answer=None), completion) == 0.0


def test_rank1_loader(tmp_path):
    rows = [
        {"query_id": "q1", "doc_id": "d1", "query": "capital of France", "passage": "Paris is the capital of France.",
         "answer": "true", "reasoning": "The passage names the capital."},
        {"query": "capital of France", "doc": "Lyon is a city in France.", "label": 0},
        {"id": "r3", "query": "boiling point of water", "text": "Water boils at 100 C at sea level.",
         "generated": "<think>It gives the boiling point.</think> true"},
    ]
    path = tmp_path / "rank1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = Rank()
    exs = t.examples("rank1", path=str(path))
    assert [e.answer for e in exs] == [True, False, True]
    assert exs[0].reference == "The passage names the capital.\nANSWER: true"
    assert exs[1].reference == "ANSWER: false"
    assert exs[2].reference.startswith("It gives the boiling point.") and exs[2].id == "rank1-r3"
    assert "Passage: Paris is the capital of France." in exs[0].prompt and 'ANSWER: true" or' in exs[0].prompt
    assert [t.reward(e, e.reference) for e in exs] == [1.0, 1.0, 1.0]
    assert t.reward(exs[0], "ANSWER: false") == 0.0 and t.reward(exs[1], "no") == 1.0
    assert t.reward(exs[0], "maybe") == 0.0
    m = t.metrics([t.score(e, "ANSWER: true") for e in exs])
    assert m == {"accuracy": pytest.approx(2 / 3)}  # pointwise data has no pairs


def test_bad_files_name_file_and_line(tmp_path):
    t = Rank()
    with pytest.raises(RlmError, match="missing.jsonl"):
        t.examples("nevir", path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(NEVIR_ROWS[0]) + "\n" + json.dumps({"q1": "x", "q2": "y", "doc1": "z"}) + "\n")
    with pytest.raises(RlmError, match=r"bad\.jsonl: record 2.*doc2"):
        t.examples("nevir", path=str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(NEVIR_ROWS[0]) + "\n[1, 2\n")
    with pytest.raises(RlmError, match=r"broken\.jsonl:2"):
        t.examples("nevir", path=str(broken))
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text(json.dumps({"query": "q", "passage": "p", "answer": "perhaps"}) + "\n")
    with pytest.raises(RlmError, match=r"nolabel\.jsonl: record 1.*label"):
        t.examples("rank1", path=str(nolabel))
    with pytest.raises(RlmError, match="did you mean 'nevir'"):
        t.examples("nevr")
