"""Command line: version, plugins JSON contract, config schema, errors."""

from __future__ import annotations

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
    assert set(data) == {"trainers", "merge_methods", "tasks", "metrics", "plugins"}
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
