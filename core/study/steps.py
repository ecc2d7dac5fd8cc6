"""The step functions of a study (``rlm experiment run``, ``rlm merge-eval``): :class:`StudySteps` has one
method per step kind of :mod:`rlm.core.study.plan`, each calling the engines (models, training, merging,
evaluation, conflicts, report) and writing its outputs into the step's own directory ``RUN/steps/NAME-KEY/``.

What each step writes (paths relative to its step directory) and returns (its ``step.json`` result):

``init``         ``model/`` (the tiny model, or the base loaded and saved in ``dtype``); a local base directory
                 is used in place (not copied) -> ``{"model": PATH}``. Without a warm-up this model is θ0 and
                 is saved in ``precision.save_dtype`` (a local directory in another dtype is copied)
``warmup``       ``run/`` (an ``rlm train`` run directory on the task mixture; ``run/final`` is θ0)
``train``        ``run/`` (one expert; ``run/metrics.jsonl`` feeds the training curves) or, for given experts
                 (``merge-eval``), nothing -> ``{"model": DIR}``. ``train`` and ``warmup`` train in the step's
                 process, or on several through ``accelerate launch`` when the kind's resources ask for more
                 than one process (:mod:`rlm.core.study.train_launch`; the same outputs and result)
``merge``        ``model/`` (``merge_manifest.json`` inside); the method's ``preset``, ``params`` and
                 ``model_params`` go to the merge engine as written, which resolves the preset
``eval_*``       ``summary.json``, ``records.jsonl`` (prompt, completion, scores per example) ->
                 ``{"score", "per_example", "n", "metrics", "source", "clusters"}``
``conflicts``    ``conflicts.json``, ``report.md``, the metrics' figures (``over_steps/`` when asked) ->
                 ``{"models": {task: {column: value}}, "pairs": {pair: {column: value}}, "figures", "files"}``:
                 the summary cells of the metrics that ran (:meth:`rlm.core.contracts.Metric.columns`)
``landscape``    ``landscape.json``, ``landscape.png``
``report``       ``report.md``, ``summary.json``, ``table1.{md,csv,json}``, ``table2.*``, ``table3.*``,
                 ``figures/*.png``, ``provenance.json`` (:mod:`rlm.core.study.report`)

Scores are :func:`rlm.core.study.scores.primary_score` per example. Generation is greedy unless the study's
``eval.temperature`` is above 0: then every example gets ``eval.n`` samples drawn with ``eval.seed`` and scores
their mean. The evaluation examples of a task do not depend on the training seed (``seed=0``), so every model
of a study is scored on the same examples. The landscape is :class:`rlm.core.study.landscape.Landscape`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from rlm.core.study.graph import model_of

#: bump a kind's version when its step function's output would change for the same config
STEP_VERSIONS = {"init": "1", "warmup": "1", "train": "1", "eval_expert": "2", "merge": "1", "eval_merged": "2",
                 "conflicts": "2", "landscape": "1", "report": "6"}


# -- helpers -----------------------------------------------------------------------------------------------
def _plugin_data(cls: Any, user: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The user's overrides plus ``defaults`` for fields the plugin's config has and the user left unset (seed,
    progress, train_limit): the data :func:`_plugin_config` validates."""
    fields = getattr(cls.Config, "model_fields", {})
    data = {k: v for k, v in defaults.items() if k in fields and k not in user}
    data.update(user)
    return data


def _plugin_config(cls: Any, user: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
    """A plugin config from the user's overrides plus ``defaults`` (:func:`_plugin_data`)."""
    data = _plugin_data(cls, user, defaults)
    from rlm.core.config import validate

    return validate(cls.Config, data, f"config of {getattr(cls, 'name', cls.__name__)!r}")


def _last_metrics(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                last = json.loads(line)
            except ValueError:
                break
    return last


# -- evaluation --------------------------------------------------------------------------------------------
def evaluate_loaded(model: Any, tokenizer: Any, task: Mapping[str, Any], ev: Mapping[str, Any],
                    limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Evaluation of an in-memory model on one task spec (a step config's ``task``): greedy, or with ``ev``'s
    ``temperature`` > 0 ``n`` samples per example (seed ``ev["seed"]``), an example scoring the mean of its
    samples' primary scores. Returns ``{"label", "spec", "metrics", "score", "per_example", "n", "records",
    "clusters"}`` (``n``: examples; ``records``: one per sample; ``clusters``:
    :func:`~rlm.core.study.tables.prompt_clusters` of the examples' prompts)."""
    from rlm.core.eval.engine import load_task
    from rlm.core.eval.generation import chat_prompt, generate
    from rlm.core.study.scores import primary_score

    size = task.get("size")
    if limit is not None:
        size = min(size, limit) if size else limit
    spec = f"{task['name']}:{task['subset']}" if task.get("subset") else task["name"]
    run = load_task(spec, data=task.get("path"), limit=size, split=task.get("split", "test"), seed=0,
                    config=task.get("config") or {})
    temperature = float(ev.get("temperature", 0.0))
    n = int(ev.get("n", 1)) if temperature > 0 else 1
    prompts = [chat_prompt(tokenizer, ex.prompt, system=run.task.system_prompt) for ex in run.examples]
    max_new = int(task.get("max_new_tokens") or ev["max_new_tokens"])
    gens = generate(model, tokenizer, prompts, n=n, max_new_tokens=max_new, temperature=temperature,
                    top_p=float(ev.get("top_p", 1.0)), batch_size=int(ev["batch_size"]), seed=int(ev.get("seed", 0)),
                    progress=progress)
    examples = [ex for ex in run.examples for _ in range(n)]  # gens[i * n + j] is sample j of example i
    scores = run.task.score_batch(examples, [g.text for g in gens])
    per_sample = [primary_score(s) for s in scores]
    per = [sum(per_sample[i * n:(i + 1) * n]) / n for i in range(len(run.examples))]
    # each sample index is one pass over the examples in order, so metrics that pair examples stay whole
    passes = [run.task.metrics(scores[j::n]) for j in range(n)]
    metrics = {k: sum(float(p[k]) for p in passes) / n for k, v in passes[0].items() if isinstance(v, (int, float))}
    records = [{"task": task["label"], "id": ex.id, **({"sample": g.sample_index} if n > 1 else {}),
                "prompt": g.prompt, "completion": g.text, "scores": s, "score": p, "finish_reason": g.finish_reason,
                "completion_tokens": len(g.completion_ids)}
               for ex, g, s, p in zip(examples, gens, scores, per_sample)]
    from rlm.core.study.tables import prompt_clusters

    return {"label": task["label"], "spec": run.label, "metrics": metrics, "score": sum(per) / len(per),
            "per_example": per, "n": len(per), "records": records,
            "clusters": prompt_clusters([ex.prompt for ex in run.examples])}


def _load(model_dir: Path, dtype: str | None = None) -> tuple[Any, Any]:
    import torch

    from rlm.core.eval.engine import default_device
    from rlm.core.models.hf import load_model

    dt = getattr(torch, dtype) if dtype else None
    return load_model(str(model_dir), dtype=dt, device=default_device())


def _decoding(ev: Mapping[str, Any]) -> Any:
    """A manifest's ``decoding``: the sampling settings in ``ev`` (the config's defaults where absent), or
    ``"greedy"``."""
    from rlm.core.study.config import DECODING_FIELDS, EvalConfig

    return EvalConfig(**{k: ev[k] for k in DECODING_FIELDS if k in ev}).decoding() or "greedy"


def _write_eval(out: Path, ev: dict[str, Any], ctx: Any, model_dir: Path) -> dict[str, Any]:
    from rlm.core.io.atomic import atomic_write_json, atomic_write_text
    from rlm.core.io.manifest import write_manifest

    atomic_write_json(out / "summary.json", {ev["spec"]: {**ev["metrics"], "score": ev["score"], "n": ev["n"]}})
    atomic_write_text(out / "records.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in ev["records"]))
    write_manifest(out, command=list(sys.argv), config=ctx.config, seed=ctx.config.get("seed"),
                   inputs={"model": str(model_dir)},
                   extra={"step": ctx.name, "decoding": _decoding(ctx.config["eval"])})
    return {"score": ev["score"], "per_example": ev["per_example"], "n": ev["n"], "metrics": ev["metrics"],
            "source": ctx.run_relative(ctx.final_dir), "task": ev["label"], "spec": ev["spec"],
            "clusters": ev["clusters"]}


# -- the step functions ------------------------------------------------------------------------------------
class StudySteps:
    """The step functions of one study. ``cfg`` (an :class:`rlm.core.study.config.ExperimentConfig`) is what the
    report step arranges scores by; ``progress`` shows the trainers' own progress lines."""

    def __init__(self, cfg: Any, *, progress: bool = False) -> None:
        self.cfg = cfg
        self.progress = progress
        base = getattr(cfg, "base", None)
        #: dtype models are evaluated in (the base model's)
        self.dtype: str | None = getattr(base, "dtype", None)

    def functions(self) -> dict[str, Callable[[Any], Any]]:
        return {"init": self.init, "warmup": self.warmup, "train": self.train, "eval_expert": self.evaluate,
                "merge": self.merge, "eval_merged": self.evaluate, "conflicts": self.conflicts,
                "landscape": self.landscape, "report": self.report}

    # init ------------------------------------------------------------------------------------------------
    def init(self, ctx: Any) -> dict[str, Any]:
        base = ctx.config["base"]
        spec = str(base["model"])
        from rlm.core.models.hf import init_tiny, load_model, save_model, tiny_seed
        from rlm.core.train.precision import model_dtype_name, torch_dtype

        save = ctx.config.get("save_dtype")  # set when this model is θ0 (no warm-up): saved as the experts are
        seed = tiny_seed(spec, int(base.get("seed", 0)))
        if seed is not None:
            init_tiny(ctx.out / "model", seed=seed)
            if save:
                model, tok = load_model(str(ctx.out / "model"))
                save_model(model, tok, ctx.out / "model", overwrite=True, dtype=torch_dtype(save))
            return {"model": "model", "kind": "tiny", "seed": seed}
        p = Path(spec).expanduser()
        if p.is_dir() and (save is None or model_dtype_name(str(p)) == save):
            return {"model": str(p.resolve()), "kind": "local"}  # used in place; its fingerprint is in the config
        model, tok = _load(p if p.is_dir() else Path(spec), base.get("dtype"))
        save_model(model, tok, ctx.out / "model", dtype=torch_dtype(save) if save else None)
        return {"model": "model", "kind": "local-copy" if p.is_dir() else "hub", "id": spec}

    # training ------------------------------------------------------------------------------------------------
    def _train(self, ctx: Any, kind: str, trainer_name: str, user_cfg: Mapping[str, Any],
               task_spec: Mapping[str, Any], subset: str | None, data_path: str | None, start: Path,
               train_limit: int | None) -> dict[str, Any]:
        """Train ``ctx.work_dir/run`` and move it into the step. ``task_spec``: ``{"mixture": [specs]}`` or
        ``{"task": spec}``. With more than one process in the step kind's resources the trainer runs under
        ``accelerate launch`` (:mod:`rlm.core.study.train_launch`); the step's outputs are the same."""
        from rlm.core.plugins import get_plugin
        from rlm.core.study.train_launch import launch_processes, training_task

        cls = get_plugin("trainer", trainer_name)
        defaults: dict[str, Any] = {"seed": int(ctx.config.get("seed", 0)), "progress": self.progress,
                                    **(ctx.config.get("defaults") or {})}  # the study's precision section
        if train_limit:
            defaults["train_limit"] = int(train_limit)
        work = ctx.work_dir / "run"
        resume = work.is_dir() and (work / "manifest.json").is_file()
        command = list(sys.argv) + [f"[step {ctx.name}]"]
        resources = self._resources(kind)
        processes = launch_processes(resources)
        if processes > 1:
            from rlm.core.study.executors import LOGS_DIR
            from rlm.core.study.train_launch import run_launch, train_spec

            spec = train_spec(trainer=trainer_name, config=_plugin_data(cls, dict(user_cfg), defaults),
                              model=str(start), task=task_spec, out=work, subset=subset, data_path=data_path,
                              resume=resume, command=command)
            final = run_launch(spec, work.parent, processes=processes, config_file=resources.config_file,
                               log_path=Path(ctx.run_dir) / LOGS_DIR / f"{ctx.final_dir.name}.launch.log",
                               step=ctx.name, log=ctx.log)
        else:
            from rlm.core.train.config import TrainRun

            cfg = _plugin_config(cls, dict(user_cfg), defaults)
            run = TrainRun(model=str(start), task=training_task(task_spec), out=work, subset=subset,
                           data_path=data_path, resume=resume, overwrite=not resume, command=command)
            final = Path(cls(cfg).train(run))
        shutil.move(str(work), str(ctx.out / "run"))
        rel = final.resolve().relative_to(work.resolve()) if final.resolve().is_relative_to(work.resolve()) \
            else Path("final")
        metrics = _last_metrics(ctx.out / "run" / "metrics.jsonl")
        return {"model": str(Path("run") / rel), "run": "run", "resumed": resume, "final_metrics": metrics}

    def _resources(self, kind: str) -> Any:
        """The study's resources of a step kind (None without a resources section)."""
        res = getattr(self.cfg, "resources", None)
        return res.of(kind) if res is not None else None

    def warmup(self, ctx: Any) -> dict[str, Any]:
        c = ctx.config
        start = model_of(next(iter(ctx.inputs.values())))
        return self._train(ctx, "warmup", c["trainer"], c.get("config") or {}, {"mixture": c["tasks"]}, None, None,
                           start, None)

    def train(self, ctx: Any) -> dict[str, Any]:
        c = ctx.config
        if c.get("given"):  # merge-eval: an expert trained elsewhere, used in place
            return {"model": c["given"]["path"], "given": True}
        start = model_of(next(iter(ctx.inputs.values())))
        t = c["task"]
        return self._train(ctx, "train", c["trainer"], c.get("config") or {}, {"task": t}, t.get("subset"),
                           t.get("path"), start, t.get("size"))

    # evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, ctx: Any) -> dict[str, Any]:
        model_dir = model_of(next(iter(ctx.inputs.values())))
        model, tok = _load(model_dir, self.dtype)
        ev = evaluate_loaded(model, tok, ctx.config["task"], ctx.config["eval"])
        return _write_eval(ctx.out, ev, ctx, model_dir)

    # merging ------------------------------------------------------------------------------------------------
    def merge(self, ctx: Any) -> dict[str, Any]:
        from rlm.core.merge.engine import MergeRunConfig, merge_models

        c = ctx.config
        deps = list(ctx.inputs.values())
        base, experts = deps[0], deps[1:]
        run = MergeRunConfig(method=c["method"], base=str(model_of(base)),
                             models=[str(model_of(e)) for e in experts], preset=c.get("preset"),
                             params=c.get("params") or {}, model_params=c.get("model_params") or {},
                             seed=int(c.get("seed", 0)), smoke=True)  # flags a degenerate merge
        summary = merge_models(run, ctx.out / "model", command=list(sys.argv) + [f"[step {ctx.name}]"])
        return {"model": "model", "tasks": c["tasks"], "method": c["method"], "merge": summary}

    # conflicts ------------------------------------------------------------------------------------------------
    def conflicts(self, ctx: Any) -> dict[str, Any]:
        from rlm.core.conflicts.config import ConflictsConfig
        from rlm.core.conflicts.engine import build_metrics, compute_conflicts
        from rlm.core.conflicts.report import summary_rows, write_conflicts
        from rlm.core.io.manifest import write_manifest
        from rlm.core.plugins import get_plugin
        from rlm.core.study.check import metric_settings

        c = ctx.config
        base = model_of(ctx.inputs[next(iter(ctx.inputs))])
        models = {t: str(model_of(ctx.inputs[step])) for t, step in c["models"].items()}
        metric_cfg = {name: metric_settings(get_plugin("metric", name), name, c.get("metric_config") or {},
                                            c["threshold"]) for name in c["metrics"]}
        ccfg = ConflictsConfig(metrics=list(c["metrics"]), metric={k: v for k, v in metric_cfg.items() if v})
        metrics = build_metrics(ccfg)
        res = compute_conflicts(str(base), models, ccfg, metrics=metrics)
        files = write_conflicts(ctx.out, res.data, metrics)
        rows = summary_rows(res.data, metrics)
        out: dict[str, Any] = {"models": rows["models"], "pairs": rows["pairs"], "files": files,
                               "figures": [f for f in files if f.endswith(".png")]}
        if c.get("over_steps"):
            out.update(self._conflicts_over_steps(ctx, str(base), ccfg))
            out["figures"] += [f for f in out["over_steps_files"] if f.endswith(".png")]
        write_manifest(ctx.out, config=ctx.config, inputs={"base": str(base), **models},
                       extra={"step": ctx.name, "stats": res.stats})
        return out

    def _conflicts_over_steps(self, ctx: Any, base: str, ccfg: Any) -> dict[str, Any]:
        """Norms and conflict norms over each expert's training checkpoints, in ``over_steps/``."""
        from rlm.core.conflicts.over_steps import compute_over_steps
        from rlm.core.conflicts.report import write_over_steps

        runs = {t: str(ctx.inputs[step].dir / (ctx.inputs[step].result or {}).get("run", "run"))
                for t, step in ctx.config["models"].items()}
        data = compute_over_steps(base, runs, ccfg)
        (ctx.out / "over_steps").mkdir()
        return {"over_steps_files": [f"over_steps/{f}" for f in write_over_steps(ctx.out / "over_steps", data)]}

    # landscape ------------------------------------------------------------------------------------------------
    def landscape(self, ctx: Any) -> dict[str, Any]:
        from rlm.core.io.atomic import atomic_write_json
        from rlm.core.study.figures import plot_landscape
        from rlm.core.study.landscape import Landscape

        c = ctx.config
        names = list(ctx.inputs)
        expert_dir = model_of(ctx.inputs[names[1]])
        merged_dir = model_of(ctx.inputs[names[2]])
        model, tok = _load(expert_dir, self.dtype)
        grid = Landscape(model, merged_dir, seed=int(c.get("direction_seed", 0)))
        alphas, betas = [float(a) for a in c["alphas"]], [float(b) for b in c["betas"]]
        values: list[list[float]] = []
        per: list[list[list[float]]] = []
        n = None
        for a in alphas:
            row, prow = [], []
            for b in betas:
                grid.set(a, b)
                ev = evaluate_loaded(model, tok, c["task"], c["eval"])
                row.append(ev["score"])
                prow.append(ev["per_example"])
                n = ev["n"]
            values.append(row)
            per.append(prow)
        grid.set(0.0, 0.0)
        data = {"group": c["group"], "pair": c["pair"], "method": c["method"], "expert": c["expert"],
                "task": c["task"]["label"], "alphas": alphas, "betas": betas, "values": values,
                "per_example": per, "n": n, "delta_norm": grid.delta_norm, "direction_seed": grid.seed,
                "definition": "f(alpha, beta) = score(theta_a + alpha * (theta_merge - theta_a) + beta * r), "
                              "||r|| = ||theta_merge - theta_a||",
                "expert_model": str(expert_dir), "merged_model": str(merged_dir)}
        atomic_write_json(ctx.out / "landscape.json", data)
        plot_landscape(alphas, betas, values, ctx.out / "landscape.png",
                       title=f"{c['group']}: {c['task']['label']} expert → {'+'.join(c['pair'])} "
                             f"{c['method']} merge", label=f"score on {c['task']['label']}")
        return {"values": values, "alphas": alphas, "betas": betas, "n": n, "delta_norm": grid.delta_norm,
                "files": ["landscape.json", "landscape.png"]}

    # report ------------------------------------------------------------------------------------------------
    def report(self, ctx: Any) -> dict[str, Any]:
        from rlm.core.study.report import write_report

        return write_report(self.cfg, ctx)
