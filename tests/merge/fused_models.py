"""Small safetensors models for the fused merge tests: a base and experts with chosen dtypes, shapes and task
vectors (Gaussian, or drawn from a few values so that magnitudes tie at the TIES cut)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlm.core.models.writer import ShardedWriter

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48, "intermediate_size": 96,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40}

#: names and shapes: a vector, small matrices, one tensor over the kernels' read size (32768) and block size
SHAPES = {"model.embed_tokens.weight": (40, 48), "model.norm.weight": (48,), "model.layers.0.mlp.up_proj.weight": (96, 48),
          "model.layers.0.mlp.big.weight": (700, 480), "model.layers.0.scalar": (), "lm_head.weight": (40, 48)}


def write(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, shard_bytes: int = 400_000) -> Path:
    w = ShardedWriter(path, [(n, t.shape, dtype) for n, t in tensors.items()], max_shard_bytes=shard_bytes)
    for n, t in tensors.items():
        w.write(n, t.to(dtype))
    w.close()
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def make_set(root: Path, *, dtype: torch.dtype = torch.bfloat16, experts: int = 2, ties: bool = False,
             seed: int = 0, shapes: dict | None = None) -> tuple[Path, list[Path]]:
    """A base (N(0, 0.02) matrices, vectors near 1) and experts = base + task vectors. ``ties``: task vectors
    take values in {0, ±1, ±2, ±3}·2⁻¹⁰ (many equal magnitudes), else N(0, 10⁻³)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    base = {n: torch.randn(s, generator=g) * 0.02 + (1.0 if len(s) <= 1 else 0.0) for n, s in shapes.items()}
    bpath = write(root / "base", base, dtype)
    paths = []
    for i in range(experts):
        tensors = {}
        for n, b in base.items():
            if ties:
                tau = torch.randint(-3, 4, b.shape, generator=g).float() * 2.0 ** -10
            else:
                tau = torch.randn(b.shape, generator=g) * 1e-3
            tensors[n] = b.to(dtype).float() + tau
        paths.append(write(root / f"e{i}", tensors, dtype))
    return bpath, paths
