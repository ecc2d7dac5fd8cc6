"""``rlm experiment run|plan|list`` and ``rlm merge-eval``: a whole study as a cached graph of steps.

``rlm experiment run CONFIG|PRESET [--out DIR] [--quick] [--set k=v]`` loads the study, checks it against the
installed plugins, plans its steps and runs them in ``DIR`` (default ``runs/NAME`` or ``runs/NAME-quick``).
Finished steps are reused (their directory name holds a hash of their config and inputs), so rerunning after
an interruption or a failure redoes only what is unfinished or changed. The report goes to ``DIR/report/``
and Table 1 is printed at the end.

``rlm merge-eval --base DIR --experts SPEC --methods M1,M2 --out DIR`` does the merging half of a study on
experts trained elsewhere: SPEC is ``GROUP:TASK=DIR,...`` (e.g. ``sft:math=runs/a,sft:code=runs/b,
grpo:math=...``); the same step functions evaluate each expert on its task, merge every pair of a group with
every method, evaluate each merged model on both tasks and write Table 1, the number-of-merged-models curve
and the landscape.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

from rlm.core.errors import RlmError
from rlm.core.hookspecs import hookimpl

#: the paper's merge settings (Task Arithmetic λ 0.7; TIES and DARE-TIES weight 0.5, density 0.8)
PAPER_METHODS: dict[str, dict[str, Any]] = {
    "averaging": {},
    "task_arithmetic": {"params": {"lambda": 0.7}},
    "ties": {"model_params": {"weight": 0.5, "density": 0.8}},
    "dare_ties": {"model_params": {"weight": 0.5, "density": 0.8}},
}


def run_study(cfg: Any, out: str | Path, *, plan: Sequence[Any] | None = None, progress: bool = True,
              functions: dict[str, Any] | None = None, force: Sequence[str] = (), command: list[str] | None = None,
              console: Any = None) -> Any:
    """Plan (unless given), build the graph with the real step functions (or ``functions``), run it in
    ``out`` and copy the report step's folder to ``out/report``. Returns the graph's RunSummary; raises
    :class:`rlm.core.study.graph.StepFailed` naming failed steps (after running everything it could)."""
    from rlm.core.io.atomic import atomic_dir, atomic_write_json
    from rlm.core.io.manifest import write_manifest
    from rlm.core.study.config import build_graph, plan_steps
    from rlm.core.study.steps import STEP_VERSIONS, StudySteps

    out = Path(out)
    if getattr(cfg, "threads", None):
        import torch

        torch.set_num_threads(int(cfg.threads))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the step bar is the one to read
    plan = list(plan) if plan is not None else plan_steps(cfg)
    fns = functions or StudySteps(cfg).functions()
    graph = build_graph(plan, fns, STEP_VERSIONS)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "experiment.json", cfg.model_dump(mode="json"))
    write_manifest(out, command=command if command is not None else list(sys.argv), config=cfg,
                   seed=cfg.seeds[0] if len(cfg.seeds) == 1 else None,
                   extra={"kind": "experiment", "steps": len(plan)})
    summary = graph.run(out, force=force, progress=progress, console=console)
    import shutil

    if "report" in summary.steps and summary.steps["report"].status in ("done", "cached"):
        src = summary.output("report").dir
        with atomic_dir(out / "report", overwrite=True) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            (tmp / "step.json").unlink(missing_ok=True)
    else:  # never leave the report of an earlier, different run in place
        shutil.rmtree(out / "report", ignore_errors=True)
    summary.raise_for_failures()
    return summary


def parse_experts(spec: str) -> dict[str, dict[str, str]]:
    """``GROUP:TASK=DIR,...`` -> ``{group: {task: DIR}}`` in the order given."""
    out: dict[str, dict[str, str]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        key, sep, path = item.partition("=")
        group, colon, task = key.partition(":")
        group, task, path = group.strip(), task.strip(), path.strip()
        if not sep or not colon or not group or not task or not path:
            raise RlmError(f"--experts expects GROUP:TASK=DIR items separated by commas (e.g. sft:math=runs/a), "
                           f"got {item!r}")
        if task in out.get(group, {}):
            raise RlmError(f"--experts: {group}:{task} is given twice")
        out.setdefault(group, {})[task] = path
    if not out:
        raise RlmError("--experts is empty")
    for g, tasks in out.items():
        if len(tasks) < 2:
            raise RlmError(f"--experts: group {g!r} has one expert ({', '.join(tasks)}); merging needs two or more")
    return out


def merge_eval_config(base: str, experts: dict[str, dict[str, str]], methods: Sequence[str],
                      tasks: dict[str, str] | None = None, *, limit: int | None = None, max_new_tokens: int = 256,
                      batch_size: int = 16, landscape: bool = True, curve: bool = True, sets: Sequence[str] = (),
                      name: str = "merge-eval") -> Any:
    """The :class:`ExperimentConfig` of a merge-eval: one trainer (group) per SPEC group with its tasks, the
    given methods (with the paper's settings), no warm-up, no start-model evaluation, no conflicts (unless
    ``--set`` turns them on). ``tasks`` maps a task label to ``TASK[:SUBSET]`` (default: the label)."""
    from rlm.core.study.config import load_experiment

    labels: list[str] = []
    for g in experts.values():
        labels += [t for t in g if t not in labels]
    task_cfgs = []
    for label in labels:
        spec = (tasks or {}).get(label, label)
        tname, _, subset = spec.partition(":")
        t: dict[str, Any] = {"name": tname, "eval_subset": subset or None, "eval_size": limit, "train_size": None}
        if label != tname:
            t["label"] = label
        task_cfgs.append(t)
    unknown = sorted(set(tasks or {}) - set(labels))
    if unknown:
        raise RlmError(f"--tasks names task(s) no expert has: {', '.join(unknown)} (experts' tasks: {', '.join(labels)})")
    meths = []
    for m in methods:
        meths.append({"name": m, **PAPER_METHODS.get(m, {})})
    data = {"name": name, "description": f"merge-eval of {sum(len(v) for v in experts.values())} experts",
            "base": {"model": base}, "warmup": None, "tasks": task_cfgs,
            "trainers": [{"name": g, "tasks": list(ts)} for g, ts in experts.items()],
            "methods": meths,
            "eval": {"limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "include_start": False},
            "conflicts": {"enabled": False}, "landscape": {"enabled": landscape},
            "curve": {"enabled": curve}}
    return load_experiment(data, sets=sets)


def plan_given_experts(cfg: Any, experts: dict[str, dict[str, str]]) -> list[Any]:
    """The study's plan with every ``train`` step replaced by a given expert directory (its fingerprint is the
    step config, so a rewritten directory invalidates what depends on it)."""
    from rlm.core.study.config import plan_steps
    from rlm.core.study.steps import dir_fingerprint

    plan = plan_steps(cfg)
    for s in plan:
        if s.kind == "train":
            g, t = s.config["group"], s.config["task"]["label"]
            s.config = {"group": g, "task": t, "given": dir_fingerprint(experts[g][t])}
    return plan


def _print_table1(out: Path) -> None:
    md = out / "report" / "table1.md"
    if md.is_file():
        typer.echo(md.read_text(encoding="utf-8"))
    typer.echo(f"report: {out / 'report' / 'report.md'}")


def add_commands(app: typer.Typer) -> None:
    exp_app = typer.Typer(help="Declarative studies: train, merge, evaluate and report in one command.",
                          no_args_is_help=True)
    app.add_typer(exp_app, name="experiment")

    @exp_app.command("run")
    def run_cmd(
        config: str = typer.Argument(..., help="Experiment config file (YAML/TOML/JSON) or preset name "
                                               "(cpu-tiny, micro, smollm2-135m, paper)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/NAME[-quick])."),
        quick: bool = typer.Option(False, "--quick", help="Apply the config's quick block (fewer tasks and steps)."),
        set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. tasks.math.eval_size=16."),
        force: list[str] = typer.Option([], "--force", help="Rerun this step even if finished (repeatable)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the step progress bar."),
    ) -> None:
        """Run a study; finished steps are reused, so rerunning resumes. Prints Table 1 at the end."""
        import time

        from rlm.core.study.config import check_plugins, load_experiment

        cfg = load_experiment(config, quick=quick, sets=set_)
        check_plugins(cfg)
        out = out or Path("runs") / (cfg.name + ("-quick" if quick else ""))
        t0 = time.perf_counter()
        run_study(cfg, out, progress=progress, force=force)
        _print_table1(out)
        typer.echo(f"wall time: {time.perf_counter() - t0:.0f} s", err=True)

    @exp_app.command("plan")
    def plan_cmd(
        config: str = typer.Argument(..., help="Experiment config file or preset name."),
        quick: bool = typer.Option(False, "--quick", help="Apply the config's quick block."),
        set_: list[str] = typer.Option([], "--set", help="Override a field."),
        out: Optional[Path] = typer.Option(None, "--out", help="Also show which steps are finished in this run "
                                                               "directory."),
    ) -> None:
        """Validate a study and list its steps (kind and name; with --out, finished or pending)."""
        from rlm.core.study.config import build_graph, check_plugins, load_experiment, plan_steps
        from rlm.core.study.steps import STEP_VERSIONS, StudySteps

        cfg = load_experiment(config, quick=quick, sets=set_)
        check_plugins(cfg)
        plan = plan_steps(cfg)
        status = build_graph(plan, StudySteps(cfg).functions(), STEP_VERSIONS).status(out) if out else {}
        counts: dict[str, int] = {}
        for s in plan:
            counts[s.kind] = counts.get(s.kind, 0) + 1
            typer.echo(f"{s.kind:12s} {s.name}" + (f"  [{status[s.name]}]" if status else ""))
        typer.echo(f"{len(plan)} steps: " + ", ".join(f"{n} {k}" for k, n in counts.items()))

    @exp_app.command("list")
    def list_cmd() -> None:
        """The built-in presets."""
        from rlm.core.study.config import list_presets, preset_data

        for name in list_presets():
            data = preset_data(name)
            typer.echo(f"{name:14s} {data.get('description', '')}")

    @app.command("merge-eval")
    def merge_eval(
        base: str = typer.Option(..., "--base", help="The experts' common start model θ0 (HF dir)."),
        experts: str = typer.Option(..., "--experts", help="GROUP:TASK=DIR,... e.g. sft:math=A,sft:puzzle=B,"
                                                           "grpo:math=C,grpo:puzzle=D"),
        methods: str = typer.Option("averaging,task_arithmetic,ties,dare_ties", "--methods",
                                    help="Merge methods (paper settings: TA λ 0.7; TIES/DARE weight 0.5, "
                                         "density 0.8; change with --set methods.ties.model_params.density=..)."),
        tasks: Optional[str] = typer.Option(None, "--tasks", help="LABEL=TASK[:SUBSET],... evaluation task of "
                                                                  "each expert label (default: the label)."),
        out: Path = typer.Option(..., "--out", help="Run directory (steps/, report/)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Evaluation examples per task."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
        batch_size: int = typer.Option(16, "--batch-size"),
        landscape: bool = typer.Option(True, "--landscape/--no-landscape", help="The f(α, β) grid per group."),
        curve: bool = typer.Option(True, "--curve/--no-curve", help="Merge 2..N experts of each group."),
        set_: list[str] = typer.Option([], "--set", help="Override a study field, e.g. landscape.alphas=[0,1]."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is fastest for "
                                                                      "small models on a busy CPU)."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
    ) -> None:
        """Evaluate experts, merge every pair within each group with every method, evaluate the merged models
        on both tasks and write Table 1 (Markdown/CSV/JSON), the curve and the landscape."""
        from rlm.core.study.config import check_plugins

        spec = parse_experts(experts)
        task_map: dict[str, str] = {}
        for item in (s.strip() for s in (tasks or "").split(",")):
            if item:
                label, sep, t = item.partition("=")
                if not sep:
                    label, t = item.split(":", 1)[0], item
                task_map[label.strip()] = t.strip()
        meths = [m.strip() for m in methods.split(",") if m.strip()]
        if not meths:
            raise RlmError("--methods is empty")
        cfg = merge_eval_config(base, spec, meths, task_map, limit=limit, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, landscape=landscape, curve=curve,
                                sets=([f"threads={threads}"] if threads else []) + list(set_))
        check_plugins(cfg, trainers=False)
        run_study(cfg, out, plan=plan_given_experts(cfg, spec), progress=progress)
        _print_table1(out)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    add_commands(app)
