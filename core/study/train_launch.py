"""A study's training step on several processes: ``accelerate launch`` of this module inside the step.

When a ``train`` or ``warmup`` step's resources ask for more than one process (:func:`launch_processes`:
``resources.train.num_processes``, or a whole ``num_gpus`` above 1), :meth:`rlm.core.study.steps.StudySteps.
_train` does not call the trainer in its own process: it writes the trainer call (:func:`train_spec`: the
trainer, its config data, the start model, the task spec, the run directory ``ctx.work_dir/run``, resume or
not) to ``WORK/launch.json`` and runs

    accelerate launch --multi_gpu --num_processes N ... -m rlm.core.study.train_launch WORK/launch.json

(``--config_file FILE`` in place of the default flags when ``resources.train.config_file`` names an accelerate
config, e.g. ``configs/accelerate/fsdp.yaml`` for FSDP2). Every process builds the same trainer and
:class:`rlm.core.train.config.TrainRun` as the in-process step would and calls ``train``, which is how
``rlm train`` runs under ``accelerate launch`` (:mod:`rlm.core.train.distributed`: DDP, or FSDP2; gloo on
CPU). The main process writes ``WORK/launch-result.json`` with the final model's path; the step then moves
``WORK/run`` into its directory exactly as a one-process step does, so the step's outputs, key and caching do
not depend on the number of processes (the run's ``manifest.json`` records ``processes``).

The launch's output goes to ``RUN/logs/NAME-KEY.launch.log`` (appended, one header per attempt). A launch that
exits non-zero (a rank killed, out of memory, an exception in a rank) raises one :class:`RlmError` naming the
exit status and the log, after the log's last lines have gone to the step's log; the run's checkpoints stay
in the work directory, so a rerun resumes. The launcher gets SIGTERM when the step's process dies (Linux), and
each rank SIGKILL when its launcher dies, so a killed Ray worker leaves no orphaned ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from rlm.core.errors import RlmError

SPEC_FILE = "launch.json"
RESULT_FILE = "launch-result.json"
#: variables of an outer distributed launch that must not leak into the step's own launch
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def launch_processes(resources: Any) -> int:
    """How many processes a training step's :class:`~rlm.core.study.config.StepResources` ask for:
    ``num_processes`` when set, else ``num_gpus`` when it is a whole number above 1, else 1."""
    if resources is None:
        return 1
    if resources.num_processes is not None:
        return int(resources.num_processes)
    gpus = resources.num_gpus
    return int(gpus) if gpus is not None and gpus > 1 and float(gpus).is_integer() else 1


def train_spec(*, trainer: str, config: Mapping[str, Any], model: str, task: Mapping[str, Any], out: Path,
               subset: str | None, data_path: str | None, resume: bool, command: list[str]) -> dict[str, Any]:
    """The trainer call every launched process makes (JSON data). ``task`` is ``{"mixture": [task specs]}``
    (the warm-up) or ``{"task": spec}`` (an expert); ``config`` the trainer's config data before validation."""
    return {"trainer": trainer, "config": dict(config), "model": str(model), "task": dict(task), "out": str(out),
            "subset": subset, "data_path": data_path, "resume": bool(resume), "command": list(command)}


def launch_args(spec_path: Path, processes: int, *, config_file: str | None, threads: int, port: int) -> list[str]:
    """The arguments of ``accelerate launch`` for a step (run by this interpreter, so the ranks import the same
    rlm). Without a config file the processes are started by torchrun (``--multi_gpu``: NCCL on GPUs, gloo on
    CPU as rlm selects) with accelerate's ``mixed_precision`` off, since the study's ``precision`` sets it."""
    cmd: list[str] = []
    if config_file:
        cmd += ["--config_file", str(config_file)]
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(processes), "--num_cpu_threads_per_process", str(max(1, threads)),
            "--main_process_port", str(port), "-m", __name__, str(spec_path)]
    return cmd


def check_config_file(path: str, where: str) -> Path:
    """An accelerate config file a step launches with: it must exist and not ask for DeepSpeed (which
    ``rlm train`` refuses). One-line :class:`RlmError` naming ``where``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RlmError(f"{where}: accelerate config file {path} not found")
    import yaml

    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RlmError(f"{where}: accelerate config file {path} is not readable YAML ({type(exc).__name__})") from None
    if str(data.get("distributed_type", "")).upper() == "DEEPSPEED":
        raise RlmError(f"{where}: {path} asks for DeepSpeed, which rlm train does not support; use an FSDP config "
                       f"(configs/accelerate/fsdp.yaml) or none (DDP)")
    return p.resolve()


def run_launch(spec: dict[str, Any], work: Path, *, processes: int, config_file: str | None, log_path: Path,
               step: str, log: Callable[[str], None] = print) -> Path:
    """Run the trainer call ``spec`` on ``processes`` processes through ``accelerate launch`` and return the
    final model directory the main process reported. The launch's output is appended to ``log_path``."""
    import torch

    config = check_config_file(config_file, f"resources of step {step}: config_file") if config_file else None
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / SPEC_FILE, work / RESULT_FILE
    result_path.unlink(missing_ok=True)
    threads = max(1, torch.get_num_threads() // processes)
    spec_path.write_text(json.dumps({**spec, "threads": threads, "result": str(result_path)}, indent=1),
                         encoding="utf-8")
    args = launch_args(spec_path, processes, config_file=str(config) if config else None, threads=threads,
                       port=_free_port())
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    log(f"{step}: accelerate launch of {processes} processes (log: {log_path})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"== {step}: accelerate launch {' '.join(args)}\n")
        fh.flush()
        code = _run_until_done(args, env, fh)
    if code != 0:
        from rich.markup import escape  # the local executor's console reads markup

        tail = _tail(log_path, 40)
        for line in tail[-20:]:
            log(f"  | {escape(line)}")
        raise RlmError(f"step {step}: accelerate launch of {processes} processes {_status(code)} (log: {log_path})"
                       + (f": {_last_error(tail)}" if tail else ""))
    try:
        final = json.loads(result_path.read_text(encoding="utf-8"))["final"]
    except (OSError, ValueError, KeyError):
        raise RlmError(f"step {step}: accelerate launch finished without the main process's result "
                       f"{result_path} (log: {log_path})") from None
    return Path(final)


def _run_until_done(args: list[str], env: dict[str, str], out: Any) -> int:
    """Run ``accelerate launch ARGS`` to its end; if this process is interrupted first, stop it (SIGTERM:
    torchrun then stops its ranks) before re-raising."""
    proc = subprocess.Popen([sys.executable, "-m", __name__, "--launcher", *args], env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error(lines: list[str]) -> str:
    """What went wrong, from the end of a launch log: torchrun's root cause (which rank, how it ended), else the
    last line naming an error."""
    if any("Root Cause" in ln for ln in lines):
        block = lines[max(i for i, ln in enumerate(lines) if "Root Cause" in ln):]
        fields = [" ".join(ln.split()) for ln in block if ln.strip().startswith(("rank ", "exitcode "))]
        if fields:
            return "root cause: " + ", ".join(fields)
    for key in ("Error", "error", "Signal"):
        hits = [ln.strip() for ln in lines if key in ln]
        if hits:
            return " ".join(hits[-1].split())[:300]
    return " ".join(lines[-1].split())[:300]


def _tail(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG


# -- in each launched process ---------------------------------------------------------------------------------
def training_task(spec: Mapping[str, Any]) -> Any:
    """The training task of ``{"mixture": [task specs]}`` (the warm-up) or ``{"task": spec}`` (an expert)."""
    from rlm.core.study.mixture import MixtureTask, make_task

    return MixtureTask({"tasks": spec["mixture"]}) if "mixture" in spec else make_task(spec["task"])


def train_in_process(spec: Mapping[str, Any]) -> Path:
    """One launched process's share of a training step: the trainer call of ``spec``; the main process
    writes the final model's path to ``spec["result"]``."""
    import torch

    from rlm.core.config import validate
    from rlm.core.io.atomic import atomic_write_json
    from rlm.core.plugins import get_plugin
    from rlm.core.train.config import TrainRun

    torch.set_num_threads(int(spec.get("threads") or 1))
    cls = get_plugin("trainer", spec["trainer"])
    cfg = validate(cls.Config, dict(spec["config"]), f"config of {spec['trainer']!r}")
    resume = bool(spec["resume"])
    run = TrainRun(model=spec["model"], task=training_task(spec["task"]), out=Path(spec["out"]),
                   subset=spec.get("subset"), data_path=spec.get("data_path"), resume=resume, overwrite=not resume,
                   command=list(spec.get("command") or []))
    final = Path(cls(cfg).train(run))
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_json(Path(spec["result"]), {"final": str(final)})
    return final


def main(argv: list[str] | None = None) -> int:
    """``-m rlm.core.study.train_launch SPEC`` (a rank) or ``--launcher ARGS`` (accelerate launch itself,
    made to die with the step's process)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--launcher"]:
        _die_with_parent(signal.SIGTERM)
        from accelerate.commands.launch import main as accelerate_launch

        sys.argv = ["accelerate-launch", *args[1:]]
        accelerate_launch()
        return 0
    if len(args) != 1:
        print("usage: python -m rlm.core.study.train_launch LAUNCH_JSON", file=sys.stderr)
        return 2
    _die_with_parent(signal.SIGKILL)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    train_in_process(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    from rlm.core.train.distributed import end_distributed

    end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
