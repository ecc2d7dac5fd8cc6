"""Command line: version, plugins JSON contract, config schema, errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

from rlm.core import __version__
from rlm.core.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rlm {__version__}"


def test_plugins_json_contract(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"trainers", "merge_methods", "tasks", "metrics", "generation_backends", "plugins"}
    assert data["generation_backends"] == ["hf", "vllm"]
    for p in data["plugins"]:
        assert set(p) == {"name", "distribution", "version", "registered", "error"}
        assert p["error"] is None, p


def test_plugins_table(capsys):
    assert main(["plugins"]) == 0
    assert "merge methods" in capsys.readouterr().out


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from rlm.core.cli import main; main(['plugins', '--json']); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["no-such-command"]) == 2


def test_built_in_commands_are_entry_point_plugins_with_importable_functions():
    """Every built-in command arrives through register_commands, from an entry point of the rlm group, as a
    module-level function; disabling the entry point removes the command like a third party's."""
    import importlib.metadata as md

    import typer

    eps = {ep.name: ep.value for ep in md.entry_points(group="rlm") if ep.name.startswith("commands.")}
    assert eps == {f"commands.{n}": f"rlm.core.cli.{n}" for n in
                   ("model", "train", "merge", "conflicts", "eval", "experiment")}
    from rlm.core.cli.conflicts import conflicts
    from rlm.core.cli.eval import eval, score
    from rlm.core.cli.experiment import merge_eval
    from rlm.core.cli.merge import merge
    from rlm.core.cli.model import model_init
    from rlm.core.cli.train import train

    app = typer.Typer()
    for value in eps.values():
        importlib.import_module(value).register_commands(app=app)
    callbacks = {c.callback for c in app.registered_commands}
    assert {train, merge, eval, score, conflicts, merge_eval} <= callbacks
    groups = {g.name: g.typer_instance for g in app.registered_groups}
    assert set(groups) == {"model", "experiment"}
    assert model_init in {c.callback for c in groups["model"].registered_commands}


def test_disabling_a_command_plugin_removes_the_command(tmp_path):
    import os

    env = dict(os.environ, RLM_DISABLE_PLUGINS="commands.eval")
    res = subprocess.run([sys.executable, "-m", "rlm.core.cli", "--help"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and " train " in res.stdout and " eval " not in res.stdout
    res = subprocess.run([sys.executable, "-m", "rlm.core.cli", "eval", "--help"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert res.returncode != 0
