"""``manifest.json``: what produced a run directory (command, resolved config, seed, inputs, versions)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from rlm.core.cpu_numerics import cpu_numerics
from rlm.core.io.atomic import atomic_write_json, sha256_file

PACKAGES = ("rlm", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy",
            "pluggy", "pydantic", "typer", "lm_eval", "math-verify")
# Files that identify a model directory without hashing gigabytes of weights.
MODEL_ID_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                  "adapter_config.json", "tokenizer_config.json", "generation_config.json")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def describe_input(path: str | Path) -> dict[str, Any]:
    """Path plus hashes: a model directory by its config and index files, a file by its content."""
    p = Path(path)
    info: dict[str, Any] = {"path": str(p.resolve()) if p.exists() else str(p)}
    if p.is_dir():
        info["files"] = {name: sha256_file(p / name) for name in MODEL_ID_FILES if (p / name).is_file()}
    elif p.is_file():
        info["sha256"] = sha256_file(p)
        info["bytes"] = p.stat().st_size
    else:
        info["missing"] = True
    return info


def build_manifest(*, command: list[str] | None = None, config: BaseModel | Mapping[str, Any] | None = None,
                   seed: int | None = None, inputs: Mapping[str, str | Path] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config or {})
    manifest = {
        "command": list(command if command is not None else sys.argv),
        "config": cfg,
        "seed": seed,
        "inputs": {k: describe_input(v) for k, v in (inputs or {}).items()},
        "versions": package_versions(),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_numerics": cpu_numerics(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update(dict(extra or {}))
    return manifest


def write_manifest(out_dir: str | Path, name: str = "manifest.json", **kwargs: Any) -> Path:
    """Write ``manifest.json`` (or ``name``) into ``out_dir`` atomically; see :func:`build_manifest`."""
    return atomic_write_json(Path(out_dir) / name, build_manifest(**kwargs))
