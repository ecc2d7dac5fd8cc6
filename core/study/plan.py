"""The plan of a study: :func:`plan_steps` turns an :class:`rlm.core.study.config.ExperimentConfig` into
named steps with dependencies and a JSON step config, and :func:`build_graph` attaches one function per step
kind to make a :class:`rlm.core.study.graph.Graph`. Step names (dots separate the parts; every label is
``[A-Za-z0-9_-]``)::

    init                                   base model (kind init; θ0 when there is no warm-up, then saved in
                                           precision.save_dtype)
    warmup                                 warm-up SFT on the task mixture (kind warmup; only if enabled)
    eval_start.TASK                        the start model θ0 on TASK (kind eval_expert; eval.include_start)
    train.GROUP.TASK.sSEED                 an expert (kind train)
    eval_expert.GROUP.TASK.sSEED           the expert on its own task (kind eval_expert)
    merge.GROUP.T1+T2[+T3...].METHOD.sSEED a merged model (kind merge): every pair of a group's experts with
                                           every method, plus larger sets for the curve
    eval_merged.GROUP.T1+T2.METHOD.sSEED.TASK   a merged model on each task of its set (kind eval_merged)
    conflicts.GROUP.sSEED                  task-vector statistics of a group's experts (kind conflicts)
    landscape.GROUP.sSEED                  f(alpha, beta) around one expert of GROUP (kind landscape)
    report                                 tables and figures (kind report)

Task sets inside names follow the order of ``tasks`` in the config. Warm-up and base model are shared by all
seeds; each seed trains its own experts and seeds the merges' random masks: a step's ``config["seed"]`` is
the seed to give the plugin (the trainer's ``seed`` field, the merge's ``seed``); the plugin overrides in
``config["config"]`` (and a merge's ``preset``, ``params`` and ``model_params``) are exactly what the user
wrote; a warm-up's or train step's ``config["defaults"]`` holds what the study's ``precision`` section sets
where those overrides leave a field unset (``save_dtype``, ``precision``). Planning needs no plugin: the plan
depends on the config alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rlm.core.errors import ConfigError, RlmError
from rlm.core.study.config import CurveConfig, ExperimentConfig, MergeMethodConfig, TaskConfig
from rlm.core.study.graph import Graph

STEP_KINDS = ("init", "warmup", "train", "eval_expert", "merge", "eval_merged", "conflicts", "landscape", "report")


@dataclass
class PlannedStep:
    """A step by name, kind, dependencies and JSON config (what its output hash covers)."""

    name: str
    kind: str
    deps: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    ephemeral: bool = False  # output deleted once every dependent has finished (see rlm.core.study.graph.Step)
    cost: float = 0.0  # scheduling hint (rlm.core.study.graph.Step.cost): :func:`training_cost` of train steps


# A token an RL run generates (one forward pass of the whole batch per token, plus the rewards) cost about ten
# tokens an SFT run trains on in the cpu-tiny runs (SFT 184k tokens in 10-15 s, GRPO 295k generated in 120 s).
SFT_TOKEN_COST = 0.1


def training_cost(config: Mapping[str, Any]) -> float:
    """A training step's estimated cost from its trainer config (scheduling only; nothing else reads it): tokens
    an RL run generates (steps × prompts_per_step × group_size × max_new_tokens), or :data:`SFT_TOKEN_COST`
    times the tokens an SFT-style run trains on (steps × batch_size × max_response_tokens). A field the config
    leaves unset takes rlm's RL or SFT default, so a plugin trainer's estimate is at least of the right kind."""
    from rlm.core.train.config import RLConfig, SFTConfig

    c = dict(config.get("config") or {})

    def get(model: Any, name: str) -> float:
        value = c.get(name, model.model_fields[name].default)
        return float(value) if isinstance(value, (int, float)) else 1.0

    if any(k in c for k in ("prompts_per_step", "group_size", "max_new_tokens")) or \
            config.get("trainer") in ("grpo", "ppo", "reinforce_pp", "rl_pos"):
        return get(RLConfig, "steps") * get(RLConfig, "prompts_per_step") * get(RLConfig, "group_size") \
            * get(RLConfig, "max_new_tokens")
    steps = c.get("steps") if isinstance(c.get("steps"), (int, float)) else 100
    return SFT_TOKEN_COST * float(steps) * get(SFTConfig, "batch_size") * get(SFTConfig, "max_response_tokens")


def dir_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of a model directory used in place: names, sizes and modification times of its files, plus
    the sha256 of its config (so the cache notices when the directory is rewritten)."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise RlmError(f"model directory {p} does not exist")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise RlmError(f"{p} is not a model directory: config.json is missing")
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cfg = p / "config.json"
    return {"path": str(p), "files": h.hexdigest()[:16],
            "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else None}


def _task_train(t: TaskConfig) -> dict[str, Any]:
    return {"label": t.id, "name": t.name, "subset": t.train_subset, "size": t.train_size, "path": t.train_path,
            "split": "train", "config": t.config}


def _cap(*limits: int | None) -> int | None:
    """The smallest of the limits that are set (None: none is)."""
    return min((x for x in limits if x), default=None)


def _task_eval(t: TaskConfig, limit: int | None) -> dict[str, Any]:
    size = _cap(t.eval_size, limit)
    out = {"label": t.id, "name": t.name, "subset": t.eval_subset, "size": size, "path": t.eval_path,
           "split": t.eval_split, "config": t.config}
    if t.max_new_tokens is not None:
        out["max_new_tokens"] = t.max_new_tokens
    return out


def set_name(tasks: Sequence[str]) -> str:
    return "+".join(tasks)


def curve_methods(cfg: ExperimentConfig, group: str) -> list[MergeMethodConfig]:
    """The methods whose number-of-merged-models curve ``group`` gets (none when the curve is off for it)."""
    c = cfg.curve
    if not c.enabled or (c.groups is not None and group not in c.groups):
        return []
    return [m for m in cfg.methods if c.methods is None or m.id in c.methods]


def curve_subsets(curve: CurveConfig, tasks: Sequence[str]) -> dict[int, list[tuple[str, ...]]]:
    """N -> the task sets merged for the curve's point N, for N = 2 .. max_models (the planner and
    :func:`rlm.core.study.scores.collect_scores` must agree on them)."""
    n_max = min(len(tasks), curve.max_models or len(tasks))
    return {n: [tuple(tasks[:n])] if curve.subsets == "prefix" else list(itertools.combinations(tasks, n))
            for n in range(2, n_max + 1)}


class _Planner:
    """Builds the steps of one config in execution order (see :func:`plan_steps`)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.steps: dict[str, PlannedStep] = {}
        self.ev = {"max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size,
                   **cfg.eval.decoding()}
        self.order = [t.id for t in cfg.tasks]
        self.start = "init"
        self.evals_expert: list[str] = []
        self.evals_merged: list[str] = []
        self.trains: list[str] = []
        self.conflicts: list[str] = []
        self.landscapes: list[str] = []

    def add(self, name: str, kind: str, deps: list[str], config: dict[str, Any]) -> str:
        config = json.loads(json.dumps(config))
        if name in self.steps:  # the same merge planned twice (a pair is also the curve's N=2 prefix)
            if self.steps[name].config != config or self.steps[name].deps != deps:
                raise ConfigError(f"internal: step {name} planned twice with different configs")
            return name
        self.steps[name] = PlannedStep(name, kind, deps, config,
                                       ephemeral=kind == "merge" and not self.cfg.keep_merged_models,
                                       cost=training_cost(config) if kind in ("train", "warmup") else 0.0)
        return name

    def defaults(self) -> dict[str, Any]:
        """``{"defaults": {field: value}}``: the trainer config fields the study sets where the warm-up's or a
        trainer's config leaves them unset (``precision``: save_dtype, training); nothing when there are none."""
        d = self.cfg.trainer_defaults()
        return {"defaults": d} if d else {}

    def eval_task(self, label: str) -> dict[str, Any]:
        return _task_eval(self.cfg.task(label), self.cfg.eval.limit)

    def plan_start(self) -> None:
        """init, the warm-up and the start model's evaluations."""
        cfg = self.cfg
        init_cfg: dict[str, Any] = {"base": cfg.base.model_dump(mode="json")}
        if Path(cfg.base.model).expanduser().is_dir():  # used in place: the cache must notice a rewritten directory
            init_cfg["fingerprint"] = dir_fingerprint(cfg.base.model)
        if cfg.cpu_capability != "native":  # other kernels, other numbers: every step's key changes with it
            init_cfg["cpu_capability"] = cfg.cpu_capability
        if not cfg.warmup_enabled and cfg.precision.save_dtype != "auto":  # the base is θ0: saved as the experts
            init_cfg["save_dtype"] = cfg.precision.save_dtype
        self.start = self.add("init", "init", [], init_cfg)
        if cfg.warmup_enabled:
            w = cfg.warmup
            mix = [cfg.task(t) for t in (w.tasks or self.order)]
            self.start = self.add("warmup", "warmup", [self.start], {
                "trainer": w.trainer, "config": w.config, "seed": cfg.base.seed,
                "tasks": [{**_task_train(t), "size": w.examples.get(t.id, w.examples_per_task)} for t in mix],
                **self.defaults()})
        if cfg.eval.include_start:
            for t in cfg.tasks:
                self.evals_expert.append(self.add(f"eval_start.{t.id}", "eval_expert", [self.start],
                                                  {"group": "start", "model": "start",
                                                   "task": self.eval_task(t.id), "eval": self.ev}))

    def plan_merge(self, group: str, seed: int, method: MergeMethodConfig, tasks: Sequence[str]) -> str:
        """One merged model of a task set and its evaluations on each task of the set."""
        name = f"merge.{group}.{set_name(tasks)}.{method.id}.s{seed}"
        deps = [self.start] + [f"train.{group}.{t}.s{seed}" for t in tasks]
        self.add(name, "merge", deps, {"group": group, "method": method.name, "label": method.id,
                                       "preset": method.preset, "params": method.params,
                                       "model_params": method.model_params, "tasks": list(tasks), "seed": seed})
        for t in tasks:
            self.evals_merged.append(self.add(
                f"eval_merged.{group}.{set_name(tasks)}.{method.id}.s{seed}.{t}", "eval_merged", [name],
                {"group": group, "method": method.id, "tasks": list(tasks), "seed": seed,
                 "task": self.eval_task(t), "eval": self.ev}))
        return name

    def plan_group(self, seed: int, group: str) -> None:
        """One trainer's experts, their evaluations, merges and conflicts under one seed."""
        cfg = self.cfg
        tr = cfg.trainer(group)
        tasks = cfg.tasks_of(tr)
        for t in tasks:
            conf = {**tr.config, **tr.per_task.get(t, {})}
            train = self.add(f"train.{group}.{t}.s{seed}", "train", [self.start],
                             {"group": group, "trainer": tr.name, "config": conf,
                              "task": _task_train(cfg.task(t)), "seed": seed, **self.defaults()})
            self.trains.append(train)
            self.evals_expert.append(self.add(f"eval_expert.{group}.{t}.s{seed}", "eval_expert", [train],
                                              {"group": group, "model": "expert", "seed": seed,
                                               "task": self.eval_task(t), "eval": self.ev}))
        for m in cfg.methods:
            for a, b in itertools.combinations(tasks, 2):
                self.plan_merge(group, seed, m, (a, b))
        for m in curve_methods(cfg, group):
            for n, subsets in curve_subsets(cfg.curve, tasks).items():
                if n > 2:  # the pairs are planned above
                    for s in subsets:
                        self.plan_merge(group, seed, m, s)
        if cfg.conflicts.enabled:
            c = cfg.conflicts
            self.conflicts.append(self.add(
                f"conflicts.{group}.s{seed}", "conflicts", [self.start] + [f"train.{group}.{t}.s{seed}" for t in tasks],
                {"group": group, "seed": seed, "models": {t: f"train.{group}.{t}.s{seed}" for t in tasks},
                 "metrics": c.metrics, "threshold": c.threshold, "metric_config": c.metric_config,
                 "over_steps": c.over_steps}))

    def plan_landscapes(self, seed: int) -> None:
        cfg, ls = self.cfg, self.cfg.landscape
        pair = [t for t in self.order if t in (ls.pair or self.order[:2])]
        method = cfg.method(ls.method) if ls.method else cfg.methods[0]
        expert = ls.expert or (ls.pair or self.order[:2])[0]
        for g in ls.groups or [t.id for t in cfg.trainers]:
            gtasks = cfg.tasks_of(cfg.trainer(g))
            if any(t not in gtasks for t in pair):
                raise ConfigError(f"landscape: trainer {g!r} has no experts for all of {pair}")
            merge = f"merge.{g}.{set_name(pair)}.{method.id}.s{seed}"
            self.landscapes.append(self.add(f"landscape.{g}.s{seed}", "landscape",
                                            [self.start, f"train.{g}.{expert}.s{seed}", merge], {
                "group": g, "pair": pair, "method": method.id, "expert": expert, "alphas": ls.alphas,
                "betas": ls.betas, "direction_seed": ls.seed, "seed": seed,
                "task": _task_eval(cfg.task(expert), _cap(ls.eval_limit, cfg.eval.limit)), "eval": self.ev}))

    def plan_report(self) -> None:
        cfg, rep = self.cfg, self.cfg.report
        # training runs are listed too (for the training curves); they are ancestors of the evaluations anyway
        # and θ0 (init or warm-up), whose saved dtype the report states
        extra = [self.start] + self.trains
        self.add("report", "report", self.evals_expert + self.evals_merged + self.conflicts + self.landscapes + extra, {
            "name": cfg.name, "tasks": self.order, "groups": rep.table1_groups or [t.id for t in cfg.trainers],
            "methods": [m.id for m in cfg.methods], "seeds": cfg.seeds, "bootstrap_resamples": rep.bootstrap_resamples,
            "ci": rep.ci, "bootstrap_seed": rep.seed, "scale": rep.scale,
            "table3": cfg.report.table3, "curve": cfg.curve.enabled,
            "landscape": cfg.landscape.enabled, "save_dtype": cfg.precision.save_dtype,
            "cpu_capability": cfg.cpu_capability, **({"decoding": d} if (d := cfg.eval.decoding()) else {})})


def plan_steps(cfg: ExperimentConfig) -> list[PlannedStep]:
    """Every step of the study in a valid execution order (dependencies first); see the module docstring."""
    planner = _Planner(cfg)
    planner.plan_start()
    for seed in cfg.seeds:
        for tr in cfg.trainers:
            planner.plan_group(seed, tr.id)
        if cfg.landscape.enabled:
            planner.plan_landscapes(seed)
    planner.plan_report()
    return list(planner.steps.values())


StepFunction = Callable[..., Any]


def build_graph(plan: Sequence[PlannedStep], functions: Mapping[str, StepFunction],
                versions: Mapping[str, str] | None = None) -> Graph:
    """A :class:`Graph` from a plan, with one step function per kind (``functions[kind]``) and an optional
    code version key per kind (bump it when a step function's output would change)."""
    kinds = {s.kind for s in plan}
    missing = sorted(kinds - set(functions))
    if missing:
        raise ConfigError(f"no step function for step kind(s): {', '.join(missing)}")
    g = Graph()
    for s in plan:
        g.add(s.name, functions[s.kind], deps=s.deps, config=s.config, version=(versions or {}).get(s.kind, "1"),
              kind=s.kind, ephemeral=s.ephemeral, cost=s.cost)
    return g
