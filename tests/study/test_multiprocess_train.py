"""A study's train step on two processes (``resources.train.num_processes: 2``): ``accelerate launch`` inside
the step, on CPU over gloo. The step gets the same key, the same ``step.json`` result and the same run files as
the one-process step, and the same weights (SFT over DDP sums the same global batch); it runs the same under the
Ray executor; a killed rank fails the step with the launch's log named, and a rerun resumes from the checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlm.core.errors import ConfigError, RlmError
from rlm.core.study.config import StepResources
from rlm.core.study.executors import LocalExecutor
from rlm.core.study.plan import build_graph, plan_steps
from rlm.core.study.presets import load_experiment
from rlm.core.study.steps import STEP_VERSIONS, StudySteps
from rlm.core.study.train_launch import (
    SPEC_FILE,
    check_config_file,
    launch_args,
    launch_processes,
    _status,
)

REPO = Path(__file__).resolve().parents[2]
STEP = "train.sft.math.s0"
SFT = {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 5.0e-4, "max_response_tokens": 32}


def study(processes: int = 1, sft: dict | None = None, config_file: str | None = None):
    """A two-task SFT study of the tiny model without warm-up (fp32 throughout, experts saved in fp32)."""
    data = {"name": "mp-train", "base": {"model": "tiny", "seed": 0, "dtype": "float32"},
            "precision": {"training": "fp32", "save_dtype": "float32"}, "warmup": {"enabled": False},
            "tasks": [{"name": "math", "train_subset": "gen", "eval_subset": "gen", "train_size": 16, "eval_size": 4},
                      {"name": "puzzle", "train_subset": "id", "eval_subset": "id", "train_size": 16,
                       "eval_size": 4}],
            "trainers": [{"name": "sft", "config": sft or SFT}], "methods": [{"name": "averaging"}],
            "eval": {"max_new_tokens": 8, "batch_size": 8}, "conflicts": {"enabled": False},
            "landscape": {"enabled": False}, "curve": {"enabled": False}, "threads": 1}
    if processes > 1:
        data["resources"] = {"train": {"num_processes": processes, "config_file": config_file}}
    return load_experiment(data)


def train_step(cfg, run: Path, executor=None):
    """Run the study's init and ``train.sft.math.s0`` steps only."""
    graph = build_graph(plan_steps(cfg), StudySteps(cfg).functions(), STEP_VERSIONS)
    return graph.run(run, targets=[STEP], progress=False, executor=executor or LocalExecutor())


def files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def weights(step_dir: Path) -> dict:
    return load_file(str(step_dir / "run" / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:  # the same global batch: equal up to the order of the gradient sums (measured: bit-equal)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-5)


# -- the settings (fast) ----------------------------------------------------------------------------------------
def test_processes_from_resources():
    assert launch_processes(None) == 1
    assert launch_processes(StepResources()) == 1
    assert launch_processes(StepResources(num_gpus=1)) == 1
    assert launch_processes(StepResources(num_gpus=4)) == 4
    assert launch_processes(StepResources(num_gpus=0.5)) == 1
    assert launch_processes(StepResources(num_gpus=2.5)) == 1
    assert launch_processes(StepResources(num_gpus=4, num_processes=2)) == 2
    assert launch_processes(StepResources(num_gpus=0, num_processes=3)) == 3


def test_launch_only_for_training_and_config_file_resolved(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="resources.merge: num_processes and config_file apply to train and warmup"):
        load_experiment("micro", sets=["resources.merge.num_processes=2"])
    monkeypatch.chdir(REPO)
    cfg = load_experiment("micro", sets=["resources.train.config_file=configs/accelerate/fsdp.yaml",
                                         "resources.warmup.num_processes=2"])
    assert cfg.resources.train.config_file == str(REPO / "configs" / "accelerate" / "fsdp.yaml")
    assert cfg.resources.warmup.num_processes == 2


def test_ray_reserves_a_gpu_per_training_process():
    from rlm.core.study.executors import RayExecutor

    ex = RayExecutor(load_experiment("micro", sets=["resources.train.num_processes=4"]).resources)
    ex._cluster_gpus = 8.0
    assert ex._options("train")["num_gpus"] == 4.0 and ex._options("warmup")["num_gpus"] == 1.0
    assert ex._options("eval_expert")["num_gpus"] == 1.0 and ex._options("merge")["num_gpus"] == 0.0
    ex._cluster_gpus = 0.0
    assert ex._options("train")["num_gpus"] == 0.0


def test_launch_args_and_config_checks(tmp_path):
    spec = tmp_path / SPEC_FILE
    args = launch_args(spec, 2, config_file=None, threads=3, port=29999)
    assert args == ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--num_processes", "2", "--num_cpu_threads_per_process", "3", "--main_process_port", "29999",
                    "-m", "rlm.core.study.train_launch", str(spec)]
    fsdp = str(REPO / "configs" / "accelerate" / "fsdp.yaml")
    args = launch_args(spec, 4, config_file=fsdp, threads=1, port=1)
    assert args[:4] == ["--config_file", fsdp, "--num_processes", "4"]
    assert check_config_file(fsdp, "here") == Path(fsdp)
    with pytest.raises(RlmError, match="here: accelerate config file .*absent.yaml not found"):
        check_config_file(str(tmp_path / "absent.yaml"), "here")
    (tmp_path / "ds.yaml").write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n")
    with pytest.raises(RlmError, match="asks for DeepSpeed, which rlm train does not support"):
        check_config_file(str(tmp_path / "ds.yaml"), "here")
    assert _status(1) == "exited with code 1" and _status(-9) == "was killed by SIGKILL"


# -- two processes on CPU (slow) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-train")
    one = train_step(study(1), root / "one")
    two = train_step(study(2), root / "two")
    return root, one, two


@pytest.mark.slow
def test_two_processes_give_the_one_process_step(one_and_two):
    root, one, two = one_and_two
    assert one.ok and two.ok
    d1, d2 = one.steps[STEP].dir, two.steps[STEP].dir
    assert d1.name == d2.name  # the same key: resources are not part of it
    r1, r2 = (json.loads((d / "step.json").read_text()) for d in (d1, d2))
    assert r1["config"] == r2["config"] and r1["inputs"]["init"]["key"] == r2["inputs"]["init"]["key"]
    m1, m2 = r1["result"].pop("final_metrics"), r2["result"].pop("final_metrics")
    assert r1["result"] == r2["result"] == {"model": "run/final", "run": "run", "resumed": False}
    assert m1.keys() == m2.keys() and m1["step"] == m2["step"] == 2
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-5)
    # the same run files; two processes add rank 1's RNG state to each checkpoint
    extra = files(d2) - files(d1)
    assert files(d1) <= files(d2) and extra and all(p.endswith("rng-1.pt") for p in extra)
    assert_same_weights(weights(d1), weights(d2))
    man = json.loads((d2 / "run" / "manifest.json").read_text())
    assert (man["processes"], man["distributed"], man["status"]) == (2, "MULTI_CPU", "complete")
    assert len(set(man["rank_weight_sha256"])) == 1
    log = (root / "two" / "logs" / f"{d2.name}.launch.log").read_text()
    assert f"== {STEP}: accelerate launch --multi_gpu" in log and "--num_processes 2" in log
    assert not (root / "two" / "steps" / ".work" / d2.name).exists()  # the work dir goes once the step is done
    # a rerun with one process finds the step finished: the caching does not depend on the processes
    again = train_step(study(1), root / "two")
    assert again.names("cached") == ["init", STEP]


@pytest.mark.slow
def test_two_processes_under_ray(one_and_two, tmp_path):
    ray = pytest.importorskip("ray")
    from rlm.core.study.executors import RayExecutor

    root, one, two = one_and_two
    cfg = study(2)
    owns = not ray.is_initialized()
    if owns:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = train_step(cfg, tmp_path / "ray", executor=RayExecutor(cfg.resources, threads=cfg.threads))
    finally:
        if owns:
            ray.shutdown()
    assert summary.ok, {n: s.error for n, s in summary.steps.items()}
    d = summary.steps[STEP].dir
    assert d.name == two.steps[STEP].dir.name
    rec = json.loads((d / "step.json").read_text())
    rec["result"].pop("final_metrics")
    assert rec["result"] == {"model": "run/final", "run": "run", "resumed": False}
    assert files(d) == files(two.steps[STEP].dir)
    assert_same_weights(weights(d), weights(one.steps[STEP].dir))
    task_log = (tmp_path / "ray" / "logs" / f"{d.name}.log").read_text()
    assert f"{STEP}: accelerate launch of 2 processes (log: " in task_log  # the task's log names the launch's
    assert (tmp_path / "ray" / "logs" / f"{d.name}.launch.log").is_file()


@pytest.mark.slow
def test_two_processes_with_fsdp_config(one_and_two, tmp_path):
    """``config_file: configs/accelerate/fsdp.yaml``: the step's trainer runs FSDP2 (on CPU over gloo, as
    rlm.core.train.distributed switches it on) and gives the one-process weights."""
    _, one, _ = one_and_two
    summary = train_step(study(2, config_file=str(REPO / "configs" / "accelerate" / "fsdp.yaml")), tmp_path / "run")
    assert summary.ok, {n: s.error for n, s in summary.steps.items()}
    d = summary.steps[STEP].dir
    assert d.name == one.steps[STEP].dir.name
    man = json.loads((d / "run" / "manifest.json").read_text())
    assert (man["processes"], man["distributed"], man["status"]) == (2, "FSDP", "complete")
    assert_same_weights(weights(d), weights(one.steps[STEP].dir))
    assert "--config_file " + str(REPO / "configs" / "accelerate" / "fsdp.yaml") in \
        (tmp_path / "run" / "logs" / f"{d.name}.launch.log").read_text()


def _rank_pids(spec: Path) -> list[int]:
    """The launched ranks of the step whose launch spec is ``spec`` (not the launcher)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(spec).encode() in cmd and b"rlm.core.study.train_launch" in cmd and b"--launcher" not in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the ranks through /proc")
def test_killed_rank_is_reported_with_the_log_and_rerun_resumes(tmp_path):
    sft = {**SFT, "steps": 16, "save_every": 4}
    cfg, run = study(2, sft), tmp_path / "run"
    killed: list[int] = []

    def kill_a_rank_after_a_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for work in (run / "steps" / ".work").glob(f"{STEP}-*"):
                metrics = work / "run" / "metrics.jsonl"
                if (work / "run" / "checkpoints" / "step-4").is_dir() and metrics.is_file() \
                        and len(metrics.read_text().splitlines()) >= 6:
                    pids = _rank_pids(work / SPEC_FILE)
                    if pids:
                        os.kill(max(pids), signal.SIGKILL)
                        killed.append(max(pids))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_rank_after_a_checkpoint, daemon=True)
    killer.start()
    summary = train_step(cfg, run)
    killer.join()
    assert killed, "no rank was found to kill"
    st = summary.steps[STEP]
    assert summary.failed == [STEP]
    log = run / "logs" / f"{st.dir.name}.launch.log"
    assert st.error.startswith(f"rlm.core.errors.RlmError: step {STEP}: accelerate launch of 2 processes exited with "
                               f"code 1 (log: {log}): root cause: rank "), st.error
    assert st.error.endswith(f"exitcode : -9 (pid: {killed[0]}) (SIGKILL)"), st.error  # the rank killed here
    assert "Signal 9 (SIGKILL)" in log.read_text()  # torchrun's report of the dead rank
    failed = json.loads((run / "steps" / f"{st.dir.name}.failed.json").read_text())
    assert failed["error"] == st.error
    assert not _rank_pids(run / "steps" / ".work" / st.dir.name / SPEC_FILE)  # no rank left running

    again = train_step(cfg, run)
    assert again.ok and again.executed == [STEP]
    d = again.steps[STEP].dir
    result = json.loads((d / "step.json").read_text())["result"]
    assert result["resumed"] is True and result["final_metrics"]["step"] == 16
    rows = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert log.read_text().count(f"== {STEP}: accelerate launch") == 2
