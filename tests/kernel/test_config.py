"""Config loading: file < --set < flags, errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, model_validator

from rlm.core.config import load_config, parse_set
from rlm.core.errors import ConfigError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-5
    steps: int = 10


class Run(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "x"
    optim: Inner = Inner()
    tasks: list[str] = []


def test_precedence_file_then_set_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: fromfile\noptim:\n  lr: 0.1\n  steps: 3\n")
    cfg = load_config(Run, f, sets=["optim.steps=7", "tasks=[math, code]"], flags={"name": "flag", "optim.lr": None})
    assert cfg.name == "flag"
    assert cfg.optim.lr == 0.1 and cfg.optim.steps == 7
    assert cfg.tasks == ["math", "code"]


def test_toml_and_json_files(tmp_path):
    (tmp_path / "c.toml").write_text('name = "t"\n[optim]\nsteps = 2\n')
    assert load_config(Run, tmp_path / "c.toml").optim.steps == 2
    (tmp_path / "c.json").write_text('{"optim": {"lr": 2}}')
    assert load_config(Run, tmp_path / "c.json").optim.lr == 2.0


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.steps: .*got 'many'"):
        load_config(Run, sets=["optim.steps=many"])
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown field"):
        load_config(Run, sets=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Run, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set("novalue")


class Checked(Run):
    @model_validator(mode="after")
    def _two_tasks(self) -> "Checked":
        if len(self.tasks) < 2:
            raise ValueError("needs at least two tasks")
        return self


def test_errors_stay_one_line_each_without_the_whole_config():
    """A model-level check names the problem, not the whole section it was given; a long value is cut."""
    with pytest.raises(ConfigError) as err:
        load_config(Checked, sets=["tasks=[math]", "name=" + "n" * 50])
    lines = str(err.value).splitlines()
    assert lines[1] == "  (top level): Value error, needs at least two tasks"
    assert len(lines) == 2
    with pytest.raises(ConfigError) as err:
        load_config(Run, sets=["optim.steps=" + "9x" * 100])
    assert str(err.value).splitlines()[1].endswith("...)") and len(str(err.value).splitlines()[1]) < 200


def test_set_values_are_typed():
    assert parse_set("a.b=3") == (["a", "b"], 3)
    assert parse_set("a=true") == (["a"], True)
    assert parse_set("a=null") == (["a"], None)
    assert parse_set("a=hello world") == (["a"], "hello world")
