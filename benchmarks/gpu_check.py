"""GPU readiness check: the training, evaluation, merging and conflicts chain on a CUDA device, with timings
and peak GPU memory.

For each model (the ``tiny`` preset, and every ``--model DIR`` given, e.g. a local SmolLM2-135M-Instruct
copy; ``$RLM_GPU_CHECK_MODELS`` adds more, colon-separated) it runs, through rlm's own CLI in this process:

1. ``train-grpo``: 3 GRPO steps in ``bf16-mixed`` (fp32 master weights, bf16 autocast) on the generated math
   task, saved in bf16;
2. ``train-sft``: 3 SFT steps in ``bf16-mixed`` (the second expert);
3. ``eval``: greedy evaluation of the GRPO expert on ``--eval-limit`` math examples;
4. ``merge``: task arithmetic of the two experts onto the model, on the device (``rlm merge --device``);
5. ``conflicts``: every default metric of the two experts;
6. on a CUDA device, ``merge-gpu-vs-cpu``: TIES and DARE-TIES (paper settings) on the GPU and on the CPU, which
   must agree within float rounding (the DARE masks are the same seeded CPU draws).

Then, only where a CUDA device and an importable ``vllm`` are both present (otherwise it prints why it skipped),
the vLLM section, through rlm's own generation backends:

7. ``vllm-throughput-hf`` / ``vllm-throughput-vllm``: the same ``--vllm-prompts`` math prompts, sampled once each
   (temperature 1) with the same ``--vllm-max-new-tokens``, in bfloat16 by the ``hf`` backend and by the ``vllm``
   backend; generated tokens per second of each and the vLLM / HF ratio;
8. ``grpo-vllm-step``: one GRPO step in ``bf16-mixed`` with rollouts from the ``vllm`` backend
   (``generation.backend=vllm``, the engine taking ``--vllm-memory`` of the GPU): its time, the logged
   |Δ log p| between the engine's and the trainer's log-probs (mean and max), the mean importance ratio, and the
   relative difference of the engine's and the policy's weights checksums after the push (within
   ``generation.checksum_rtol`` or the step fails).

It prints one Markdown table (seconds and peak GPU memory per phase), the vLLM numbers, and, with ``--json FILE``,
the same rows as JSON. Without a CUDA device it prints that it skipped and exits 0 (``--allow-cpu`` runs the chain
on the CPU anyway, which the test suite does to keep this script working; the vLLM section still needs CUDA).

    python benchmarks/gpu_check.py [--model DIR ...] [--steps 3] [--eval-limit 32] [--json FILE] [--allow-cpu]
                                   [--vllm-only] [--vllm-prompts 64] [--vllm-max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def _peak_reset(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(cuda: bool) -> float | None:
    if not cuda:
        return None
    import torch

    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def _phase(rows: list[dict[str, Any]], model: str, name: str, cuda: bool, fn: Callable[[], Any]) -> None:
    """Run ``fn`` as phase ``name`` and record its time and peak GPU memory (and what it returns, when a dict, as
    ``detail``); a failure is recorded, not raised, so the other phases still report."""
    _peak_reset(cuda)
    t0 = time.perf_counter()
    error, detail = None, None
    try:
        detail = fn()
    except SystemExit as exc:
        error = None if exc.code in (0, None) else f"exit {exc.code}"
    except Exception as exc:  # a readiness check reports every failure
        error = f"{type(exc).__name__}: {exc}"
    rows.append({"model": model, "phase": name, "seconds": round(time.perf_counter() - t0, 2),
                 "peak_gpu_gib": _peak_gib(cuda), "error": error})
    if isinstance(detail, dict):
        rows[-1]["detail"] = detail
    status = "ok" if error is None else f"FAILED ({error})"
    print(f"{model} {name}: {rows[-1]['seconds']} s {status}", file=sys.stderr, flush=True)


def check_model(model: str, work: Path, a: argparse.Namespace, cuda: bool) -> list[dict[str, Any]]:
    """The five phases on ``model``; outputs under ``work``."""
    from rlm.core.cli import main

    def cli(*args: Any) -> None:
        main([str(x) for x in args])

    rows: list[dict[str, Any]] = []
    common = ["--task", "math", "--model", model, "--steps", a.steps, "--no-progress",
              "--set", "precision=bf16-mixed", "--set", "save_dtype=bfloat16"]
    grpo, sft = work / "grpo", work / "sft"
    _phase(rows, model, "train-grpo", cuda, lambda: cli(
        "train", "--trainer", "grpo", *common, "--out", grpo, "--set", f"prompts_per_step={a.prompts}",
        "--set", "group_size=8", "--set", f"max_new_tokens={a.max_new_tokens}"))
    _phase(rows, model, "train-sft", cuda, lambda: cli(
        "train", "--trainer", "sft", *common, "--out", sft, "--set", "batch_size=16"))
    device = "cuda" if cuda else "cpu"
    _phase(rows, model, "eval", cuda, lambda: cli(
        "eval", "--model", grpo / "final", "--task", "math", "--limit", a.eval_limit, "--device", device,
        "--max-new-tokens", a.max_new_tokens, "--out", work / "eval", "--no-progress"))
    _phase(rows, model, "merge", cuda, lambda: cli(
        "merge", "--method", "task_arithmetic", "--base", model, "--models", f"{grpo / 'final'},{sft / 'final'}",
        "--device", device, "--out", work / "merged"))
    _phase(rows, model, "conflicts", cuda, lambda: cli(
        "conflicts", "--base", model, "--models", f"grpo={grpo / 'final'},sft={sft / 'final'}",
        "--out", work / "conflicts"))
    if cuda:
        _phase(rows, model, "merge-gpu-vs-cpu", cuda, lambda: compare_device_merges(
            cli, model, f"{grpo / 'final'},{sft / 'final'}", work))
    return rows


def compare_device_merges(cli: Callable[..., None], model: str, experts: str, work: Path) -> None:
    """TIES and DARE-TIES merges on ``cuda`` and on the CPU; raises when any tensor differs by more than float
    rounding (1e-5 relative, or two steps of a 16-bit output dtype)."""
    import torch

    from rlm.core.models.reader import ModelReader

    for method in ("ties", "dare_ties"):
        outs = {dev: work / f"merged-{method}-{dev}" for dev in ("cuda", "cpu")}
        for dev, out in outs.items():
            cli("merge", "--method", method, "--preset", "paper", "--base", model, "--models", experts,
                "--device", dev, "--out", out)
        gpu, cpu = ModelReader(outs["cuda"]), ModelReader(outs["cpu"])
        worst = 0.0
        for name in cpu.tensor_names():
            x, y = gpu.get(name).double(), cpu.get(name).double()
            step = 1e-5 if cpu.dtype(name) in (torch.float32, torch.float64) else 2 * torch.finfo(cpu.dtype(name)).eps
            excess = float(((x - y).abs() / (step * (1 + y.abs()))).max()) if y.numel() else 0.0
            worst = max(worst, excess)
            if excess > 1:
                raise AssertionError(f"{method}: tensor {name} differs between cuda and cpu by "
                                     f"{float((x - y).abs().max()):.3g}")
        print(f"{model} {method}: cuda vs cpu within {worst:.3f} of the rounding bound", file=sys.stderr)


# -- the vLLM section --------------------------------------------------------------------------------------------

def vllm_skip_reason() -> str | None:
    """Why the vLLM section cannot run here, or ``None``: it needs a CUDA device and an importable ``vllm``."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a vllm built for another torch / CUDA failing at import
        return f"vllm is not importable ({type(exc).__name__}: {exc}); pip install 'rlm[vllm]'"
    return None


def _free_accelerator() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def throughput(backend: Any, prompts: list[str], max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Generated tokens per second of ``backend`` sampling each prompt once (temperature 1, seed 0), after a short
    warm-up call (kernels, CUDA graphs)."""
    import torch

    from rlm.core.contracts import SamplingParams

    backend.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, batch_size=batch_size, seed=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gens = backend.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(len(g.completion_ids) for g in gens)
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "tokens": tokens,
            "seconds": round(seconds, 6), "tokens_per_s": round(tokens / seconds, 1)}


def check_vllm(model: str, work: Path, a: argparse.Namespace, cuda: bool,
               device: str = "cuda") -> list[dict[str, Any]]:
    """The vLLM section on ``model``: the two throughput phases and one GRPO step with vLLM rollouts."""
    from rlm.core.cli import main
    from rlm.core.eval.engine import load_task
    from rlm.core.eval.generation import chat_prompt
    from rlm.core.models.hf import load_tokenizer, resolve_model
    from rlm.core.plugins import get_plugin

    path = resolve_model(model)
    tok = load_tokenizer(path)
    examples = load_task("math", limit=a.vllm_prompts).examples
    prompts = [chat_prompt(tok, ex.prompt) for ex in examples]
    rows: list[dict[str, Any]] = []

    def measure(name: str, **load: Any) -> dict[str, Any]:
        backend = get_plugin("generation_backend", name).load(path, dtype="bfloat16", **load)
        try:
            return throughput(backend, prompts, a.vllm_max_new_tokens, batch_size=a.vllm_prompts)
        finally:
            del backend
            _free_accelerator()

    _phase(rows, model, "vllm-throughput-hf", cuda, lambda: measure("hf", device=device))
    _phase(rows, model, "vllm-throughput-vllm", cuda, lambda: measure(
        "vllm", config={"gpu_memory_utilization": a.vllm_memory}))
    out = work / "grpo-vllm"

    def grpo_step() -> dict[str, Any]:
        rc = main([str(x) for x in (
            "train", "--trainer", "grpo", "--task", "math", "--model", model, "--steps", 1, "--no-progress",
            "--out", out, "--set", "precision=bf16-mixed", "--set", f"prompts_per_step={a.prompts}",
            "--set", "group_size=8", "--set", f"max_new_tokens={a.max_new_tokens}",
            "--set", "generation.backend=vllm", "--set", "generation.dtype=bfloat16",
            "--set", f"generation.config.gpu_memory_utilization={a.vllm_memory}")])
        if rc:
            raise RuntimeError(f"rlm train exited {rc}")
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        keys = ("gen_time", "rollout_logp_diff_mean", "rollout_logp_diff_max", "rollout_ratio_mean",
                "rollout_checksum_rel_diff")
        return {k: row.get(k) for k in keys}

    _phase(rows, model, "grpo-vllm-step", cuda, grpo_step)
    _free_accelerator()
    return rows


def vllm_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model for the vLLM phases: HF and vLLM tokens/s and their ratio; the GRPO step's numbers."""
    lines = []
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["phase"].startswith(("vllm-", "grpo-vllm")) and r.get("detail"):
            by_model.setdefault(r["model"], {})[r["phase"]] = r
    for model, phases in by_model.items():
        hf, vl = (phases.get(f"vllm-throughput-{b}", {}).get("detail") for b in ("hf", "vllm"))
        if hf and vl:
            ratio = vl["tokens_per_s"] / hf["tokens_per_s"] if hf["tokens_per_s"] else float("nan")
            lines.append(f"{model} generation, {hf['prompts']} prompts x {hf['max_new_tokens']} max new tokens, "
                         f"bf16: hf {hf['tokens_per_s']} tok/s, vllm {vl['tokens_per_s']} tok/s, "
                         f"vllm/hf {ratio:.2f}x")
        step = phases.get("grpo-vllm-step")
        if step:
            d = step["detail"]
            lines.append(f"{model} GRPO step with vLLM rollouts: {step['seconds']} s (generation {d['gen_time']} s); "
                         f"|d log p| mean {d['rollout_logp_diff_mean']} max {d['rollout_logp_diff_max']}; "
                         f"importance ratio mean {d['rollout_ratio_mean']}; weights checksum relative difference "
                         f"{d['rollout_checksum_rel_diff']} (beyond generation.checksum_rtol the step fails)")
    return lines


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for pkg in ("transformers", "accelerate", "peft", "vllm"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:  # not installed, or (vllm) not importable with this torch
            env[pkg] = None
    return env


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | phase | s | peak GPU GiB | status |", "|---|---|---:|---:|---|"]
    for r in rows:
        peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        lines.append(f"| {r['model']} | {r['phase']} | {r['seconds']:.2f} | {peak} | {r['error'] or 'ok'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="a local model directory (repeatable)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step (× 8 samples)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA device")
    ap.add_argument("--vllm-only", action="store_true", help="skip the chain, run only the vLLM section")
    ap.add_argument("--vllm-prompts", type=int, default=64, help="prompts of the throughput comparison")
    ap.add_argument("--vllm-max-new-tokens", type=int, default=256)
    ap.add_argument("--vllm-memory", type=float, default=0.3, help="the vLLM engine's gpu_memory_utilization")
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    vllm_reason = vllm_skip_reason()
    if not cuda and not a.allow_cpu:
        print("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False)")
        print(f"gpu_check vllm: skipped: {vllm_reason}")
        return 0
    models = ["tiny", *a.model, *[m for m in os.environ.get("RLM_GPU_CHECK_MODELS", "").split(":") if m]]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="rlm-gpu-check-"))
    rows: list[dict[str, Any]] = []
    for i, model in enumerate(models):
        if not a.vllm_only:
            rows += check_model(model, work / f"m{i}", a, cuda)
        if vllm_reason is None:
            rows += check_vllm(model, work / f"m{i}", a, cuda)
    env = environment()
    print(json.dumps(env))
    print(markdown(rows))
    if vllm_reason is None:
        print("\n".join(vllm_summary(rows)))
    else:
        print(f"gpu_check vllm: skipped: {vllm_reason}")
    if a.json:
        a.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
