"""GGUF export of Llama-architecture HF models (f32/f16), so GGUF import can be tested without downloads; the
metadata of a GGUF file (what it is, how it is quantized) without loading its tensors.

Tensor names and the rotary permutation of q/k weights follow the llama.cpp GGUF convention that transformers'
GGUF loader reverses; the tokenizer is stored as a byte-level BPE (``tokenizer.ggml.model = "gpt2"``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlm.core.errors import ModelError

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_metadata(file: str | Path) -> dict:
    """What a GGUF file says about itself: ``name``, ``architecture``, ``file_type`` (llama.cpp's file type,
    e.g. ``Q4_1`` for ``MOSTLY_Q4_1``; None when absent), ``tensor_types`` (tensor count per storage type) and
    ``chat_template`` (None when absent). Reads the header through a memory map, not the tensors."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:
        raise ModelError(f"cannot read GGUF file {file}: {exc}") from exc

    def value(key: str):
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        part = field.parts[field.data[0]]
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part[0].item()

    file_type = value("general.file_type")
    if file_type is not None:
        try:
            file_type = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            file_type = str(file_type)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return {"name": value("general.name"), "architecture": value("general.architecture"), "file_type": file_type,
            "tensor_types": dict(sorted(counts.items())), "chat_template": value("tokenizer.chat_template")}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ModelError(f"tensor {hf_name!r} has no GGUF name for the llama architecture")


def rotary_interleave(weight, n_head: int):
    """Reorder the rows of a q/k projection from HF's half-split rotary layout to GGUF's interleaved one."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(model_dir: str | Path, file: str | Path, dtype: str = "f32") -> Path:
    """Write a Llama-architecture HF directory as a GGUF file."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    model_dir, file = Path(model_dir), Path(file)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: GGUF export needs a full model directory (config.json is missing; for a "
                         f"LoRA run's final/ train with lora.merge_lora=true and export final/merged)")
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ModelError(f"{model_dir}: GGUF export supports the llama architecture, not {cfg.get('model_type')!r}")
    weights_file = model_dir / "model.safetensors"
    if not weights_file.is_file():
        raise ModelError(f"{model_dir}: GGUF export needs a single model.safetensors file")
    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = json.loads(tok.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise ModelError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers only")

    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    rope = cfg.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    writer.add_vocab_size(cfg["vocab_size"])

    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    merges = backend["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)

    np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
    state = load_file(weights_file)  # tied embeddings have no lm_head.weight: the loader reuses token_embd
    for name, array in state.items():
        array = array.astype(np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            array = rotary_interleave(array, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            array = rotary_interleave(array, n_kv)
        # norms stay f32, as llama.cpp writes them
        writer.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(array if array.ndim == 1 else array.astype(np_dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file
