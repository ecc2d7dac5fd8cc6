"""Studies are open to third-party plugins: merge methods take their settings from the plugins' ``presets``;
defaults that list plugins come from the registry; ``check_plugins`` instantiates every plugin with its config;
a metric's summary cells and figures reach the study report through ``Metric.columns`` and ``section``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlm.core.contracts import MergeMethod, Metric, PluginConfig, ReportSection, Task, Trainer
from rlm.core.errors import ConfigError
from rlm.core.hookspecs import hookimpl
from rlm.core.plugins import PluginSystem, get_system, reset_system
from rlm.core.study.check import check_plugins, method_settings
from rlm.core.study.plan import STEP_KINDS, build_graph, plan_steps
from rlm.core.study.presets import list_presets, load_experiment

#: the merge settings every preset spelled out before they came from the plugins' ``paper`` presets
TODAY = {
    "averaging": {},
    "task_arithmetic": {"params": {"lambda": 0.7}},
    "ties": {"model_params": {"weight": 0.5, "density": 0.8}},
    "dare_ties": {"model_params": {"weight": 0.5, "density": 0.8}},
}


# -- merge methods from their presets --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpu-tiny", "micro", "paper", "smollm2-135m"])
def test_preset_methods_resolve_to_todays_settings(name):
    assert name in list_presets()
    registry = get_system().registry("merge_method")
    for quick in (False, True):
        cfg = load_experiment(name, quick=quick)
        names = [m.name for m in cfg.methods]
        # cpu-tiny --quick keeps two of the four (averaging and TIES) to fit make demo's time budget
        assert names == (["averaging", "ties"] if (name, quick) == ("cpu-tiny", True) else list(TODAY))
        for m in cfg.methods:
            assert m.preset == "paper" and not m.params and not m.model_params
            cls = registry.get(m.name)
            params, model_params = method_settings(cls, m)
            assert cls.Config.model_validate(params) == cls.Config.model_validate(TODAY[m.name].get("params", {}))
            mp = cls.ModelParams
            assert mp.model_validate(model_params) == mp.model_validate(TODAY[m.name].get("model_params", {}))
    ta = method_settings(registry.get("task_arithmetic"), load_experiment(name).method("task_arithmetic"))
    assert registry.get("task_arithmetic").Config.model_validate(ta[0]).lambda_ == 0.7


def test_explicit_values_win_over_the_preset():
    from rlm.plugins.mergers.ties import Ties

    cfg = load_experiment("micro", sets=["methods.ties.model_params.density=0.5", "methods.ties.params={lambda: 2}"])
    assert method_settings(Ties, cfg.method("ties")) == ({"lambda": 2}, {"weight": 0.5, "density": 0.5})
    merge = next(s for s in plan_steps(cfg) if s.name == "merge.sft.math+puzzle.ties.s0")
    assert merge.config["preset"] == "paper" and merge.config["model_params"] == {"density": 0.5}


class _Output:
    """A finished step as a step function sees it (rlm.core.study.graph.StepOutput)."""

    def __init__(self, name: str, model: Path) -> None:
        self.name, self.dir, self.result = name, model.parent, {"model": str(model)}


class _Context:
    def __init__(self, name: str, config: dict, inputs: dict, out: Path) -> None:
        self.name, self.config, self.inputs, self.out = name, config, inputs, out


def test_merge_step_with_preset_writes_the_literal_settings_merge(tiny_model_dir, tmp_path):
    """The merge step hands ``preset`` to the merge engine: the merged weights equal those of today's literal
    settings, method by method."""
    from safetensors.numpy import load_file
    from test_study import _perturbed

    from rlm.core.study.steps import StudySteps

    cfg = load_experiment("micro")
    experts = [_perturbed(tiny_model_dir, tmp_path / f"e{i}", i + 10) for i in range(2)]
    inputs = {"warmup": _Output("warmup", tiny_model_dir), "train.sft.math.s0": _Output("a", experts[0]),
              "train.sft.puzzle.s0": _Output("b", experts[1])}
    steps = StudySteps(cfg)
    for s in plan_steps(cfg):
        if s.kind != "merge" or not s.name.startswith("merge.sft.math+puzzle."):
            continue
        literal = {**s.config, "preset": None, "params": TODAY[s.config["method"]].get("params", {}),
                   "model_params": TODAY[s.config["method"]].get("model_params", {})}
        outs = []
        for tag, config in (("preset", s.config), ("literal", literal)):
            out = tmp_path / f"{s.config['method']}-{tag}"
            out.mkdir()
            steps.merge(_Context(s.name, config, inputs, out))
            outs.append(load_file(str(out / "model" / "model.safetensors")))
        assert outs[0].keys() == outs[1].keys()
        assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0]), s.name


# -- fake third-party plugins ----------------------------------------------------------------------------------
class _Task(Task):
    name = "math"
    subsets = {"gen": "generated"}

    class Config(PluginConfig):
        level: int = 1

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        if self.config.level > 3:  # a check the pydantic schema does not express
            raise ConfigError(f"level {self.config.level} is not generated (levels 1-3)")

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        return []

    def reward(self, example, completion):
        return 0.0


class _Code(_Task):
    name = "code"


class _RL(Trainer):
    """An RL trainer that refuses an unknown advantage estimator when it is built."""

    name = "fake_rl"

    class Config(PluginConfig):
        advantage: str = "group"
        steps: int = 1

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        if self.config.advantage not in ("group", "max_baseline"):
            raise ConfigError(f"unknown advantage estimator {self.config.advantage!r} (known: group, max_baseline)")

    def train(self, run):
        return None


class _Scaled(MergeMethod):
    name = "scaled"
    default = True

    class Config(PluginConfig):
        scale: float = 1.0

    presets = {"paper": {"params": {"scale": 0.5}}, "fast": {"params": {"scale": 2.0}}}

    def check(self, params):
        if any(p.weight < 0 for p in params):
            raise ConfigError("scaled: weights must not be negative")

    def merge(self, base, deltas, params, *, context=None):
        return base


class _Plain(_Scaled):
    name = "plain"
    default = False


class _Signed(_Scaled):
    name = "signed"
    default = True


class _AbsMax(Metric):
    """Largest |τ| per model, with a section and a figure of its own."""

    name = "abs_max"
    default = True

    class Config(PluginConfig):
        floor: float = 0.0

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        if self.config.floor < 0:
            raise ConfigError("abs_max: floor must not be negative")
        self._max: dict[str, float] = {}

    def update(self, tensor_name, deltas, context=None):
        for n, d in deltas.items():
            if d.numel():
                self._max[n] = max(self._max.get(n, self.config.floor), float(d.abs().max()))

    def result(self):
        return {"models": {n: {"abs_max": v} for n, v in self._max.items()}}

    def section(self, data, out_dir):
        (Path(out_dir) / "abs_max.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
        return ReportSection("Largest entries", "max |τ| per model", ["abs_max.png"])


class _SameSign(Metric):
    """Share of positions where two task vectors have the same sign (a pair metric with default columns)."""

    name = "same_sign"
    scope = "pair"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._same: dict[str, list[int]] = {}

    def update(self, tensor_name, deltas, context=None):
        from rlm.core.conflicts.stats import pair_key

        names = list(deltas)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                acc = self._same.setdefault(pair_key(a, b), [0, 0])
                acc[0] += int(((deltas[a] > 0) == (deltas[b] > 0)).sum())
                acc[1] += deltas[a].numel()

    def result(self):
        return {"pairs": {p: {"same_sign": s / n} for p, (s, n) in self._same.items()}}


class _ThirdParty:
    @hookimpl
    def register_tasks(self, register):
        register(_Task)
        register(_Code)

    @hookimpl
    def register_trainers(self, register):
        register(_RL)

    @hookimpl
    def register_merge_methods(self, register):
        for cls in (_Scaled, _Plain, _Signed):
            register(cls)

    @hookimpl
    def register_metrics(self, register):
        register(_AbsMax)
        register(_SameSign)


@pytest.fixture
def third_party():
    """A private plugin system holding only the fakes, installed as the process-wide one."""
    system = PluginSystem(load_entry_points=False)
    system.add_plugin(_ThirdParty(), name="third-party", distribution="rlm-third-party", version="0.1")
    reset_system(system)
    try:
        yield system
    finally:
        reset_system(None)


STUDY = {"name": "fake", "base": {"model": "tiny"},
         "tasks": [{"name": "math", "train_subset": "gen"}, {"name": "code"}],
         "trainers": [{"name": "fake_rl", "config": {"steps": 2}}],
         "methods": [{"name": "scaled", "preset": "paper"}, {"name": "plain", "model_params": {"weight": 2.0}}],
         "eval": {"include_start": False}}


def test_defaults_come_from_the_registry(third_party):
    cfg = load_experiment(STUDY)
    assert cfg.conflicts.metrics == ["abs_max"]  # the metrics declaring default = True
    assert cfg.report.table3 is None and cfg.table3_groups() is None
    two = load_experiment({**STUDY, "trainers": [{"name": "fake_rl"}, {"name": "fake_rl", "label": "rl_pos"}]})
    assert two.table3_groups() is None  # no Table 3 unless asked for
    report = next(s for s in plan_steps(two) if s.name == "report")
    assert report.config["table3"] is None
    asked = load_experiment({**STUDY, "trainers": [{"name": "fake_rl", "label": "grpo"},
                                                   {"name": "fake_rl", "label": "rl_pos"}],
                             "report": {"table3": ["grpo", "rl_pos"]}})
    assert asked.table3_groups() == ("grpo", "rl_pos")
    check_plugins(cfg)


def test_merge_eval_defaults_and_preset(third_party, tiny_model_dir, tmp_path, monkeypatch):
    """``rlm merge-eval`` without --methods merges with the registry's default methods (registration order),
    each with --preset (default paper); the command function is importable and callable as is."""
    import rlm.core.study.run as run_module
    from rlm.core.cli.experiment import merge_eval

    seen = {}

    def fake_run_study(cfg, out, *, plan=None, progress=True, **_):
        seen["cfg"], seen["plan"] = cfg, plan

    monkeypatch.setattr(run_module, "run_study", fake_run_study)
    spec = f"g:math={tiny_model_dir},g:code={tiny_model_dir}"
    options = dict(base=str(tiny_model_dir), experts=spec, tasks=None, out=tmp_path / "me", limit=2,
                   max_new_tokens=4, batch_size=2, landscape=False, curve=False, set_=[], threads=None,
                   progress=False, executor="local", ray_address=None)
    merge_eval(methods=None, preset="paper", **options)
    cfg = seen["cfg"]
    assert [(m.name, m.preset) for m in cfg.methods] == [("scaled", "paper"), ("signed", "paper")]
    merges = {s.config["method"]: s.config for s in seen["plan"] if s.kind == "merge"}
    assert merges["scaled"]["preset"] == "paper" and merges["scaled"]["params"] == {}
    assert all(s.config.get("given") for s in seen["plan"] if s.kind == "train")
    merge_eval(methods="plain", preset="fast", **options)
    assert [(m.name, m.preset) for m in seen["cfg"].methods] == [("plain", "fast")]
    with pytest.raises(ConfigError, match=r"methods\[0\]\.preset: .*no preset 'papr'; did you mean 'paper'\? "
                                          r"\(presets: paper, fast\)"):
        merge_eval(methods="scaled,signed", preset="papr", **options)


def test_check_plugins_instantiates_each_plugin(third_party):
    check_plugins(load_experiment(STUDY))
    bad = json.loads(json.dumps(STUDY))
    bad["trainers"][0]["config"] = {"advantage": "gea"}
    bad["trainers"][0]["per_task"] = {"code": {"advantage": "group"}}
    bad["tasks"][1]["config"] = {"level": 5}
    bad["methods"][0]["preset"] = "papr"
    bad["methods"][1]["model_params"] = {"weight": -1.0}
    bad["conflicts"] = {"metrics": ["abs_max", "same_sign"], "metric_config": {"abs_max": {"floor": -1}}}
    with pytest.raises(ConfigError) as exc:
        check_plugins(load_experiment(bad))
    lines = str(exc.value).splitlines()
    assert lines[0] == "experiment 'fake' does not match the installed plugins:"
    expected = [
        "  tasks[1].config: level 5 is not generated (levels 1-3)",
        "  trainers[0].config: unknown advantage estimator 'gea' (known: group, max_baseline)",
        "  methods[0].preset: merge method 'scaled' has no preset 'papr'; did you mean 'paper'? (presets: paper, fast)",
        "  methods[1]: scaled: weights must not be negative",
        "  conflicts.metric_config.abs_max: abs_max: floor must not be negative",
    ]
    assert lines[1:] == expected  # one line per problem, naming the field; the per_task override is fine
    # the pydantic check comes first: a config that does not validate is not instantiated
    bad = {**STUDY, "trainers": [{"name": "fake_rl", "config": {"advantage": 3.5}}]}
    with pytest.raises(ConfigError, match=r"trainers\[0\]\.config\.advantage: Input should be a valid string"):
        check_plugins(load_experiment(bad))


# -- the report from the metrics that ran ------------------------------------------------------------------------
def test_report_shows_third_party_metrics(third_party, tiny_model_dir, tmp_path):
    """The real conflicts and report steps, every other step faked: Table 2 and the pair table hold the cells
    of the metrics that ran (by Metric.columns), and their figures are embedded."""
    from test_study import _perturbed

    from rlm.core.study.steps import STEP_VERSIONS, StudySteps

    cfg = load_experiment({**STUDY, "conflicts": {"metrics": ["abs_max", "same_sign"]},
                           "report": {"bootstrap_resamples": 10}, "eval": {"include_start": True}})
    check_plugins(cfg)
    experts = {t: _perturbed(tiny_model_dir, tmp_path / t, seed) for seed, t in enumerate(("math", "code"))}

    def model(ctx):
        if ctx.name.startswith("train."):
            return {"model": str(experts[ctx.config["task"]["label"]])}
        return {"model": str(tiny_model_dir)}

    def evaluate(ctx):
        per = [1.0, 0.0, 1.0, 1.0] if ctx.name.startswith("eval_expert") else [1.0, 0.0, 0.0, 1.0]
        return {"score": float(np.mean(per)), "per_example": per, "n": 4, "task": ctx.config["task"]["label"],
                "source": ctx.run_relative(ctx.final_dir)}

    real = StudySteps(cfg).functions()
    functions = {k: model for k in STEP_KINDS}
    functions.update(eval_expert=evaluate, eval_merged=evaluate, conflicts=real["conflicts"], report=real["report"])
    run = tmp_path / "run"
    summary = build_graph(plan_steps(cfg), functions, STEP_VERSIONS).run(run, progress=False)
    assert summary.ok, summary.failed
    result = summary.steps["conflicts.fake_rl.s0"].result
    assert set(result["models"]["math"]) == {"abs_max", "parameters"}
    assert result["models"]["math"]["abs_max"] > 0
    assert set(result["pairs"]["math|code"]) == {"same_sign"}
    assert result["figures"] == ["abs_max.png"]
    rep = summary.output("report").dir
    md = (rep / "report.md").read_text()
    assert "| model | abs_max | parameters | saved dtype | source |" in md
    assert "| group | pair | same_sign | source |" in md and "| fake_rl | math vs code |" in md
    assert "![conflicts-fake_rl-s0-abs_max](figures/conflicts-fake_rl-s0-abs_max.png)" in md
    assert (rep / "figures" / "conflicts-fake_rl-s0-abs_max.png").is_file()
    t2 = json.loads((rep / "table2.json").read_text())
    assert [r["model"] for r in t2["rows"]] == ["fake_rl/math", "fake_rl/code"]
    assert t2["rows"][0]["abs_max"] == pytest.approx(result["models"]["math"]["abs_max"])
    assert "Table 3" not in md  # no Table 3 unless asked for
    # summary.json: θ0 scored [1, 0, 0, 1], each expert [1, 0, 1, 1] on the same examples: Δ = 0.25 with the
    # paired bootstrap interval of the per-example differences [0, 0, 1, 0], seeded as Table 1's cells
    data = json.loads((rep / "summary.json").read_text())
    assert data["start"] == {"math": {"score": 0.5, "n": 4}, "code": {"score": 0.5, "n": 4}}
    cell = data["experts"]["fake_rl"]["code"]
    assert cell["score"] == 0.75 and cell["delta_vs_start"] == pytest.approx(0.25) and cell["paired"]
    import zlib

    rng = np.random.default_rng([cfg.report.seed, zlib.crc32(b"fake_rl|start|code")])
    diffs = np.array([0.0, 0.0, 1.0, 0.0])[rng.integers(0, 4, size=(10, 4))].mean(axis=1)
    assert cell["delta_ci"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])))
    assert data["table1"]["fake_rl"]["scaled"]["math"]["score"] == 0.5
    assert data["table2"]["fake_rl/math"]["update_norm"] is None  # the metrics that ran have no update norm
    assert "| fake_rl | code | 50.0 | 75.0 | +25.0 |" in md
