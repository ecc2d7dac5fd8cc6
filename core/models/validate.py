"""Checking a set of models against a base before any compute (architecture, tensor names, shapes, dtypes,
vocabulary policy), shared by the merge and task-conflict engines::

    plan = validate_models(r, [src1, src2], vocab="error", scan_finite=False)
    plan.tensors                           # [TensorPlan(name, shape, dtype, vocab_rows)] in base shard order

and whether they belong together (used by the merge; see docs/merging.md)::

    check_configs(r, models)               # hidden size, layers, heads, MLP size (vocab size under vocab="error")
    check_tokenizers(r, models)            # the same token for every id
    check_descent(r, models, plan)         # cosine similarity to the base on a few sampled matrices
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
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


# ------------------------------------------------------------------------------------------------------
# checks that the inputs belong together (used by the merge before any tensor is merged)
# ------------------------------------------------------------------------------------------------------

#: config entries that must agree between the base and every full model: (name in messages, keys it goes by)
CONFIG_SHAPE_KEYS = (
    ("hidden_size", ("hidden_size", "n_embd", "d_model")),
    ("num_hidden_layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ("num_attention_heads", ("num_attention_heads", "n_head")),
    ("num_key_value_heads", ("num_key_value_heads",)),
    ("intermediate_size", ("intermediate_size", "n_inner")),
    ("vocab_size", ("vocab_size",)),
)


def _config_value(config: dict[str, Any], keys: Sequence[str]) -> Any:
    for cfg in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
    return None


def check_configs(base: ModelReader, models: Sequence[ModelReader | LoraReader], *, vocab: str = "error") -> None:
    """Refuse a full model whose config differs from the base's in the shape of the network (hidden size, layer
    count, attention heads, key/value heads, MLP size; the vocabulary size too under ``vocab="error"``), with
    one line naming the model, the entry and both values. Shapes that agree tensor by tensor can still hide a
    different head count, which would make the merged model compute garbage."""
    for m in models:
        if isinstance(m, LoraReader):
            continue
        for label, keys in CONFIG_SHAPE_KEYS:
            if label == "vocab_size" and vocab != "error":
                continue
            a, b = _config_value(base.config, keys), _config_value(m.config, keys)
            if a is not None and b is not None and a != b:
                hint = "; pass --vocab truncate or --vocab base" if label == "vocab_size" else ""
                raise ModelError(f"model {m.path} has {label}={b!r} in config.json but the base {base.path} has "
                                 f"{label}={a!r}: they cannot be merged{hint}")


def tokenizer_vocab(directory: Path) -> dict[int, str] | str | None:
    """The vocabulary of the tokenizer saved in ``directory``: ``{id: token}`` from ``tokenizer.json`` (its
    model's vocabulary and added tokens) or ``vocab.json`` (+ ``added_tokens.json``); the sha256 of a
    SentencePiece ``tokenizer.model`` otherwise; ``None`` without a tokenizer."""
    import json

    def load(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read tokenizer file {path}: {exc}") from None

    ids: dict[int, str] = {}
    if (directory / "tokenizer.json").is_file():
        data = load(directory / "tokenizer.json")
        vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
        if isinstance(vocab, dict):
            ids = {int(i): str(t) for t, i in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            ids = {i: str(e[0] if isinstance(e, list) else e) for i, e in enumerate(vocab)}
        for added in (data.get("added_tokens") or []) if isinstance(data, dict) else []:
            ids[int(added["id"])] = str(added["content"])
        return ids
    if (directory / "vocab.json").is_file():
        ids = {int(i): str(t) for t, i in load(directory / "vocab.json").items()}
        if (directory / "added_tokens.json").is_file():
            ids.update({int(i): str(t) for t, i in load(directory / "added_tokens.json").items()})
        return ids
    if (directory / "tokenizer.model").is_file():
        import hashlib

        return hashlib.sha256((directory / "tokenizer.model").read_bytes()).hexdigest()
    return None


def _vocab_difference(base: dict[int, str] | str, other: dict[int, str] | str, vocab: str) -> str | None:
    """How ``other``'s vocabulary differs from the base's (``None``: it does not, or they cannot be compared)."""
    if isinstance(base, str) or isinstance(other, str):
        if isinstance(base, str) and isinstance(other, str) and base != other:
            return "its tokenizer.model differs from the base's"
        return None
    if base == other:
        return None
    for i in sorted(set(base) & set(other)):
        if base[i] != other[i]:
            return f"token id {i} is {other[i]!r} there but {base[i]!r} in the base"
    if vocab == "error":  # same tokens where both have them: one has more
        extra = sorted(set(other) - set(base)) or sorted(set(base) - set(other))
        owner = "it" if set(other) - set(base) else "the base"
        return (f"it has {len(other)} tokens and the base {len(base)} ({owner} alone has id {extra[0]} "
                f"{(other if owner == 'it' else base)[extra[0]]!r}); pass --vocab truncate or --vocab base")
    return None


def _tokenizer_files(directory: Path) -> tuple[bytes, ...] | None:
    """The raw bytes of the tokenizer files :func:`tokenizer_vocab` reads (``None`` without a tokenizer)."""
    for names in (("tokenizer.json",), ("vocab.json", "added_tokens.json"), ("tokenizer.model",)):
        if (directory / names[0]).is_file():
            return tuple((directory / n).read_bytes() for n in names if (directory / n).is_file())
    return None


def check_tokenizers(base: ModelReader, models: Sequence[ModelReader | LoraReader], *, vocab: str = "error") -> int:
    """Refuse a model whose saved tokenizer maps a token id to another token than the base's (or, under
    ``vocab="error"``, has other ids at all): the merged model keeps the base's tokenizer, so the expert's rows
    would be read as other tokens. Models without tokenizer files are not compared; byte-identical files are
    not parsed. Returns how many models were compared."""
    base_files = _tokenizer_files(base.path)
    if base_files is None:
        return 0
    base_vocab: dict[int, str] | str | None = None
    compared = 0
    for m in models:
        files = _tokenizer_files(Path(m.path))
        if files is None:
            continue
        compared += 1
        if files == base_files:
            continue
        base_vocab = base_vocab if base_vocab is not None else tokenizer_vocab(base.path)
        difference = _vocab_difference(base_vocab, tokenizer_vocab(Path(m.path)), vocab)  # type: ignore[arg-type]
        if difference is not None:
            raise ModelError(f"model {m.path}: its tokenizer differs from the base {base.path}'s: {difference}")
    return compared


#: a model descends from the base when every sampled tensor has at least this cosine similarity to the base's;
#: fine-tuned experts measure above 0.99 and independently initialised or trained models near 0 (docs/merging.md)
DESCENT_MIN_COSINE = 0.25
DESCENT_SAMPLES = 4               # tensors compared per model
DESCENT_SAMPLE_ELEMENTS = 1 << 18  # at most this many leading elements (whole rows) of each


def descent_sample(plan: ModelSetPlan, count: int = DESCENT_SAMPLES) -> list[tuple[str, tuple[int, int]]]:
    """Up to ``count`` matrices spread over the network (not the vocabulary ones, nor vectors such as norms,
    which look alike in unrelated models), each with the leading rows to compare."""
    eligible = [t for t in plan.tensors if len(t.shape) >= 2 and not t.vocab and is_float(t.dtype) and t.numel >= 64]
    if not eligible:
        return []
    picks = sorted({round(i * (len(eligible) - 1) / max(1, count - 1)) for i in range(count)})
    out = []
    for i in picks:
        t = eligible[i]
        row = t.numel // t.shape[0]
        out.append((t.name, (0, max(1, min(t.shape[0], DESCENT_SAMPLE_ELEMENTS // max(1, row))))))
    return out


def tensor_cosine(a: Any, b: Any) -> float | None:
    """Cosine similarity of two tensors, flattened, in float64 (``None`` when either is all zero)."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0 or ny == 0:
        return None
    return float(x @ y) / (nx * ny)


def check_descent(base: ModelReader, models: Sequence[ModelReader | LoraReader], plan: ModelSetPlan, *,
                  skip: Sequence[int] = (), min_cosine: float = DESCENT_MIN_COSINE) -> list[dict[str, Any]]:
    """Refuse a full model that does not descend from ``base``: the cosine similarity of its weights to the
    base's, on the leading rows of a few matrices (:func:`descent_sample`), must reach ``min_cosine`` for each.
    LoRA adapters (task vectors by construction) and the models at the indices ``skip`` are not compared.
    Returns ``[{"model", "min_cosine", "tensors"}]`` for the compared models."""
    sample = descent_sample(plan)
    base_rows = {name: base.get(name, rows) for name, rows in sample}
    found = []
    for i, m in enumerate(models):
        if isinstance(m, LoraReader) or i in skip or not sample:
            continue
        worst: tuple[float, str] | None = None
        for name, rows in sample:
            cos = tensor_cosine(m.get(name, rows), base_rows[name])
            if cos is not None and (worst is None or cos < worst[0]):
                worst = (cos, name)
        if worst is None:
            continue
        if worst[0] < min_cosine:
            raise ModelError(f"model {m.path} does not descend from the base {base.path}: tensor {worst[1]} has "
                             f"cosine similarity {worst[0]:.3f} to the base's, below {min_cosine} (fine-tuned "
                             f"experts measure above 0.9); merge experts of this base, or set check_descent=false")
        found.append({"model": str(m.path), "min_cosine": round(worst[0], 6), "tensors": len(sample)})
    return found
