"""The Ray executor of the step graph against the local one: the same step directories and results (the
``micro`` study gives the same Table 1 and the same evaluation summaries), a step whose worker process dies is
retried or reported, a rerun finishes the run, and either executor resumes what the other started."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rlm.core.cli import main
from rlm.core.study.graph import Graph, StepFailed
from rlm.core.study.presets import load_experiment

ray = pytest.importorskip("ray")

from rlm.core.study.executors import LocalExecutor, RayExecutor, check_shared_run_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance with 2 CPUs for the module (an executor uses it and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _toy_graph(marker: Path) -> Graph:
    """a -> b -> d, c independent; b's process dies (os._exit) the first time it runs, while ``marker`` is
    absent. The functions are closures so that Ray pickles them by value."""
    def write(text):
        def fn(ctx):
            inputs = "".join((o.dir / "out.txt").read_text() for o in ctx.inputs.values())
            (ctx.out / "out.txt").write_text(inputs + text)
            return {"text": inputs + text}
        return fn

    def dies_once(ctx):
        print("b starts", flush=True)
        if not marker.exists():
            marker.write_text("killed once")
            os._exit(3)
        return write("b")(ctx)

    g = Graph()
    g.add("a", write("a"), kind="merge")
    g.add("b", dies_once, deps=["a"], kind="train")
    g.add("c", write("c"), kind="merge")
    g.add("d", write("d"), deps=["b"], kind="eval_merged")
    return g


def test_killed_worker_is_retried(ray_session, tmp_path):
    marker = tmp_path / "marker"
    summary = _toy_graph(marker).run(tmp_path / "run", progress=False, executor=RayExecutor(max_retries=1))
    assert summary.ok and sorted(summary.executed) == ["a", "b", "c", "d"]
    assert summary.steps["d"].result == {"text": "abd"}
    log = (tmp_path / "run" / "logs" / f"{summary.steps['b'].dir.name}.log").read_text()
    assert log.count("== b (train)") == 2 and log.count("b starts") == 2  # the first attempt died
    assert not list((tmp_path / "run" / "steps").glob(".b-*.partial"))


def test_killed_worker_is_reported_and_rerun_completes(ray_session, tmp_path, capsys):
    """Without retries the dead step is a failure naming its log; the independent step still runs; the rerun
    (on the local executor: mixing executors) redoes exactly the failed step and its dependent."""
    from rich.console import Console

    marker, run = tmp_path / "marker", tmp_path / "run"
    console = Console(stderr=True, width=200, force_terminal=False)
    summary = _toy_graph(marker).run(run, executor=RayExecutor(max_retries=0), console=console)
    assert summary.failed == ["b"] and summary.blocked == ["d"] and sorted(summary.executed) == ["a", "c"]
    b = summary.steps["b"]
    assert "Ray task failed" in b.error and b.log is not None and b.log.is_file()
    err = capsys.readouterr().err
    assert f"log: {b.log}" in err and "| b starts" in err  # the failure is reported with the step's log
    failed = json.loads(next((run / "steps").glob("b-*.failed.json")).read_text())
    assert failed["status"] == "failed" and "Ray task failed" in failed["error"]
    graph = {s["name"]: s for s in json.loads((run / "graph.json").read_text())["steps"]}
    assert graph["b"]["status"] == "failed" and graph["b"]["log"] == str(b.log)
    with pytest.raises(StepFailed, match=r"b: failed: Ray task failed.*\(log: "):
        summary.raise_for_failures()
    again = _toy_graph(marker).run(run, progress=False, executor=LocalExecutor())
    assert again.ok and sorted(again.executed) == ["b", "d"] and again.steps["d"].result == {"text": "abd"}
    assert not list((run / "steps").glob("*.failed.json"))


def test_a_raising_step_fails_without_retry_and_run_dir_is_shared(ray_session, tmp_path):
    calls = tmp_path / "calls"

    def boom(ctx):
        with open(calls, "a") as fh:
            fh.write("x")
        raise ValueError("bad input (simulated)")

    g = Graph()
    g.add("boom", boom)
    g.add("fine", lambda ctx: {"ok": True})
    summary = g.run(tmp_path / "run", progress=False, executor=RayExecutor(max_retries=2))
    assert summary.failed == ["boom"] and summary.steps["boom"].error == "ValueError: bad input (simulated)"
    assert calls.read_text() == "x"  # an exception is the step's answer, not a lost worker: no retry
    assert "Traceback" in summary.steps["boom"].log.read_text()
    assert summary.steps["fine"].status == "done"
    check_shared_run_dir(tmp_path / "run")  # every node of the local instance sees the run directory
    assert not list((tmp_path / "run").glob(".ray-probe-*"))


def test_run_dir_not_shared_is_one_line(ray_session, tmp_path, monkeypatch):
    from rlm.core.errors import RlmError
    from rlm.core.study import executors

    probe = tmp_path / "probe"
    probe.write_text("token")
    assert executors._probe_task(str(probe), "token", 0)[1] and (tmp_path / "probe.0").read_text() == "token"
    assert not executors._probe_task(str(probe), "other", 1)[1]
    assert not executors._probe_task(str(tmp_path / "absent"), "token", 2)[1]
    monkeypatch.setattr(executors, "_reads", lambda path, token: False)  # the replies never reach the driver
    with pytest.raises(RlmError, match=r"is not shared with Ray node\(s\) .+: put it on storage every node"):
        check_shared_run_dir(tmp_path / "run")
    assert not list((tmp_path / "run").glob(".ray-probe-*"))


def test_executor_flags(tmp_path, capsys):
    assert main(["experiment", "run", "micro", "--executor", "spark", "--out", str(tmp_path / "o")]) == 2
    assert "unknown 'spark'" in capsys.readouterr().err
    assert main(["experiment", "run", "micro", "--ray-address", "auto", "--out", str(tmp_path / "o")]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err


# -- the micro study under both executors --------------------------------------------------------------------
def _finished_steps(run: Path) -> dict[str, Path]:
    graph = json.loads((run / "graph.json").read_text())
    return {s["name"]: run / s["dir"] for s in graph["steps"] if s["status"] in ("done", "cached")}


def _deterministic(record: dict) -> dict:
    """A step.json without what differs between two runs of the same step (timings, absolute paths)."""
    result = record.get("result")
    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if k not in ("final_metrics", "merge")}
    return {"name": record["name"], "key": record["key"], "config": record["config"], "result": result}


@pytest.fixture(scope="module")
def micro_runs(ray_session, tmp_path_factory):
    from rlm.core.study.run import run_study

    cfg = load_experiment("micro")
    root = tmp_path_factory.mktemp("micro-executors")
    local = run_study(cfg, root / "local", progress=False)
    on_ray = run_study(cfg, root / "ray", progress=False, executor=RayExecutor(cfg.resources, threads=cfg.threads))
    return cfg, root, local, on_ray


def test_micro_same_results_under_ray(micro_runs):
    _, root, local, on_ray = micro_runs
    assert local.ok and on_ray.ok and sorted(on_ray.executed) == sorted(local.executed)
    t_local = json.loads((root / "local" / "report" / "table1.json").read_text())
    t_ray = json.loads((root / "ray" / "report" / "table1.json").read_text())
    assert t_ray == t_local
    steps_local, steps_ray = _finished_steps(root / "local"), _finished_steps(root / "ray")
    assert {n: p.name for n, p in steps_ray.items()} == {n: p.name for n, p in steps_local.items()}  # same keys
    summaries = 0
    for name, d in steps_local.items():
        rec_local = json.loads((d / "step.json").read_text())
        rec_ray = json.loads((steps_ray[name] / "step.json").read_text())
        assert _deterministic(rec_ray) == _deterministic(rec_local), name
        if (d / "summary.json").is_file():  # the report's holds the summed step times: the rest must agree
            summaries += 1
            sum_local, sum_ray = (json.loads((p / "summary.json").read_text()) for p in (d, steps_ray[name]))
            assert {k: v for k, v in sum_ray.items() if k != "elapsed_s"} == \
                {k: v for k, v in sum_local.items() if k != "elapsed_s"}, name
    assert summaries >= 20  # every evaluation step (and the report) wrote one


def test_mixing_executors_across_resume(micro_runs):
    """The quick study shares the warm-up and the GRPO experts with the full one: Ray picks up the local run's
    steps as cached, a merge fails there, and the local executor finishes exactly what is left."""
    from rlm.core.study.run import run_study
    from rlm.core.study.steps import StudySteps

    _, root, _, _ = micro_runs
    run = root / "mixed"
    shutil.copytree(root / "local", run)
    cfg = load_experiment("micro", quick=True)
    bad = "merge.sft.math+puzzle.ties.s0"
    fns = StudySteps(cfg).functions()
    real_merge = fns["merge"]

    def failing_merge(ctx):
        if ctx.name == bad:
            raise RuntimeError("disk full (simulated)")
        return real_merge(ctx)

    with pytest.raises(StepFailed, match="disk full"):
        run_study(cfg, run, progress=False, functions={**fns, "merge": failing_merge},
                  executor=RayExecutor(cfg.resources, threads=cfg.threads))
    graph = {s["name"]: s for s in json.loads((run / "graph.json").read_text())["steps"]}
    assert graph["train.grpo.math.s0"]["status"] == "cached" and graph["warmup"]["status"] == "cached"
    assert graph["train.sft.math.s0"]["status"] == "done"  # the quick SFT config is new: run on Ray
    assert graph[bad]["status"] == "failed" and graph["report"]["status"] == "blocked"
    summary = run_study(cfg, run, progress=False, executor=LocalExecutor())
    assert sorted(summary.executed) == sorted([bad, "eval_merged.sft.math+puzzle.ties.s0.math",
                                               "eval_merged.sft.math+puzzle.ties.s0.puzzle", "report"])
    assert (run / "report" / "table1.json").is_file()
    # the CLI path: everything is finished, whichever executor looks
    for executor in ("ray", "local"):
        assert main(["experiment", "run", "micro", "--quick", "--out", str(run), "--executor", executor,
                     "--no-progress"]) == 0
        graph = json.loads((run / "graph.json").read_text())
        assert graph["ok"] and {s["status"] for s in graph["steps"]} == {"cached"}
