"""Model presets, loading, saving, manifests."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlm.core.cli import main
from rlm.core.errors import ModelError
from rlm.core.models.hf import init_tiny, load_model, resolve_model
from rlm.core.models.tiny import build_tokenizer


def test_tiny_loads_with_transformers_and_generates_through_chat_template(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert tok.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    text = tok.decode(enc["input_ids"][0])
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tiny_model_dir / name).is_file()


def test_tiny_is_deterministic_per_seed(tmp_path, tiny_model_dir):
    again = init_tiny(tmp_path / "again", seed=0)
    other = init_tiny(tmp_path / "other", seed=1)
    a = load_file(tiny_model_dir / "model.safetensors")
    b = load_file(again / "model.safetensors")
    c = load_file(other / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()


def test_tokenizer_round_trips_text():
    tok = build_tokenizer()
    text = "def f(x):\n    return x * 2  # ünïcode ✓ 12345"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_word_tiny_stands_for_a_fresh_model():
    path = resolve_model("tiny")
    assert path == resolve_model("tiny:0")
    model, tok = load_model("tiny")
    assert model.config.vocab_size == len(tok)


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        resolve_model(tmp_path / "empty")


def test_cli_model_init_writes_manifest_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["model", "init", "tiny", "--out", str(out), "--seed", "3", "--set", "num_hidden_layers=1"]) == 0
    manifest = json.loads((out / "rlm_manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["config"]["num_hidden_layers"] == 1
    assert manifest["versions"]["torch"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert main(["model", "init", "tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["model", "init", "tiny", "--out", str(out), "--overwrite"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
