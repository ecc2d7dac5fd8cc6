"""Layout of ``rlm.core.conflicts``: every module imports alone, the engines do not import each other (only
``engine`` imports both), no import cycles (module-level or lazy), the modules the command line and the
metric plugins load stay free of heavy libraries, and the engines read only members declared on ``Metric``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rlm.core.conflicts
from rlm.core.contracts import Metric

PACKAGE = "rlm.core.conflicts"
ROOT = Path(rlm.core.conflicts.__file__).parent
MODULES = ["config", "stats", "chunk", "pair_topk", "passes", "eager", "fused", "engine", "over_steps", "report"]
ENGINES = ["passes", "eager", "fused", "engine"]


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone(module):
    _run(f"import {PACKAGE}.{module}")


def _imports(module: str) -> set[str]:
    """Every ``rlm.core.conflicts`` module that ``module`` imports, at module level or inside functions."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                out |= {a.name for a in node.names}
            elif node.module.startswith(PACKAGE + "."):
                out.add(node.module[len(PACKAGE) + 1:])
        elif isinstance(node, ast.Import):
            out |= {a.name[len(PACKAGE) + 1:] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return out - {"_kernels"}


def test_the_engines_do_not_import_each_other_and_there_is_no_cycle():
    graph = {m: _imports(m) for m in MODULES}
    assert "engine" not in graph["fused"] and "eager" not in graph["fused"]
    assert "engine" not in graph["eager"] and "fused" not in graph["eager"]
    assert [m for m in MODULES if {"eager", "fused"} & graph[m]] == ["engine"]

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path + (m,))}"
        for dep in graph.get(m, ()):
            visit(dep, path + (m,))

    for m in MODULES:
        visit(m, ())
    # and at run time: the fused engine's module does not load the engine
    _run(f"import sys, {PACKAGE}.fused; assert '{PACKAGE}.engine' not in sys.modules")


def test_light_modules_import_no_heavy_library():
    """What ``rlm --help``, ``rlm plugins`` and the metric plugins load stays free of torch and numpy."""
    light = [f"{PACKAGE}.{m}" for m in ("config", "stats", "chunk", "pair_topk", "report")]
    light += [f"rlm.plugins.metrics.{m}" for m in ("conflict_norm", "cosine", "fraction_updated", "sign_conflict",
                                                   "topk_overlap", "update_norm")]
    light += ["rlm.core.cli.conflicts"]
    _run("import sys\n" + "".join(f"import {m}\n" for m in light)
         + "heavy = [m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules]\n"
           "assert not heavy, heavy")


def test_the_engines_probe_no_metric_member():
    """No ``getattr``/``hasattr`` of Metric members in the engines: they are declared on the base class."""
    members = {"update_histogram", "histogram_bits", "count_thresholds", "scope", "needs_topk", "reads_deltas",
               "columns", "section", "default"}
    assert members <= set(dir(Metric))
    for module in ENGINES:
        for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr",
                                                                                                  "hasattr"):
                names = {a.value for a in node.args if isinstance(a, ast.Constant)}
                assert not names & members, f"{module}.py probes {names & members}"
