"""Benchmark of ``rlm merge`` against mergekit on the same merges (TIES by default), with the I/O floor and peak RSS.

Generates synthetic HF-layout bf16 Llama-shaped models (a base and N experts, sharded safetensors with an
index and a config.json that mergekit accepts), then for each size runs, each in a fresh subprocess (wall time
and peak RSS from ``os.wait4``):

* ``io_floor``: every input tensor read once (``ModelReader.get``) and one output model written
  (``ShardedWriter``), no arithmetic: what any merge must pay;
* ``rlm``: ``rlm merge --method METHOD --preset paper`` (TIES and DARE-TIES: weight 0.5, density 0.8; task
  arithmetic: weight 1, λ 0.7; fp32 compute, bf16 output), per ``--engines`` entry (``auto``: the fused kernels;
  ``torch``: the torch path; with several, the outputs must be bit-identical, which is reported);
* ``mergekit``: ``mergekit-yaml`` with the same settings (``dtype: float32``, ``out_dtype: bfloat16``), with
  torch's default threads and/or ``OMP_NUM_THREADS=1`` (``--mergekit-threads``); the faster run is compared.

The page cache is warmed by a read pass first, so all three see the inputs in memory. This process imports
neither torch nor rlm (generation and comparison run in helper processes), so a measured child's peak RSS is
its own (Linux starts a forked child's high-water mark from its parent's). The two outputs are
compared (max |diff| and the share of entries that differ, which come from ties at the magnitude cut).

    python benchmarks/merge_bench.py --params 400 200 [--methods ties dare_ties task_arithmetic]
        [--engines auto torch] [--mergekit-threads default 1] [--experts 2] [--workdir DIR] [--keep] [--json FILE]

Prints, per method, the time ratios against mergekit's faster run and against the I/O floor, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, VOCAB, HEADS, KV = 1024, 2816, 32000, 16, 4


def llama_shapes(params_m: float) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A Llama config and its tensor shapes with about ``params_m`` million parameters (depth varies, the
    widths stay fixed, so the largest tensor is the same at every size)."""
    head_dim = HIDDEN // HEADS
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV * head_dim + 3 * HIDDEN * INTER + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, round((params_m * 1e6 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV * head_dim, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    return config, shapes


def write_model(out: Path, config: dict, shapes: dict[str, tuple[int, ...]], seed: int, base: Path | None = None,
                scale: float = 1e-3, shard_bytes: int = 256 * 2**20) -> Path:
    """A sharded bf16 model written tensor by tensor; an expert is the base plus Gaussian noise."""
    import torch

    from rlm.core.models.reader import ModelReader
    from rlm.core.models.writer import ShardedWriter

    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    ref = ModelReader(base) if base is not None else None
    w = ShardedWriter(out, [(n, s, torch.bfloat16) for n, s in shapes.items()], max_shard_bytes=shard_bytes)
    for name, shape in shapes.items():
        if ref is None:
            t = torch.randn(shape, generator=g).mul_(0.02)
            if len(shape) == 1:
                t.add_(1.0)
        else:
            t = ref.get(name).float().add_(torch.randn(shape, generator=g), alpha=scale)
        w.write(name, t.to(torch.bfloat16))
    w.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def generate_models(workdir: str | Path, params_m: float = 400, experts: int = 2) -> tuple[Path, list[Path]]:
    """Write (or reuse) ``base`` and ``expert{i}`` under ``workdir``; returns their paths."""
    workdir = Path(workdir)
    config, shapes = llama_shapes(params_m)
    base = workdir / "base"
    if not (base / "config.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        write_model(base, config, shapes, 0)
    paths = []
    for i in range(experts):
        p = workdir / f"expert{i}"
        if not (p / "config.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
            write_model(p, config, shapes, i + 1, base=base)
        paths.append(p)
    return base, paths


FLOOR_CODE = r"""
import sys, torch
from rlm.core.models.reader import ModelReader
from rlm.core.models.writer import ShardedWriter
base, out, models = sys.argv[1], sys.argv[2], sys.argv[3:]
readers = [ModelReader(p) for p in [base, *models]]
names = readers[0].tensor_names()
w = ShardedWriter(out, [(n, readers[0].shape(n), readers[0].dtype(n)) for n in names])
for n in names:
    ts = [r.get(n) for r in readers]
    w.write(n, ts[0])
w.close()
"""

WARM_CODE = r"""
import sys
from rlm.core.models.reader import ModelReader
for p in sys.argv[1:]:
    r = ModelReader(p)
    for n in r.tensor_names():
        r.get(n)
"""


def measure(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; wall seconds, CPU seconds and that process's peak RSS (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def compare(a: Path, b: Path) -> dict:
    """Max |diff| of two models and the share of entries further apart than one bf16 step."""
    from rlm.core.models.reader import ModelReader

    ra, rb = ModelReader(a), ModelReader(b)
    worst, differ, total = 0.0, 0, 0
    for n in ra.tensor_names():
        x, y = ra.get(n).float(), rb.get(n).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 2.0 ** -7 * y.abs()).sum())
        total += x.numel()
    return {"max_abs_diff": worst, "share_beyond_bf16_step": differ / total}


def _helper(*args: str) -> dict:
    """Run a helper step (generation, comparison) in its own process, so this process stays small: a
    forked child's peak RSS starts from its parent's."""
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_size(workdir: Path, params_m: float, experts: int, methods: list[str], mergekit_threads: list[str],
               engines: list[str]) -> dict:
    sizedir = workdir / f"p{int(params_m)}"
    t0 = time.perf_counter()
    gen = _helper("_generate", str(sizedir), str(params_m), str(experts))
    base, models = Path(gen["base"]), [Path(m) for m in gen["models"]]
    gen_s = time.perf_counter() - t0
    nparams = sum(math.prod(s) for s in llama_shapes(params_m)[1].values())
    py = sys.executable
    res: dict = {"params_m": round(nparams / 1e6, 1), "experts": experts, "generate_s": round(gen_s, 1),
                 "load_average": os.getloadavg()}
    subprocess.run([py, "-c", WARM_CODE, str(base), *map(str, models)], check=True)
    for d in ("floor_out", "mergekit_out"):
        shutil.rmtree(sizedir / d, ignore_errors=True)
    res["io_floor"] = measure([py, "-c", FLOOR_CODE, str(base), str(sizedir / "floor_out"), *map(str, models)],
                              "io floor")
    shutil.rmtree(sizedir / "floor_out", ignore_errors=True)
    for method in methods:
        res[method] = bench_method(sizedir, base, models, method, res["io_floor"], mergekit_threads, engines)
    return res


def bench_method(sizedir: Path, base: Path, models: list[Path], method: str, floor: dict,
                 mergekit_threads: list[str], engines: list[str]) -> dict:
    """One method: ``rlm merge`` (per engine: ``auto``, the fused kernels, and/or ``torch``) and mergekit (per
    threading setting) on the same inputs, with the time ratios and the outputs' agreement."""
    py = sys.executable
    res: dict = {}
    for engine in engines:
        out = sizedir / f"rlm_{engine}_out"
        shutil.rmtree(out, ignore_errors=True)
        res[f"rlm_{engine}"] = measure([py, "-c", "from rlm.core.cli import run; run()", "merge", "--method", method,
                                        "--preset", "paper", "--base", str(base), "--models",
                                        ",".join(map(str, models)), "--set", f"engine={engine}", "--out", str(out)],
                                       f"rlm merge ({engine})")
        res[f"rlm_{engine}"]["over_io_floor"] = round(res[f"rlm_{engine}"]["wall_s"] / floor["wall_s"], 2)
    rlm = res[f"rlm_{engines[0]}"]
    if len(engines) > 1:
        res["engines_identical"] = _helper("_identical", *(str(sizedir / f"rlm_{e}_out") for e in engines))
    if mergekit_threads:
        paper = MERGEKIT_PAPER[method]
        cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
               "parameters": paper.get("parameters", {}),
               "models": [{"model": str(m), "parameters": paper["model"]} for m in models]}
        (sizedir / "mergekit.yml").write_text(json.dumps(cfg))
        exe = str(Path(py).parent / "mergekit-yaml")
        mk = [exe, str(sizedir / "mergekit.yml"), str(sizedir / "mergekit_out"), "--quiet", "--no-copy-tokenizer",
              "--no-write-model-card"]
        # torch's default threads and/or one thread (faster on a busy machine); the faster counts
        for threads in mergekit_threads:
            shutil.rmtree(sizedir / "mergekit_out", ignore_errors=True)
            env = {"OMP_NUM_THREADS": "1"} if threads == "1" else None
            res[f"mergekit_{threads}_thread{'s' if threads != '1' else ''}"] = measure(mk, "mergekit", env=env)
        mk_runs = [v for k, v in res.items() if k.startswith("mergekit_")]
        res["mergekit"] = min(mk_runs, key=lambda r: r["wall_s"])
        res["speedup_vs_mergekit"] = round(res["mergekit"]["wall_s"] / rlm["wall_s"], 2)
        res["cpu_ratio_mergekit_over_rlm"] = round(res["mergekit"]["cpu_s"] / rlm["cpu_s"], 2)
        res["rss_ratio_mergekit_over_rlm"] = round(res["mergekit"]["peak_rss_mb"] / rlm["peak_rss_mb"], 2)
        res["agreement"] = _helper("_compare", str(sizedir / f"rlm_{engines[0]}_out"), str(sizedir / "mergekit_out"))
    res["rlm_over_io_floor"] = rlm["over_io_floor"]
    return res


#: the paper preset of each benchmarked method, in mergekit's terms
MERGEKIT_PAPER = {
    "ties": {"model": {"weight": 0.5, "density": 0.8}},
    "dare_ties": {"model": {"weight": 0.5, "density": 0.8}},
    "task_arithmetic": {"model": {"weight": 1.0}, "parameters": {"lambda": 0.7}},
    "linear": {"model": {"weight": 1.0}},
}


def identical(*paths: str) -> dict:
    """Whether the models at ``paths`` hold bit-identical tensors (the first differing tensor, if any)."""
    import torch

    from rlm.core.models.reader import ModelReader

    readers = [ModelReader(p) for p in paths]
    for n in readers[0].tensor_names():
        ref = readers[0].get(n)
        for r in readers[1:]:
            if not torch.equal(ref.view(torch.uint8), r.get(n).view(torch.uint8)):
                return {"identical": False, "first_difference": n}
    return {"identical": True}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_generate":
        base, models = generate_models(argv[1], params_m=float(argv[2]), experts=int(argv[3]))
        print(json.dumps({"base": str(base), "models": [str(m) for m in models]}))
        return 0
    if argv and argv[0] == "_compare":
        print(json.dumps(compare(Path(argv[1]), Path(argv[2]))))
        return 0
    if argv and argv[0] == "_identical":
        print(json.dumps(identical(*argv[1:])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, nargs="+", default=[400.0, 200.0], help="model sizes, millions")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["ties"], choices=sorted(MERGEKIT_PAPER))
    ap.add_argument("--engines", nargs="+", default=["auto"], choices=["auto", "fused", "torch"],
                    help="rlm engines to time (the first is compared with mergekit; several: outputs must agree)")
    ap.add_argument("--mergekit-threads", nargs="*", default=["default", "1"], choices=["default", "1"],
                    help="mergekit runs: torch's default threads and/or OMP_NUM_THREADS=1 (none: skip mergekit)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rlm-merge-bench-"))
    results = []
    try:
        for p in args.params:
            res = bench_size(workdir, p, args.experts, args.methods, args.mergekit_threads, args.engines)
            results.append(res)
            print(json.dumps(res), flush=True)
            if not args.keep:
                shutil.rmtree(workdir / f"p{int(p)}", ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, args.methods)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: list[dict], methods: list[str]) -> None:
    print(f"\n{'params':>8} {'method':>16} {'run':>22} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'x floor':>8}")
    for r in results:
        f = r["io_floor"]
        print(f"{r['params_m']:>7}M {'':>16} {'io_floor':>22} {f['wall_s']:>8} {f['cpu_s']:>8} {f['peak_rss_mb']:>12}")
        for method in methods:
            m = r[method]
            for tool, v in m.items():
                if isinstance(v, dict) and "wall_s" in v and tool != "mergekit":
                    print(f"{'':>8} {method:>16} {tool:>22} {v['wall_s']:>8} {v['cpu_s']:>8} {v['peak_rss_mb']:>12} "
                          f"{round(v['wall_s'] / f['wall_s'], 2):>8}")
            if "speedup_vs_mergekit" in m:
                print(f"{'':>8} {method:>16} rlm is {m['speedup_vs_mergekit']}x faster than mergekit's faster run, "
                      f"{m['rlm_over_io_floor']}x the I/O floor; mergekit uses {m['rss_ratio_mergekit_over_rlm']}x "
                      f"the memory; agreement {m['agreement']}")
            if "engines_identical" in m:
                print(f"{'':>8} {method:>16} rlm engines bit-identical: {m['engines_identical']}")


if __name__ == "__main__":
    sys.exit(main())
