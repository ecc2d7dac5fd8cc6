"""The math task: generator, loaders, math-verify reward, GSM8K extraction identical to lm-eval's filters."""

from __future__ import annotations

import json
import random
import time

import pytest
from conftest import shared_file

from rlm.core.contracts import Example
from rlm.core.errors import RlmError
from rlm.core.io.records import DataError
from rlm.plugins.tasks.math import MathTask
from rlm.plugins.tasks.math.verify import FALLBACK, exact_match, extract_flexible, extract_strict

TRICKY = [
    "The answer is 18.\n#### 18", "#### 1,234.", "so 3 + 4 = 7 then $12.50 total\n#### $12.50", "#### -5",
    "no numbers here", "", "#### ", "72 apples, 3 boxes, answer 24.", "####18", "#### 18 and #### 20",
    "costs $1,000,000.", "-3 degrees and 4", "1.5.6", "answer: -.5", "x=7\n#### 7\nextra 9", "9" * 30,
]


def lm_eval_filters():
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0)
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    return strict, flexible


def test_extraction_matches_lm_eval_filters():
    strict, flexible = lm_eval_filters()
    rng = random.Random(0)
    texts = list(TRICKY) + [" ".join(rng.choice(["#### ", "$", "12", "3.5", ",", "-7", "a", "\n", "1,0"])
                                     for _ in range(rng.randint(1, 12))) for _ in range(300)]
    s_ref = [r[0] for r in strict.apply([[t] for t in texts], [{}] * len(texts))]
    f_ref = [r[0] for r in flexible.apply([[t] for t in texts], [{}] * len(texts))]
    assert [extract_strict(t) for t in texts] == s_ref
    assert [extract_flexible(t) for t in texts] == f_ref
    assert extract_strict("nothing") == FALLBACK == "[invalid]"


def test_exact_match_matches_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    kw = dict(regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True, ignore_punctuation=False)
    pairs = [("1,234", "blah\n#### 1234"), ("$12.50", "x #### 12.50"), ("18.", "#### 18"), ("[invalid]", "#### 5"),
             ("5", "#### 5"), ("-5", "#### 5"), ("A", "#### a")]
    for p, g in pairs:
        assert exact_match(p, g) == exact_match_hf_evaluate([p], [g], **kw)["exact_match"]


def test_gsm8k_gold_answers_score_one():
    path = shared_file("gsm8k_test.jsonl")
    task = MathTask()
    exs = task.examples("gsm8k", split="test", path=str(path))
    assert len(exs) == 1319
    t0 = time.perf_counter()
    scores = [task.score(e, e.meta["gold_text"]) for e in exs]
    m = task.metrics(scores)
    assert m == {"accuracy": 1.0, "strict_match": 1.0, "flexible_extract": 1.0}, m
    assert time.perf_counter() - t0 < 120
    # the SFT reference (calculator annotations removed) scores 1 too
    assert all(task.reward(e, e.reference) == 1.0 for e in exs[:50])
    assert "<<" not in exs[0].reference and exs[0].answer == "18"


def test_gsm8k_default_location_and_wrong_answers(monkeypatch):
    path = shared_file("gsm8k_test.jsonl")
    monkeypatch.setenv("RLM_SHARED_DATA", str(path.parent))
    task = MathTask()
    ex = task.examples("gsm8k", split="test", limit=3)
    assert len(ex) == 3 and ex[0].id == "gsm8k/test/0" and "#### ANSWER" in ex[0].prompt
    s = task.score(ex[0], "She makes 16 dollars.\n#### 17")
    assert s == {"accuracy": 0.0, "strict_match": 0.0, "flexible_extract": 0.0}
    s = task.score(ex[0], "So she makes 18 dollars.")  # no '####': strict fails, flexible and math-verify pass
    assert s == {"accuracy": 1.0, "strict_match": 0.0, "flexible_extract": 1.0}


def test_generator_is_seeded_correct_and_has_difficulty_knobs():
    easy = MathTask()
    a = easy.examples("gen", split="train", limit=50, seed=3)
    assert [e.prompt for e in a] == [e.prompt for e in easy.examples("gen", split="train", limit=50, seed=3)]
    assert [e.prompt for e in a] != [e.prompt for e in easy.examples("gen", split="test", limit=50, seed=3)]
    for e in a:  # easy level: one addition of single digits
        expr = e.prompt.split("What is ", 1)[1].split("?", 1)[0]
        assert expr.count("+") == 1 and all(int(x) <= 9 for x in expr.split(" + "))
        assert int(e.answer) == eval(expr)  # noqa: S307 - independent check of the generator's arithmetic
        assert easy.reward(e, e.reference) == 1.0
    hard = MathTask(min_ops=3, max_ops=4, min_operand=10, max_operand=99, operators="+-*")
    for e in hard.examples("gen", split="test", limit=50):
        expr = e.prompt.split("What is ", 1)[1].split("?", 1)[0]
        assert 3 <= sum(expr.count(op) for op in (" + ", " - ", " * ")) <= 4
        assert int(e.answer) == eval(expr)  # noqa: S307
        assert hard.score(e, e.reference) == {"accuracy": 1.0, "strict_match": 1.0, "flexible_extract": 1.0,
                                              "answer_accuracy": 1.0, "steps_correct": 1.0}
    assert len(MathTask(n_test=7).examples("gen", split="test")) == 7


def test_math500_and_openmath_fixtures(tmp_path):
    rows = [{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "answer": "\\frac{3}{4}", "solution": "... \\boxed{\\frac34}",
             "unique_id": "test/algebra/1.json", "level": 1, "subject": "Algebra"},
            {"problem": "Solve $x^2=4$, $x>0$.", "answer": "2", "solution": "\\boxed{2}", "unique_id": "test/algebra/2.json"}]
    f = tmp_path / "math500.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = MathTask()
    ex = task.examples("math500", split="test", path=str(f))
    assert [e.id for e in ex] == ["test/algebra/1.json", "test/algebra/2.json"] and "\\boxed{}" in ex[0].prompt
    assert task.score(ex[0], "We add: $\\boxed{0.75}$") == {"accuracy": 1.0}
    assert task.reward(ex[0], "\\boxed{\\frac{6}{8}}") == 1.0
    assert task.reward(ex[0], "\\boxed{\\frac{2}{3}}") == 0.0
    assert task.reward(ex[1], "the answer is $\\boxed{2}$") == 1.0
    om = tmp_path / "omi.json"
    om.write_text(json.dumps([{"problem": "1+1?", "generated_solution": "1+1=2, \\boxed{2}", "expected_answer": "2",
                               "problem_source": "x"}] * 3))
    ex = task.examples("openmath", path=str(om), limit=2)
    assert len(ex) == 2 and task.reward(ex[0], ex[0].reference) == 1.0


@pytest.mark.parametrize("garbage", [None, "", "\x00\xff\ud800", "\\boxed{", "#### " + "9" * 5000,
                                     "\\frac{" * 200, "$$$$", "#### \n####", "1/0", "x" * 100000])
def test_reward_never_raises(garbage):
    task = MathTask()
    for e in (task.examples("gen", limit=1)[0],
              Example(id="b", prompt="p", answer="\\frac{3}{4}", meta={"format": "boxed"})):
        assert task.reward(e, garbage) in (0.0, 1.0)
        assert all(v in (0.0, 1.0) for v in task.score(e, garbage).values())


def test_bad_inputs(tmp_path):
    task = MathTask()
    with pytest.raises(RlmError, match=r"unknown subset 'gsm8' .*did you mean 'gsm8k'"):
        task.examples("gsm8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        task.examples("gsm8k", path=str(bad))
    nonutf = tmp_path / "n.jsonl"
    nonutf.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff\xfe", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"n.jsonl:2: not UTF-8"):
        task.examples("gsm8k", path=str(nonutf))
    lacking = tmp_path / "l.jsonl"
    lacking.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"record 1 lacks field\(s\) answer"):
        task.examples("gsm8k", path=str(lacking))
    with pytest.raises(DataError, match="not found"):
        task.examples("gsm8k", path=str(tmp_path / "missing.jsonl"))


def test_gen_answer_only_solution_asks_for_and_references_the_final_line():
    from rlm.plugins.tasks.math import MathTask
    from rlm.plugins.tasks.math.generator import generate_arithmetic
    from rlm.plugins.tasks.math.verify import ANSWER_FORMAT, HASH_FORMAT

    steps = MathTask(MathTask.Config(max_ops=2)).examples("gen", limit=20)
    answer = MathTask(MathTask.Config(max_ops=2, solution="answer")).examples("gen", limit=20)
    task = MathTask(MathTask.Config())
    for s, a in zip(steps, answer):
        assert s.prompt.replace(HASH_FORMAT, "") == a.prompt.replace(ANSWER_FORMAT, "")  # the same problems
        assert s.prompt.endswith(HASH_FORMAT) and a.prompt.endswith(ANSWER_FORMAT)
        assert a.answer == s.answer and a.reference == f"#### {s.answer}"
        assert s.reference.endswith(f"\n#### {s.answer}") and s.reference.count("\n") == s.meta["ops"]
        assert task.reward(a, a.reference) == 1.0
    with pytest.raises(ValueError, match="expected 'steps' or 'answer'"):
        generate_arithmetic(2, solution="final")


def test_check_steps_scores_only_a_right_derivation():
    """``check_steps``: a right final answer after a false or miscopied step line scores 0 (the outcome reward
    alone rewarded it); the derivation is computed here by hand, independently of the generator."""
    plain = MathTask(MathTask.Config(max_ops=2, operators="+-*"))
    strict = MathTask(MathTask.Config(max_ops=2, operators="+-*", check_steps=True))
    exs = strict.examples("gen", limit=40)
    assert exs == plain.examples("gen", limit=40)  # the same problems either way
    for e in exs:
        assert strict.reward(e, e.reference) == plain.reward(e, e.reference) == 1.0
        assert strict.score(e, e.reference)["accuracy"] == 1.0
    e = next(x for x in exs if x.meta["ops"] == 2)
    rows = e.meta["steps"]
    first = e.prompt.split("What is ")[1].split("?")[0].replace("(", "").replace(")", "").split()
    assert [str(rows[0][0]), rows[0][1], str(rows[0][2])] == first[:3] and rows[1][0] == rows[0][3]
    for (a, op, b, c) in rows:
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
    good = "\n".join(f"{a} {op} {b} = {c}" for a, op, b, c in rows) + f"\n#### {e.answer}"
    spaced = "\n".join(f" {a}{op}{b} ={c} " for a, op, b, c in rows) + f"\n\n#### {e.answer}"
    miscopied = f"{rows[0][0] + 1} {rows[0][1]} {rows[0][2]} = {rows[0][3]}\n" + good.split("\n", 1)[1]
    missing = good.split("\n", 1)[1]
    extra = "1 + 1 = 2\n" + good
    for text, ok in [(good, 1.0), (spaced, 1.0), (miscopied, 0.0), (missing, 0.0), (extra, 0.0),
                     (f"#### {e.answer}", 0.0), ("", 0.0)]:
        assert strict.reward(e, text) == ok, text
        assert plain.reward(e, text) == (1.0 if text else 0.0), text  # the final answer alone
        s = strict.score(e, text)
        assert s["accuracy"] == ok and s["steps_correct"] == ok and s["answer_accuracy"] == (1.0 if text else 0.0)
        assert plain.score(e, text)["accuracy"] == s["answer_accuracy"]
    # answer-only examples have no derivation: check_steps leaves them alone
    a = MathTask(MathTask.Config(solution="answer", check_steps=True)).examples("gen", limit=3)[0]
    assert "steps" not in a.meta and strict.reward(a, a.reference) == 1.0


def test_integer_fast_path_agrees_with_math_verify():
    """Plain integers are compared without math-verify; every verdict must be the one math-verify gives."""
    from math_verify import parse, verify

    from rlm.plugins.tasks.math.verify import verify_answer

    rng = random.Random(0)
    nums = ["0", "-0", "7", "-7", "07", "-07", "00", "10", "1", "123456789012345678901234567890"]
    nums += [str(rng.choice([-1, 1]) * rng.randint(0, 10 ** rng.randint(1, 30))) for _ in range(60)]
    for _ in range(300):
        gold, pred = rng.choice(nums), rng.choice(nums + [str(int(rng.choice(nums)) + 1)])
        if rng.random() < 0.3:
            pred = gold
        want = float(verify(parse(f"${gold}$"), parse(pred)))
        assert verify_answer(gold, f"#### {pred}", "hash", timeout_seconds=5, max_chars=4000) == want, (gold, pred)


def test_gen_distinct_problems_cover_the_space_without_repeats():
    """``distinct``: the 200 one-digit ``+-`` problems each once in a 200-example set (drawn with repeats
    otherwise), every answer and step line computed here by hand; the default draw is unchanged."""
    plain = MathTask(MathTask.Config(operators="+-")).examples("gen", split="test", limit=200)
    task = MathTask(MathTask.Config(operators="+-", distinct=True, check_steps=True))
    exs = task.examples("gen", split="test", limit=200)
    assert len({e.prompt for e in plain}) < 150 and len({e.prompt for e in exs}) == 200
    assert exs[0].prompt == plain[0].prompt  # the first draw is the same
    for e in exs:
        a, op, b = e.prompt.split("?")[0].removeprefix("What is ").split()
        want = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert e.answer == str(want) and e.reference == f"{a} {op} {b} = {want}\n#### {want}"
        assert task.reward(e, e.reference) == 1.0
    more = task.examples("gen", split="train", limit=450)
    assert len({e.prompt for e in more[:200]}) == 200 and len({e.prompt for e in more[200:400]}) == 200
