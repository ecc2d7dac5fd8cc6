"""Plugin system: registries, look-up errors, duplicates, broken plugins, env variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlm.core.contracts import GenerationBackend, MergeMethod, Metric, PluginConfig, Task, Trainer
from rlm.core.errors import DuplicatePluginError, UnknownPluginError
from rlm.core.hookspecs import hookimpl
from rlm.core.plugins import PluginSystem


class FakeMerge(MergeMethod):
    """A fake merge method."""

    name = "fake_ties"
    aliases = ("ft",)

    class Config(PluginConfig):
        k: int = 1

    def merge(self, base, deltas, params, *, context=None):
        return base


class FakeTask(Task):
    name = "fake_task"

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        return []

    def reward(self, example, completion):
        return 0.0


class FakeTrainer(Trainer):
    name = "fake_trainer"

    def train(self, run):
        return None


class FakeMetric(Metric):
    name = "fake_metric"

    def update(self, tensor_name, deltas):
        pass

    def result(self):
        return {}


class FakeBackend(GenerationBackend):
    name = "fake_backend"

    @classmethod
    def load(cls, model_path, *, device=None, dtype="float32", config=None):
        return cls(config)

    def generate(self, prompts, params):
        return []


class FakePlugin:
    @hookimpl
    def register_generation_backends(self, register):
        register(FakeBackend, aliases=["fb"])

    @hookimpl
    def register_merge_methods(self, register):
        register(FakeMerge)

    @hookimpl
    def register_tasks(self, register):
        register(FakeTask, aliases=["ft_alias"])

    @hookimpl
    def register_trainers(self, register):
        register(FakeTrainer)

    @hookimpl
    def register_metrics(self, register):
        register(FakeMetric)

    @hookimpl
    def register_commands(self, app):
        @app.command("fake-hello")
        def hello() -> None:
            print("hello from fake")


@pytest.fixture
def system():
    s = PluginSystem(load_entry_points=False)
    s.add_plugin(FakePlugin(), name="fake", distribution="fake-dist", version="1.0")
    return s


def test_every_register_hook_fills_its_registry(system):
    assert system.registry("merge_method").get("fake_ties") is FakeMerge
    assert system.registry("merge_methods").get("ft") is FakeMerge
    assert system.registry("task").get("ft_alias") is FakeTask
    assert system.registry("trainer").get("fake_trainer") is FakeTrainer
    assert system.registry("metric").get("fake_metric") is FakeMetric
    assert system.registry("generation_backend").get("fb") is FakeBackend
    data = system.as_json()
    assert data["generation_backends"] == ["fake_backend"]
    assert data["merge_methods"] == ["fake_ties"]
    assert data["plugins"] == [{"name": "fake", "distribution": "fake-dist", "version": "1.0",
                                "registered": ["fake_trainer", "fake_ties", "fake_task", "fake_metric",
                                               "fake_backend"],
                                "error": None}]


def test_register_commands_hook_adds_a_command(system):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.command("noop")
    def noop() -> None:
        pass

    system.register_commands(app)
    result = CliRunner().invoke(app, ["fake-hello"])
    assert result.exit_code == 0, result.output
    assert "hello from fake" in result.output


def test_unknown_name_lists_closest(system):
    with pytest.raises(UnknownPluginError) as err:
        system.registry("merge_method").get("fake_tis")
    assert "did you mean 'fake_ties'" in str(err.value)
    with pytest.raises(UnknownPluginError, match="unknown plugin kind 'mergre'"):
        system.registry("mergre")


def test_duplicate_name_names_both_plugins(system):
    class Other:
        @hookimpl
        def register_merge_methods(self, register):
            class Clash(FakeMerge):
                pass

            register(Clash, name="fake_ties")

    system.add_plugin(Other(), name="other")
    with pytest.raises(DuplicatePluginError) as err:
        system.registry("merge_method")
    assert "'fake'" in str(err.value) and "'other'" in str(err.value)


def test_registration_error_is_recorded_not_raised(system):
    class Broken:
        @hookimpl
        def register_tasks(self, register):
            raise RuntimeError("boom")

    system.add_plugin(Broken(), name="broken")
    names = system.registry("task").names()
    assert names == ["fake_task"]
    info = {i.name: i for i in system.plugin_infos()}["broken"]
    assert "RuntimeError: boom" in info.error


def _fake_distribution(root: Path, dist: str, module: str, body: str, ep_name: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rlm]\n{ep_name} = {module}\n")


def _rlm(args, env_extra, tmp_path):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "rlm.core.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


def test_plugin_that_fails_to_import_is_listed_and_cli_still_works(tmp_path):
    _fake_distribution(tmp_path, "rlm-broken", "rlm_broken_mod", "raise ImportError('missing dependency xyz')\n",
                       "broken")
    _fake_distribution(tmp_path, "rlm-good", "rlm_good_mod", """
        from rlm.core.contracts import Task
        from rlm.core.hookspecs import hookimpl

        class Echo(Task):
            name = "echo_task"
            def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
                return []
            def reward(self, example, completion):
                return 1.0

        @hookimpl
        def register_tasks(register):
            register(Echo)
    """, "good")
    env = {"PYTHONPATH": str(tmp_path)}
    res = _rlm(["plugins", "--json"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert "missing dependency xyz" in plugins["broken"]["error"]
    assert plugins["broken"]["distribution"] == "rlm-broken"
    assert plugins["good"]["registered"] == ["echo_task"] and plugins["good"]["error"] is None
    assert "echo_task" in data["tasks"]
    # other commands keep working
    res = _rlm(["config", "schema", "task", "echo_task"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["type"] == "object"
    res = _rlm(["config", "schema", "task", "echo_tsk"], env, tmp_path)
    assert res.returncode == 2 and "did you mean 'echo_task'" in res.stderr
    # RLM_DISABLE_PLUGINS and RLM_LOAD_PLUGINS
    res = _rlm(["plugins", "--json"], {**env, "RLM_DISABLE_PLUGINS": "broken"}, tmp_path)
    assert "broken" not in {p["name"] for p in json.loads(res.stdout)["plugins"]}
    res = _rlm(["plugins", "--json"], {**env, "RLM_LOAD_PLUGINS": "rlm-good"}, tmp_path)
    names = {p["name"] for p in json.loads(res.stdout)["plugins"]}
    assert names == {"good"}
