"""Meta-tests of the code layout: every module of rlm imports alone, no import cycles, core never imports the
built-in plugins, modules stay under 800 lines and functions under 80 (unless a ``# long:`` comment says why)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"rlm.core": REPO / "core", "rlm.plugins": REPO / "plugins"}
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, Path]:
    """Every module of the rlm distribution (``rlm.core...``, ``rlm.plugins...``) and its source file."""
    out: dict[str, Path] = {}
    for prefix, root in ROOTS.items():
        for f in sorted(root.rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and parts[-1] == "__main__":
                continue  # running the program is what importing it does
            out[".".join([prefix, *parts])] = f
    return out


MODULES = module_files()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, parents: bool) -> list[str]:
    """rlm modules an import statement names (the module and imported submodules) and, with ``parents``, the
    parent packages Python initialises first."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                pkg = pkg.rsplit(".", 1)[0]
            base = f"{pkg}.{base}" if base else pkg
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(2 if parents else len(parts), len(parts) + 1):  # parent packages run first
            cand = ".".join(parts[:i])
            if cand in MODULES and cand != module:
                out.append(cand)
    return out


def imports_of(module: str, *, lazy: bool) -> set[str]:
    """rlm modules ``module`` imports at module level, with the parent packages Python initialises first
    (``lazy``: also inside functions, naming only the modules imported: inside a function every parent package
    is already initialised), without ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt], top: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if top or lazy:
                    found.update(_targets(node, module, parents=not lazy))
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if lazy:
                    visit(node.body, False)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, top)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, ast.AST)], top)

    visit(tree.body, True)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _import_alone(name: str) -> str | None:
    res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
    return None if res.returncode == 0 else f"{name}: {(res.stderr.strip().splitlines() or ['?'])[-1]}"


def test_every_module_imports_alone_in_a_fresh_interpreter():
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        bad = [b for b in pool.map(_import_alone, sorted(MODULES)) if b]
    assert bad == [], "modules that fail to import alone:\n" + "\n".join(bad)


def test_no_module_level_import_cycle():
    graph = {m: imports_of(m, lazy=False) for m in MODULES}
    assert cycles(graph) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    """Deferred imports (kept out of module level so ``rlm --help`` stays fast) must not go back and forth
    between modules either: the dependencies of the engines point one way."""
    graph = {m: imports_of(m, lazy=True) for m in MODULES}
    assert cycles(graph) == []


def test_core_never_imports_the_built_in_plugins():
    offenders = sorted(m for m in MODULES if m.startswith("rlm.core")
                       for t in imports_of(m, lazy=True) if t.startswith("rlm.plugins"))
    assert offenders == []


def test_task_plugins_do_not_import_each_other():
    tasks = {m.split(".")[3] for m in MODULES if m.startswith("rlm.plugins.tasks.") and m.count(".") >= 3}
    bad = []
    for m in MODULES:
        if m.startswith("rlm.plugins.tasks.") and m.count(".") >= 3:
            own = m.split(".")[3]
            bad += [(m, t) for t in imports_of(m, lazy=True)
                    if t.startswith("rlm.plugins.tasks.") and t.count(".") >= 3 and t.split(".")[3] != own
                    and t.split(".")[3] in tasks]
    assert bad == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_MODULE_LINES, f"{module} has {n} lines (at most {MAX_MODULE_LINES}): split it by concern"


def long_functions(path: Path) -> list[str]:
    """Functions over MAX_FUNCTION_LINES lines without a ``# long: reason`` comment on the line above their
    ``def`` (or above their decorators)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            if n > MAX_FUNCTION_LINES and not above.startswith("# long:"):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    return bad


def test_functions_are_short_or_say_why():
    bad = [b for f in sorted(set(MODULES.values())) for b in long_functions(f)]
    assert bad == [], "functions over 80 lines without a '# long: reason' comment:\n" + "\n".join(bad)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
