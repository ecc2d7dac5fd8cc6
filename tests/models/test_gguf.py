"""GGUF: export the tiny model, import it back through transformers, same tokens and logits."""

from __future__ import annotations

import json

import torch

from rlm.core.cli import main
from rlm.core.models.hf import load_model


def test_gguf_round_trip_through_cli(tiny_model_dir, tmp_path):
    gguf_file = tmp_path / "tiny.gguf"
    assert main(["model", "export-gguf", str(tiny_model_dir), "--out", str(gguf_file)]) == 0
    out = tmp_path / "imported"
    assert main(["model", "import-gguf", str(gguf_file), "--out", str(out)]) == 0
    assert json.loads((out / "rlm_manifest.json").read_text())["inputs"]["gguf"]["sha256"]
    a, tok_a = load_model(tiny_model_dir)
    b, tok_b = load_model(out)
    text = "What is 12 + 30? The answer is 42. ünï ✓"
    ids = tok_a(text, return_tensors="pt")
    assert tok_b(text)["input_ids"] == ids["input_ids"][0].tolist()
    assert tok_b.chat_template == tok_a.chat_template
    with torch.no_grad():
        assert torch.allclose(a(**ids).logits, b(**ids).logits, atol=1e-6)


def test_import_gguf_missing_file(tmp_path, capsys):
    assert main(["model", "import-gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_export_of_an_adapter_only_directory_is_one_line(tmp_path, tiny_model_dir, capsys):
    import json

    from rlm.core.cli import main

    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir),
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert main(["model", "export-gguf", str(adapter), "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is missing" in err[0] and "final/merged" in err[0]
    assert not (tmp_path / "m.gguf").exists()
