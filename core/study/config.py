"""The :class:`ExperimentConfig` of a study (``rlm experiment``, ``rlm merge-eval``) and its parts, with the
cross-checks between them.

An experiment is: a base model; the precision regime (the dtype θ0 and every expert are saved in, the default
training precision); an optional warm-up SFT on a mixture of the tasks (the start point θ0 of every
expert); tasks with training and evaluation subsets and sizes; trainers (each trainer's experts form one
*group* of Table 1); merge methods (each with an optional ``preset`` of the method plugin, e.g. ``paper``);
evaluation settings; conflict statistics; the landscape and the number-of-merged-models curve; the report;
seeds. Unknown fields are errors naming the field.

Loading (presets, ``--quick``, ``--set``) is :mod:`rlm.core.study.presets`; checking the plugins each part
names is :mod:`rlm.core.study.check`; turning a config into steps is :mod:`rlm.core.study.plan`.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, Mapping, Sequence

from pydantic import Field, field_validator, model_validator

from rlm.core.conflicts.config import default_metrics
from rlm.core.contracts import PluginConfig

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


class PrecisionConfig(PluginConfig):
    """The paper's precision regime: experts trained with fp32 master weights and saved as bf16 checkpoints,
    θ0 saved in the same dtype, so that τ = θ_expert − θ0, the merges and Table 2 ("fraction updated") see only
    what the saved checkpoints keep of an update, never the rounding of unchanged weights."""

    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype θ0 (the warm-up's output; without a warm-up, the init step's model) and "
                                "every expert are saved in: each trainer's save_dtype and the warm-up's (a trainer "
                                "config may not set another); auto: each trainer's own choice (the start model's "
                                "dtype), θ0 as the base is (paper: bfloat16)")
    training: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"] | None = Field(
        None, description="precision of the warm-up and of every trainer whose config does not set `precision` "
                          "(None: each trainer's default, fp32; fp32 and the mixed modes keep fp32 master weights; "
                          "paper: bf16-mixed)")


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
    examples: dict[str, int] = Field(default_factory=dict, description="task label -> its examples in the "
                                     "mixture, in place of examples_per_task (a task's share of the warm-up)")
    config: dict[str, Any] = Field(default_factory=dict, description="trainer config overrides (steps, lr, ...)")

    @field_validator("examples")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"examples must be >= 1, got {bad}")
        return v


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
    """A merge-method plugin with global (``params``) and per-model (``model_params``) parameters, on top of
    one of the plugin's named ``presets`` (explicit values win over the preset's, as ``rlm merge --preset``)."""

    name: str = Field(description="merge method plugin name (averaging, task_arithmetic, ties, dare_ties, ...)")
    label: str | None = Field(None, description="row name in tables and step names (default: name)")
    preset: str | None = Field(None, description="one of the method plugin's presets, e.g. paper (None: the "
                                                 "plugin's defaults)")
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


#: the sampling fields of ``EvalConfig``: what an evaluation step's ``eval`` carries when it samples
DECODING_FIELDS = ("temperature", "top_p", "n", "seed")


class EvalConfig(PluginConfig):
    """Evaluation of θ0, the experts and the merged models: greedy by default; with ``temperature > 0``, ``n``
    samples per example (``rlm eval``'s ``--temperature``, ``--top-p``, ``--n``), each example scoring the mean
    over its samples (pass@1 estimated from ``n`` samples)."""

    limit: int | None = Field(None, ge=1, description="cap on every task's eval_size (None: no cap)")
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    include_start: bool = Field(True, description="also evaluate the start model θ0 on every task")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus of the sampling (temperature > 0)")
    n: int = Field(1, ge=1, description="samples per example (temperature > 0); an example scores their mean")
    seed: int = Field(0, ge=0, description="sampling seed, the same for every model (temperature > 0)")

    @model_validator(mode="after")
    def _sampling(self) -> "EvalConfig":
        if self.temperature == 0 and (self.n > 1 or self.top_p != 1.0):
            raise ValueError(f"n {self.n} / top_p {self.top_p:g} with greedy decoding (temperature 0) repeat one "
                             "completion; give temperature > 0")
        return self

    def decoding(self) -> dict[str, Any]:
        """The sampling settings of the evaluation steps: empty when greedy (so greedy studies keep their step
        keys), else temperature, top_p, n and seed."""
        return {k: getattr(self, k) for k in DECODING_FIELDS} if self.temperature else {}


class ConflictsConfig(PluginConfig):
    """Task-vector statistics of each group's experts against θ0 (Table 2 and the conflict figures)."""

    enabled: bool = True
    metrics: list[str] = Field(default_factory=default_metrics,
                               description="metric plugins (default: those that declare themselves default)")
    threshold: float = Field(1e-5, gt=0, description="|τ| above this counts as updated: the `threshold` of every "
                                                     "metric whose config has one, unless metric_config sets it")
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
    table3: list[str] | None = Field(None, description="[RL label, RL-Pos label]: Table 3 compares these two "
                                                       "groups (None: no Table 3)")


class StepResources(PluginConfig):
    """What one step asks of a Ray cluster (``--executor ray``; the local executor ignores ``num_cpus`` and
    ``num_gpus``), and for training steps how many processes train (under either executor)."""

    num_cpus: float = Field(1.0, ge=0, description="CPU cores reserved for the step's Ray task")
    num_gpus: float | None = Field(None, ge=0, description="GPUs reserved for the step's Ray task (None: 1 on a "
                                                           "cluster with GPUs, else 0)")
    num_processes: int | None = Field(None, ge=1, description="train and warmup only: train on this many processes "
                                                              "through accelerate launch, under either executor "
                                                              "(None: num_gpus when it is a whole number above 1, "
                                                              "else 1 process, the trainer in the step's own)")
    config_file: str | None = Field(None, description="train and warmup only: accelerate config file of that launch "
                                                      "(e.g. configs/accelerate/fsdp.yaml for FSDP2; None: DDP); "
                                                      "a relative path is taken from where the study is loaded")

    @field_validator("config_file")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        from pathlib import Path

        return str(Path(v).expanduser().resolve()) if v else v


def _cpu_only() -> StepResources:
    return StepResources(num_cpus=1.0, num_gpus=0.0)


class ResourcesConfig(PluginConfig):
    """Ray resources per step kind (``rlm experiment run --executor ray``). Training, evaluation and the
    landscape get a GPU where the cluster has any; init, merge, conflicts and the report run on CPUs. A
    training step that needs several GPUs asks for them here (``train.num_gpus: 4``): its trainer then runs on
    that many processes through ``accelerate launch`` inside the step (``num_processes``, ``config_file``;
    :mod:`rlm.core.study.train_launch`, docs/study.md). Resources never change step keys."""

    init: StepResources = Field(default_factory=_cpu_only)
    warmup: StepResources = Field(default_factory=StepResources)
    train: StepResources = Field(default_factory=StepResources)
    eval_expert: StepResources = Field(default_factory=StepResources)
    merge: StepResources = Field(default_factory=_cpu_only)
    eval_merged: StepResources = Field(default_factory=StepResources)
    conflicts: StepResources = Field(default_factory=_cpu_only)
    landscape: StepResources = Field(default_factory=StepResources)
    report: StepResources = Field(default_factory=_cpu_only)
    max_retries: int = Field(1, ge=0, description="times Ray reruns a step whose worker process died (killed, "
                                                  "out of memory); a step that raises is not retried")

    @model_validator(mode="after")
    def _launch_only_for_training(self) -> "ResourcesConfig":
        for kind in type(self).model_fields:
            res = getattr(self, kind)
            if kind in ("train", "warmup") or not isinstance(res, StepResources):
                continue
            if (res.num_processes or 1) > 1 or res.config_file:
                raise ValueError(f"resources.{kind}: num_processes and config_file apply to train and warmup "
                                 f"steps only")
        return self

    def of(self, kind: str | None) -> StepResources:
        """The resources of a step kind (CPU-only defaults for a kind this section does not name)."""
        value = getattr(self, kind, None) if kind and kind in type(self).model_fields else None
        return value if isinstance(value, StepResources) else _cpu_only()


def _unique(ids: list[str], what: str) -> None:
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"{what} names must be unique (set a label): {', '.join(dup)}")


def _known(values: Sequence[str] | None, allowed: list[str], where: str) -> None:
    for v in values or ():
        if v not in allowed:
            close = difflib.get_close_matches(v, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown {v!r}{hint} (known: {', '.join(allowed)})")


def _check_save_dtype(save_dtype: str, overrides: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """θ0 and every expert are saved in ``precision.save_dtype``: a trainer config may not ask for another."""
    if save_dtype == "auto":
        return
    for where, conf in overrides:
        # the deprecated `dtype` bfloat16 / float16 also means saving in that dtype (float32: the start model's)
        field = "save_dtype" if conf.get("save_dtype") is not None else "dtype"
        got = conf.get(field)
        if got is not None and got not in (save_dtype, "auto") and not (field == "dtype" and got == "float32"):
            raise ValueError(f"{where}.{field}: {got} differs from precision.save_dtype {save_dtype} (θ0 and "
                             f"every expert are saved in one dtype, so that τ = θ_expert − θ0 holds no rounding; "
                             f"set precision.save_dtype instead)")


def _check_landscape(ls: LandscapeConfig, tasks: list[str], groups: list[str], methods: list[str]) -> None:
    _known(ls.groups, groups, "landscape.groups")
    _known([ls.method] if ls.method else None, methods, "landscape.method")
    if ls.pair is not None:
        if len(ls.pair) != 2 or ls.pair[0] == ls.pair[1]:
            raise ValueError(f"landscape.pair: two different task labels, got {ls.pair}")
        _known(ls.pair, tasks, "landscape.pair")
    if ls.expert is not None and ls.expert not in (ls.pair or tasks[:2]):
        raise ValueError(f"landscape.expert: {ls.expert!r} is not a task of the pair {ls.pair or tasks[:2]}")
    if ls.enabled and (not ls.alphas or not ls.betas):
        raise ValueError("landscape: alphas and betas must not be empty")


class ExperimentConfig(PluginConfig):
    """A whole study; see the module docstring."""

    name: str = "experiment"
    description: str = ""
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    warmup: WarmupConfig | None = None
    tasks: list[TaskConfig] = Field(min_length=2)
    trainers: list[TrainerConfig] = Field(min_length=1)
    methods: list[MergeMethodConfig] = Field(min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    conflicts: ConflictsConfig = Field(default_factory=ConflictsConfig)
    landscape: LandscapeConfig = Field(default_factory=LandscapeConfig)
    curve: CurveConfig = Field(default_factory=CurveConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the whole run (None: torch's "
                                                        "default; 1 is fastest for the tiny model on a busy CPU)")
    cpu_capability: Literal["native", "avx2"] = Field(
        "native", description="CPU code paths of torch, MKL and oneDNN: avx2 pins them to AVX2 on every x86-64 "
        "CPU that has it, so the same seeds give the same numbers on different CPUs (rlm.core.cpu_numerics); "
        "native: each CPU's fastest paths")
    keep_merged_models: bool = Field(True, description="False: delete each merged model's weights once its "
                                     "evaluations (and landscape) have finished; it is merged again only when a "
                                     "step that reads it has to run again (for large bases: 16 GB per 8B merge)")

    @model_validator(mode="after")
    def _cross_check(self) -> "ExperimentConfig":
        tasks = [t.id for t in self.tasks]
        groups = [t.id for t in self.trainers]
        methods = [m.id for m in self.methods]
        _unique(tasks, "task")
        _unique(groups, "trainer")
        _unique(methods, "merge method")
        for i, t in enumerate(self.tasks):
            _check_label(t.id, f"tasks[{i}] name")
        for i, t in enumerate(self.trainers):
            _check_label(t.id, f"trainers[{i}] name")
            _known(t.tasks, tasks, f"trainers[{i}].tasks")
            _known(list(t.per_task), tasks, f"trainers[{i}].per_task")
        for i, m in enumerate(self.methods):
            _check_label(m.id, f"methods[{i}] name")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        if self.warmup is not None:
            _known(self.warmup.tasks, tasks, "warmup.tasks")
            _known(list(self.warmup.examples), self.warmup.tasks or tasks, "warmup.examples")
        _check_save_dtype(self.precision.save_dtype, self._trainer_overrides())
        _check_landscape(self.landscape, tasks, groups, methods)
        _known(self.curve.groups, groups, "curve.groups")
        _known(self.curve.methods, methods, "curve.methods")
        _known(self.report.table1_groups, groups, "report.table1_groups")
        if self.report.table3 is not None:
            if len(self.report.table3) != 2:
                raise ValueError(f"report.table3: [RL label, RL-Pos label], got {self.report.table3}")
            _known(self.report.table3, groups, "report.table3")
        for i, t in enumerate(self.trainers):
            if len(self.tasks_of(t)) < 2:
                raise ValueError(f"trainers[{i}] ({t.id}): needs experts on at least two tasks to merge")
        return self

    def _trainer_overrides(self) -> list[tuple[str, Mapping[str, Any]]]:
        """(config field, trainer overrides) of the warm-up and of every trainer and per-task entry."""
        out: list[tuple[str, Mapping[str, Any]]] = []
        if self.warmup is not None:
            out.append(("warmup.config", self.warmup.config))
        for i, t in enumerate(self.trainers):
            out.append((f"trainers[{i}].config", t.config))
            out += [(f"trainers[{i}].per_task.{k}", v) for k, v in t.per_task.items()]
        return out

    def trainer_defaults(self) -> dict[str, str]:
        """What the study gives the warm-up and every trainer for the fields their config leaves unset
        (``save_dtype``, ``precision``), from ``precision``; empty where the trainers decide."""
        out = {}
        if self.precision.save_dtype != "auto":
            out["save_dtype"] = self.precision.save_dtype
        if self.precision.training is not None:
            out["precision"] = self.precision.training
        return out

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
        """The two groups of Table 3 (``report.table3``), or None for no Table 3."""
        if self.report.table3 is None:
            return None
        return self.report.table3[0], self.report.table3[1]
