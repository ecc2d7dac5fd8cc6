"""mergekit's YAML merge configs, mapped onto rlm's own :class:`rlm.core.merge.engine.MergeRunConfig` data.

``rlm merge --config FILE`` takes a file in mergekit's format when its top level has ``merge_method`` (rlm's own
format has ``method``), e.g.::

    merge_method: ties
    base_model: runs/base
    models:
      - model: runs/sft-math/final
        parameters: {weight: 0.5, density: 0.8}
      - model: runs/sft-code/final
        parameters: {weight: 0.5, density: 0.8}
    parameters: {normalize: true, int8_mask: true}
    dtype: float32
    out_dtype: bfloat16

The names and defaults follow mergekit 0.1.5 (``mergekit/config.py`` and its merge methods): ``linear`` is rlm's
``averaging`` (every input, the ``base_model`` too when given, is averaged with its ``weight``);
``task_arithmetic``, ``ties``, ``dare_ties`` and ``dare_linear`` keep their names, and a ``models`` entry that
is the ``base_model`` is dropped for them (mergekit does not count the base among the task vectors). Top-level
``parameters`` that are per model in rlm (``weight``, ``density``) apply to every model, an entry's own
``parameters`` win; the others (``lambda``, ``normalize``, ``rescale``) are the method's. ``int8_mask`` only
changes the dtype of mergekit's sign mask, so it is accepted and has no effect. ``out_dtype`` (or, without it,
``dtype``) is the output dtype; rlm always computes in float32.

Everything else is refused with one line naming the field: ``slices``, ``modules``, ``tokenizer_source``,
``tokenizer``, ``chat_template``, other methods (slerp, della, model_stock, ...), per-layer gradients (lists)
and filtered values (mappings) as parameters, ``model+lora`` references, and parameters mergekit would ignore
(a global one inside ``models[].parameters``, an unknown name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlm.core.errors import ConfigError

#: mergekit method name -> rlm merge method
METHODS = {"linear": "averaging", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties",
           "dare_linear": "dare_linear"}
#: mergekit fields rlm has no equivalent of, and what to do instead
UNSUPPORTED_FIELDS = {
    "slices": "layer slices are not supported by rlm; list whole models under models",
    "modules": "per-module definitions are not supported by rlm; list whole models under models",
    "tokenizer_source": "rlm keeps the base model's tokenizer (and checks that every model shares it); remove it",
    "tokenizer": "rlm keeps the base model's tokenizer (and checks that every model shares it); remove it",
    "chat_template": "rlm keeps the base model's chat template; remove it",
}
#: every top-level field of mergekit's MergeConfiguration
FIELDS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", *UNSUPPORTED_FIELDS}
#: mergekit parameters that change nothing in rlm's arithmetic (the dtype of mergekit's sign mask)
NO_EFFECT = {"int8_mask"}
DTYPES = ("float32", "bfloat16", "float16")


def is_mergekit_config(data: dict[str, Any]) -> bool:
    """Whether a config mapping is in mergekit's format (it has ``merge_method``; rlm's has ``method``)."""
    return "merge_method" in data


def _refuse(where: str, field: str, why: str) -> ConfigError:
    return ConfigError(f"mergekit config {where}: {field}: {why}")


def _model_ref(value: Any, where: str, field: str) -> str:
    """A mergekit model reference as a path: a plain string without ``+lora`` or ``@revision`` parts."""
    if not isinstance(value, str) or not value.strip():
        raise _refuse(where, field, f"expected a model directory (a string), got {value!r}")
    if "+" in value and not Path(value).exists():
        raise _refuse(where, field, f"{value!r}: mergekit's model+lora references are not supported; "
                                    f"give the LoRA adapter directory itself as a model")
    return value


def _dtype(value: Any, where: str, field: str) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise _refuse(where, field, f"{value!r} is not supported (rlm writes {', '.join(DTYPES)})")
    return name


def _scalar_params(params: Any, where: str, field: str) -> dict[str, Any]:
    """A ``parameters`` mapping whose values are all scalars (no gradient lists, no filtered values)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _refuse(where, field, f"expected a mapping of parameters, got {type(params).__name__}")
    for key, value in params.items():
        if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
            raise _refuse(where, f"{field}.{key}", "per-layer gradients (lists of values) are not supported by "
                                                   "rlm; give one number")
        if isinstance(value, (dict, list)):
            raise _refuse(where, f"{field}.{key}", "filtered values (value/filter mappings) are not supported by "
                                                   "rlm; give one number")
    return dict(params)


def _split_params(params: dict[str, Any], method: Any, where: str, field: str, *,
                  global_ok: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` split into (the method's global parameters, per-model parameters); a name the method does not
    take, or a global one where only per-model ones count (``global_ok`` false), is refused."""
    per_model_names = set(method.ModelParams.model_fields)
    global_names = {f.alias or n for n, f in method.Config.model_fields.items()}
    glob: dict[str, Any] = {}
    per_model: dict[str, Any] = {}
    for key, value in params.items():
        if key in per_model_names:
            per_model[key] = value
        elif key in global_names or (key in NO_EFFECT and method.name != "averaging"):
            if not global_ok:
                raise _refuse(where, f"{field}.{key}", "a global parameter (mergekit ignores it here); put it in "
                                                       "the top-level parameters")
            if key not in NO_EFFECT:
                glob[key] = value
        else:
            known = sorted(per_model_names | global_names | (NO_EFFECT if method.name != "averaging" else set()))
            raise _refuse(where, f"{field}.{key}", f"not a parameter of {method.name} in rlm "
                                                   f"(known: {', '.join(known)})")
    return glob, per_model


def _same_model(a: str, b: str) -> bool:
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _entries(data: dict[str, Any], method: Any, base: str | None, shared: dict[str, Any],
             where: str) -> list[dict[str, Any]]:
    """rlm model entries ``{path, weight, density...}`` from mergekit's ``models`` (and, for ``linear``, its
    ``base_model``)."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise _refuse(where, "models", "a non-empty list of {model: DIR, parameters: {...}} is required")
    entries = []
    for i, item in enumerate(models):
        if not isinstance(item, dict) or "model" not in item:
            raise _refuse(where, f"models.{i}", f"expected a mapping with model (and parameters), got {item!r}")
        extra = sorted(set(item) - {"model", "parameters"})
        if extra:
            raise _refuse(where, f"models.{i}.{extra[0]}", "unknown field (allowed: model, parameters)")
        path = _model_ref(item["model"], where, f"models.{i}.model")
        own = _scalar_params(item.get("parameters"), where, f"models.{i}.parameters")
        _, own = _split_params(own, method, where, f"models.{i}.parameters", global_ok=False)
        entries.append({"path": path, **shared, **own, "_field": f"models.{i}"})
    if method.name == "averaging":
        if base is not None and not any(_same_model(e["path"], base) for e in entries):
            entries.append({"path": base, **shared, "_field": "base_model"})  # mergekit's linear averages it too
    else:
        entries = [e for e in entries if base is None or not _same_model(e["path"], base)]
        if not entries:
            raise _refuse(where, "models", "every entry is the base_model; list the models to merge into it")
    for e in entries:
        if "weight" not in e and e["_field"] == "base_model":
            raise _refuse(where, "base_model", "mergekit's linear averages the base_model too, and it has no "
                                               "weight; list it under models with its weight")
        if "weight" not in e:
            raise _refuse(where, f"{e['_field']}.parameters.weight", f"missing (mergekit requires a weight for "
                                                                     f"every model of {data['merge_method']})")
        del e["_field"]
    return entries


def from_mergekit(data: dict[str, Any], source: str | Path, system: Any = None) -> dict[str, Any]:
    """rlm's merge config data (``MergeRunConfig`` fields) for the mergekit config ``data`` read from
    ``source``; anything rlm does not support is a one-line :class:`ConfigError` naming the field."""
    from rlm.core.plugins import get_system

    where = str(source)
    for key, value in data.items():
        if key in UNSUPPORTED_FIELDS and value is not None:
            raise _refuse(where, key, UNSUPPORTED_FIELDS[key])
        if key not in FIELDS:
            raise _refuse(where, key, f"unknown field (mergekit's fields: {', '.join(sorted(FIELDS))})")
    name = data.get("merge_method")
    if name not in METHODS:
        raise _refuse(where, "merge_method", f"{name!r} is not supported by rlm (supported: {', '.join(METHODS)})")
    method = (system or get_system()).registry("merge_methods").get(METHODS[name])
    base = data.get("base_model")
    base = None if base is None else _model_ref(base, where, "base_model")
    if base is None and method.name != "averaging":
        raise _refuse(where, "base_model", f"required by {name}")
    top = _scalar_params(data.get("parameters"), where, "parameters")
    params, shared = _split_params(top, method, where, "parameters", global_ok=True)
    entries = _entries(data, method, base, shared, where)
    compute = _dtype(data.get("dtype"), where, "dtype")
    out = _dtype(data.get("out_dtype"), where, "out_dtype") or compute
    native: dict[str, Any] = {"method": method.name, "base": base or entries[0]["path"], "models": entries,
                              "params": params}
    if out is not None:
        native["dtype"] = out
    return native
