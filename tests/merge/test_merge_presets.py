"""`rlm merge --preset NAME` takes a method's settings from the plugin's ``presets``, for a third-party method as
for the built-ins: an explicit ``--set params.x=...`` (or ``--weights``) wins over the preset, and an unknown
preset is one line listing the method's presets. The merge command is a module-level function that arrives
through ``register_commands`` like any plugin's."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from test_merge_engine import load, make_llama
from typer.testing import CliRunner

from rlm.core.contracts import MergeMethod, PluginConfig
from rlm.core.hookspecs import hookimpl
from rlm.core.plugins import PluginSystem, reset_system


class ScaledSum(MergeMethod):
    """A third party's method: θ_b + scale · Σ_i w_i τ_i + shift."""

    name = "scaled_sum"

    class Config(PluginConfig):
        scale: float = 1.0
        shift: float = 0.0

    presets = {"paper": {"params": {"scale": 0.5, "shift": 0.125}, "model_params": {"weight": 2.0}},
               "plain": {"params": {}}}

    def merge(self, base, deltas, params, *, context=None):
        w = torch.tensor([p.weight for p in params], dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
        return base + self.config.scale * (deltas * w).sum(dim=0) + self.config.shift


class ThirdParty:
    @hookimpl
    def register_merge_methods(self, register):
        register(ScaledSum)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset-models")
    base = make_llama(root / "base", 0)
    return base, make_llama(root / "e1", 1, base=base), make_llama(root / "e2", 2, base=base)


@pytest.fixture
def rlm_merge(experts, tmp_path, capsys):
    """``rlm merge --method scaled_sum`` on the experts, the fake plugin installed next to the built-ins in the
    process-wide plugin system; returns (exit code, stderr, output directory)."""
    from rlm.core.cli import main

    system = PluginSystem()
    system.add_plugin(ThirdParty(), name="third-party", distribution="rlm-third-party", version="0.1")
    reset_system(system)
    base, e1, e2 = experts
    counter = iter(range(100))

    def run(*args: str):
        out = tmp_path / f"out{next(counter)}"
        capsys.readouterr()
        rc = main(["merge", "--method", "scaled_sum", "--base", str(base), "--models", f"{e1},{e2}",
                   "--out", str(out), "--workers", "0", *args])
        return rc, capsys.readouterr().err, out

    try:
        yield run
    finally:
        reset_system(None)


def expected(experts, scale, weights, shift):
    b, e1, e2 = (load(p) for p in experts)
    return {n: b[n] + scale * (weights[0] * (e1[n] - b[n]) + weights[1] * (e2[n] - b[n])) + shift for n in b}


def check(out, want):
    got = load(out)
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5, msg=name)


def manifest(out):
    return json.loads((out / "merge_manifest.json").read_text())


def test_preset_of_a_third_party_method_is_applied(experts, rlm_merge):
    rc, err, out = rlm_merge("--preset", "paper")
    assert rc == 0, err
    man = manifest(out)
    assert man["method_params"] == {"scale": 0.5, "shift": 0.125}
    assert [m["weight"] for m in man["model_params"]] == [2.0, 2.0]
    check(out, expected(experts, 0.5, [2.0, 2.0], 0.125))


def test_explicit_settings_win_over_the_preset(experts, rlm_merge):
    rc, err, out = rlm_merge("--preset", "paper", "--set", "params.scale=0.25", "--weights", "1.0,0.5")
    assert rc == 0, err
    man = manifest(out)
    assert man["method_params"] == {"scale": 0.25, "shift": 0.125}  # shift still from the preset
    assert [m["weight"] for m in man["model_params"]] == [1.0, 0.5]
    check(out, expected(experts, 0.25, [1.0, 0.5], 0.125))


def test_without_preset_the_config_defaults_apply(experts, rlm_merge):
    rc, err, out = rlm_merge()
    assert rc == 0, err
    assert manifest(out)["method_params"] == {"scale": 1.0, "shift": 0.0}
    check(out, expected(experts, 1.0, [1.0, 1.0], 0.0))


def test_unknown_preset_is_one_line_listing_the_presets(rlm_merge):
    rc, err, out = rlm_merge("--preset", "papr")
    assert rc == 2
    assert err.strip() == "error: merge method 'scaled_sum' has no preset 'papr' (presets: paper, plain)"
    assert not out.exists()


def test_merge_command_is_module_level_and_registers_through_the_hook():
    import rlm.core.cli.merge as merge_cli
    from rlm.core.cli.merge import merge

    system = PluginSystem(load_entry_points=False)
    system.add_plugin(merge_cli, name="commands.merge")
    app = typer.Typer()
    system.register_commands(app)
    assert [c.callback for c in app.registered_commands] == [merge]
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "--preset" in result.output
