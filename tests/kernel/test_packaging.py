"""Packaging: the wheel holds every package folder; the example plugin installs and is listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pip(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _source_copy(dst: Path) -> Path:
    """Copy the sources to build from: building in the checkout would leave an ``rlm.egg-info`` there that
    shadows the installed distribution's entry points whenever Python runs from the checkout."""
    import shutil

    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    for top in ("core", "plugins"):
        shutil.copytree(REPO / top, dst / top, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_wheel_contains_every_package_folder(tmp_path):
    src = _source_copy(tmp_path / "src")
    res = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src))
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("rlm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for top, prefix in (("core", "rlm/core"), ("plugins", "rlm/plugins")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            target = f"{prefix}/{rel.as_posix()}/__init__.py" if str(rel) != "." else f"{prefix}/__init__.py"
            assert target in names, f"{init.parent} is missing from the wheel (add it to [tool.setuptools] packages)"
        for py in (REPO / top).rglob("*.py"):
            rel = py.relative_to(REPO / top).as_posix()
            assert f"{prefix}/{rel}" in names, f"{py} is missing from the wheel"
    eps = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(eps).decode()
    assert "[console_scripts]" in text and "rlm = rlm.core.cli:run" in text


def test_example_plugin_installs_and_is_listed(tmp_path):
    target = tmp_path / "site"
    import shutil

    src = tmp_path / "example"
    shutil.copytree(REPO / "examples" / "rlm-example-plugin", src,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    res = _pip("install", "--no-deps", "--no-build-isolation", "--target", str(target), str(src))
    assert res.returncode == 0, res.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    res = subprocess.run([sys.executable, "-m", "rlm.core.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert "sign_consensus" in data["merge_methods"]
    plugin = {p["name"]: p for p in data["plugins"]}["example"]
    assert plugin["distribution"] == "rlm-example-plugin"
    assert plugin["version"] == "0.1.0"
    assert sorted(plugin["registered"]) == ["letter_count", "max_update", "median_rl", "sign_consensus"]
    assert plugin["error"] is None
