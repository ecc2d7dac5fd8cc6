"""Meta-tests: every hook is documented with its exact signature and exercised by a test."""

from __future__ import annotations

import inspect
from pathlib import Path

from rlm.core import hookspecs

REPO = Path(__file__).resolve().parents[2]


def hook_functions():
    return {name: fn for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, "rlm_spec")}


def signature_text(fn) -> str:
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{fn.__name__}({params}) -> {sig.return_annotation}"


def test_there_are_six_hooks_each_with_a_docstring():
    hooks = hook_functions()
    assert set(hooks) == {"register_trainers", "register_merge_methods", "register_tasks", "register_metrics",
                          "register_generation_backends", "register_commands"}
    for fn in hooks.values():
        assert fn.__doc__ and fn.__doc__.strip()


def test_every_hook_is_documented_with_its_exact_signature():
    doc = (REPO / "docs" / "plugins.md").read_text()
    for name, fn in hook_functions().items():
        assert f"### {name}" in doc, f"{name} has no section in docs/plugins.md"
        assert signature_text(fn) in doc, f"docs/plugins.md lacks the signature {signature_text(fn)}"


def test_every_hook_has_a_test():
    tests = "".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py") if p.name != "test_docs.py")
    for name in hook_functions():
        assert f"def {name}(" in tests, f"no test implements the hook {name}"
