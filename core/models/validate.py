"""Checking a set of models against a base before any compute (architecture, tensor names, shapes, dtypes,
vocabulary policy), shared by the merge and task-conflict engines::

    plan = validate_models(r, [src1, src2], vocab="error", scan_finite=False)
    plan.tensors                           # [TensorPlan(name, shape, dtype, vocab_rows)] in base shard order
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlm.core.errors import ModelError
from rlm.core.models.lora import LoraReader
from rlm.core.models.reader import ModelReader, check_finite, is_float


@dataclass
class TensorPlan:
    """One output tensor: its name, output shape and dtype, and whether dim 0 is the vocabulary."""

    name: str
    shape: tuple[int, ...]
    dtype: Any
    vocab: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelSetPlan:
    """What :func:`validate_models` found: output tensors in base shard order and the output vocab size."""

    tensors: list[TensorPlan]
    vocab_size: int | None
    vocab_policy: str
    # per source: rows of each vocab tensor that the source really has (rows past it fall back to the base)
    source_vocab: list[int | None] = field(default_factory=list)

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


_ARCH_KEYS = ("model_type", "architectures")


def validate_models(base: ModelReader, models: Sequence[ModelReader | LoraReader], *, vocab: str = "error",
                    scan_finite: bool = False, progress: Any = None) -> ModelSetPlan:
    """Check ``models`` against ``base`` from headers and configs: same architecture, same tensor names,
    same shapes (vocabulary rows per ``vocab``: ``error`` | ``truncate`` to the smallest | ``base``'s size),
    floating dtypes where the base is floating. With ``scan_finite`` every tensor of every input is read once
    and checked for NaN/Inf. Raises ModelError naming the model and tensor; returns the plan."""
    if vocab not in ("error", "truncate", "base"):
        raise ModelError(f"unknown vocab policy {vocab!r} (error | truncate | base)")
    base_names = base.tensor_names()
    base_set = set(base_names)
    bv = base.vocab_size
    for m in models:
        if isinstance(m, LoraReader):
            continue
        for key in _ARCH_KEYS:
            a, b = base.config.get(key), m.config.get(key)
            if a != b:
                raise ModelError(f"model {m.path} has {key}={b!r} but the base {base.path} has {key}={a!r}: "
                                 f"different architectures cannot be merged")
        names = m.tensor_names()
        extra = [n for n in names if n not in base_set]
        if extra:
            raise ModelError(f"model {m.path}: tensor {extra[0]} is not in the base model {base.path}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        have = set(names)
        missing = [n for n in base_names if n not in have]
        if missing:
            raise ModelError(f"model {m.path}: tensor {missing[0]} (present in the base {base.path}) is missing"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    vocabs = [bv] + [m.vocab_size for m in models]
    out_vocab = bv
    if vocab == "truncate" and all(v is not None for v in vocabs):
        out_vocab = min(vocabs)  # type: ignore[type-var]
    plans: list[TensorPlan] = []
    for name in base_names:
        bshape = base.shape(name)
        bdtype = base.dtype(name)
        is_vocab = bool(bshape) and bv is not None and bshape[0] == bv and (
            "embed" in name or "lm_head" in name or "wte" in name or "output" in name)
        for m in models:
            shape = m.shape(name)
            mdtype = m.dtype(name)
            if is_float(bdtype) != is_float(mdtype):
                raise ModelError(f"model {m.path}: tensor {name} has dtype {mdtype} but the base has {bdtype}")
            if shape == bshape:
                continue
            vocab_diff = (is_vocab and len(shape) == len(bshape) and shape[1:] == bshape[1:]
                          and m.vocab_size is not None and shape[0] == m.vocab_size)
            if not vocab_diff:
                raise ModelError(f"model {m.path}: tensor {name} has shape {list(shape)} but the base "
                                 f"{base.path} has {list(bshape)}")
            if vocab == "error":
                raise ModelError(f"model {m.path}: tensor {name} has vocabulary size {shape[0]} but the base "
                                 f"{base.path} has {bshape[0]}; pass --vocab truncate or --vocab base")
        oshape = bshape
        if is_vocab and out_vocab is not None:
            oshape = (out_vocab, *bshape[1:])
        plans.append(TensorPlan(name, tuple(oshape), bdtype, is_vocab))
    src_vocab = [m.vocab_size for m in models]
    plan = ModelSetPlan(plans, out_vocab, vocab, src_vocab)
    if scan_finite:
        for src in [base, *models]:
            for t in plans:
                if isinstance(src, LoraReader):
                    d = src.delta(t.name)
                    if d is not None:
                        check_finite(d, src.path, t.name)
                else:
                    check_finite(src.get(t.name), src.path, t.name)
                if progress is not None:
                    progress(src, t.name)
    return plan
