"""Executors of a step graph (:meth:`rlm.core.study.graph.Graph.run`): who runs the steps whose inputs are ready.

The graph does the scheduling (keys, caching, blocking after a failure, pruning, ``graph.json``, progress); an
executor only runs :func:`rlm.core.study.graph.execute_step` on the :class:`~rlm.core.study.graph.StepJob`\\ s it
is handed and reports a :class:`~rlm.core.study.graph.StepOutcome` for each. Both executors therefore produce
the same step directories under the same keys, and a run started with one can be finished with the other.
An executor has ``slots`` (how many steps may be submitted at once; None: any number), ``in_process`` (steps
run in this process and may log to the console), ``start(run_dir)``, ``submit(job)``, ``wait()`` (blocks until
at least one submitted step has finished and returns their outcomes) and ``close()``.

:class:`LocalExecutor` (the default) runs one step at a time in this process. :class:`RayExecutor` turns every
ready step into a Ray task with the CPUs and GPUs its kind asks for (:class:`rlm.core.study.config.
ResourcesConfig`); each task writes its output to ``RUN/logs/NAME-KEY.log``, which a failure report names and
quotes. A training step whose resources ask for several processes launches them with ``accelerate launch``
inside its task (:mod:`rlm.core.study.train_launch`; the launch's own log is ``RUN/logs/NAME-KEY.launch.log``).
A task whose worker process dies (killed, out of memory) is rerun by Ray up to ``max_retries`` times,
then reported as failed; a step that raises is reported at once. The run directory must be on a filesystem
every Ray node mounts at the same path: with ``address`` this is checked up front (:func:`check_shared_run_dir`).

Usage::

    graph.run(run_dir, executor=RayExecutor(cfg.resources, threads=cfg.threads))   # a local Ray instance
    graph.run(run_dir, executor=RayExecutor(cfg.resources, address="ray://head:10001"))
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

from rlm.core.cpu_numerics import ENV_NAMES
from rlm.core.errors import RlmError
from rlm.core.study.graph import (  # noqa: F401 - LocalExecutor re-exported: the in-process default lives in graph
    DONE,
    FAILED,
    LocalExecutor,
    StepJob,
    StepOutcome,
    error_line,
    execute_step,
)

EXECUTORS = ("local", "ray")
LOGS_DIR = "logs"
#: environment variables a Ray cluster started here passes on to its workers (caches, offline switches)
_FORWARDED_ENV_PREFIXES = ("RLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")



def step_log_path(run_dir: Path, job: StepJob) -> Path:
    """Where a step run by Ray writes its output: ``RUN/logs/NAME-KEY.log``."""
    return Path(run_dir) / LOGS_DIR / f"{job.final.name}.log"


class RayExecutor:
    """Every ready step as a Ray task (``--executor ray``).

    ``resources`` is the study's :class:`~rlm.core.study.config.ResourcesConfig` (per step kind; a ``num_gpus``
    of None means one GPU, or ``num_processes`` GPUs for a training step, where the cluster has GPUs).
    ``address``: a running cluster (``auto``, ``ray://HOST:10001``, ``HOST:6379``); without it a local Ray
    instance with ``num_cpus`` cores (None: all) is started and shut down again. An already initialised Ray
    session is used as it is (and left running).
    ``threads``: torch CPU threads in each task (None: the step's ``num_cpus``).
    """

    slots: int | None = None  # Ray queues what the cluster cannot run yet
    in_process = False

    def __init__(self, resources: Any = None, *, address: str | None = None, num_cpus: int | None = None,
                 threads: int | None = None, max_retries: int | None = None) -> None:
        if resources is None:
            from rlm.core.study.config import ResourcesConfig

            resources = ResourcesConfig()
        self.resources = resources
        self.address, self.num_cpus, self.threads = address, num_cpus, threads
        self.max_retries = int(resources.max_retries if max_retries is None else max_retries)
        self._pending: dict[Any, StepJob] = {}
        self._owns_ray = False
        self._cluster_gpus = 0.0
        self._run_dir: Path | None = None
        self._task: Any = None

    def start(self, run_dir: Path) -> None:
        ray = _import_ray()
        self._run_dir = Path(run_dir)
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items()
                   if k.startswith(_FORWARDED_ENV_PREFIXES) or k in ENV_NAMES}  # ENV_NAMES: cpu_capability's
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "runtime_env": {"env_vars": env} if env else None}
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.num_cpus, **kwargs)
            self._owns_ray = True
        self._cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        if self.address:
            check_shared_run_dir(self._run_dir)
        (self._run_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
        self._task = ray.remote(_run_step_task)

    def _options(self, kind: str | None) -> dict[str, Any]:
        res = self.resources.of(kind)
        # unset: one GPU per training process (one for every other step) where the cluster has GPUs
        gpus = res.num_gpus if res.num_gpus is not None else \
            (float(getattr(res, "num_processes", None) or 1) if self._cluster_gpus > 0 else 0.0)
        return {"num_cpus": res.num_cpus, "num_gpus": gpus, "max_retries": self.max_retries,
                "retry_exceptions": False}

    def submit(self, job: StepJob) -> None:
        if self._task is None or self._run_dir is None:
            raise RlmError("RayExecutor.submit before start")
        opts = self._options(job.step.kind)
        threads = self.threads or max(1, int(opts["num_cpus"]))
        task = self._task.options(name=f"rlm:{job.step.name}", **opts)
        self._pending[task.remote(job, threads, str(step_log_path(self._run_dir, job)))] = job

    def wait(self) -> list[StepOutcome]:
        ray = _import_ray()
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        more, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        outcomes = []
        for ref in dict.fromkeys(ready + more):
            job = self._pending.pop(ref)
            log = step_log_path(self._run_dir, job) if self._run_dir else None
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died (after max_retries reruns) or Ray failed
                error = f"Ray task failed ({type(exc).__name__}): {_first_line(exc)}"
                _write_lost_step(job, error)
                outcomes.append(StepOutcome(job.step.name, FAILED, error=error, log=log))
                continue
            outcomes.append(StepOutcome(job.step.name, out["status"], result=out.get("result"),
                                        seconds=out.get("seconds"), error=out.get("error"), log=log))
        return outcomes

    def close(self) -> None:
        if self._pending:
            ray = _import_ray()
            for ref in self._pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            self._pending = {}
        if self._owns_ray:
            _import_ray().shutdown()
            self._owns_ray = False


def make_executor(name: str, cfg: Any = None, *, address: str | None = None) -> Any:
    """The executor ``--executor NAME [--ray-address ADDR]`` asks for, with the study's resources and threads."""
    if name not in EXECUTORS:
        raise RlmError(f"--executor: unknown {name!r} (known: {', '.join(EXECUTORS)})")
    if name == "local":
        if address:
            raise RlmError("--ray-address needs --executor ray")
        return LocalExecutor()
    return RayExecutor(getattr(cfg, "resources", None), address=address, threads=getattr(cfg, "threads", None))


# -- inside the Ray workers --------------------------------------------------------------------------------
def _run_step_task(job: StepJob, threads: int, log_path: str) -> dict[str, Any]:
    """The Ray task of one step: its output goes to ``log_path``; returns the outcome as plain data."""
    with _output_to(Path(log_path), f"== {job.step.name} ({job.step.kind}) on {os.uname().nodename} "
                                    f"pid {os.getpid()}"):
        _prepare_worker(threads)
        try:
            result, seconds = execute_step(job, log=lambda msg: print(msg, flush=True))
        except Exception as exc:  # noqa: BLE001 - reported to the driver as the step's outcome
            import traceback

            traceback.print_exc()
            return {"status": FAILED, "error": error_line(exc)}
    return {"status": DONE, "result": result, "seconds": seconds}


def _prepare_worker(threads: int) -> None:
    """Set up a worker as ``rlm experiment run`` sets up its own process: torch threads, no HF bars."""
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(int(threads))
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _output_to(path: Path, header: str) -> Iterator[None]:
    """Send this process's stdout and stderr (Python and C level) to ``path`` (appended) while inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(header + "\n")
        fh.flush()
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _write_lost_step(job: StepJob, error: str) -> None:
    """``NAME-KEY.failed.json`` for a step whose worker died before it could write one itself."""
    from rlm.core.io.atomic import atomic_write_json

    failed = job.final.with_name(job.final.name + ".failed.json")
    atomic_write_json(failed, {"name": job.step.name, "kind": job.step.kind, "key": job.key, "status": FAILED,
                               "error": error})


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RlmError("--executor ray needs Ray: pip install 'rlm[ray]' (or 'ray>=2.9')") from None
    return ray


# -- the shared-filesystem check -----------------------------------------------------------------------------
def _probe_task(probe: str, token: str, index: int) -> tuple[str, bool]:
    """On one node: read the driver's probe file and write the reply ``PROBE.INDEX`` beside it."""
    node = os.uname().nodename
    path = Path(probe)
    try:
        if path.read_text(encoding="utf-8") != token:
            return node, False
        path.with_name(f"{path.name}.{index}").write_text(token, encoding="utf-8")
    except OSError:
        return node, False
    return node, True


def _reads(path: Path, token: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == token
    except OSError:
        return False


def check_shared_run_dir(run_dir: Path, timeout_s: float = 120.0) -> None:
    """Check that every alive Ray node sees ``run_dir`` at the same path: the driver writes a probe file, one
    task pinned to each node reads it and writes a reply, and the driver reads the replies back. One-line
    :class:`RlmError` naming the nodes that do not."""
    ray = _import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = run_dir / f".ray-probe-{token}"
    probe.write_text(token, encoding="utf-8")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        task = ray.remote(_probe_task)
        refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token, i) for i, n in enumerate(nodes)]
        answers = ray.get(refs, timeout=timeout_s)
        blind = sorted(node for i, (node, ok) in enumerate(answers)
                       if not ok or not _reads(run_dir / f"{probe.name}.{i}", token))
        if blind:
            raise RlmError(f"run directory {run_dir} is not shared with Ray node(s) {', '.join(blind) or '?'}: put "
                           f"it on storage every node mounts at the same path (NFS, Lustre, ...)")
    finally:
        for p in run_dir.glob(f"{probe.name}*"):
            p.unlink(missing_ok=True)
