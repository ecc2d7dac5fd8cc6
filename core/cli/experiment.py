"""``rlm experiment run|plan|list`` and ``rlm merge-eval``: a whole study as a cached graph of steps.

``rlm experiment run CONFIG|PRESET [--out DIR] [--quick] [--set k=v]`` loads the study, checks it against the
installed plugins, plans its steps and runs them in ``DIR`` (default ``runs/NAME`` or ``runs/NAME-quick``).
Finished steps are reused (their directory name holds a hash of their config and inputs), so rerunning after
an interruption or a failure redoes only what is unfinished or changed. The report goes to ``DIR/report/``
and Table 1 is printed at the end. ``--executor ray [--ray-address ADDR]`` runs every ready step as a Ray task
(:mod:`rlm.core.study.executors`) with the same step directories, so either executor can resume the other's run.

``rlm merge-eval --base DIR --experts SPEC --methods M1,M2 --out DIR`` does the merging half of a study on
experts trained elsewhere: SPEC is ``GROUP:TASK=DIR,...`` (e.g. ``sft:math=runs/a,sft:code=runs/b,
grpo:math=...``); the same step functions evaluate each expert on its task, merge every pair of a group with
every method (each with the method plugin's ``--preset``, default ``paper``), evaluate each merged model on
both tasks and write Table 1, the number-of-merged-models curve and the landscape.

The command functions are module-level (importable); :func:`register_commands` adds them to the app. The work
is done by :mod:`rlm.core.study`, imported inside the functions (``rlm --help`` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rlm.core.errors import RlmError
from rlm.core.hookspecs import hookimpl
from rlm.core.io.lock import run_lock


def _print_table1(out: Path) -> None:
    md = out / "report" / "table1.md"
    if md.is_file():
        typer.echo(md.read_text(encoding="utf-8"))
    typer.echo(f"report: {out / 'report' / 'report.md'}")


_EXECUTOR_HELP = ("local: one step at a time in this process; ray: every ready step as a Ray task with the "
                  "resources of the config's `resources` section (docs/study.md)")
_RAY_ADDRESS_HELP = ("Ray cluster to use with --executor ray (auto, HOST:6379, ray://HOST:10001; default: start a "
                     "local one). The run directory must be on storage every node mounts at the same path.")


def experiment_run(
    config: str = typer.Argument(..., help="Experiment config file (YAML/TOML/JSON) or preset name "
                                           "(cpu-tiny, micro, smollm2-135m, paper)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/NAME[-quick])."),
    quick: bool = typer.Option(False, "--quick", help="Apply the config's quick block (fewer tasks and steps)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. tasks.math.eval_size=16."),
    force: list[str] = typer.Option([], "--force", help="Rerun this step even if finished (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the step progress bar."),
    executor: str = typer.Option("local", "--executor", help=_EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=_RAY_ADDRESS_HELP),
) -> None:
    """Run a study; finished steps are reused, so rerunning resumes. Prints Table 1 at the end."""
    import time

    from rlm.core.study.check import check_plugins
    from rlm.core.study.executors import make_executor
    from rlm.core.study.presets import load_experiment
    from rlm.core.study.run import run_study

    cfg = load_experiment(config, quick=quick, sets=set_)
    check_plugins(cfg)
    runner = make_executor(executor, cfg, address=ray_address)
    out = out or Path("runs") / (cfg.name + ("-quick" if quick else ""))
    t0 = time.perf_counter()
    with run_lock(out):
        run_study(cfg, out, progress=progress, force=force, executor=runner)
    _print_table1(out)
    typer.echo(f"wall time: {time.perf_counter() - t0:.0f} s", err=True)


def experiment_plan(
    config: str = typer.Argument(..., help="Experiment config file or preset name."),
    quick: bool = typer.Option(False, "--quick", help="Apply the config's quick block."),
    set_: list[str] = typer.Option([], "--set", help="Override a field."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also show which steps are finished in this run "
                                                           "directory."),
) -> None:
    """Validate a study and list its steps (kind and name; with --out, finished or pending)."""
    from rlm.core.study.check import check_plugins
    from rlm.core.study.plan import build_graph, plan_steps
    from rlm.core.study.presets import load_experiment
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


def experiment_list() -> None:
    """The built-in presets."""
    from rlm.core.study.presets import list_presets, preset_data

    for name in list_presets():
        data = preset_data(name)
        typer.echo(f"{name:14s} {data.get('description', '')}")


def merge_eval(
    base: str = typer.Option(..., "--base", help="The experts' common start model θ0 (HF dir)."),
    experts: str = typer.Option(..., "--experts", help="GROUP:TASK=DIR,... e.g. sft:math=A,sft:puzzle=B,"
                                                       "grpo:math=C,grpo:puzzle=D"),
    methods: Optional[str] = typer.Option(None, "--methods",
                                          help="Merge methods M1,M2,... (default: those that declare "
                                               "themselves default, the paper's four)."),
    preset: str = typer.Option("paper", "--preset",
                               help="Each method plugin's preset of settings (paper: TA λ 0.7; TIES/DARE weight "
                                    "0.5, density 0.8); change one with --set methods.ties.model_params.density=.."),
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
    executor: str = typer.Option("local", "--executor", help=_EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=_RAY_ADDRESS_HELP),
) -> None:
    """Evaluate experts, merge every pair within each group with every method, evaluate the merged models
    on both tasks and write Table 1 (Markdown/CSV/JSON), the curve and the landscape."""
    from rlm.core.plugins import get_system
    from rlm.core.study.check import check_plugins
    from rlm.core.study.executors import make_executor
    from rlm.core.study.run import merge_eval_config, parse_experts, parse_task_map, plan_given_experts, run_study

    spec = parse_experts(experts)
    task_map = parse_task_map(tasks)
    if methods is None:
        meths = get_system().registry("merge_method").defaults()
    else:
        meths = [m.strip() for m in methods.split(",") if m.strip()]
    if not meths:
        raise RlmError("--methods is empty")
    cfg = merge_eval_config(base, spec, meths, task_map, preset=preset, limit=limit, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, landscape=landscape, curve=curve,
                            sets=([f"threads={threads}"] if threads else []) + list(set_))
    check_plugins(cfg, trainers=False)
    runner = make_executor(executor, cfg, address=ray_address)
    with run_lock(out):
        run_study(cfg, out, plan=plan_given_experts(cfg, spec), progress=progress, executor=runner)
    _print_table1(out)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    """``rlm experiment run|plan|list`` (a sub-app) and ``rlm merge-eval``."""
    experiment_app = typer.Typer(help="Declarative studies: train, merge, evaluate and report in one command.",
                                 no_args_is_help=True)
    experiment_app.command("run")(experiment_run)
    experiment_app.command("plan")(experiment_plan)
    experiment_app.command("list")(experiment_list)
    app.add_typer(experiment_app, name="experiment")
    app.command("merge-eval")(merge_eval)
