"""Declarative studies: the :class:`ExperimentConfig`, its presets and the plan of graph steps.

An experiment is: a base model; an optional warm-up SFT on a mixture of the tasks (the start point θ0 of every
expert); tasks with training and evaluation subsets and sizes; trainers (each trainer's experts form one
*group* of Table 1); merge methods; evaluation settings; conflict statistics; the landscape and the
number-of-merged-models curve; the report; seeds.

Loading (:func:`load_experiment`): a preset name (``cpu-tiny``, ``micro``, ``smollm2-135m``, ``paper``: the YAML files
in ``rlm/core/presets``), a YAML/TOML/JSON file or a mapping; then, with ``quick=True``, the file's ``quick:``
block is deep-merged over it (mappings merge key by key, lists and scalars replace); then ``--set a.b=value``
overrides (list items may be addressed by index or by their ``label``/``name``, e.g.
``tasks.math.eval_size=16``); then validation (unknown fields are errors naming the field).

Planning (:func:`plan_steps`) turns a config into named steps with dependencies and a JSON step config, and
:func:`build_graph` attaches one function per step kind to make a :class:`rlm.core.study.graph.Graph`. Step names
(dots separate the parts; every label is ``[A-Za-z0-9_-]``)::

    init                                   base model (kind init)
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
``config["config"]`` are exactly what the user wrote.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import Field, field_validator, model_validator

from rlm.core.config import deep_update, parse_set, read_config_file, validate
from rlm.core.contracts import PluginConfig
from rlm.core.errors import ConfigError
from rlm.core.study.graph import Graph

PRESET_PACKAGE = "rlm.core.study"
PRESET_DIR = "presets"
STEP_KINDS = ("init", "warmup", "train", "eval_expert", "merge", "eval_merged", "conflicts", "landscape", "report")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _check_label(v: str | None, what: str) -> str | None:
    if v is not None and not _LABEL_RE.match(v):
        raise ValueError(f"{what} {v!r} may hold only letters, digits, '_' and '-' (it is part of step names)")
    return v


# -- the config ------------------------------------------------------------------------------------------
class BaseModelConfig(PluginConfig):
    """The base model: ``tiny`` / ``tiny:SEED``, a local HF directory, or a hub id (where there is network)."""

    model: str = "tiny"
    seed: int = Field(0, description="initialisation seed of the tiny model")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TaskConfig(PluginConfig):
    """One task plugin with its training and evaluation data."""

    name: str = Field(description="task plugin name (math, code, instruction_following, puzzle, rank, ...)")
    label: str | None = Field(None, description="name in tables and step names (default: name)")
    train_subset: str | None = Field(None, description="subset for training (None: the task's default)")
    eval_subset: str | None = Field(None, description="subset for evaluation (None: the task's default)")
    train_size: int | None = Field(256, ge=1, description="training examples (None: all of the subset)")
    eval_size: int | None = Field(64, ge=1, description="evaluation examples, capped by eval.limit (None: all)")
    train_path: str | None = Field(None, description="local file for the training subset")
    eval_path: str | None = Field(None, description="local file for the evaluation subset")
    eval_split: str = Field("test", description="split asked of the task for evaluation")
    max_new_tokens: int | None = Field(None, ge=1, description="evaluation tokens for this task (None: "
                                                                "eval.max_new_tokens)")
    config: dict[str, Any] = Field(default_factory=dict, description="task plugin config overrides")

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str | None) -> str | None:
        return _check_label(v, "task label")

    @property
    def id(self) -> str:
        return self.label or self.name


class WarmupConfig(PluginConfig):
    """Warm-up SFT on a mixture of the tasks' training data, before any expert is trained (as the paper does
    before RL). Its output is θ0, the start point and merge base of every expert."""

    enabled: bool = True
    trainer: str = "sft"
    tasks: list[str] | None = Field(None, description="task labels in the mixture (None: every task)")
    examples_per_task: int = Field(256, ge=1)
    config: dict[str, Any] = Field(default_factory=dict, description="trainer config overrides (steps, lr, ...)")


class TrainerConfig(PluginConfig):
    """A trainer plugin; its experts (one per task) form one group of Table 1."""

    name: str = Field(description="trainer plugin name (sft, rft, grpo, ppo, reinforce_pp, rl_pos, ...)")
    label: str | None = Field(None, description="group name in tables and step names (default: name)")
    config: dict[str, Any] = Field(default_factory=dict, description="trainer config overrides (steps, lr, ...)")
    per_task: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                description="task label -> overrides on top of config")
    tasks: list[str] | None = Field(None, description="train experts only for these task labels (None: all)")

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str | None) -> str | None:
        return _check_label(v, "trainer label")

    @property
    def id(self) -> str:
        return self.label or self.name


class MergeMethodConfig(PluginConfig):
    """A merge-method plugin with global (``params``) and per-model (``model_params``) parameters."""

    name: str = Field(description="merge method plugin name (averaging, task_arithmetic, ties, dare_ties, ...)")
    label: str | None = Field(None, description="row name in tables and step names (default: name)")
    params: dict[str, Any] = Field(default_factory=dict, description="global parameters (lambda, normalize, ...)")
    model_params: dict[str, Any] = Field(default_factory=dict,
                                         description="per-model parameters applied to every model (weight, density)")

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str | None) -> str | None:
        return _check_label(v, "merge method label")

    @property
    def id(self) -> str:
        return self.label or self.name


class EvalConfig(PluginConfig):
    """Greedy evaluation of experts and merged models."""

    limit: int | None = Field(None, ge=1, description="cap on every task's eval_size (None: no cap)")
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    include_start: bool = Field(True, description="also evaluate the start model θ0 on every task")


class ConflictsConfig(PluginConfig):
    """Task-vector statistics of each group's experts against θ0 (Table 2 and the conflict figures)."""

    enabled: bool = True
    metrics: list[str] = Field(default_factory=lambda: ["update_norm", "fraction_updated", "conflict_norm",
                                                        "sign_conflict", "cosine"])
    threshold: float = Field(1e-5, gt=0, description="|τ| above this counts as updated")
    metric_config: dict[str, dict[str, Any]] = Field(default_factory=dict, description="metric -> config overrides")
    over_steps: bool = Field(False, description="also the norms and conflict norms over training checkpoints")


class LandscapeConfig(PluginConfig):
    """f(α, β) = score(θ_a + α Δθ + β r), Δθ = θ_merge − θ_a, r random with ‖r‖ = ‖Δθ‖ (the paper's Fig. 4)."""

    enabled: bool = False
    groups: list[str] | None = Field(None, description="trainer labels, one landscape each (None: every trainer)")
    pair: list[str] | None = Field(None, description="two task labels (None: the first two tasks)")
    method: str | None = Field(None, description="merge method label (None: the first method)")
    expert: str | None = Field(None, description="task label of θ_a, one of pair (None: pair[0])")
    alphas: list[float] = Field(default_factory=lambda: [-0.5, 0.0, 0.5, 1.0, 1.5])
    betas: list[float] = Field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])
    eval_limit: int | None = Field(None, ge=1, description="examples per grid point (None: as eval)")
    seed: int = Field(0, description="seed of the random direction r")


class CurveConfig(PluginConfig):
    """Merge 2..N experts of a group and evaluate on their tasks (the paper's appendix D.2)."""

    enabled: bool = False
    groups: list[str] | None = Field(None, description="trainer labels (None: all)")
    methods: list[str] | None = Field(None, description="method labels (None: all)")
    subsets: Literal["prefix", "all"] = Field("prefix", description="prefix: the first N tasks in config order; "
                                                                    "all: every N-subset")
    max_models: int | None = Field(None, ge=2, description="largest N (None: all tasks)")


class ReportConfig(PluginConfig):
    """Tables and figures."""

    bootstrap_resamples: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    scale: float = Field(100.0, gt=0, description="scores are shown multiplied by this")
    table1_groups: list[str] | None = Field(None, description="trainer labels in Table 1 (None: all)")
    table3: list[str] | None = Field(None, description="[RL label, RL-Pos label] (None: grpo and rl_pos if present)")


class ExperimentConfig(PluginConfig):
    """A whole study; see the module docstring."""

    name: str = "experiment"
    description: str = ""
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    warmup: WarmupConfig | None = None
    tasks: list[TaskConfig] = Field(min_length=2)
    trainers: list[TrainerConfig] = Field(min_length=1)
    methods: list[MergeMethodConfig] = Field(min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    conflicts: ConflictsConfig = Field(default_factory=ConflictsConfig)
    landscape: LandscapeConfig = Field(default_factory=LandscapeConfig)
    curve: CurveConfig = Field(default_factory=CurveConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the whole run (None: torch's "
                                                        "default; 1 is fastest for the tiny model on a busy CPU)")
    keep_merged_models: bool = Field(True, description="False: delete each merged model's weights once its "
                                     "evaluations (and landscape) have finished; it is merged again only when a "
                                     "step that reads it has to run again (for large bases: 16 GB per 8B merge)")

    @model_validator(mode="after")
    def _cross_check(self) -> "ExperimentConfig":
        def unique(ids: list[str], what: str) -> None:
            dup = sorted({i for i in ids if ids.count(i) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique (set a label): {', '.join(dup)}")

        def known(values: Sequence[str] | None, allowed: list[str], where: str) -> None:
            for v in values or ():
                if v not in allowed:
                    close = difflib.get_close_matches(v, allowed, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(f"{where}: unknown {v!r}{hint} (known: {', '.join(allowed)})")

        tasks = [t.id for t in self.tasks]
        groups = [t.id for t in self.trainers]
        methods = [m.id for m in self.methods]
        unique(tasks, "task")
        unique(groups, "trainer")
        unique(methods, "merge method")
        for i, t in enumerate(self.tasks):
            _check_label(t.id, f"tasks[{i}] name")
        for i, t in enumerate(self.trainers):
            _check_label(t.id, f"trainers[{i}] name")
            known(t.tasks, tasks, f"trainers[{i}].tasks")
            known(list(t.per_task), tasks, f"trainers[{i}].per_task")
        for i, m in enumerate(self.methods):
            _check_label(m.id, f"methods[{i}] name")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        if self.warmup is not None:
            known(self.warmup.tasks, tasks, "warmup.tasks")
        ls = self.landscape
        known(ls.groups, groups, "landscape.groups")
        known([ls.method] if ls.method else None, methods, "landscape.method")
        if ls.pair is not None:
            if len(ls.pair) != 2 or ls.pair[0] == ls.pair[1]:
                raise ValueError(f"landscape.pair: two different task labels, got {ls.pair}")
            known(ls.pair, tasks, "landscape.pair")
        if ls.expert is not None and ls.expert not in (ls.pair or tasks[:2]):
            raise ValueError(f"landscape.expert: {ls.expert!r} is not a task of the pair {ls.pair or tasks[:2]}")
        if ls.enabled and (not ls.alphas or not ls.betas):
            raise ValueError("landscape: alphas and betas must not be empty")
        known(self.curve.groups, groups, "curve.groups")
        known(self.curve.methods, methods, "curve.methods")
        known(self.report.table1_groups, groups, "report.table1_groups")
        if self.report.table3 is not None:
            if len(self.report.table3) != 2:
                raise ValueError(f"report.table3: [RL label, RL-Pos label], got {self.report.table3}")
            known(self.report.table3, groups, "report.table3")
        for i, t in enumerate(self.trainers):
            if len(self.tasks_of(t)) < 2:
                raise ValueError(f"trainers[{i}] ({t.id}): needs experts on at least two tasks to merge")
        return self

    # -- conveniences --------------------------------------------------------------------------------------
    def task(self, label: str) -> TaskConfig:
        return next(t for t in self.tasks if t.id == label)

    def trainer(self, label: str) -> TrainerConfig:
        return next(t for t in self.trainers if t.id == label)

    def method(self, label: str) -> MergeMethodConfig:
        return next(m for m in self.methods if m.id == label)

    def tasks_of(self, trainer: TrainerConfig) -> list[str]:
        """Task labels a trainer trains experts on, in config order."""
        return [t.id for t in self.tasks if trainer.tasks is None or t.id in trainer.tasks]

    @property
    def warmup_enabled(self) -> bool:
        return self.warmup is not None and self.warmup.enabled

    def table3_groups(self) -> tuple[str, str] | None:
        if self.report.table3 is not None:
            return self.report.table3[0], self.report.table3[1]
        ids = [t.id for t in self.trainers]
        return ("grpo", "rl_pos") if "grpo" in ids and "rl_pos" in ids else None


# -- presets and loading ---------------------------------------------------------------------------------
def list_presets() -> list[str]:
    root = resources.files(PRESET_PACKAGE) / PRESET_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_data(name: str) -> dict[str, Any]:
    """The raw mapping of a preset (with its ``quick`` block), or a ConfigError with the closest names."""
    import yaml

    presets = list_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"no experiment config file or preset named {name!r}{hint} (presets: {', '.join(presets)})")
    text = (resources.files(PRESET_PACKAGE) / PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} does not hold a mapping")
    return data


def _apply_set(data: dict[str, Any], path: Sequence[str], value: Any, item: str) -> None:
    """``a.b.c=value`` where a list may be indexed by position or by an item's ``label`` / ``name``."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            idx = None
            if re.fullmatch(r"-?\d+", part):
                idx = int(part)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(f"--set {item}: {where}: index out of range (the list has {len(node)} items)")
            else:
                matches = [j for j, x in enumerate(node) if isinstance(x, dict)
                           and (x.get("label") == part or (x.get("label") is None and x.get("name") == part))]
                if not matches:  # a labelled item by its plugin name, when that is unambiguous
                    by_name = [j for j, x in enumerate(node) if isinstance(x, dict) and x.get("name") == part]
                    matches = by_name if len(by_name) == 1 else []
                if not matches:
                    names = [x.get("label") or x.get("name") for x in node if isinstance(x, dict)]
                    raise ConfigError(f"--set {item}: {where}: no list item named {part!r} "
                                      f"(items: {', '.join(str(n) for n in names)})")
                idx = matches[0]
            if last:
                node[idx] = value
                return
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"--set {item}: {'.'.join(path[:i])} is not a mapping or list")


def load_experiment(config_or_preset: str | Path | Mapping[str, Any], quick: bool = False,
                    sets: Sequence[str] = ()) -> ExperimentConfig:
    """Load a preset name, a config file or a mapping; apply the ``quick`` block if asked, then ``sets``."""
    if isinstance(config_or_preset, Mapping):
        data, source = json.loads(json.dumps(dict(config_or_preset))), "experiment config"
    else:
        p = Path(config_or_preset).expanduser()
        if p.is_file():
            data, source = read_config_file(p), f"experiment config {p}"
        elif str(config_or_preset) in list_presets() or not p.suffix:
            data, source = preset_data(str(config_or_preset)), f"preset {config_or_preset}"
        else:
            raise ConfigError(f"experiment config file not found: {p}")
    quick_block = data.pop("quick", None)
    if quick_block is not None and not isinstance(quick_block, dict):
        raise ConfigError(f"{source}: the quick block must be a mapping, not {type(quick_block).__name__}")
    if quick:
        if not quick_block:
            raise ConfigError(f"{source} has no quick block; run without --quick")
        deep_update(data, quick_block)
        source += " (quick)"
    for item in sets:
        path, value = parse_set(item)
        _apply_set(data, path, value, item)
    return validate(ExperimentConfig, data, source)


# -- plugins ---------------------------------------------------------------------------------------------
def check_plugins(cfg: ExperimentConfig, system: Any = None, trainers: bool = True) -> None:
    """Check every plugin name and config override against the installed plugins, before any work. Errors
    (ConfigError) name the config field. ``system``: a :class:`rlm.core.plugins.PluginSystem` (default: the
    process-wide one); ``trainers=False`` skips the trainers (``merge-eval``: experts trained elsewhere)."""
    from pydantic import ValidationError

    from rlm.core.errors import UnknownPluginError
    from rlm.core.plugins import get_system

    system = system or get_system()
    problems: list[str] = []

    def get(kind: str, name: str, where: str) -> Any:
        try:
            return system.registry(kind).get(name)
        except UnknownPluginError as exc:
            problems.append(f"  {where}: {exc}")
            return None

    def check(model: Any, data: Mapping[str, Any], where: str) -> None:
        if model is None or not data:
            return
        try:
            model.model_validate(dict(data))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                problems.append(f"  {where}.{loc}: {msg}")

    def check_subset(cls: Any, subset: str | None, where: str) -> None:
        subsets = getattr(cls, "subsets", None) or {}
        if cls is not None and subset is not None and subsets and subset not in subsets:
            close = difflib.get_close_matches(subset, list(subsets), n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            problems.append(f"  {where}: unknown subset {subset!r} of task {cls.name!r}{hint} "
                            f"(subsets: {', '.join(subsets)})")

    for i, t in enumerate(cfg.tasks):
        cls = get("task", t.name, f"tasks[{i}].name")
        if cls is not None:
            check(cls.Config, t.config, f"tasks[{i}].config")
            check_subset(cls, t.train_subset, f"tasks[{i}].train_subset")
            check_subset(cls, t.eval_subset, f"tasks[{i}].eval_subset")
    if cfg.warmup_enabled:
        cls = get("trainer", cfg.warmup.trainer, "warmup.trainer")
        check(getattr(cls, "Config", None), cfg.warmup.config, "warmup.config")
    for i, t in enumerate(cfg.trainers if trainers else []):
        cls = get("trainer", t.name, f"trainers[{i}].name")
        check(getattr(cls, "Config", None), t.config, f"trainers[{i}].config")
        for task, over in t.per_task.items():
            check(getattr(cls, "Config", None), {**t.config, **over}, f"trainers[{i}].per_task.{task}")
    for i, m in enumerate(cfg.methods):
        cls = get("merge_method", m.name, f"methods[{i}].name")
        check(getattr(cls, "Config", None), m.params, f"methods[{i}].params")
        check(getattr(cls, "ModelParams", None), m.model_params, f"methods[{i}].model_params")
    if cfg.conflicts.enabled:
        for j, name in enumerate(cfg.conflicts.metrics):
            cls = get("metric", name, f"conflicts.metrics[{j}]")
            check(getattr(cls, "Config", None), cfg.conflicts.metric_config.get(name, {}),
                  f"conflicts.metric_config.{name}")
        for name in cfg.conflicts.metric_config:
            if name not in cfg.conflicts.metrics:
                problems.append(f"  conflicts.metric_config.{name}: not one of conflicts.metrics")
    if problems:
        raise ConfigError(f"experiment {cfg.name!r} does not match the installed plugins:\n" + "\n".join(problems))


# -- the plan --------------------------------------------------------------------------------------------
@dataclass
class PlannedStep:
    """A step by name, kind, dependencies and JSON config (what its output hash covers)."""

    name: str
    kind: str
    deps: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    ephemeral: bool = False  # output deleted once every dependent has finished (see rlm.core.study.graph.Step)


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


def _curve_methods(cfg: ExperimentConfig, group: str) -> list[MergeMethodConfig]:
    """The methods whose number-of-merged-models curve ``group`` gets (none when the curve is off for it)."""
    c = cfg.curve
    if not c.enabled or (c.groups is not None and group not in c.groups):
        return []
    return [m for m in cfg.methods if c.methods is None or m.id in c.methods]


def _curve_subsets(curve: CurveConfig, tasks: Sequence[str]) -> dict[int, list[tuple[str, ...]]]:
    """N -> the task sets merged for the curve's point N, for N = 2 .. max_models (the planner and
    :func:`collect_scores` must agree on them)."""
    n_max = min(len(tasks), curve.max_models or len(tasks))
    return {n: [tuple(tasks[:n])] if curve.subsets == "prefix" else list(itertools.combinations(tasks, n))
            for n in range(2, n_max + 1)}


def plan_steps(cfg: ExperimentConfig) -> list[PlannedStep]:
    """Every step of the study in a valid execution order (dependencies first); see the module docstring."""
    steps: dict[str, PlannedStep] = {}

    def add(name: str, kind: str, deps: list[str], config: dict[str, Any]) -> str:
        config = json.loads(json.dumps(config))
        if name in steps:  # the same merge planned twice (a pair is also the curve's N=2 prefix)
            if steps[name].config != config or steps[name].deps != deps:
                raise ConfigError(f"internal: step {name} planned twice with different configs")
            return name
        steps[name] = PlannedStep(name, kind, deps, config,
                                  ephemeral=kind == "merge" and not cfg.keep_merged_models)
        return name

    ev = {"max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size}
    order = [t.id for t in cfg.tasks]
    init_cfg: dict[str, Any] = {"base": cfg.base.model_dump(mode="json")}
    if Path(cfg.base.model).expanduser().is_dir():  # used in place: the cache must notice a rewritten directory
        from rlm.core.study.steps import dir_fingerprint

        init_cfg["fingerprint"] = dir_fingerprint(cfg.base.model)
    start = add("init", "init", [], init_cfg)
    if cfg.warmup_enabled:
        w = cfg.warmup
        mix = [cfg.task(t) for t in (w.tasks or order)]
        start = add("warmup", "warmup", [start], {
            "trainer": w.trainer, "config": w.config, "seed": cfg.base.seed,
            "tasks": [{**_task_train(t), "size": w.examples_per_task} for t in mix]})
    evals_expert: list[str] = []
    if cfg.eval.include_start:
        for t in cfg.tasks:
            evals_expert.append(add(f"eval_start.{t.id}", "eval_expert", [start],
                                    {"group": "start", "model": "start", "task": _task_eval(t, cfg.eval.limit),
                                     "eval": ev}))

    evals_merged: list[str] = []
    trains: list[str] = []
    conflicts: list[str] = []
    landscapes: list[str] = []

    def merge_set(group: str, seed: int, method: MergeMethodConfig, tasks: Sequence[str]) -> str:
        name = f"merge.{group}.{set_name(tasks)}.{method.id}.s{seed}"
        deps = [start] + [f"train.{group}.{t}.s{seed}" for t in tasks]
        add(name, "merge", deps, {"group": group, "method": method.name, "label": method.id,
                                  "params": method.params, "model_params": method.model_params,
                                  "tasks": list(tasks), "seed": seed})
        for t in tasks:
            evals_merged.append(add(f"eval_merged.{group}.{set_name(tasks)}.{method.id}.s{seed}.{t}", "eval_merged",
                                    [name], {"group": group, "method": method.id, "tasks": list(tasks), "seed": seed,
                                             "task": _task_eval(cfg.task(t), cfg.eval.limit), "eval": ev}))
        return name

    for seed in cfg.seeds:
        for tr in cfg.trainers:
            g = tr.id
            tasks = cfg.tasks_of(tr)
            for t in tasks:
                conf = {**tr.config, **tr.per_task.get(t, {})}
                train = add(f"train.{g}.{t}.s{seed}", "train", [start],
                            {"group": g, "trainer": tr.name, "config": conf, "task": _task_train(cfg.task(t)),
                             "seed": seed})
                trains.append(train)
                evals_expert.append(add(f"eval_expert.{g}.{t}.s{seed}", "eval_expert", [train],
                                        {"group": g, "model": "expert", "seed": seed,
                                         "task": _task_eval(cfg.task(t), cfg.eval.limit), "eval": ev}))
            for m in cfg.methods:
                for a, b in itertools.combinations(tasks, 2):
                    merge_set(g, seed, m, (a, b))
            for m in _curve_methods(cfg, g):
                for n, subsets in _curve_subsets(cfg.curve, tasks).items():
                    if n > 2:  # the pairs are planned above
                        for s in subsets:
                            merge_set(g, seed, m, s)
            if cfg.conflicts.enabled:
                c = cfg.conflicts
                conflicts.append(add(f"conflicts.{g}.s{seed}", "conflicts",
                                     [start] + [f"train.{g}.{t}.s{seed}" for t in tasks],
                                     {"group": g, "seed": seed, "models": {t: f"train.{g}.{t}.s{seed}" for t in tasks},
                                      "metrics": c.metrics, "threshold": c.threshold,
                                      "metric_config": c.metric_config, "over_steps": c.over_steps}))
        ls = cfg.landscape
        if ls.enabled:
            pair = [t for t in order if t in (ls.pair or order[:2])]
            method = cfg.method(ls.method) if ls.method else cfg.methods[0]
            expert = ls.expert or (ls.pair or order[:2])[0]
            limit = _cap(ls.eval_limit, cfg.eval.limit)
            for g in ls.groups or [t.id for t in cfg.trainers]:
                gtasks = cfg.tasks_of(cfg.trainer(g))
                if any(t not in gtasks for t in pair):
                    raise ConfigError(f"landscape: trainer {g!r} has no experts for all of {pair}")
                merge = f"merge.{g}.{set_name(pair)}.{method.id}.s{seed}"
                landscapes.append(add(f"landscape.{g}.s{seed}", "landscape",
                                      [start, f"train.{g}.{expert}.s{seed}", merge], {
                    "group": g, "pair": pair, "method": method.id, "expert": expert, "alphas": ls.alphas,
                    "betas": ls.betas, "direction_seed": ls.seed, "seed": seed,
                    "task": _task_eval(cfg.task(expert), limit), "eval": ev}))

    rep = cfg.report
    # training runs are listed too (for the training curves); they are ancestors of the evaluations anyway
    extra = ([start] if cfg.warmup_enabled else []) + trains
    add("report", "report", evals_expert + evals_merged + conflicts + landscapes + extra, {
        "name": cfg.name, "tasks": order, "groups": rep.table1_groups or [t.id for t in cfg.trainers],
        "methods": [m.id for m in cfg.methods], "seeds": cfg.seeds, "bootstrap_resamples": rep.bootstrap_resamples,
        "ci": rep.ci, "bootstrap_seed": rep.seed, "scale": rep.scale,
        "table3": list(cfg.table3_groups() or []) or None, "curve": cfg.curve.enabled,
        "landscape": ls.enabled})
    return list(steps.values())


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
              kind=s.kind, ephemeral=s.ephemeral)
    return g


# -- from step results to the report's inputs ------------------------------------------------------------
@dataclass
class CollectedScores:
    """Scores of a study arranged for :mod:`rlm.core.study.tables` (values are :class:`rlm.core.study.tables.Score`)."""

    unmerged: dict[str, dict[str, Any]]  # group -> task -> Score
    merged: dict[str, dict[str, dict[tuple[str, str], dict[str, Any]]]]  # group -> method -> pair -> task
    start: dict[str, Any]  # task -> Score of the start model θ0
    curve: dict[str, dict[int, list[float]]]  # "group/method" -> N -> mean score over each N-subset's tasks
    missing: list[str]  # evaluation steps without a score (failed or not run)


def _mean_over_seeds(scores: list[Any]) -> Any:
    """One Score from the same evaluation under several seeds: per-example scores are averaged example by
    example when every seed has them on the same examples (so the bootstrap still resamples examples);
    otherwise the means are averaged."""
    from rlm.core.study.tables import Score

    if len(scores) == 1:
        return scores[0]
    sources = ";".join(s.source for s in scores if s.source) or None
    arrays = [s.per_example for s in scores]
    if all(a is not None for a in arrays) and len({a.size for a in arrays}) == 1:
        import numpy as np

        per = np.mean(np.stack(arrays), axis=0)
        return Score(float(per.mean()), per, sources, int(per.size))
    return Score(float(sum(s.value for s in scores) / len(scores)), None, sources, scores[0].n)


def collect_scores(cfg: ExperimentConfig, scores: Mapping[str, Any]) -> CollectedScores:
    """Arrange evaluation scores by step name (``scores[step_name]``: a number, per-example scores, a mapping
    ``{"score", "per_example", "source", "n"}`` or a Score) into Table 1's inputs, the start model's scores
    and the number-of-merged-models curve. Several seeds are combined by :func:`_mean_over_seeds`."""
    from rlm.core.study.tables import as_score

    plan = plan_steps(cfg)
    buckets: dict[tuple, list[Any]] = {}
    missing: list[str] = []
    for s in plan:
        if s.kind not in ("eval_expert", "eval_merged"):
            continue
        if s.name not in scores:
            missing.append(s.name)
            continue
        c = s.config
        t = c["task"]["label"]
        if s.kind == "eval_expert":
            key = ("start", t) if c["group"] == "start" else ("unmerged", c["group"], t)
        else:
            key = ("merged", c["group"], c["method"], tuple(c["tasks"]), t)
        buckets.setdefault(key, []).append(as_score(scores[s.name], s.name))
    unmerged: dict[str, dict[str, Any]] = {}
    merged: dict[str, dict[str, dict[tuple[str, str], dict[str, Any]]]] = {}
    start: dict[str, Any] = {}
    combined = {k: _mean_over_seeds(v) for k, v in buckets.items()}
    for key, score in combined.items():
        if key[0] == "start":
            start[key[1]] = score
        elif key[0] == "unmerged":
            unmerged.setdefault(key[1], {})[key[2]] = score
        elif len(key[3]) == 2:
            merged.setdefault(key[1], {}).setdefault(key[2], {}).setdefault(key[3], {})[key[4]] = score
    curve: dict[str, dict[int, list[float]]] = {}
    for tr in cfg.trainers:
        for m in _curve_methods(cfg, tr.id):
            points: dict[int, list[float]] = {}
            for n, subsets in _curve_subsets(cfg.curve, cfg.tasks_of(tr)).items():
                for sub in subsets:
                    vals = [combined.get(("merged", tr.id, m.id, sub, t)) for t in sub]
                    if all(v is not None for v in vals):
                        points.setdefault(n, []).append(sum(v.value for v in vals) / len(vals))
            if points:
                curve[f"{tr.id}/{m.id}"] = points
    return CollectedScores(unmerged, merged, start, curve, missing)
