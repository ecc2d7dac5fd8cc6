"""The checks ``rlm merge`` makes before merging (configs, tokenizers, descent from the base), each refusing in
one line naming the model and what differs with nothing written; and the smoke test after writing
(``--smoke``), which flags degenerate output in ``merge_manifest.json`` and on the terminal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_merge_engine import make_llama

from rlm.core.errors import ModelError
from rlm.core.merge.engine import MergeRunConfig, merge_models
from rlm.core.models.reader import ModelReader


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    base = make_llama(root / "base", 0)
    return {"root": root, "base": base, "e1": make_llama(root / "e1", 1, base=base),
            "e2": make_llama(root / "e2", 2, base=base)}


def rlm_merge(capsys, *args):
    """``rlm merge ARGS`` in-process: (exit code, stderr lines)."""
    from rlm.core.cli import main

    capsys.readouterr()
    rc = main(["merge", *map(str, args)])
    return rc, capsys.readouterr().err.strip().splitlines()


def refused(capsys, family, out, models, *extra):
    """Merge ``models`` onto the family's base through the CLI; it must fail in one line, writing nothing."""
    rc, err = rlm_merge(capsys, "--method", "task_arithmetic", "--base", family["base"], "--models",
                        ",".join(map(str, models)), "--out", out, *extra)
    assert rc == 2 and len(err) == 1, err
    assert not out.exists()
    return err[0]


def test_related_models_pass_and_the_manifest_records_the_checks(family, tmp_path):
    out = tmp_path / "ok"
    merge_models(MergeRunConfig(method="ties", base=str(family["base"]), models=[str(family["e1"]),
                                                                                 str(family["e2"])]), out)
    checks = json.loads((out / "merge_manifest.json").read_text())["checks"]
    assert [d["model"] for d in checks["descent"]] == [str(family["e1"]), str(family["e2"])]
    assert all(d["min_cosine"] > 0.8 and d["tensors"] == 4 for d in checks["descent"])
    assert checks["configs"] is True and checks["seconds"] >= 0


def test_config_with_other_head_count_but_same_shapes_is_refused(family, tmp_path, capsys):
    # 8 heads of 4 with 4 key/value heads: every tensor has the base's shape (4 heads of 8, 2 kv heads)
    other = make_llama(tmp_path / "heads", 3, base=family["base"], num_attention_heads=8, num_key_value_heads=4)
    line = refused(capsys, family, tmp_path / "out", [family["e1"], other])
    assert line == (f"error: model {other} has num_attention_heads=8 in config.json but the base {family['base']} "
                    f"has num_attention_heads=4: they cannot be merged")


def test_unrelated_model_is_refused_by_the_descent_check(family, tmp_path, capsys):
    stranger = make_llama(tmp_path / "stranger", 7)  # same architecture, independent initialisation
    line = refused(capsys, family, tmp_path / "out", [family["e1"], stranger])
    assert line.startswith(f"error: model {stranger} does not descend from the base {family['base']}: tensor ")
    assert "cosine similarity" in line and "below 0.25" in line and "check_descent=false" in line
    out = tmp_path / "forced"
    merge_models(MergeRunConfig(method="task_arithmetic", base=str(family["base"]), check_descent=False,
                                models=[str(family["e1"]), str(stranger)]), out)
    assert json.loads((out / "merge_manifest.json").read_text())["checks"]["descent"] is None


def test_descent_sample_skips_vectors_and_vocabulary_and_cosines_separate_the_cases(family):
    from rlm.core.models.validate import check_descent, descent_sample, tensor_cosine, validate_models

    base, e1 = ModelReader(family["base"]), ModelReader(family["e1"])
    plan = validate_models(base, [e1])
    sample = descent_sample(plan)
    assert len(sample) == 4 and all(len(base.shape(n)) == 2 and "embed" not in n and "lm_head" not in n
                                    for n, _ in sample)
    assert sample[0][0].startswith("model.layers.0.") and sample[-1][0].startswith("model.layers.1.")
    found = check_descent(base, [e1], plan)
    assert found[0]["min_cosine"] > 0.8
    assert tensor_cosine(torch.zeros(3), torch.ones(3)) is None
    assert tensor_cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    with pytest.raises(ModelError, match="does not descend"):
        check_descent(base, [e1], plan, min_cosine=0.999)
    assert check_descent(base, [e1], plan, skip=[0]) == []


def write_vocab(model: Path, tokens: list[str], added: dict[int, str] | None = None) -> None:
    vocab = {t: i for i, t in enumerate(tokens)}
    extra = [{"id": i, "content": t, "special": True} for i, t in (added or {}).items()]
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                      "added_tokens": extra}))


def test_tokenizer_vocabularies_must_agree(family, tmp_path, capsys):
    from rlm.core.models.validate import check_tokenizers

    base = tmp_path / "base"
    shutil.copytree(family["base"], base)
    e1, e2 = tmp_path / "e1", tmp_path / "e2"
    shutil.copytree(family["e1"], e1)
    shutil.copytree(family["e2"], e2)
    tokens = [f"t{i}" for i in range(64)]
    write_vocab(base, tokens)
    write_vocab(e1, tokens)
    write_vocab(e2, tokens[:10] + ["swapped"] + tokens[11:])
    family = {**family, "base": base}
    line = refused(capsys, family, tmp_path / "out", [e1, e2])
    assert line == (f"error: model {e2}: its tokenizer differs from the base {base}'s: token id 10 is 'swapped' "
                    f"there but 't10' in the base")
    # an added token the base lacks: refused under --vocab error, accepted under truncate (same ids agree)
    write_vocab(e2, tokens, added={64: "<extra>"})
    line = refused(capsys, family, tmp_path / "out", [e1, e2])
    assert "it has 65 tokens and the base 64 (it alone has id 64 '<extra>'); pass --vocab truncate" in line
    assert check_tokenizers(ModelReader(base), [ModelReader(e1), ModelReader(e2)], vocab="truncate") == 2
    # a model without tokenizer files is not compared
    (e2 / "tokenizer.json").unlink()
    assert check_tokenizers(ModelReader(base), [ModelReader(e1), ModelReader(e2)]) == 1


def test_vocab_json_and_sentencepiece_files_are_compared(tmp_path):
    from rlm.core.models.validate import _vocab_difference, tokenizer_vocab

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "vocab.json").write_text(json.dumps({"x": 0, "y": 1}))
    (tmp_path / "a" / "added_tokens.json").write_text(json.dumps({"<z>": 2}))
    assert tokenizer_vocab(tmp_path / "a") == {0: "x", 1: "y", 2: "<z>"}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"\x00piece")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer.model").write_bytes(b"\x00other")
    sp_b, sp_c = tokenizer_vocab(tmp_path / "b"), tokenizer_vocab(tmp_path / "c")
    assert _vocab_difference(sp_b, sp_c, "error") == "its tokenizer.model differs from the base's"
    assert _vocab_difference(sp_b, sp_b, "error") is None
    assert tokenizer_vocab(tmp_path) is None


# ------------------------------------------------------------------------------------------------------
# the smoke test
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids,text,verdict", [
    ([], "", "empty"),
    ([5, 6], "  \n ", "empty"),
    ([7, 7, 7, 7], "abababab", "repeated"),
    ([1, 7, 7, 7, 7, 7, 7, 7], "x total total total", "repeated"),
    ([1, 2, 3, 4], "ab\ufffdcd", "unreadable"),
    ([1, 2, 3, 4], "\x00\x01\x02a", "unreadable"),
    ([1, 2, 3, 4, 5, 6, 7, 8], " Paris, the city of", "ok"),
    ([1, 2, 1, 2], "    return a + b", "ok"),
])
def test_judge_continuation(ids, text, verdict):
    from rlm.core.merge.smoke import judge_continuation

    assert judge_continuation(ids, text) == verdict


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny model (it has a tokenizer) and an 'expert' of it whose final norm is zero: its logits are all
    equal, so greedy decoding repeats one token."""
    from safetensors.torch import load_file, save_file

    from rlm.core.models.hf import resolve_model

    base = Path(resolve_model("tiny"))
    broken = tmp_path_factory.mktemp("smoke") / "broken"
    shutil.copytree(base, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return base, broken


def test_smoke_flags_a_degenerate_merge_in_manifest_and_terminal(tiny_pair, tmp_path, capsys):
    base, broken = tiny_pair
    out = tmp_path / "m"
    rc, err = rlm_merge(capsys, "--method", "task_arithmetic", "--base", base, "--models", broken, "--smoke",
                        "--out", out)
    assert rc == 0
    smoke = json.loads((out / "merge_manifest.json").read_text())["smoke"]
    assert {r["verdict"] for r in smoke["prompts"]} <= {"empty", "repeated"} and len(smoke["prompts"]) == 4
    counted = sum(r["base_verdict"] == "ok" for r in smoke["prompts"])  # degenerate where the base is not
    assert counted >= 2 and smoke["ran"] and smoke["degenerate"] and smoke["degenerate_prompts"] == counted
    verdicts = ", ".join(f"{r['verdict']} (base: {r['base_verdict']})" for r in smoke["prompts"])
    expected = (f"warning: the merged model {out} gives degenerate output on {counted} of 4 smoke prompts "
                f"({verdicts}); see smoke in its merge_manifest.json")
    assert [line for line in err if line.startswith("warning: the merged model")] == [expected]


def test_smoke_counts_only_what_the_base_does_well(tiny_pair, tmp_path, capsys, monkeypatch):
    """A merge that behaves like its base is not flagged, whatever the base answers; without a base every
    degenerate continuation counts."""
    from rlm.core.merge import smoke as smoke_module

    base, broken = tiny_pair
    monkeypatch.setattr(smoke_module, "judge_continuation", lambda ids, text: "empty")  # everything degenerate
    same = smoke_module.smoke_test(base, base_dir=base)
    assert same["ran"] and not same["degenerate"] and same["degenerate_prompts"] == 0
    assert {r["base_verdict"] for r in same["prompts"]} == {"empty"}
    alone = smoke_module.smoke_test(broken)
    assert alone["degenerate"] and alone["degenerate_prompts"] == 4
    assert {r["base_verdict"] for r in alone["prompts"]} == {None}


def test_smoke_is_off_by_default_and_skipped_without_tokenizer(family, tiny_pair, tmp_path, capsys):
    base, broken = tiny_pair
    out = tmp_path / "plain"
    rc, err = rlm_merge(capsys, "--method", "task_arithmetic", "--base", base, "--models", broken, "--out", out)
    assert rc == 0 and not any(line.startswith("warning") for line in err)
    assert "smoke" not in json.loads((out / "merge_manifest.json").read_text())
    summary = merge_models(MergeRunConfig(method="ties", base=str(family["base"]), models=[str(family["e1"])],
                                          smoke=True), tmp_path / "notok")
    assert summary["smoke"] == {"ran": False, "reason": "the model has no tokenizer"}
    assert "warning: no smoke test of the merged model" in capsys.readouterr().err


def test_study_merge_step_runs_the_smoke_test(family, tmp_path, monkeypatch):
    """``rlm merge-eval`` and experiments merge through StudySteps.merge, which asks for the smoke test."""
    from types import SimpleNamespace

    from rlm.core.merge import engine
    from rlm.core.study.steps import StudySteps

    seen = []
    monkeypatch.setattr(engine, "merge_models", lambda run, out, **kw: seen.append(run) or {"tensors": 0})

    def step(name, model):
        return SimpleNamespace(name=name, result={"model": str(model)}, dir=tmp_path)

    ctx = SimpleNamespace(config={"method": "ties", "tasks": ["math"]}, out=tmp_path, name="merge",
                          inputs={"base": step("base", family["base"]), "e1": step("e1", family["e1"])})
    StudySteps(SimpleNamespace()).merge(ctx)
    assert [run.smoke for run in seen] == [True]
