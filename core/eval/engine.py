"""The evaluation engine behind ``rlm eval`` and ``rlm score``: any registered Task, through its contract.

Output directory layout (written atomically, with ``manifest.json``)::

    summary.json    {"TASK[:SUBSET]": {"METRIC": value, ..., "n": count}, ...}
    records.jsonl   one line per example: task, id, prompt, completion, scores (+ finish_reason, tokens)
    errors.jsonl    (``rlm score`` only, when there were any) lines that could not be matched or read

``evaluate`` generates through a registered generation backend (``hf`` by default; greedy unless sampling is
asked for, then pass@k by :mod:`rlm.core.eval.pass_at_k`) and scores
with ``Task.score_batch``/``Task.metrics``; ``score_completions`` does the same for given completions. Used by
``rlm eval`` and ``rlm score`` (:mod:`rlm.core.cli.eval`); ``load_task`` also by the study's evaluation steps.
``rlm eval --harness lm-eval`` goes through the lm-evaluation-harness bridge, :mod:`rlm.core.eval.lm_eval`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlm.core.contracts import Example, Task
from rlm.core.errors import RlmError

#: fields of a completions line that may carry the example's id, tried in this order
ID_FIELDS = ("task_id", "id", "key", "prompt")


@dataclass
class TaskRun:
    """A task plugin instance with the examples loaded for one run; ``label`` is ``NAME`` or ``NAME:SUBSET``."""

    label: str
    task: Task
    subset: str | None
    examples: list[Example]


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """``TASK`` or ``TASK:SUBSET`` -> ``(task, subset or None)``."""
    name, _, subset = spec.partition(":")
    if not name:
        raise RlmError(f"empty task name in {spec!r} (expected TASK or TASK:SUBSET)")
    return name, subset or None


def load_task(spec: str, *, data: str | None = None, limit: int | None = None, split: str = "test",
              seed: int = 0, config: dict[str, Any] | None = None) -> TaskRun:
    """Instantiate the task plugin named in ``spec`` and load its examples."""
    from rlm.core.plugins import make_task

    name, subset = parse_task_spec(spec)
    task = make_task(name, config, f"task config of {name!r}")
    subset = task.check_subset(subset)
    task.check_data(subset, data)
    if limit is not None and limit < 1:
        raise RlmError(f"--limit must be >= 1, got {limit}")
    examples = task.examples(subset, split=split, limit=limit, seed=seed, path=data)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise RlmError(f"task {spec!r} has no examples" + (f" in {data}" if data else ""))
    label = f"{task.name}:{subset}" if subset else task.name
    return TaskRun(label, task, subset, examples)


def assign_data(tasks: list[str], data: list[str]) -> dict[str, str | None]:
    """``--data PATH`` (one task) or ``--data TASK[:SUBSET]=PATH`` (any number) -> path per task spec."""
    out: dict[str, str | None] = {t: None for t in tasks}
    for d in data:
        key, sep, path = d.partition("=")
        if sep and key in out:
            out[key] = path
        elif len(tasks) == 1 and not (sep and ":" in key and not Path(d).exists()):
            out[tasks[0]] = d
        else:
            raise RlmError(f"--data {d!r}: with several tasks use --data TASK[:SUBSET]=PATH "
                           f"(tasks: {', '.join(tasks)})")
    return out


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu`` (also the lm-eval bridge's default)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _summary_entry(task: Task, scores: list[dict[str, Any]]) -> dict[str, Any]:
    metrics = task.metrics(scores)
    return {**{k: float(v) for k, v in metrics.items()}, "n": len(scores)}


def _write_run(out: Path, summary: dict[str, Any], records: list[dict[str, Any]], *, overwrite: bool,
               manifest: dict[str, Any], errors: list[dict[str, Any]] | None = None) -> Path:
    from rlm.core.io.atomic import atomic_dir, atomic_write_json, atomic_write_text
    from rlm.core.io.manifest import write_manifest

    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write_text(tmp / "records.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
        if errors:
            atomic_write_text(tmp / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
        write_manifest(tmp, **manifest)
    return out


@dataclass
class Decoding:
    """How ``rlm eval`` generates: the backend, its weights' dtype and config, sampling and prompt settings."""

    backend: str = "hf"
    dtype: str = "float32"
    backend_config: dict[str, Any] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    pass_k: str | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    system_prompt: str | None = None
    chat_template: bool = True

    def check(self) -> list[int]:
        """Refuse contradictory settings; returns the k of pass@k to report."""
        from rlm.core.eval.pass_at_k import parse_ks

        if self.n < 1:
            raise RlmError(f"--n must be >= 1, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise RlmError(f"--n {self.n} with greedy decoding (--temperature 0) repeats one completion; "
                           "give --temperature > 0")
        return parse_ks(self.pass_k, self.n)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


def load_backend(name: str, model_path: str, *, device: str | None, dtype: str,
                 config: dict[str, Any] | None = None) -> Any:
    """The registered generation backend ``name`` built on ``model_path``."""
    from rlm.core.plugins import get_plugin

    cls = get_plugin("generation_backend", name)
    return cls.load(model_path, device=device, dtype=dtype, config=config)


def _prompt(tok: Any, run: TaskRun, text: str, decoding: Decoding) -> str:
    from rlm.core.eval.generation import chat_prompt

    system = decoding.system_prompt if decoding.system_prompt is not None else run.task.system_prompt
    if decoding.chat_template:
        return chat_prompt(tok, text, system=system)
    return f"{system}\n\n{text}\n" if system else f"{text}\n"


def binary_keys(scores: list[dict[str, Any]]) -> list[str]:
    """Score keys whose every value is 0 or 1 (pass/fail verdicts): the ones pass@k is reported for."""
    keys = [k for k, v in scores[0].items() if isinstance(v, (bool, int, float))] if scores else []
    return [k for k in keys if all(s.get(k) in (0, 1, True, False) for s in scores)]


def _sampled_summary(task: Task, scores: list[dict[str, Any]], n_examples: int, n: int,
                     ks: list[int]) -> dict[str, Any]:
    """Metrics over every sample (their mean is pass@1), pass@k of each binary score key, example count."""
    from rlm.core.eval.pass_at_k import mean_pass_at_k

    entry = {**{k: float(v) for k, v in task.metrics(scores).items()}}
    for key in binary_keys(scores):
        correct = [sum(int(bool(s[key])) for s in scores[i * n:(i + 1) * n]) for i in range(n_examples)]
        for k, v in mean_pass_at_k(n, correct, ks).items():
            entry[f"{key}@{k}"] = v
    return {**entry, "n": n_examples, **({"samples_per_example": n} if n > 1 else {})}


def evaluate(model: str, tasks: list[str], out: str | Path, *, data: list[str] | None = None,
             limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 256, seed: int = 0,
             progress: bool = True, overwrite: bool = False, device: str | None = None,
             decoding: Decoding | None = None, task_config: dict[str, dict[str, Any]] | None = None
             ) -> dict[str, Any]:
    """Generate for every task's test examples (greedily unless ``decoding`` says otherwise) and score them;
    returns the summary. ``task_config`` maps a task name to overrides of its plugin config. With
    ``decoding.n > 1`` every example gets ``n`` samples, one record each, and the summary adds pass@k for every k
    of ``decoding.pass_k``."""
    from rlm.core.eval.generation import SamplingParams
    from rlm.core.io.atomic import prepare_output_dir
    from rlm.core.models.hf import resolve_model

    decoding = decoding or Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size)
    ks = decoding.check()
    if not tasks:
        raise RlmError("give at least one --task")
    prepare_output_dir(out, overwrite)
    paths = assign_data(tasks, list(data or []))
    task_config = task_config or {}
    runs = [load_task(t, data=paths[t], limit=limit, seed=seed, config=task_config.get(parse_task_spec(t)[0]))
            for t in tasks]  # fail fast on bad data
    model_path = resolve_model(model)
    if device is None:
        device = default_device()
    backend = load_backend(decoding.backend, str(model_path), device=device, dtype=decoding.dtype,
                           config=decoding.backend_config)
    params = SamplingParams(n=decoding.n, max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
                            top_p=decoding.top_p, batch_size=decoding.batch_size, seed=seed, progress=progress)
    summary: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    timing: dict[str, Any] = {}
    for run in runs:
        prompts = [_prompt(backend.tokenizer, run, ex.prompt, decoding) for ex in run.examples]
        t0 = time.perf_counter()
        gens = backend.generate(prompts, params)
        t1 = time.perf_counter()
        examples = [ex for ex in run.examples for _ in range(decoding.n)]
        scores = run.task.score_batch(examples, [g.text for g in gens], progress=progress)
        t2 = time.perf_counter()
        summary[run.label] = (_summary_entry(run.task, scores) if decoding.n == 1 and not ks
                              else _sampled_summary(run.task, scores, len(run.examples), decoding.n, ks))
        timing[run.label] = {"generation_s": t1 - t0, "scoring_s": t2 - t1,
                             "examples_per_s": len(prompts) / max(t2 - t0, 1e-9)}
        records.extend(_records(run.label, examples, gens, scores, decoding.n))
    _write_run(Path(out), summary, records, overwrite=overwrite,
               manifest=dict(command=list(sys.argv), seed=seed,
                             config={"tasks": tasks, "limit": limit, "batch_size": decoding.batch_size,
                                     "max_new_tokens": decoding.max_new_tokens, "device": device,
                                     "decoding": "greedy" if decoding.temperature == 0 else "sampling",
                                     "generation": decoding.as_dict(), "pass_k": ks,
                                     "task_configs": {r.label: r.task.config.model_dump(mode="json") for r in runs}},
                             inputs={"model": model_path, **{f"data:{t}": p for t, p in paths.items() if p}},
                             extra={"timing": timing}))
    return summary


def _records(label: str, examples: list[Example], gens: list[Any], scores: list[dict[str, Any]],
             n: int) -> list[dict[str, Any]]:
    """One record per completion; with ``n > 1`` each names its sample index."""
    out = []
    for ex, g, s in zip(examples, gens, scores):
        rec = {"task": label, "id": ex.id, "prompt": g.prompt, "completion": g.text, "scores": s,
               "finish_reason": g.finish_reason, "completion_tokens": len(g.completion_ids)}
        if n > 1:
            rec["sample"] = g.sample_index
        out.append(rec)
    return out


def _example_index(examples: list[Example]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, ex in enumerate(examples):
        keys = [ex.id, ex.meta.get("task_id"), ex.meta.get("key"), ex.meta.get("prompt"), ex.prompt]
        for k in keys:
            if k is not None and str(k) not in index:
                index[str(k)] = i
    return index


def read_completions(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], list[dict[str, Any]]]:
    """Lines of a completions JSONL file; unreadable lines become errors (file, line, reason) instead of
    stopping the run. Non-UTF-8 bytes are replaced (and reported)."""
    path = Path(path)
    if not path.is_file():
        raise RlmError(f"completions file not found: {path}")
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = raw.decode("utf-8", errors="replace")
                errors.append({"file": str(path), "line": lineno, "error": f"not UTF-8 ({exc.reason}); "
                               "undecodable bytes replaced with U+FFFD and the line scored"})
            text = text.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                errors.append({"file": str(path), "line": lineno, "error": f"invalid JSON ({exc.msg})"})
                continue
            if not isinstance(obj, dict):
                errors.append({"file": str(path), "line": lineno, "error": "not a JSON object"})
                continue
            rows.append((lineno, obj))
    return rows, errors


def _match_completions(run: TaskRun, rows: list[tuple[int, dict[str, Any]]], errors: list[dict[str, Any]],
                       completions: str | Path) -> dict[int, tuple[int, Any]]:
    """Example index -> (line, completion) for the lines of a completions file whose id names an example of
    ``run``; lines without an id, with an unknown or repeated id, or without a string completion are added to
    ``errors`` (the last ones are still scored, as failures)."""
    index = _example_index(run.examples)
    chosen: dict[int, tuple[int, Any]] = {}
    for lineno, obj in rows:
        key = next((obj[f] for f in ID_FIELDS if f in obj and obj[f] is not None), None)
        if key is None:
            errors.append({"file": str(completions), "line": lineno,
                           "error": f"no id field (one of {', '.join(ID_FIELDS)})"})
            continue
        i = index.get(str(key))
        if i is None:
            import difflib

            close = difflib.get_close_matches(str(key), [e.id for e in run.examples], n=1, cutoff=0.8)
            hint = f"; closest id {close[0]!r}" if close else ""
            errors.append({"file": str(completions), "line": lineno,
                           "error": f"unknown id {str(key)[:80]!r} for task {run.label}{hint}"})
            continue
        if i in chosen:
            errors.append({"file": str(completions), "line": lineno,
                           "error": f"duplicate completion for id {run.examples[i].id!r}; the first (line "
                                    f"{chosen[i][0]}) is scored"})
            continue
        comp = obj.get("completion")
        if comp is None:
            comp = next((obj[f] for f in ("response", "output") if f in obj), None)  # IFEval/evalplus styles
        if not isinstance(comp, str):
            errors.append({"file": str(completions), "line": lineno,
                           "error": "'completion' missing or not a string; scored as a failure"})
            comp = ""
        chosen[i] = (lineno, comp)
    return chosen


def score_completions(task_spec: str, completions: str | Path, out: str | Path, *, data: str | None = None,
                      limit: int | None = None, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Score given completions (no model). Each JSONL line holds an id field (``task_id``, ``id``, ``key`` or
    ``prompt``) and ``completion`` (or ``response``/``output``). Unknown ids and unreadable lines go to
    ``errors.jsonl`` (and a warning); empty or non-string completions are scored (as failures); examples without
    a completion are left out."""
    from rlm.core.io.atomic import prepare_output_dir

    prepare_output_dir(out, overwrite)
    run = load_task(task_spec, data=data, limit=limit)
    rows, errors = read_completions(completions)
    chosen = _match_completions(run, rows, errors, completions)
    if not chosen:
        raise RlmError(f"{completions}: no line matched an example of {run.label} "
                       f"({len(errors)} problem(s); first: {errors[0]['error'] if errors else 'empty file'})")
    order = sorted(chosen)
    exs = [run.examples[i] for i in order]
    comps = [chosen[i][1] for i in order]
    scores = run.task.score_batch(exs, comps, progress=progress)
    summary = {run.label: _summary_entry(run.task, scores)}
    missing = len(run.examples) - len(order)
    records = [{"task": run.label, "id": ex.id, "line": chosen[i][0], "completion": c, "scores": s}
               for i, ex, c, s in zip(order, exs, comps, scores)]
    errors.sort(key=lambda e: e["line"])
    _write_run(Path(out), summary, records, overwrite=overwrite, errors=errors,
               manifest=dict(command=list(sys.argv), config={"task": task_spec, "limit": limit,
                                                             "task_config": run.task.config.model_dump(mode="json")},
                             inputs={"completions": completions, **({"data": data} if data else {})},
                             extra={"problems": len(errors), "examples_without_completion": missing}))
    return summary
