"""The model arguments rlm hands lm-eval's ``hf`` model: a plain directory, and a LoRA adapter directory without a
merged model (its base with ``peft=``)."""

from __future__ import annotations

import json

from rlm.core.eval.lm_eval import _model_args


def test_plain_directory_and_adapter_only_directory(tmp_path, tiny_model_dir):
    assert _model_args(str(tiny_model_dir)) == f"pretrained={tiny_model_dir},dtype=float32"
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir),
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert _model_args(str(adapter)) == f"pretrained={tiny_model_dir},peft={adapter},dtype=float32"
