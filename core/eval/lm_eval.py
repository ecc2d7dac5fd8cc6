"""The lm-evaluation-harness bridge behind ``rlm eval --harness lm-eval``: runs lm-eval's ``hf`` model (or, with
``--backend vllm``, its ``vllm`` model) on a model and writes the result in rlm's output layout (``summary.json`` as ``{"lm-eval:TASK": {"METRIC,FILTER":
value, ..., "n": count}}``, lm-eval's own ``lm_eval_results.json`` and ``manifest.json``), reading gsm8k and
IFEval from local files when the shared data folder holds them (offline runs).

Used by ``rlm eval`` (:mod:`rlm.core.cli.eval`) and ``benchmarks/eval_bench.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError

#: lm-eval task -> (its YAML under lm_eval/tasks, {split: local file name in the shared data folder})
LM_EVAL_LOCAL = {
    "gsm8k": ("gsm8k/gsm8k.yaml", {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"}),
    "ifeval": ("ifeval/ifeval.yaml", {"train": "ifeval_input_data.jsonl"}),
}

#: rlm generation backend -> lm-eval model type
LM_EVAL_MODELS = {"hf": "hf", "transformers": "hf", "vllm": "vllm"}

#: the parts of lm-eval's result kept in ``lm_eval_results.json``
KEPT_RESULTS = ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better")


def lm_eval_local_tasks(tasks: list[str], data_dir: str | Path | None, work: Path) -> tuple[list[str], str | None]:
    """Point lm-eval tasks at local files: for each task with known local files present in ``data_dir``,
    write a YAML that includes lm-eval's own task config and replaces only the dataset
    (``dataset_path: json`` with ``data_files``). Returns the task names to run and the include path."""
    import lm_eval

    if data_dir is None:
        return tasks, None
    root = Path(lm_eval.__file__).parent / "tasks"
    names = []
    wrote = False
    for t in tasks:
        spec = LM_EVAL_LOCAL.get(t)
        files = {s: Path(data_dir) / f for s, f in spec[1].items()} if spec else {}
        if not spec or not all(p.is_file() for p in files.values()):
            names.append(t)
            continue
        import yaml

        cfg = {"include": str(root / spec[0]), "task": f"{t}_rlm_local", "tag": [], "dataset_path": "json",
               "dataset_name": None, "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()}}}
        (work / f"{t}_rlm_local.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        names.append(f"{t}_rlm_local")
        wrote = True
    return names, (str(work) if wrote else None)


def _model_args(model_path: str, dtype: str = "float32", backend: str = "hf", extra: str | None = None) -> str:
    """lm-eval's model arguments: the model in ``dtype``, or for a LoRA adapter directory without a merged model
    (``hf`` only) its base with ``peft=`` the adapter; then ``extra`` (``--model-args k=v,...``) appended, so a
    key given there wins."""
    from rlm.core.eval.generation import DTYPES
    from rlm.core.models.lora import adapter_base, is_adapter_only

    if str(dtype).lower() not in DTYPES:
        raise RlmError(f"unknown dtype {dtype!r} (dtypes: float32, bfloat16, float16, auto)")
    dtype = DTYPES[str(dtype).lower()]
    p = Path(model_path)
    if is_adapter_only(p):
        if backend == "vllm":
            raise RlmError(f"{model_path}: a LoRA adapter without a merged model; lm-eval's vllm model needs a full "
                           "model directory (the run's final/merged/)")
        from rlm.core.models.hf import resolve_model

        args = f"pretrained={resolve_model(adapter_base(p))},peft={p},dtype={dtype}"
    else:
        args = f"pretrained={model_path},dtype={dtype}"
    return f"{args},{extra.strip(',')}" if extra and extra.strip(",") else args


def _gen_kwargs(max_new_tokens: int | None, extra: str | None) -> str | None:
    """lm-eval's ``gen_kwargs``: ``max_gen_toks`` from ``--max-new-tokens`` unless ``--gen-kwargs`` sets it, then
    ``--gen-kwargs`` as given."""
    parts = [x.strip() for x in (extra or "").split(",") if x.strip()]
    if max_new_tokens is not None and not any(x.split("=", 1)[0].strip() == "max_gen_toks" for x in parts):
        parts.insert(0, f"max_gen_toks={max_new_tokens}")
    return ",".join(parts) or None


def lm_eval_model(backend: str) -> str:
    """The lm-eval model type for an rlm generation backend name."""
    try:
        return LM_EVAL_MODELS[backend]
    except KeyError:
        raise RlmError(f"--harness lm-eval runs backends {', '.join(sorted(set(LM_EVAL_MODELS)))}; "
                       f"got --backend {backend!r}") from None


def _simple_evaluate(model_path: str, tasks: list[str], data_dir: str | Path | None, *, limit: int | None,
                     batch_size: int, max_new_tokens: int | None, num_fewshot: int | None,
                     apply_chat_template: bool, device: str, model: str = "hf", model_args: str | None = None,
                     gen_kwargs: str | None = None,
                     system_instruction: str | None = None) -> tuple[dict[str, Any], list[str], float]:
    """lm-eval's ``simple_evaluate`` on its ``model`` (``hf`` or ``vllm``) with ``model_args``; returns its result, the lm-eval task names it
    ran (local variants where files exist) and the wall time. A failure inside lm-eval is one :class:`RlmError`
    line."""
    import tempfile

    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - lm-eval is a dependency
        raise RlmError(f"lm-evaluation-harness is not installed: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="rlm-lmeval-") as work:
        names, include = lm_eval_local_tasks(tasks, data_dir, Path(work))
        tm = TaskManager(include_path=include) if include else TaskManager()
        kwargs: dict[str, Any] = dict(model=model, model_args=model_args or _model_args(model_path),
                                      tasks=names, batch_size=batch_size, limit=limit, device=device,
                                      task_manager=tm, apply_chat_template=apply_chat_template,
                                      log_samples=False)
        if num_fewshot is not None:
            kwargs["num_fewshot"] = num_fewshot
        gen = gen_kwargs if gen_kwargs is not None else _gen_kwargs(max_new_tokens, None)
        if gen:
            kwargs["gen_kwargs"] = gen
        if system_instruction is not None:
            kwargs["system_instruction"] = system_instruction
        t0 = time.perf_counter()
        try:
            res = simple_evaluate(**kwargs)
        except Exception as exc:
            raise RlmError(f"lm-eval failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
                from exc
        return res, names, time.perf_counter() - t0


def lm_eval_summary(res: dict[str, Any], names: list[str], tasks: list[str]) -> dict[str, Any]:
    """rlm's summary of an lm-eval result: ``{"lm-eval:TASK": {"METRIC,FILTER": value, ..., "n": count}}`` (no
    stderr entries); ``names`` are the lm-eval task names run for ``tasks``, in the same order."""
    summary: dict[str, Any] = {}
    for name, t in zip(names, tasks):
        metrics = res["results"].get(name, {})
        n = res.get("n-samples", {}).get(name, {}).get("effective")
        entry = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and "," in k and "_stderr" not in k}
        summary[f"lm-eval:{t}"] = {**entry, "n": n}
    return summary


def run_lm_eval(model: str, tasks: list[str], out: str | Path, *, limit: int | None = None, batch_size: int = 16,
                max_new_tokens: int | None = None, num_fewshot: int | None = None, data_dir: str | Path | None = None,
                apply_chat_template: bool = False, device: str | None = None,
                overwrite: bool = False, backend: str = "hf", dtype: str = "float32", model_args: str | None = None,
                gen_kwargs: str | None = None, system_instruction: str | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness (its ``hf`` model, or ``vllm`` with ``backend="vllm"``) on ``model``; returns and writes a summary in rlm's layout
    (``{"lm-eval:TASK": {"METRIC,FILTER": value, ..., "n": count}}``) plus lm-eval's full results."""
    from rlm.core.eval.engine import default_device
    from rlm.core.io.atomic import atomic_dir, atomic_write_json, prepare_output_dir
    from rlm.core.io.manifest import write_manifest
    from rlm.core.io.records import shared_data_dir
    from rlm.core.models.hf import resolve_model

    prepare_output_dir(out, overwrite)
    if not tasks:
        raise RlmError("give lm-eval tasks with --tasks, e.g. --tasks gsm8k,ifeval")
    model_path = resolve_model(model)
    if data_dir is None:
        data_dir = shared_data_dir()
    if "ifeval" in tasks:
        from rlm.core.eval.nltk_data import ensure_punkt_tab

        ensure_punkt_tab()
    if device is None:
        device = default_device()
    lm_model = lm_eval_model(backend)
    args = _model_args(str(model_path), dtype, lm_model, model_args)
    gen = _gen_kwargs(max_new_tokens, gen_kwargs)
    res, names, wall = _simple_evaluate(model_path, tasks, data_dir, limit=limit, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, num_fewshot=num_fewshot,
                                        apply_chat_template=apply_chat_template, device=device, model=lm_model,
                                        model_args=args, gen_kwargs=gen, system_instruction=system_instruction)
    summary = lm_eval_summary(res, names, tasks)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write_json(tmp / "lm_eval_results.json", {k: v for k, v in res.items() if k in KEPT_RESULTS})
        write_manifest(tmp, command=list(sys.argv), config={"harness": "lm-eval", "tasks": tasks, "limit": limit,
                                                            "batch_size": batch_size, "num_fewshot": num_fewshot,
                                                            "max_new_tokens": max_new_tokens, "device": device,
                                                            "model": lm_model, "model_args": args,
                                                            "gen_kwargs": gen,
                                                            "system_instruction": system_instruction},
                       inputs={"model": model_path}, extra={"wall_seconds": wall, "lm_eval_tasks": names})
    return summary
