"""The built-in study presets (the YAML files in ``rlm/core/study/presets``) and :func:`load_experiment`.

Loading: a preset name (``cpu-tiny``, ``micro``, ``smollm2-135m``, ``paper``), a YAML/TOML/JSON file or a
mapping; then, with ``quick=True``, the file's ``quick:`` block is deep-merged over it (mappings merge key by
key, lists and scalars replace); then ``--set a.b=value`` overrides (list items may be addressed by index or
by their ``label``/``name``, e.g. ``tasks.math.eval_size=16``); then validation as an
:class:`rlm.core.study.config.ExperimentConfig` (unknown fields are errors naming the field).
"""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlm.core.config import deep_update, parse_set, read_config_file, validate
from rlm.core.errors import ConfigError
from rlm.core.study.config import ExperimentConfig

PRESET_PACKAGE = "rlm.core.study"
PRESET_DIR = "presets"


def list_presets() -> list[str]:
    """Names of the built-in presets, sorted."""
    root = resources.files(PRESET_PACKAGE) / PRESET_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_data(name: str) -> dict[str, Any]:
    """The raw mapping of a preset (with its ``quick`` block), or a ConfigError with the closest names."""
    import yaml

    presets = list_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"no experiment config file or preset named {name!r}{hint} (presets: {', '.join(presets)})")
    text = (resources.files(PRESET_PACKAGE) / PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} does not hold a mapping")
    return data


def _list_index(node: list[Any], part: str, where: str, item: str) -> int:
    """The index of a list item addressed by position or by its ``label`` (or ``name``, when unlabelled or
    unambiguous)."""
    if re.fullmatch(r"-?\d+", part):
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise ConfigError(f"--set {item}: {where}: index out of range (the list has {len(node)} items)")
        return idx
    matches = [j for j, x in enumerate(node) if isinstance(x, dict)
               and (x.get("label") == part or (x.get("label") is None and x.get("name") == part))]
    if not matches:  # a labelled item by its plugin name, when that is unambiguous
        by_name = [j for j, x in enumerate(node) if isinstance(x, dict) and x.get("name") == part]
        matches = by_name if len(by_name) == 1 else []
    if not matches:
        names = [x.get("label") or x.get("name") for x in node if isinstance(x, dict)]
        raise ConfigError(f"--set {item}: {where}: no list item named {part!r} "
                          f"(items: {', '.join(str(n) for n in names)})")
    return matches[0]


def _apply_set(data: dict[str, Any], path: Sequence[str], value: Any, item: str) -> None:
    """``a.b.c=value`` where a list may be indexed by position or by an item's ``label`` / ``name``."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where, item)
            if last:
                node[idx] = value
                return
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"--set {item}: {'.'.join(path[:i])} is not a mapping or list")


def load_experiment(config_or_preset: str | Path | Mapping[str, Any], quick: bool = False,
                    sets: Sequence[str] = ()) -> ExperimentConfig:
    """Load a preset name, a config file or a mapping; apply the ``quick`` block if asked, then ``sets``."""
    if isinstance(config_or_preset, Mapping):
        data, source = json.loads(json.dumps(dict(config_or_preset))), "experiment config"
    else:
        p = Path(config_or_preset).expanduser()
        if p.is_file():
            data, source = read_config_file(p), f"experiment config {p}"
        elif str(config_or_preset) in list_presets() or not p.suffix:
            data, source = preset_data(str(config_or_preset)), f"preset {config_or_preset}"
        else:
            raise ConfigError(f"experiment config file not found: {p}")
    quick_block = data.pop("quick", None)
    if quick_block is not None and not isinstance(quick_block, dict):
        raise ConfigError(f"{source}: the quick block must be a mapping, not {type(quick_block).__name__}")
    if quick:
        if not quick_block:
            raise ConfigError(f"{source} has no quick block; run without --quick")
        deep_update(data, quick_block)
        source += " (quick)"
    for item in sets:
        path, value = parse_set(item)
        _apply_set(data, path, value, item)
    return validate(ExperimentConfig, data, source)
