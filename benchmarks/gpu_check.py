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

It prints one Markdown table (seconds and peak GPU memory per phase) and, with ``--json FILE``, the same rows
as JSON. Without a CUDA device it prints that it skipped and exits 0 (``--allow-cpu`` runs the chain on the
CPU anyway, which the test suite does to keep this script working).

    python benchmarks/gpu_check.py [--model DIR ...] [--steps 3] [--eval-limit 32] [--json FILE] [--allow-cpu]
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


def _phase(rows: list[dict[str, Any]], model: str, name: str, cuda: bool, fn: Callable[[], None]) -> None:
    """Run ``fn`` as phase ``name`` and record its time and peak GPU memory; a failure is recorded, not raised,
    so the other phases still report."""
    _peak_reset(cuda)
    t0 = time.perf_counter()
    error = None
    try:
        fn()
    except SystemExit as exc:
        error = None if exc.code in (0, None) else f"exit {exc.code}"
    except Exception as exc:  # a readiness check reports every failure
        error = f"{type(exc).__name__}: {exc}"
    rows.append({"model": model, "phase": name, "seconds": round(time.perf_counter() - t0, 2),
                 "peak_gpu_gib": _peak_gib(cuda), "error": error})
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


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for pkg in ("transformers", "accelerate", "peft"):
        try:
            env[pkg] = __import__(pkg).__version__
        except ImportError:
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
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        print("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    models = ["tiny", *a.model, *[m for m in os.environ.get("RLM_GPU_CHECK_MODELS", "").split(":") if m]]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="rlm-gpu-check-"))
    rows: list[dict[str, Any]] = []
    for i, model in enumerate(models):
        rows += check_model(model, work / f"m{i}", a, cuda)
    env = environment()
    print(json.dumps(env))
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
