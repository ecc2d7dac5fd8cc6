"""The step functions of a study (``rlm experiment run``, ``rlm merge-eval``): one per step kind of
:mod:`rlm.core.study.config`, each calling the engines (models, training, merging, evaluation, conflicts,
report) and writing its outputs into the step's own directory ``RUN/steps/NAME-KEY/``.

What each step writes (paths relative to its step directory) and returns (its ``step.json`` result):

``init``         ``model/`` (the tiny model, or the base loaded and saved in ``dtype``); a local base directory
                 is used in place (not copied) -> ``{"model": PATH}``
``warmup``       ``run/`` (an ``rlm train`` run directory on the task mixture; ``run/final`` is θ0)
``train``        ``run/`` (one expert; ``run/metrics.jsonl`` feeds the training curves) or, for given experts
                 (``merge-eval``), nothing -> ``{"model": DIR}``
``merge``        ``model/`` (``merge_manifest.json`` inside)
``eval_*``       ``summary.json``, ``records.jsonl`` (prompt, completion, scores per example) ->
                 ``{"score", "per_example", "n", "metrics", "source"}``
``conflicts``    ``conflicts.json``, ``report.md``, plots (``over_steps/`` when asked)
``landscape``    ``landscape.json``, ``landscape.png``
``report``       ``report.md``, ``table1.{md,csv,json}``, ``table2.*``, ``table3.*``, ``figures/*.png``,
                 ``provenance.json``

Scores. The score of a model on a task is the mean over evaluation examples of one per-example number, the
first of ``reward``, ``accuracy``, ``pass_plus``, ``pass`` in the task's per-example scores (math: math-verify
accuracy; code: pass@1 plus where there are plus tests; instruction following: the fraction of constraints
followed; puzzle: all roles right; rank: the query's passage right). These per-example numbers are what the
report's bootstrap resamples. Generation is greedy; the evaluation examples of a task do not depend on the
seed (``seed=0``), so every model of a study is scored on the same examples.

Landscape. f(α, β) = score(θ_a + α Δθ + β r) with Δθ = θ_merge − θ_a, over every floating-point parameter;
r is drawn tensor by tensor from ``N(0, 1)`` with one generator per (seed, tensor name)
(:func:`rlm.core.contracts.tensor_seed`) and scaled so that ‖r‖₂ = ‖Δθ‖₂ over all parameters. Points are
built in memory from θ_a, the merged model (read tensor by tensor) and r (redrawn per point), so memory is
one model plus one tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.errors import RlmError

#: bump a kind's version when its step function's output would change for the same config
STEP_VERSIONS = {"init": "1", "warmup": "1", "train": "1", "eval_expert": "1", "merge": "1", "eval_merged": "1",
                 "conflicts": "1", "landscape": "1", "report": "1"}
PRIMARY_KEYS = ("reward", "accuracy", "pass_plus", "pass")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# -- helpers -----------------------------------------------------------------------------------------------
def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(p)


def model_of(output: Any) -> Path:
    """The model directory a finished step produced (``result["model"]``, relative to its directory)."""
    res = output.result or {}
    if "model" not in res:
        raise RlmError(f"step {output.name} produced no model")
    p = Path(res["model"])
    return p if p.is_absolute() else output.dir / p


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


def primary_score(scores: Mapping[str, Any]) -> float:
    """The per-example number of a task's score dict that studies report (see the module docstring)."""
    for k in PRIMARY_KEYS:
        v = scores.get(k)
        if isinstance(v, (int, float)):  # bool included
            return float(v)
    return 0.0


def _plugin_config(cls: Any, user: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
    """A plugin config from the user's overrides plus ``defaults`` for fields the config has and the user left
    unset (seed, progress, train_limit)."""
    fields = getattr(cls.Config, "model_fields", {})
    data = {k: v for k, v in defaults.items() if k in fields and k not in user}
    data.update(user)
    from rlm.core.config import validate

    return validate(cls.Config, data, f"config of {getattr(cls, 'name', cls.__name__)!r}")


def _make_task(spec: Mapping[str, Any]) -> Task:
    from rlm.core.config import validate
    from rlm.core.plugins import get_plugin

    cls = get_plugin("task", spec["name"])
    return cls(validate(cls.Config, spec.get("config") or {}, f"config of task {spec['name']!r}"))


# -- the warm-up mixture -----------------------------------------------------------------------------------
class MixtureTask(Task):
    """The warm-up's training data: several tasks' training examples together (each task's own subset, size
    and data path); rewards are delegated to the task an example came from."""

    name = "mixture"

    class Config(PluginConfig):
        tasks: list[dict[str, Any]] = []

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._tasks = {t["label"]: _make_task(t) for t in self.config.tasks}

    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        out: list[Example] = []
        for t in self.config.tasks:
            task = self._tasks[t["label"]]
            exs = task.examples(t.get("subset"), split=split, limit=t.get("size"), seed=seed, path=t.get("path"))
            exs = exs[: t["size"]] if t.get("size") else exs
            for e in exs:
                out.append(Example(id=f"{t['label']}/{e.id}", prompt=e.prompt, answer=e.answer,
                                   reference=e.reference, meta={**e.meta, "_task": t["label"]}))
        return out[:limit] if limit else out

    def _origin(self, example: Example) -> tuple[Task, Example]:
        label = example.meta.get("_task")
        task = self._tasks.get(label)
        if task is None:
            raise RlmError(f"mixture example {example.id!r} names no task of the mixture")
        meta = {k: v for k, v in example.meta.items() if k != "_task"}
        return task, Example(id=example.id.split("/", 1)[-1], prompt=example.prompt, answer=example.answer,
                             reference=example.reference, meta=meta)

    def reward(self, example: Example, completion: str) -> float:
        task, ex = self._origin(example)
        return task.reward(ex, completion)

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        task, ex = self._origin(example)
        return task.score(ex, completion)


# -- evaluation --------------------------------------------------------------------------------------------
def evaluate_loaded(model: Any, tokenizer: Any, task: Mapping[str, Any], ev: Mapping[str, Any],
                    limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Greedy evaluation of an in-memory model on one task spec (a step config's ``task``): returns
    ``{"label", "spec", "metrics", "score", "per_example", "n", "records"}``."""
    from rlm.core.eval.engine import load_task
    from rlm.core.eval.generation import chat_prompt, generate

    size = task.get("size")
    if limit is not None:
        size = min(size, limit) if size else limit
    spec = f"{task['name']}:{task['subset']}" if task.get("subset") else task["name"]
    run = load_task(spec, data=task.get("path"), limit=size, split=task.get("split", "test"), seed=0,
                    config=task.get("config") or {})
    prompts = [chat_prompt(tokenizer, ex.prompt, system=run.task.system_prompt) for ex in run.examples]
    gens = generate(model, tokenizer, prompts, max_new_tokens=int(task.get("max_new_tokens") or ev["max_new_tokens"]),
                    batch_size=int(ev["batch_size"]), seed=0, progress=progress)
    scores = run.task.score_batch(run.examples, [g.text for g in gens])
    per = [primary_score(s) for s in scores]
    metrics = {k: float(v) for k, v in run.task.metrics(scores).items() if isinstance(v, (int, float))}
    records = [{"task": task["label"], "id": ex.id, "prompt": g.prompt, "completion": g.text, "scores": s,
                "score": p, "finish_reason": g.finish_reason, "completion_tokens": len(g.completion_ids)}
               for ex, g, s, p in zip(run.examples, gens, scores, per)]
    return {"label": task["label"], "spec": run.label, "metrics": metrics, "score": sum(per) / len(per),
            "per_example": per, "n": len(per), "records": records}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(model_dir: Path, dtype: str | None = None) -> tuple[Any, Any]:
    import torch

    from rlm.core.models.hf import load_model

    dt = getattr(torch, dtype) if dtype else None
    return load_model(str(model_dir), dtype=dt, device=_device())


def _write_eval(out: Path, ev: dict[str, Any], ctx: Any, model_dir: Path) -> dict[str, Any]:
    from rlm.core.io.atomic import atomic_write_json, atomic_write_text
    from rlm.core.io.manifest import write_manifest

    atomic_write_json(out / "summary.json", {ev["spec"]: {**ev["metrics"], "score": ev["score"], "n": ev["n"]}})
    atomic_write_text(out / "records.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in ev["records"]))
    write_manifest(out, command=list(sys.argv), config=ctx.config, seed=ctx.config.get("seed"),
                   inputs={"model": str(model_dir)}, extra={"step": ctx.name, "decoding": "greedy"})
    return {"score": ev["score"], "per_example": ev["per_example"], "n": ev["n"], "metrics": ev["metrics"],
            "source": _rel(ctx.final_dir, ctx.run_dir), "task": ev["label"], "spec": ev["spec"]}


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
        if spec == "tiny" or spec.startswith("tiny:"):
            from rlm.core.models.hf import init_tiny

            seed = int(spec.split(":", 1)[1]) if ":" in spec else int(base.get("seed", 0))
            init_tiny(ctx.out / "model", seed=seed)
            return {"model": "model", "kind": "tiny", "seed": seed}
        p = Path(spec).expanduser()
        if p.is_dir():  # a local directory is used in place; its fingerprint is part of the step config
            return {"model": str(p.resolve()), "kind": "local"}
        from rlm.core.models.hf import save_model

        model, tok = _load(Path(spec), base.get("dtype"))
        save_model(model, tok, ctx.out / "model")
        return {"model": "model", "kind": "hub", "id": spec}

    # training ------------------------------------------------------------------------------------------------
    def _train(self, ctx: Any, trainer_name: str, user_cfg: Mapping[str, Any], task: Task, subset: str | None,
               data_path: str | None, start: Path, train_limit: int | None) -> dict[str, Any]:
        from rlm.core.plugins import get_plugin
        from rlm.core.train.session import TrainRun

        cls = get_plugin("trainer", trainer_name)
        defaults: dict[str, Any] = {"seed": int(ctx.config.get("seed", 0)), "progress": self.progress}
        if train_limit:
            defaults["train_limit"] = int(train_limit)
        cfg = _plugin_config(cls, dict(user_cfg), defaults)
        work = ctx.work_dir / "run"
        resume = work.is_dir() and (work / "manifest.json").is_file()
        run = TrainRun(model=str(start), task=task, out=work, subset=subset, data_path=data_path, resume=resume,
                       overwrite=not resume, command=list(sys.argv) + [f"[step {ctx.name}]"])
        final = Path(cls(cfg).train(run))
        shutil.move(str(work), str(ctx.out / "run"))
        rel = final.resolve().relative_to(work.resolve()) if final.resolve().is_relative_to(work.resolve()) \
            else Path("final")
        metrics = _last_metrics(ctx.out / "run" / "metrics.jsonl")
        return {"model": str(Path("run") / rel), "run": "run", "resumed": resume, "final_metrics": metrics}

    def warmup(self, ctx: Any) -> dict[str, Any]:
        c = ctx.config
        start = model_of(next(iter(ctx.inputs.values())))
        task = MixtureTask({"tasks": c["tasks"]})
        return self._train(ctx, c["trainer"], c.get("config") or {}, task, None, None, start, None)

    def train(self, ctx: Any) -> dict[str, Any]:
        c = ctx.config
        if c.get("given"):  # merge-eval: an expert trained elsewhere, used in place
            return {"model": c["given"]["path"], "given": True}
        start = model_of(next(iter(ctx.inputs.values())))
        t = c["task"]
        return self._train(ctx, c["trainer"], c.get("config") or {}, _make_task(t), t.get("subset"),
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
                             models=[str(model_of(e)) for e in experts], params=c.get("params") or {},
                             model_params=c.get("model_params") or {}, seed=int(c.get("seed", 0)))
        summary = merge_models(run, ctx.out / "model", command=list(sys.argv) + [f"[step {ctx.name}]"])
        return {"model": "model", "tasks": c["tasks"], "method": c["method"], "merge": summary}

    # conflicts ------------------------------------------------------------------------------------------------
    def conflicts(self, ctx: Any) -> dict[str, Any]:
        from rlm.core.conflicts import engine as analysis

        c = ctx.config
        base = model_of(ctx.inputs[next(iter(ctx.inputs))])
        models = {t: model_of(ctx.inputs[step]) for t, step in c["models"].items()}
        metric_cfg = {k: dict(v) for k, v in (c.get("metric_config") or {}).items()}
        if "fraction_updated" in c["metrics"]:
            metric_cfg.setdefault("fraction_updated", {}).setdefault("threshold", c["threshold"])
        ccfg = analysis.ConflictsConfig(metrics=list(c["metrics"]), metric=metric_cfg)
        res = analysis.compute_conflicts(str(base), {k: str(v) for k, v in models.items()}, ccfg)
        files = analysis.write_conflicts(ctx.out, res.data)
        out: dict[str, Any] = {"files": files, "models": {}, "pairs": {}, "threshold": res.data.get("threshold")}
        for n, v in res.data["models"].items():
            out["models"][n] = {k: v.get(k) for k in ("update_norm", "fraction_updated", "num_params") if k in v}
        for p, v in res.data.get("pairs", {}).items():
            out["pairs"][p] = {k: v.get(k) for k in ("conflict_norm", "cosine") if k in v}
        if c.get("over_steps"):
            runs = {t: ctx.inputs[step].dir / (ctx.inputs[step].result or {}).get("run", "run")
                    for t, step in c["models"].items()}
            data = analysis.compute_over_steps(str(base), {k: str(v) for k, v in runs.items()}, ccfg)
            (ctx.out / "over_steps").mkdir()
            out["over_steps_files"] = [f"over_steps/{f}" for f in analysis.write_over_steps(ctx.out / "over_steps",
                                                                                             data)]
        from rlm.core.io.manifest import write_manifest

        write_manifest(ctx.out, config=ctx.config, inputs={"base": str(base), **{k: str(v) for k, v in models.items()}},
                       extra={"step": ctx.name, "stats": res.stats})
        return out

    # landscape ------------------------------------------------------------------------------------------------
    def landscape(self, ctx: Any) -> dict[str, Any]:
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
        from rlm.core.io.atomic import atomic_write_json
        from rlm.core.study.tables import plot_landscape

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
        return write_report(self.cfg, ctx)


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


class Landscape:
    """Moves an in-memory model to θ_a + α Δθ + β r (see the module docstring), tensor by tensor.

    ``model`` holds θ_a when created; its original values are kept (one copy) to build every point."""

    def __init__(self, model: Any, merged_dir: str | Path, seed: int = 0) -> None:
        import torch

        from rlm.core.models.reader import ModelReader

        self.model, self.seed = model, int(seed)
        self.reader = ModelReader(str(merged_dir))
        self.params: list[tuple[str, Any]] = []
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point:
                if name not in self.reader:
                    raise RlmError(f"landscape: the merged model {merged_dir} has no tensor {name}")
                self.params.append((name, p))
        self.theta_a = {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.params}
        d2 = r2 = 0.0
        for n, _ in self.params:
            d = self._delta(n)
            d2 += float((d.double() ** 2).sum())
            r2 += float((self._r(n).double() ** 2).sum())
        self.delta_norm = math.sqrt(d2)
        self.r_scale = math.sqrt(d2 / r2) if r2 > 0 else 0.0

    def _delta(self, name: str) -> Any:
        import torch

        return self.reader.get(name).to(torch.float32) - self.theta_a[name]

    def _r(self, name: str) -> Any:
        import torch

        from rlm.core.contracts import tensor_seed

        g = torch.Generator(device="cpu")
        g.manual_seed(tensor_seed(self.seed, name, 0))
        return torch.randn(tuple(self.theta_a[name].shape), generator=g, dtype=torch.float32)

    def direction(self, name: str) -> Any:
        """The scaled random direction r of one tensor."""
        return self._r(name) * self.r_scale

    def set(self, alpha: float, beta: float) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params:
                v = self.theta_a[n]
                if alpha:
                    v = v + alpha * self._delta(n)
                if beta:
                    v = v + beta * self.direction(n)
                p.copy_(v.to(p.dtype))


# -- the report --------------------------------------------------------------------------------------------
def _copy_figure(src: Path, figures: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, figures / name)
    return f"figures/{name}"


def write_report(cfg: Any, ctx: Any) -> dict[str, Any]:
    """Assemble ``report.md`` and the tables and figures from the finished steps the report depends on."""
    from rlm.core.io.atomic import atomic_write_json, atomic_write_text
    from rlm.core.study import tables as R
    from rlm.core.study.config import collect_scores

    c = ctx.config
    out: Path = ctx.out
    figures = out / "figures"
    inputs = ctx.inputs
    kinds = {n: n.split(".", 1)[0] for n in inputs}
    scores = {n: o.result for n, o in inputs.items() if kinds[n] in ("eval_start", "eval_expert", "eval_merged")}
    col = collect_scores(cfg, scores)
    tasks = list(c["tasks"])
    t1 = R.table1(col.unmerged, col.merged, groups=[g for g in c["groups"] if g in col.unmerged or g in col.merged],
                  methods=c["methods"], tasks=tasks, n_boot=c["bootstrap_resamples"], ci=c["ci"],
                  seed=c["bootstrap_seed"], scale=c["scale"], seeds=c["seeds"])
    t1.write(out, "table1")
    md: list[str] = [f"# {c['name']}: merging report", ""]
    if getattr(cfg, "description", ""):
        md += [cfg.description, ""]
    md += ["Every number below comes from a step directory of this run (paths relative to the run directory; "
           "see `provenance.json` and `table1.json` → `sources`). Rerunning `rlm experiment run` with the same "
           "config reuses every finished step.", ""]
    # setup and trust
    md += ["## Setup", "", f"- base model: `{cfg.base.model}`" + (" (warm-up SFT on the task mixture → θ0)"
                                                                   if cfg.warmup_enabled else " (θ0 = base)"),
           f"- training seeds: {', '.join(str(s) for s in c['seeds'])} (Table 1 averages per example over seeds)",
           f"- trainers (groups): {', '.join(c['groups'])}; merge methods: {', '.join(c['methods'])}"]
    ns: dict[str, set[int]] = {}
    for n, r in scores.items():
        if r and r.get("n"):
            ns.setdefault(r.get("task") or n.rsplit(".", 1)[-1], set()).add(int(r["n"]))
    md.append("- evaluation examples per cell (greedy decoding, the same examples for every model): "
              + ", ".join(f"{t}: {'/'.join(str(x) for x in sorted(v))}" for t, v in ns.items()))
    md.append(f"- bootstrap: {c['bootstrap_resamples']} resamples of the evaluation examples, "
              f"{c['ci'] * 100:g}% percentile interval, seed {c['bootstrap_seed']}")
    md.append("- score: the mean per-example verifier score (math: math-verify accuracy; puzzle: every role right; "
              "rank: the query's passage right; code: pass@1 plus; instruction following: fraction of constraints "
              "followed), shown ×{:g}".format(c["scale"]))
    if col.missing:
        md.append(f"- missing evaluations: {', '.join(col.missing)}")
    md.append("")
    if col.start:
        md += ["## Start model θ0", "", "| task | score | n | source |", "|---|---|---|---|"]
        for t in tasks:
            s = col.start.get(t)
            if s is not None:
                md.append(f"| {t} | {s.value * c['scale']:.1f} | {s.n} | `{s.source}` |")
        md.append("")
    md.append(t1.to_markdown(title="Table 1: merged experts per training paradigm "
                                   "(score, relative change, bootstrap interval)"))
    files = ["report.md", "table1.md", "table1.csv", "table1.json"]
    # Table 3
    t3 = c.get("table3")
    if t3 and all(g in t1.groups for g in t3):
        tab3 = R.table3(t1, t3[0], t3[1])
        tab3.write(out, "table3")
        files += ["table3.md", "table3.csv", "table3.json"]
        md.append(tab3.to_markdown())
    # curve
    if col.curve:
        R.plot_num_models_curve(col.curve, figures / "num_models_curve.png")
        files.append("figures/num_models_curve.png")
        allns = sorted({n for p in col.curve.values() for n in p})
        md += ["## Merging more experts", "", "Mean score over the merged experts' tasks against the number of "
               "merged experts N (prefix subsets of the task order).", "",
               "![number of merged models](figures/num_models_curve.png)", "",
               "| series | " + " | ".join(f"N={n}" for n in allns) + " |", "|---|" + "---|" * len(allns)]
        for label, pts in col.curve.items():
            md.append(f"| {label} | " + " | ".join(
                "–" if n not in pts else f"{sum(pts[n]) / len(pts[n]) * c['scale']:.1f}" for n in allns) + " |")
        md.append("")
    # Table 2 and conflicts
    conf = {n: o for n, o in inputs.items() if kinds[n] == "conflicts"}
    if conf:
        many = len(c["seeds"]) > 1
        rows: dict[str, dict[str, Any]] = {}
        pair_rows: list[str] = []
        figs: list[str] = []
        for n, o in conf.items():
            _, g, s = n.split(".")
            res = o.result or {}
            src = _rel(o.dir, ctx.run_dir)
            for t, v in (res.get("models") or {}).items():
                if v.get("update_norm") is not None and "fraction_updated" in v:
                    rows[f"{g}/{t}" + (f"/{s}" if many else "")] = {**v, "threshold": res.get("threshold"),
                                                                    "source": src}
            for p, v in (res.get("pairs") or {}).items():
                pair_rows.append(f"| {g}{'/' + s if many else ''} | {p.replace('|', ' vs ')} | "
                                 f"{_f(v.get('conflict_norm'))} | {_f(v.get('cosine'))} | `{src}` |")
            for f in ("sign_conflict.png", "layer_norms.png", "over_steps/norm_vs_step.png",
                      "over_steps/conflict_norm_vs_step.png"):
                rel = _copy_figure(o.dir / f, figures, f"conflicts-{g}-{s}-{f.replace('/', '-')}")
                if rel:
                    figs.append(rel)
                    files.append(rel)
        if rows:
            tab2 = R.table2(rows, extra_columns=("source",))
            tab2.write(out, "table2")
            files += ["table2.md", "table2.csv", "table2.json"]
            md.append(tab2.to_markdown())
        if pair_rows:
            md += ["## Task conflicts between experts", "",
                   "Conflict norm and cosine of the task vectors τ = θ_expert − θ0 of each pair within a group "
                   "(see each source's `report.md` for the sign-conflict rates).", "",
                   "| group | pair | conflict norm | cosine | source |", "|---|---|---|---|---|", *pair_rows, ""]
        for f in figs:
            md += [f"![{Path(f).stem}]({f})", ""]
    # training curves
    runs: dict[str, list[dict[str, Any]]] = {}
    for n, o in inputs.items():
        if kinds[n] in ("train", "warmup") and (o.result or {}).get("run"):
            path = o.dir / o.result["run"] / "metrics.jsonl"
            if path.is_file():
                label = "warmup" if kinds[n] == "warmup" else "/".join(n.split(".")[1:3 if len(c["seeds"]) == 1 else 4])
                runs[label] = R.read_metrics_jsonl(path)
    if runs:
        rl = {k: v for k, v in runs.items() if any(r.get("reward_mean") is not None for r in v)}
        experts = {k: v for k, v in runs.items() if k != "warmup"}
        md += ["## Training curves", "", "Mean reward, mean |advantage| (RL only) and ‖θ − θ_start‖₂ per step "
               "(each run's `metrics.jsonl`; θ_start is θ0 for the experts, the base model for the warm-up).", ""]
        if experts:
            R.plot_training_curves(experts, figures / "training_curves.png")
            files.append("figures/training_curves.png")
            md += ["![training curves](figures/training_curves.png)", ""]
        if "warmup" in runs:
            R.plot_training_curves({"warmup": runs["warmup"]}, figures / "warmup_curve.png",
                                   keys=("loss", "delta_norm"))
            files.append("figures/warmup_curve.png")
            md += ["![warm-up](figures/warmup_curve.png)", ""]
        if rl:
            md += ["| run | steps | first reward | last reward | last ‖θ − θ0‖ |", "|---|---|---|---|---|"]
            for k, v in rl.items():
                rw = [r.get("reward_mean") for r in v if r.get("reward_mean") is not None]
                md.append(f"| {k} | {len(v)} | {_f(rw[0] if rw else None)} | {_f(rw[-1] if rw else None)} | "
                          f"{_f(v[-1].get('delta_norm'))} |")
            md.append("")
    # landscapes
    lands = {n: o for n, o in inputs.items() if kinds[n] == "landscape"}
    if lands:
        md += ["## Landscape around an expert", "",
               "f(α, β) = score(θ_a + α Δθ + β r), Δθ = θ_merge − θ_a, r random with ‖r‖ = ‖Δθ‖; (0, 0) is the "
               "expert, (1, 0) the merged model.", ""]
        for n, o in lands.items():
            _, g, s = n.split(".")
            rel = _copy_figure(o.dir / "landscape.png", figures, f"landscape-{g}-{s}.png")
            if rel:
                files.append(rel)
                md += [f"![landscape {g}]({rel})", ""]
            res = o.result or {}
            if res.get("values"):
                md += [f"{g} (source `{_rel(o.dir, ctx.run_dir)}`, {res.get('n')} examples per point, "
                       f"‖Δθ‖ = {_f(res.get('delta_norm'))}):", "",
                       "| α \\ β | " + " | ".join(f"{b:g}" for b in res["betas"]) + " |",
                       "|---|" + "---|" * len(res["betas"])]
                for a, row in zip(res["alphas"], res["values"]):
                    md.append(f"| {a:g} | " + " | ".join(f"{v * c['scale']:.1f}" for v in row) + " |")
                md.append("")
    # provenance
    prov = {n: {"dir": _rel(o.dir, ctx.run_dir), "key": o.key,
                **({"score": o.result.get("score"), "n": o.result.get("n")} if kinds[n].startswith("eval") and
                   o.result else {})} for n, o in inputs.items()}
    atomic_write_json(out / "provenance.json", prov)
    files.append("provenance.json")
    md += ["## Provenance", "", "Each evaluation: step → directory (summary.json and records.jsonl inside).", "",
           "| step | score | n | directory |", "|---|---|---|---|"]
    for n, p in prov.items():
        if "score" in p:
            md.append(f"| {n} | {_f(p['score'] * c['scale'] if p['score'] is not None else None)} | {p['n']} | "
                      f"`{p['dir']}` |")
    md.append("")
    atomic_write_text(out / "report.md", "\n".join(md))
    return {"files": files, "table1": "table1.md", "missing": col.missing}


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)
