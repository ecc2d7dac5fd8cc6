"""The generation engine, `rlm eval` (every registered task through the Task contract), `rlm score` on bad
input, and `rlm eval --harness lm-eval`."""

from __future__ import annotations

import json

import pytest
from conftest import shared_file

from rlm.core.cli import main
from rlm.core.eval.generation import GenerationBackend, HFBackend, SamplingParams, chat_prompt, generate


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from rlm.core.models.hf import load_model

    return load_model(tiny_model_dir)


def _greedy_by_hand(model, tok, prompt, steps):
    import torch

    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_greedy_batched_matches_unbatched_argmax(lm):
    model, tok = lm
    prompts = [chat_prompt(tok, q) for q in ["What is 2 + 3?", "hi", "Write a function add(a, b) that returns a + b."]]
    gens = generate(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert [g.prompt_index for g in gens] == [0, 1, 2]
    for p, g in zip(prompts, gens):
        assert g.completion_ids == _greedy_by_hand(model, tok, p, 12)
        assert g.prompt_ids == tok(p, add_special_tokens=False)["input_ids"]
        assert g.text == tok.decode(g.completion_ids, skip_special_tokens=True)
        assert g.finish_reason == ("stop" if g.completion_ids[-1] == tok.eos_token_id else "length")
        assert tok.pad_token_id not in g.completion_ids


def test_stops_at_eos_and_reports_finish_reason(lm):
    model, tok = lm
    p = chat_prompt(tok, "What is 2 + 3?")
    free = generate(model, tok, [p], max_new_tokens=8)[0]
    stop_tok = free.completion_ids[2]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, stop_tok]
    try:
        g = generate(model, tok, [p, chat_prompt(tok, "hi")], max_new_tokens=8, batch_size=2)[0]
    finally:
        model.generation_config.eos_token_id = old
    first = free.completion_ids.index(stop_tok)
    assert g.completion_ids == free.completion_ids[:first + 1] and g.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.completion_ids) == 8


def test_sampling_n_and_seed(lm):
    model, tok = lm
    prompts = [chat_prompt(tok, "hi"), chat_prompt(tok, "What is 1 + 1?")]
    a = generate(model, tok, prompts, n=3, temperature=1.0, max_new_tokens=6, seed=7)
    b = generate(model, tok, prompts, n=3, temperature=1.0, max_new_tokens=6, seed=7)
    c = generate(model, tok, prompts, n=3, temperature=1.0, max_new_tokens=6, seed=8)
    assert len(a) == 6 and [(g.prompt_index, g.sample_index) for g in a] == [(i, j) for i in range(2) for j in range(3)]
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    assert [g.completion_ids for g in a] != [g.completion_ids for g in c]
    greedy = generate(model, tok, prompts, n=2, max_new_tokens=6)
    assert greedy[0].completion_ids == greedy[1].completion_ids and greedy[1].sample_index == 1


def test_backend_interface_and_chat_fallback(lm):
    model, tok = lm

    class Echo(GenerationBackend):
        name = "echo"

        @classmethod
        def load(cls, model_path, *, device=None, dtype="float32", config=None):
            return cls(config)

        def generate(self, prompts, params):
            from rlm.core.eval.generation import Generation

            return [Generation(i, j, p, [], [], p[::-1], "stop") for i, p in enumerate(prompts) for j in range(params.n)]

    assert [g.text for g in generate(Echo(), None, ["ab", "cd"], n=2)] == ["ba", "ba", "dc", "dc"]
    with pytest.raises(Exception, match="'echo' cannot receive policy weights"):
        Echo().load_weights([])
    assert isinstance(HFBackend(model, tok), GenerationBackend)
    assert chat_prompt(tok, "Q").endswith("<|im_start|>assistant\n")

    class Plain:
        chat_template = None

    assert chat_prompt(Plain(), "Q", system="S") == "S\n\nQ\n"
    with pytest.raises(Exception, match="top_p"):
        SamplingParams(top_p=0)


def test_rlm_eval_every_registered_task(tiny_model_dir, tmp_path):
    from rlm.core.plugins import get_system

    names = get_system().registry("task").names()
    assert {"math", "code"} <= set(names)
    args = ["eval", "--model", str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "8", "--batch-size", "2",
            "--out", str(tmp_path / "ev"), "--no-progress"]
    for n in names:
        args += ["--task", n]
    assert main(args + ["--task", "math:gen"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary) == set(names) | {"math:gen"}
    for label, m in summary.items():
        assert m["n"] == 2 and all(isinstance(v, float) and 0 <= v <= 1 for k, v in m.items() if k != "n"), label
    assert set(summary["math"]) == {"accuracy", "answer_accuracy", "steps_correct", "strict_match",
                                    "flexible_extract", "n"}
    assert set(summary["code"]) == {"pass@1", "n"}
    records = [json.loads(line) for line in (tmp_path / "ev" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (len(names) + 1)
    assert {"task", "id", "prompt", "completion", "scores", "finish_reason"} <= set(records[0])
    manifest = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert manifest["config"]["max_new_tokens"] == 8 and "model" in manifest["inputs"]


def test_rlm_eval_bad_input(tiny_model_dir, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_model_dir), "--limit", "1", "--no-progress"]
    assert main(base + ["--task", "math:gsm8", "--out", str(tmp_path / "a")]) == 2
    assert "did you mean 'gsm8k'" in capsys.readouterr().err
    assert main(base + ["--task", "maths", "--out", str(tmp_path / "b")]) == 2
    assert "did you mean 'math'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    assert main(base + ["--task", "math:gsm8k", "--data", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_rlm_score_bad_input(tmp_path, capsys):
    comp = tmp_path / "c.jsonl"
    ex_ids = ["gen/test/7777777/0", "gen/test/7777777/1", "gen/test/7777777/2"]
    from rlm.plugins.tasks.code import CodeTask

    ex = CodeTask().examples("gen", split="test", limit=3)
    assert [e.id for e in ex] == ex_ids
    with open(comp, "wb") as f:
        f.write(json.dumps({"id": ex_ids[0], "completion": ex[0].reference}).encode() + b"\n")
        f.write(json.dumps({"id": ex_ids[1], "completion": ""}).encode() + b"\n")  # empty: failed
        f.write(b'{"id": "' + ex_ids[2].encode() + b'", "completion": "caf\xe9 \xff"}\n')  # non-UTF-8: failed
        f.write(json.dumps({"id": "gen/test/7777777/99", "completion": "x"}).encode() + b"\n")  # unknown id
        f.write(b"{broken json\n")
        f.write(json.dumps({"completion": "no id"}).encode() + b"\n")
        f.write(json.dumps({"id": ex_ids[0], "completion": "dup"}).encode() + b"\n")
    assert main(["score", "--task", "code:gen", "--limit", "3", "--completions", str(comp), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary == {"code:gen": {"pass@1": 1 / 3, "n": 3}}
    errors = [json.loads(line) for line in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [3, 4, 5, 6, 7]
    assert "not UTF-8" in errors[0]["error"] and "unknown id" in errors[1]["error"]
    assert "invalid JSON" in errors[2]["error"] and "no id field" in errors[3]["error"] and "duplicate" in errors[4]["error"]
    assert "5 problem(s)" in capsys.readouterr().err
    # nothing matches at all: a clear error
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"id": "nope", "completion": "x"}\n')
    assert main(["score", "--task", "code:gen", "--completions", str(only_bad), "--out", str(tmp_path / "p")]) == 2
    assert "no line matched" in capsys.readouterr().err
    assert main(["score", "--task", "code:gen", "--completions", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "q")]) == 2


def test_rlm_score_gsm8k_by_prompt(tmp_path):
    path = shared_file("gsm8k_test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:5]]
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps({"id": f"gsm8k/test/{i}", "completion": r["answer"]}) + "\n"
                            for i, r in enumerate(rows)))
    assert main(["score", "--task", "math:gsm8k", "--data", str(path), "--completions", str(comp),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s == {"math:gsm8k": {"accuracy": 1.0, "strict_match": 1.0, "flexible_extract": 1.0, "n": 5}}


def test_lm_eval_harness_offline(tiny_model_dir, tmp_path):
    data = shared_file("gsm8k_test.jsonl").parent
    assert main(["eval", "--harness", "lm-eval", "--tasks", "gsm8k", "--model", str(tiny_model_dir), "--limit", "2",
                 "--num-fewshot", "0", "--max-new-tokens", "8", "--batch-size", "2", "--data", str(data),
                 "--out", str(tmp_path / "lm")]) == 0
    s = json.loads((tmp_path / "lm" / "summary.json").read_text())
    m = s["lm-eval:gsm8k"]
    assert m["n"] == 2 and {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(m)
    full = json.loads((tmp_path / "lm" / "lm_eval_results.json").read_text())
    assert "gsm8k_rlm_local" in full["results"]


def test_model_generation_defaults_are_neutralised(lm):
    model, tok = lm
    p = [chat_prompt(tok, "hi")]
    plain = generate(model, tok, p, max_new_tokens=10)[0].completion_ids
    greedy_first = plain[0]
    cfg = model.generation_config
    old = (cfg.repetition_penalty, cfg.top_k)
    cfg.repetition_penalty, cfg.top_k = 5.0, 1  # a hub config like this would change greedy and sampling
    try:
        assert generate(model, tok, p, max_new_tokens=10)[0].completion_ids == plain
        samples = generate(model, tok, p, n=8, temperature=1.0, max_new_tokens=1, seed=0)
    finally:
        cfg.repetition_penalty, cfg.top_k = old
    # with top_k=1 honoured every sample would be the greedy token; the tiny model's distribution is near uniform
    assert any(s.completion_ids[0] != greedy_first for s in samples)
