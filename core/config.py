"""Run configs: a YAML/TOML/JSON file, then repeated ``--set a.b=value``, then explicit flags, validated by
pydantic with messages that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rlm.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a mapping from a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"cannot parse config file {p}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_set(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a mapping")
        node = child
    node[path[-1]] = value


def merge_sources(file: str | Path | None = None, sets: Sequence[str] = (),
                  flags: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Combine the sources in precedence order: base < file < --set < flags (flags that are None are unset)."""
    data: dict[str, Any] = json.loads(json.dumps(dict(base or {})))
    if file is not None:
        deep_update(data, read_config_file(file))
    for item in sets:
        path, value = parse_set(item)
        apply_set(data, path, value)
    for key, value in (flags or {}).items():
        if value is not None:
            apply_set(data, key.split("."), value)
    return data


def deep_update(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    """Merge ``src`` into ``dst``: mappings merge key by key, everything else is replaced by a copy."""
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = json.loads(json.dumps(v))


def _shown_input(value: Any, limit: int = 80) -> str:
    """`` (got VALUE)`` for an error line: nothing for a whole section (a model-level check's input), a long
    value cut to ``limit`` characters."""
    if isinstance(value, Mapping):
        return ""
    text = repr(value)
    return f" (got {text if len(text) <= limit else text[:limit - 3] + '...'})"


def validate(model: type[M], data: Mapping[str, Any], source: str = "config") -> M:
    """Validate ``data`` as ``model``; the error lists every bad field by its dotted path."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(model.model_fields))
                msg = f"unknown field (allowed: {allowed})" if len(err["loc"]) == 1 else "unknown field"
            got = _shown_input(err["input"]) if err["type"] not in ("missing", "extra_forbidden") else ""
            lines.append(f"  {loc}: {msg}{got}")
        raise ConfigError(f"invalid {source} for {model.__name__}:\n" + "\n".join(lines)) from None


def task_config_sets(tasks: Sequence[str], sets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--task-set`` items -> config overrides per task name. An item is ``TASK.FIELD=VALUE``, or
    ``FIELD=VALUE`` when only one task is given; a task named in an item must be one of ``tasks``."""
    names = list(dict.fromkeys(tasks))
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in sets:
        path, value = parse_set(item)
        if path[0] in out and len(path) > 1:
            name, path = path[0], path[1:]
        elif len(names) == 1:
            name = names[0]
        else:
            raise ConfigError(f"--task-set {item!r}: name the task first (TASK.FIELD=VALUE; tasks: "
                              f"{', '.join(names)})")
        apply_set(out[name], path, value)
    return {n: v for n, v in out.items() if v}


def load_config(model: type[M], file: str | Path | None = None, sets: Sequence[str] = (),
                flags: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None) -> M:
    """Build a validated config of type ``model`` from defaults, a file, ``--set`` overrides and flags."""
    source = f"config {file}" if file else "config"
    return validate(model, merge_sources(file, sets, flags, base), source)
