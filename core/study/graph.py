"""A small declarative step-graph runner with content-addressed, resumable outputs.

A :class:`Step` has a name, a function, the names of the steps it depends on, a JSON-serialisable config and
a code version key. Its output directory is ``RUN/steps/<name>-<key>/`` where ``key`` is the first 12 hex
digits of a SHA-256 over the canonical JSON of ``{"config", "version", "inputs": {dep: dep_key}}``. A
dependency's key already covers its own config, version and inputs, so a config (or version) change gives a
new key to exactly that step and every step downstream of it, and nothing else.

Running a step: the function is called with a :class:`StepContext` whose ``out`` is a temporary directory
beside the final one (:func:`rlm.core.io.atomic.atomic_dir`); when the function returns, the runner writes
``step.json`` (status, timings, config, version, input keys and the function's JSON result) into it and
renames it into place. A directory under its final name therefore always holds a finished step; an
interrupted step (``KeyboardInterrupt``, ``SIGKILL``) leaves at most a hidden ``.<name>-<key>.*.partial``
directory, which the next run removes before redoing the step. A step that can resume its own work (a
training run with checkpoints) keeps it in ``ctx.work_dir`` (``RUN/steps/.work/<name>-<key>/``), which
survives failures and interruptions and is removed once the step has finished.

A failing step (any ``Exception``) gets ``RUN/steps/<name>-<key>.failed.json`` (error, traceback, timings);
its dependents are not run (status ``blocked``); independent steps still run (``keep_going=True``, the
default). Rerunning the graph skips every finished step and redoes only failed, interrupted, blocked or
changed ones. ``RUN/graph.json`` holds the status of every step of the latest run.

Who runs a step is an executor (:mod:`rlm.core.study.executors`): :meth:`Graph.run` hands it every step whose
inputs are ready, as a :class:`StepJob`, and records the :class:`StepOutcome` it reports; the local executor
(the default) runs one step at a time in this process, the Ray executor runs ready steps as Ray tasks. Both call
:func:`execute_step`, so the keys, directories and records above do not depend on the executor.

Usage::

    g = Graph()
    g.add("data", make_data, config={"n": 10})
    g.add("train", train, deps=["data"], config={"lr": 1e-3}, version="2")
    summary = g.run("RUN")                # progress on stderr; summary.ok, summary.steps[...]
    summary.raise_for_failures()          # RlmError naming the failed steps
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from rich.markup import escape as rich_escape

from rlm.core.errors import RlmError
from rlm.core.io.atomic import atomic_dir, atomic_write_json

STEP_FILE = "step.json"
STEPS_DIR = "steps"
GRAPH_FILE = "graph.json"
WORK_DIR = ".work"
LOCK_FILE = ".graph.lock"
KEY_LENGTH = 12
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=@-]*$")

# statuses reported per step
DONE, CACHED, FAILED, BLOCKED, INTERRUPTED, PENDING, SKIPPED = (
    "done", "cached", "failed", "blocked", "interrupted", "pending", "skipped")


class GraphError(RlmError):
    """A malformed graph (unknown dependency, duplicate name, cycle, bad name or config)."""


class StepFailed(RlmError):
    """Raised by :meth:`RunSummary.raise_for_failures`; the message names each failed step and its error."""


def canonical_json(data: Any) -> str:
    """Stable JSON used for hashing: sorted keys, no whitespace, pydantic models and paths converted."""
    return json.dumps(_plain(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _plain(data: Any) -> Any:
    """Turn configs into plain JSON data (pydantic models dumped, paths and tuples converted)."""
    if hasattr(data, "model_dump"):
        return _plain(data.model_dump(mode="json"))
    if isinstance(data, Mapping):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    if isinstance(data, (set, frozenset)):
        return sorted(_plain(v) for v in data)
    if isinstance(data, Path):
        return str(data)
    if data is None or isinstance(data, (str, int, float, bool)):
        return data
    raise GraphError(f"step config value {data!r} of type {type(data).__name__} is not JSON-serialisable")


def step_key(config: Any, version: str, input_keys: Mapping[str, str]) -> str:
    """The hash naming a step's output: config, code version and the keys of its inputs."""
    payload = canonical_json({"config": config, "version": str(version), "inputs": dict(input_keys)})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:KEY_LENGTH]


@dataclass
class StepOutput:
    """A finished step as its dependents see it."""

    name: str
    key: str
    dir: Path
    result: Any = None

    @property
    def path(self) -> Path:  # alias that reads well in step functions
        return self.dir


def model_of(output: StepOutput) -> Path:
    """The model directory a finished step produced (``result["model"]``, relative to its directory)."""
    res = output.result or {}
    if "model" not in res:
        raise RlmError(f"step {output.name} produced no model")
    p = Path(res["model"])
    return p if p.is_absolute() else output.dir / p


@dataclass
class StepContext:
    """What a step function receives. Write outputs under ``out`` (a temporary directory that becomes
    ``final_dir`` when the function returns); read dependencies from ``inputs[name].dir`` / ``.result``."""

    name: str
    key: str
    config: Any
    out: Path
    final_dir: Path
    run_dir: Path
    inputs: dict[str, StepOutput]
    log: Callable[[str], None] = print

    @property
    def work_dir(self) -> Path:
        """A scratch directory for this step's key that survives failures and interruptions (for resumable
        work such as training checkpoints: move the final result into ``out``); removed after success."""
        work = self.run_dir / STEPS_DIR / WORK_DIR / f"{self.name}-{self.key}"
        work.mkdir(parents=True, exist_ok=True)
        return work

    def run_relative(self, path: str | Path) -> str:
        """``path`` relative to the run directory (both resolved), or as given when it lies elsewhere (how
        reports and results name step directories)."""
        try:
            return str(Path(path).resolve().relative_to(Path(self.run_dir).resolve()))
        except ValueError:
            return str(path)

    def input(self, name: str) -> StepOutput:
        try:
            return self.inputs[name]
        except KeyError:
            raise GraphError(f"step {self.name!r} has no input {name!r} (inputs: {', '.join(self.inputs)})") from None


StepFn = Callable[[StepContext], Any]


@dataclass
class Step:
    name: str
    fn: StepFn
    deps: tuple[str, ...] = ()
    config: Any = None
    version: str = "1"
    kind: str | None = None  # free label (e.g. "train"), recorded in step.json and graph.json
    # An ephemeral step's output files are deleted (step.json stays, marked "pruned") once every dependent has
    # finished; it is recomputed only when a dependent has to run again. For outputs too large to keep, such as
    # merged models of a large base.
    ephemeral: bool = False
    # Estimated relative cost, a scheduling hint only (not part of the key): among ready steps the one with the
    # costliest path to the end of the graph is handed out first (longest path first), so a long step does not
    # start last on a machine with two cores and hold up the whole study.
    cost: float = 0.0


@dataclass
class StepJob:
    """One step to execute, as an executor receives it (picklable with its function: it may cross to another
    process). ``log`` is the console of an in-process executor (None elsewhere: the step prints)."""

    step: Step
    key: str
    final: Path
    run_dir: Path
    inputs: dict[str, StepOutput]
    log: Callable[[str], None] | None = None


@dataclass
class StepOutcome:
    """What an executor reports for a step: ``done`` (result, seconds), ``failed`` (error; ``log``: the file
    holding the step's output, where the executor keeps one) or ``interrupted``."""

    name: str
    status: str
    result: Any = None
    seconds: float | None = None
    error: str | None = None
    log: Path | None = None


@dataclass
class StepStatus:
    name: str
    key: str
    status: str = PENDING
    dir: Path | None = None
    seconds: float | None = None
    error: str | None = None
    result: Any = None
    log: Path | None = None  # the step's output where the executor keeps one (Ray)

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "key": self.key, "status": self.status,
               "dir": f"{STEPS_DIR}/{self.dir.name}" if self.dir else None, "seconds": self.seconds, "error": self.error}
        if self.log is not None:
            out["log"] = str(self.log)
        return out


@dataclass
class RunSummary:
    run_dir: Path
    steps: dict[str, StepStatus] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.status in (DONE, CACHED, SKIPPED) for s in self.steps.values())

    def names(self, *statuses: str) -> list[str]:
        return [n for n, s in self.steps.items() if s.status in statuses]

    @property
    def executed(self) -> list[str]:
        """Steps whose function ran to completion in this run."""
        return self.names(DONE)

    @property
    def failed(self) -> list[str]:
        return self.names(FAILED)

    @property
    def blocked(self) -> list[str]:
        return self.names(BLOCKED)

    def output(self, name: str) -> StepOutput:
        s = self.steps[name]
        if s.status not in (DONE, CACHED) or s.dir is None:
            raise GraphError(f"step {name!r} has no output (status {s.status})")
        return StepOutput(name, s.key, s.dir, s.result)

    def raise_for_failures(self) -> None:
        bad = [s for s in self.steps.values() if s.status in (FAILED, BLOCKED, INTERRUPTED)]
        if not bad:
            return
        lines = []
        for s in bad:
            if s.status == FAILED:
                lines.append(f"  {s.name}: failed: {s.error}" + (f" (log: {s.log})" if s.log else ""))
            elif s.status == INTERRUPTED:
                lines.append(f"  {s.name}: interrupted")
        n_blocked = sum(s.status == BLOCKED for s in bad)
        if n_blocked:
            lines.append(f"  {n_blocked} dependent step(s) not run")
        raise StepFailed(f"{len(bad) - n_blocked} step(s) did not finish (run directory {self.run_dir}; "
                         f"rerun to resume):\n" + "\n".join(lines))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_step_json(step_dir: Path) -> dict[str, Any] | None:
    """``step.json`` of a finished step directory, or ``None`` when absent, unreadable or not done."""
    try:
        data = json.loads((Path(step_dir) / STEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("status") == DONE else None


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Refuse a second runner on the same run directory (advisory ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RlmError(f"run directory {run_dir} is in use by another rlm process") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@dataclass
class _RunPlan:
    """One :meth:`Graph.run`'s view of the graph (see :meth:`Graph._plan_run`)."""

    run_dir: Path
    order: list[str]
    keys: dict[str, str]
    wanted: set[str]
    force: set[str]
    dependents: dict[str, list[str]]
    revive: set[str]


class Graph:
    """An ordered set of steps; :meth:`run` executes them in dependency order with caching."""

    def __init__(self) -> None:
        self.steps: dict[str, Step] = {}

    def add(self, name: str, fn: StepFn, deps: Iterable[str] = (), config: Any = None, version: str = "1",
            kind: str | None = None, ephemeral: bool = False, cost: float = 0.0) -> Step:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise GraphError(f"bad step name {name!r}: use letters, digits and _ . + = @ - "
                             f"(starting with a letter or digit)")
        if name in self.steps:
            raise GraphError(f"duplicate step name {name!r}")
        deps = tuple(deps)
        if len(set(deps)) != len(deps):
            raise GraphError(f"step {name!r} lists a dependency twice: {list(deps)}")
        if not cost >= 0:
            raise GraphError(f"step {name!r}: cost must be >= 0, got {cost!r}")
        step = Step(name=name, fn=fn, deps=deps, config=_plain(config), version=str(version), kind=kind,
                    ephemeral=ephemeral, cost=float(cost))
        self.steps[name] = step
        return step

    # -- structure ---------------------------------------------------------------------------------------
    def dependents(self, order: Sequence[str], within: set[str]) -> dict[str, list[str]]:
        """Each step of ``order`` -> the steps of ``within`` that list it as a dependency (in ``order``)."""
        out: dict[str, list[str]] = {n: [] for n in order}
        for n in order:
            if n in within:
                for d in self.steps[n].deps:
                    out[d].append(n)
        return out

    def path_costs(self, order: Sequence[str], dependents: Mapping[str, list[str]] | None = None) -> dict[str, float]:
        """For each step of ``order`` (a topological order), its cost plus the costliest path through its
        ``dependents`` (default: those within ``order``): the priority of a ready step (a step's never falls
        below a dependent's)."""
        if dependents is None:
            dependents = self.dependents(order, set(order))
        rank: dict[str, float] = {}
        for n in reversed(order):
            rank[n] = self.steps[n].cost + max((rank[c] for c in dependents[n]), default=0.0)
        return rank

    def order(self) -> list[str]:
        """Topological order, stable with respect to insertion order; errors name unknown deps and cycles."""
        for s in self.steps.values():
            for d in s.deps:
                if d not in self.steps:
                    import difflib

                    close = difflib.get_close_matches(d, list(self.steps), n=2)
                    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                    raise GraphError(f"step {s.name!r} depends on unknown step {d!r}{hint}")
        state: dict[str, int] = {}  # 1 visiting, 2 done
        out: list[str] = []

        def visit(n: str, stack: list[str]) -> None:
            st = state.get(n)
            if st == 2:
                return
            if st == 1:
                cycle = stack[stack.index(n):] + [n]
                raise GraphError(f"dependency cycle: {' -> '.join(cycle)}")
            state[n] = 1
            stack.append(n)
            for d in self.steps[n].deps:
                visit(d, stack)
            stack.pop()
            state[n] = 2
            out.append(n)

        for n in self.steps:
            visit(n, [])
        return out

    def keys(self) -> dict[str, str]:
        """Every step's key (computable before anything runs)."""
        keys: dict[str, str] = {}
        for n in self.order():
            s = self.steps[n]
            keys[n] = step_key(s.config, s.version, {d: keys[d] for d in s.deps})
        return keys

    def ancestors(self, names: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(names)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            if n not in self.steps:
                raise GraphError(f"unknown step {n!r}")
            seen.add(n)
            todo.extend(self.steps[n].deps)
        return seen

    @staticmethod
    def step_dir(run_dir: str | Path, name: str, key: str) -> Path:
        return Path(run_dir) / STEPS_DIR / f"{name}-{key}"

    def status(self, run_dir: str | Path) -> dict[str, str]:
        """``done`` or ``pending`` per step, from the run directory alone (nothing runs)."""
        keys = self.keys()
        return {n: (DONE if read_step_json(self.step_dir(run_dir, n, k)) is not None else PENDING)
                for n, k in keys.items()}

    # -- running -----------------------------------------------------------------------------------------
    def run(self, run_dir: str | Path, *, targets: Iterable[str] | None = None, force: Iterable[str] = (),
            keep_going: bool = True, progress: bool = True, console: Any = None, executor: Any = None) -> RunSummary:
        """Run every step (or only ``targets`` and their ancestors) whose output is not already finished.

        ``force`` reruns the named steps even if finished (their dependents rerun only if their own output is
        missing, since keys do not change). ``keep_going=False`` stops at the first failure. A
        ``KeyboardInterrupt`` inside a step removes its partial output, records ``interrupted`` in
        ``graph.json`` and is re-raised. ``executor`` runs the steps whose inputs are ready
        (:mod:`rlm.core.study.executors`; default: one at a time in this process); the scheduling (caching,
        blocking, pruning, ``graph.json``, progress) is this method's whatever the executor.
        """
        plan, summary = self._plan_run(Path(run_dir).resolve(), targets, set(force))
        run_dir = plan.run_dir
        from rich.console import Console

        console = console or Console(stderr=True)
        log = (lambda msg: console.print(msg, highlight=False)) if progress else (lambda msg: None)
        executor = executor if executor is not None else LocalExecutor()
        with _run_lock(run_dir), _progress(console, progress, len(plan.wanted)) as bar:
            (run_dir / STEPS_DIR).mkdir(parents=True, exist_ok=True)
            self._write_graph_json(run_dir, summary)
            executor.start(run_dir)
            try:
                self._schedule(plan, summary, executor, keep_going, log, bar)
            finally:
                executor.close()
            self._write_graph_json(run_dir, summary)
        counts = {k: len(summary.names(k)) for k in (DONE, CACHED, FAILED, BLOCKED)}
        log(f"steps: {counts[DONE]} run, {counts[CACHED]} cached, {counts[FAILED]} failed, {counts[BLOCKED]} blocked"
            f" [dim]({run_dir})[/dim]")
        return summary

    def _schedule(self, plan: _RunPlan, summary: RunSummary, executor: Any, keep_going: bool,
                  log: Callable[[str], None], bar: Any) -> None:
        """Hand every step whose inputs are ready to ``executor`` (costliest path to the end first, as many as
        it takes at once) and record what comes back, until nothing is left to run."""
        rank = self.path_costs(plan.order, plan.dependents)
        # longest path first; ties (and all-zero costs) keep graph order, and a step never precedes its deps
        todo = sorted((n for n in plan.order if summary.steps[n].status == PENDING), key=lambda n: -rank[n])
        running: set[str] = set()
        stop = False
        while todo or running:
            if stop:
                for n in todo:
                    summary.steps[n].status = BLOCKED
                todo = []
            else:
                todo = self._dispatch(todo, running, plan, summary, executor, log, bar)
            if not running:
                continue
            try:
                outcomes = executor.wait()
            except KeyboardInterrupt:
                for n in running:
                    summary.steps[n].status = INTERRUPTED
                self._write_graph_json(plan.run_dir, summary)
                raise
            for outcome in outcomes:
                running.discard(outcome.name)
                self._record(outcome, summary, log)
                stop = stop or (outcome.status == FAILED and not keep_going)
                bar.advance()
                self._prune_finished(self.steps[outcome.name].deps, plan.dependents, summary)
            self._write_graph_json(plan.run_dir, summary)

    def _dispatch(self, todo: list[str], running: set[str], plan: _RunPlan, summary: RunSummary, executor: Any,
                  log: Callable[[str], None], bar: Any) -> list[str]:
        """Settle every step of ``todo`` whose dependencies have settled (blocked, cached or submitted to the
        executor while it has room); returns the steps still waiting."""
        waiting: list[str] = []
        for n in todo:
            st, step = summary.steps[n], self.steps[n]
            bad_deps = [d for d in step.deps if summary.steps[d].status in (FAILED, BLOCKED, INTERRUPTED)]
            if bad_deps:
                st.status = BLOCKED
                st.error = f"not run: dependency {bad_deps[0]!r} did not finish"
                log(f"[yellow]-[/yellow] {n} [dim](blocked by {bad_deps[0]})[/dim]")
                bar.advance()
                continue
            if any(summary.steps[d].status not in (DONE, CACHED) for d in step.deps):
                waiting.append(n)
                continue
            final = self.step_dir(plan.run_dir, n, plan.keys[n])
            st.dir = final
            cached = read_step_json(final)
            if cached is not None and n not in plan.force and n not in plan.revive:
                st.status, st.result, st.seconds = CACHED, cached.get("result"), cached.get("seconds")
                bar.advance()
                self._prune_finished(step.deps, plan.dependents, summary)
                continue
            if executor.slots is not None and len(running) >= executor.slots:
                waiting.append(n)
                continue
            inputs = {d: summary.output(d) for d in step.deps}
            executor.submit(StepJob(step=step, key=plan.keys[n], final=final, run_dir=plan.run_dir, inputs=inputs,
                                    log=log if executor.in_process else None))
            running.add(n)
            bar.describe(n if len(running) == 1 else f"{n} (+{len(running) - 1} running)")
        return waiting

    def _record(self, outcome: StepOutcome, summary: RunSummary, log: Callable[[str], None]) -> None:
        """Put an executor's outcome into the summary and say so on the console."""
        st = summary.steps[outcome.name]
        st.status, st.log = outcome.status, outcome.log
        if outcome.status == DONE:
            st.result, st.seconds = outcome.result, outcome.seconds
            log(f"[green]✓[/green] {outcome.name} [dim]{(outcome.seconds or 0.0):.1f}s[/dim]")
            return
        st.error, st.seconds = outcome.error, outcome.seconds
        log(f"[red]✗ {outcome.name}[/red]: {outcome.error}")
        if outcome.log is not None:
            log(f"  [dim]log: {outcome.log}[/dim]")
            for line in _tail(outcome.log, 15):
                log(f"  [dim]| {rich_escape(line)}[/dim]")

    def _plan_run(self, run_dir: Path, targets: Iterable[str] | None, force: set[str]) -> tuple[_RunPlan, RunSummary]:
        """What :meth:`run` will look at: the steps in order with their keys, the wanted ones, their
        dependents, and the pruned ephemeral steps to recompute (only if a wanted dependent has to run)."""
        order = self.order()
        keys = self.keys()
        wanted = self.ancestors(targets) if targets is not None else set(order)
        unknown = force - set(self.steps)
        if unknown:
            raise GraphError(f"--force names unknown step(s): {', '.join(sorted(unknown))}")
        summary = RunSummary(run_dir=run_dir)
        for n in order:
            summary.steps[n] = StepStatus(name=n, key=keys[n], status=PENDING if n in wanted else SKIPPED)
        dependents = self.dependents(order, wanted)
        finished = {n: read_step_json(self.step_dir(run_dir, n, keys[n])) for n in order}
        must_run = {n for n in wanted if finished[n] is None or n in force}
        revive = {n for n in wanted if self.steps[n].ephemeral and (finished[n] or {}).get("pruned")
                  and any(c in must_run for c in dependents[n])}
        return _RunPlan(run_dir, order, keys, wanted, force, dependents, revive), summary

    def _prune_finished(self, names: Iterable[str], dependents: Mapping[str, list[str]], summary: RunSummary) -> None:
        """Delete the output files of ephemeral steps among ``names`` whose dependents have all finished."""
        for d in names:
            st = summary.steps[d]
            if (not self.steps[d].ephemeral or st.dir is None or st.status not in (DONE, CACHED)
                    or not all(summary.steps[c].status in (DONE, CACHED) for c in dependents[d])):
                continue
            record = read_step_json(st.dir)
            if record is None or record.get("pruned"):
                continue
            for child in st.dir.iterdir():
                if child.name != STEP_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            atomic_write_json(st.dir / STEP_FILE, {**record, "pruned": True})

    def _write_graph_json(self, run_dir: Path, summary: RunSummary) -> None:
        data = {"updated": _now(), "ok": summary.ok,
                "steps": [{**s.as_dict(), "kind": self.steps[n].kind, "deps": list(self.steps[n].deps)}
                          for n, s in summary.steps.items()]}
        atomic_write_json(run_dir / GRAPH_FILE, data)


def execute_step(job: StepJob, log: Callable[[str], None] = print) -> tuple[Any, float]:
    """Run one step into its final directory (the same in every executor): remove what an interrupted
    attempt left, call the function on a temporary directory, write ``step.json`` and rename it into place.
    A failure writes ``NAME-KEY.failed.json`` (error, traceback) and re-raises. Returns (result, seconds)."""
    step, key, final, run_dir, inputs = job.step, job.key, job.final, job.run_dir, job.inputs
    _remove_leftovers(final)
    failed_file = final.with_name(final.name + ".failed.json")
    t0 = time.perf_counter()
    record = {"name": step.name, "kind": step.kind, "key": key, "version": step.version,
              "config": step.config, "inputs": {d: {"key": o.key, "dir": _rel(o.dir, run_dir)} for d, o in inputs.items()},
              "started": _now()}
    try:
        with atomic_dir(final, overwrite=True) as tmp:
            ctx = StepContext(name=step.name, key=key, config=step.config, out=tmp, final_dir=final,
                              run_dir=run_dir, inputs=inputs, log=job.log or log)
            result = step.fn(ctx)
            seconds = time.perf_counter() - t0
            record.update(status=DONE, finished=_now(), seconds=round(seconds, 3), result=_plain_result(result))
            atomic_write_json(tmp / STEP_FILE, record)
    except Exception as exc:
        record.update(status=FAILED, finished=_now(), seconds=round(time.perf_counter() - t0, 3),
                      error=error_line(exc), traceback=traceback.format_exc())
        atomic_write_json(failed_file, record)
        raise
    with contextlib.suppress(FileNotFoundError):
        failed_file.unlink()
    shutil.rmtree(run_dir / STEPS_DIR / WORK_DIR / final.name, ignore_errors=True)
    return record["result"], record["seconds"]


def error_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, as step failures are reported."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` non-empty lines of a text file (none when it is unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _plain_result(result: Any) -> Any:
    try:
        plain = _plain(result)
        json.dumps(plain, allow_nan=True)
    except (GraphError, TypeError, ValueError) as exc:
        raise GraphError(f"a step function must return JSON-serialisable data (or None): {exc}") from None
    return plain


def _remove_leftovers(final: Path) -> None:
    """Remove what an interrupted earlier attempt left beside ``final``: atomic_dir's ``.NAME.*.partial``
    temporary directories, ``.NAME.old-PID`` directories, and a final directory without a finished
    ``step.json`` (never produced by this runner, but possible after manual edits)."""
    parent = final.parent
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(f".{final.name}.") and (p.name.endswith(".partial") or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
    if final.exists() and read_step_json(final) is None:
        shutil.rmtree(final) if final.is_dir() else final.unlink()


class _NoBar:
    def advance(self) -> None:
        pass

    def describe(self, name: str) -> None:
        pass


class _Bar:
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self) -> None:
        self.progress.update(self.task, advance=1, description="steps")

    def describe(self, name: str) -> None:
        self.progress.update(self.task, description=name)


@contextlib.contextmanager
def _progress(console: Any, enabled: bool, total: int) -> Iterator[Any]:
    if not enabled:
        yield _NoBar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as prog:
        yield _Bar(prog, prog.add_task("steps", total=total))


def stale_step_dirs(graph: Graph, run_dir: str | Path) -> list[Path]:
    """Finished step directories under ``RUN/steps`` that no step of ``graph`` uses any more (older configs);
    callers may delete them to reclaim space."""
    keep = {f"{n}-{k}" for n, k in graph.keys().items()}
    root = Path(run_dir) / STEPS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in keep)


class LocalExecutor:
    """One step at a time, in this process (``--executor local``)."""

    slots: int | None = 1
    in_process = True

    def __init__(self) -> None:
        self._queue: list[StepJob] = []

    def start(self, run_dir: Path) -> None:
        self._queue = []

    def submit(self, job: StepJob) -> None:
        self._queue.append(job)

    def wait(self) -> list[StepOutcome]:
        job = self._queue.pop(0)
        name = job.step.name
        try:
            result, seconds = execute_step(job)
        except Exception as exc:  # noqa: BLE001 - a failing step is an outcome; the graph goes on
            return [StepOutcome(name, FAILED, error=error_line(exc))]
        return [StepOutcome(name, DONE, result=result, seconds=seconds)]

    def close(self) -> None:
        self._queue = []
