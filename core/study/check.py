"""Checking a study against the installed plugins before any work (:func:`check_plugins`), and how a study
resolves the settings of its merge methods (:func:`method_settings`: a plugin preset under explicit values)
and metrics (:func:`metric_settings`: ``conflicts.threshold`` for metrics that take a threshold)."""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from rlm.core.errors import ConfigError, RlmError, UnknownPluginError
from rlm.core.study.config import ExperimentConfig, MergeMethodConfig


def method_settings(cls: Any, method: MergeMethodConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The global and per-model parameters a study's merge method runs with: the plugin's ``presets[preset]``
    (:func:`rlm.core.merge.engine.method_preset`, as the merge steps resolve it) under the explicit ``params``
    / ``model_params``. An unknown preset is a ConfigError naming the closest presets."""
    from rlm.core.merge.engine import method_preset

    preset: Mapping[str, Any] = method_preset(cls, method.preset, suggest=True)
    return ({**(preset.get("params") or {}), **method.params},
            {**(preset.get("model_params") or {}), **method.model_params})


def metric_settings(cls: Any, name: str, metric_config: Mapping[str, Mapping[str, Any]],
                    threshold: float) -> dict[str, Any]:
    """The config overrides a study's conflicts step gives metric ``name``: its ``conflicts.metric_config``
    entry, plus ``threshold`` (``conflicts.threshold``) when the metric's config has such a field and the
    entry does not set it."""
    data = dict(metric_config.get(name) or {})
    if "threshold" in getattr(cls.Config, "model_fields", {}):
        data.setdefault("threshold", threshold)
    return data


class _Checker:
    """Collects one line per problem, each naming the config field."""

    def __init__(self, system: Any) -> None:
        self.system = system
        self.problems: list[str] = []

    def get(self, kind: str, name: str, where: str) -> Any:
        try:
            return self.system.registry(kind).get(name)
        except UnknownPluginError as exc:
            self.problems.append(f"  {where}: {exc}")
            return None

    def validate(self, model: Any, data: Mapping[str, Any], where: str) -> Any:
        """``model`` validated from ``data``, or None after recording each bad field."""
        from pydantic import ValidationError

        try:
            return model.model_validate(dict(data))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                self.problems.append(f"  {where}.{loc}: {msg}")
            return None

    def instantiate(self, cls: Any, data: Mapping[str, Any], where: str) -> Any:
        """``cls(config)`` once its config validates, so the plugin's own config-time checks run now; an
        RlmError from the constructor becomes a problem at ``where``."""
        config = self.validate(cls.Config, data, where)
        if config is None:
            return None
        try:
            return cls(config)
        except RlmError as exc:
            self.problems.append(f"  {where}: {exc}")
            return None

    def subset(self, cls: Any, subset: str | None, where: str) -> None:
        subsets = getattr(cls, "subsets", None) or {}
        if subset is not None and subsets and subset not in subsets:
            close = difflib.get_close_matches(subset, list(subsets), n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            self.problems.append(f"  {where}: unknown subset {subset!r} of task {cls.name!r}{hint} "
                                 f"(subsets: {', '.join(subsets)})")

    # -- the parts of a study --------------------------------------------------------------------------------
    def tasks(self, cfg: ExperimentConfig) -> None:
        for i, t in enumerate(cfg.tasks):
            cls = self.get("task", t.name, f"tasks[{i}].name")
            if cls is not None:
                self.instantiate(cls, t.config, f"tasks[{i}].config")
                self.subset(cls, t.train_subset, f"tasks[{i}].train_subset")
                self.subset(cls, t.eval_subset, f"tasks[{i}].eval_subset")

    def trainers(self, cfg: ExperimentConfig, experts: bool) -> None:
        if cfg.warmup_enabled:
            cls = self.get("trainer", cfg.warmup.trainer, "warmup.trainer")
            if cls is not None:
                self.instantiate(cls, cfg.warmup.config, "warmup.config")
        for i, t in enumerate(cfg.trainers if experts else []):
            cls = self.get("trainer", t.name, f"trainers[{i}].name")
            if cls is None:
                continue
            self.instantiate(cls, t.config, f"trainers[{i}].config")
            for task, over in t.per_task.items():
                self.instantiate(cls, {**t.config, **over}, f"trainers[{i}].per_task.{task}")

    def methods(self, cfg: ExperimentConfig) -> None:
        from rlm.core.contracts import MergeMethod

        for i, m in enumerate(cfg.methods):
            cls = self.get("merge_method", m.name, f"methods[{i}].name")
            if cls is None:
                continue
            try:
                params, model_params = method_settings(cls, m)
            except ConfigError as exc:
                self.problems.append(f"  methods[{i}].preset: {exc}")
                continue
            method = self.instantiate(cls, params, f"methods[{i}].params")
            per_model = self.validate(getattr(cls, "ModelParams", MergeMethod.ModelParams), model_params,
                                      f"methods[{i}].model_params")
            if method is not None and per_model is not None:
                try:  # every merge of a study has two or more models, each with these parameters
                    method.check([per_model, per_model])
                except RlmError as exc:
                    self.problems.append(f"  methods[{i}]: {exc}")

    def metrics(self, cfg: ExperimentConfig) -> None:
        c = cfg.conflicts
        if not c.enabled:
            return
        for j, name in enumerate(c.metrics):
            cls = self.get("metric", name, f"conflicts.metrics[{j}]")
            if cls is not None:
                self.instantiate(cls, metric_settings(cls, name, c.metric_config, c.threshold),
                                 f"conflicts.metric_config.{name}")
        for name in c.metric_config:
            if name not in c.metrics:
                self.problems.append(f"  conflicts.metric_config.{name}: not one of conflicts.metrics")


def check_plugins(cfg: ExperimentConfig, system: Any = None, trainers: bool = True) -> None:
    """Check every plugin name, preset and config override against the installed plugins, before any work:
    each plugin class is instantiated with its config, so its own config-time checks run too. Errors
    (one ConfigError listing every problem) name the config field. ``system``: a
    :class:`rlm.core.plugins.PluginSystem` (default: the process-wide one); ``trainers=False`` skips the
    experts' trainers (``merge-eval``: experts trained elsewhere)."""
    from rlm.core.plugins import get_system

    checker = _Checker(system or get_system())
    checker.tasks(cfg)
    checker.trainers(cfg, experts=trainers)
    checker.methods(cfg)
    checker.metrics(cfg)
    if checker.problems:
        raise ConfigError(f"experiment {cfg.name!r} does not match the installed plugins:\n"
                          + "\n".join(checker.problems))
