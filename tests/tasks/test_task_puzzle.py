"""Knights and Knaves: unique solutions checked by an independent brute force, ranges, rewards, metrics."""

from __future__ import annotations

import itertools
import re

import pytest

from rlm.core.contracts import Example
from rlm.core.errors import RlmError
from rlm.plugins.tasks.puzzle import Puzzle


# An evaluator written separately from rlm.plugins.tasks.puzzle.logic: statements are the JSON list form kept in
# example.meta["statements"]; roles map person index -> "knight"/"knave".
def truth(stmt, roles):
    head, args = stmt[0], stmt[1:]
    if head == "is":
        person, knight = args
        return (roles[person] == "knight") == bool(knight)
    if head == "not":
        return not truth(args[0], roles)
    values = [truth(a, roles) for a in args]
    if head == "and":
        return all(values)
    if head == "or":
        return any(values)
    if head == "imp":
        return (not values[0]) or values[1]
    if head == "iff":
        return values[0] == values[1]
    raise AssertionError(f"unknown operator {head}")


def independent_solutions(statements):
    n = len(statements)
    sols = []
    for combo in itertools.product(("knight", "knave"), repeat=n):
        # a knight's statement is true, a knave's statement is false
        if all(truth(s, combo) == (combo[i] == "knight") for i, s in enumerate(statements)):
            sols.append(combo)
    return sols


def _check_unique(ex: Example):
    sols = independent_solutions(ex.meta["statements"])
    assert len(sols) == 1, f"{ex.id}: {len(sols)} solutions"
    names = ex.meta["names"]
    assert dict(zip(names, sols[0])) == ex.answer
    # every statement and every person appears in the prompt
    for nm in names:
        assert f"{nm} says:" in ex.prompt
    assert "ANSWER:" in ex.prompt


def test_in_domain_puzzles_have_exactly_one_solution():
    exs = Puzzle().examples(limit=60, seed=11)
    sizes = {ex.meta["people"] for ex in exs}
    assert sizes <= set(range(2, 9)) and {2, 8} <= sizes
    assert all(ex.meta["domain"] == "id" for ex in exs)
    for ex in exs:
        _check_unique(ex)


def test_out_of_domain_puzzles_have_exactly_one_solution():
    exs = Puzzle().examples("ood", limit=8, seed=5, split="test")
    assert {ex.meta["people"] for ex in exs} <= set(range(9, 14))
    assert all(ex.meta["domain"] == "ood" for ex in exs)
    for ex in exs:
        _check_unique(ex)


def test_statement_templates_cover_all_operators():
    ops = set()

    def walk(s):
        ops.add(s[0])
        for a in s[1:]:
            if isinstance(a, list):
                walk(a)

    for ex in Puzzle().examples(limit=40, seed=2):
        for s in ex.meta["statements"]:
            walk(s)
    assert ops == {"is", "not", "and", "or", "imp", "iff"}
    prompts = " ".join(ex.prompt for ex in Puzzle().examples(limit=40, seed=2))
    for phrase in (" is a knight", " is a knave", " and ", " or ", "if ", " then ", " if and only if "):
        assert phrase in prompts


def test_seeded_and_split_dependent():
    a = Puzzle().examples(limit=10, seed=1)
    b = Puzzle().examples(limit=10, seed=1)
    c = Puzzle().examples(limit=10, seed=2)
    d = Puzzle().examples(limit=10, seed=1, split="test")
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert [e.prompt for e in a] != [e.prompt for e in d]
    mixed = Puzzle().examples("all", limit=10, seed=1)
    assert {e.meta["domain"] for e in mixed} == {"id", "ood"}


def test_reward_all_roles_must_be_right():
    t = Puzzle()
    ex = t.examples(limit=1, seed=7)[0]
    names, sol = ex.meta["names"], ex.answer
    assert t.reward(ex, ex.reference) == 1.0
    assert ex.reference.strip().splitlines()[-1].startswith("ANSWER:")
    line = ", ".join(f"{nm} is a {sol[nm]}" for nm in names)
    assert t.reward(ex, f"Some reasoning.\nANSWER: {line}") == 1.0
    # markdown and other phrasings
    md = "\n".join(f"- **{nm}**: {sol[nm].capitalize()}" for nm in names)
    assert t.reward(ex, f"Answer:\n{md}") == 1.0
    flip = {"knight": "knave", "knave": "knight"}
    wrong = ", ".join(f"{nm} is a {flip[sol[nm]] if k == 0 else sol[nm]}" for k, nm in enumerate(names))
    assert t.reward(ex, f"ANSWER: {wrong}") == 0.0
    missing = ", ".join(f"{nm} is a {sol[nm]}" for nm in names[:-1])
    assert t.reward(ex, f"ANSWER: {missing}") == 0.0
    # the final answer wins over hypotheses in the reasoning
    assert t.reward(ex, f"Suppose {wrong}. That fails.\nANSWER: {line}") == 1.0
    assert t.reward(ex, f"Suppose {line}.\nANSWER: {wrong}") == 0.0


@pytest.mark.parametrize("completion", [None, "", "ANSWER:", "ANSWER: ANSWER:", "\udcff\x00garbage", b"\xff\xfe",
                                        "knight knave " * 5000, "(" * 10000, 3.14])
def test_reward_never_raises(completion):
    t = Puzzle()
    ex = t.examples(limit=1, seed=3)[0]
    assert t.reward(ex, completion) == 0.0
    assert t.reward(Example(id="bad", prompt="", answer=None), completion) == 0.0


def test_metrics_in_domain_and_out_of_domain():
    t = Puzzle()
    scores = [{"reward": 1.0, "domain": "id", "people": 3}, {"reward": 0.0, "domain": "id", "people": 3},
              {"reward": 1.0, "domain": "id", "people": 5}, {"reward": 0.0, "domain": "ood", "people": 9},
              {"reward": 1.0, "domain": "ood", "people": 12}]
    m = t.metrics(scores)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["accuracy_id"] == pytest.approx(2 / 3)
    assert m["accuracy_ood"] == pytest.approx(1 / 2)
    assert m["accuracy_3ppl"] == pytest.approx(1 / 2)
    ex = t.examples("ood", limit=2, seed=0)
    sc = [t.score(e, e.reference) for e in ex]
    assert t.metrics(sc)["accuracy_ood"] == 1.0


def test_bad_subset_and_path():
    with pytest.raises(RlmError, match="did you mean 'ood'"):
        Puzzle().examples("odd")
    with pytest.raises(RlmError, match="generator"):
        Puzzle().examples(path="x.jsonl")
    with pytest.raises(Exception):
        Puzzle(id_min_people=0)
    with pytest.raises(RlmError, match="minimum"):
        Puzzle(id_min_people=9, id_max_people=3).examples(limit=1)


def test_prompt_states_answer_format_and_rules():
    ex = Puzzle().examples(limit=1, seed=9)[0]
    assert "Knights always tell the truth" in ex.prompt and "knaves always lie" in ex.prompt
    assert re.search(r'"ANSWER: \w+ is a knight, \w+ is a knave', ex.prompt)


def test_independent_brute_force_detects_zero_and_many_solutions():
    # "I am a knight" fits both roles; "I am a knave" fits neither: the checker above must see that
    assert len(independent_solutions([["is", 0, True]])) == 2
    assert independent_solutions([["is", 0, False]]) == []
    # and rlm's own solver agrees on a generated puzzle with one statement made vacuous
    from rlm.plugins.tasks.puzzle.logic import solve, tuple_form

    ex = Puzzle().examples(limit=1, seed=4)[0]
    stmts = [list(s) for s in ex.meta["statements"]]
    stmts[0] = ["or", ["is", 0, True], ["is", 0, False]]  # always true: speaker 0 must then be a knight
    ours = solve([tuple_form(s) for s in stmts])
    theirs = independent_solutions(stmts)
    assert [tuple("knight" if k else "knave" for k in s) for s in ours] == sorted(theirs, key=lambda c: [
        sum((1 << i) for i, r in enumerate(c) if r == "knight")])
