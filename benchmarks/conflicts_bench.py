"""Benchmark of ``rlm conflicts`` against the read floor, with peak RSS.

Generates synthetic HF-layout bf16 Llama-shaped models (a base and N experts, sharded safetensors; the
merging benchmark's generator is used when ``benchmarks/merge_bench.py`` provides one), warms the page cache,
then runs each phase in a fresh subprocess and reports wall time and peak RSS:

* ``read``: the read floor, every tensor of every input read once through ``ModelReader.get``;
* ``stream``: for scale, the same bytes read with ``preadv`` into one reused 1 MiB buffer (one thread): what
  reading costs without fresh memory for every tensor;
* ``norms``: update_norm, fraction_updated, conflict_norm, cosine (one streaming pass);
* ``global``: all six metrics with global top-k only (statistics + histogram pass, then the top-k pass);
* ``all``: all six metrics, global and per-tensor top-k (the default of ``rlm conflicts``);
* ``norms-eager`` / ``all-eager``: as ``norms`` / ``all`` on the eager torch engine (``engine: eager``);
* ``norms64`` / ``all64``: as ``norms`` / ``all`` with ``delta_dtype: float64`` (eager, float64 elementwise).

Each phase runs in a fresh process; ``wall s`` starts after the imports (torch, rlm), which are reported
apart (``imports s``), and includes everything else (plugin loading, reading, computing). ``× floor × passes``
divides by the floor times the number of reads the phase needs (global top-k needs its thresholds before the
top-k pass, hence two). ``--repeat N`` interleaves N rounds and keeps each phase's fastest.

    python benchmarks/conflicts_bench.py --params 400 --experts 2 [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASE_CODE = r"""
import json, resource, sys, time
phase, base, models = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t_start = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[4]))
from rlm.core.models.reader import ModelReader
if phase not in ("read", "stream"):
    from rlm.core.conflicts.config import ConflictsConfig
    from rlm.core.conflicts.engine import compute_conflicts
imports = time.perf_counter() - t_start
t0 = time.perf_counter()
if phase == "read":
    n = 0
    for path in [base, *models.values()]:
        r = ModelReader(path)
        for name in r.tensor_names():
            n += r.get(name).numel()  # as merge_bench's floor: ModelReader.get of every tensor
    extra = {"elements": n, "passes": 1}
elif phase == "stream":
    import os
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    n = 0
    for path in [base, *models.values()]:
        r = ModelReader(path)
        for name in r.tensor_names():
            fd, offset, nbytes = r.location(name)
            done = 0
            while done < nbytes:
                done += os.preadv(fd, [view[:min(len(buf), nbytes - done)]], offset + done)
            n += nbytes // 2
    extra = {"elements": n, "passes": 1}
else:
    norms = ["update_norm", "fraction_updated", "conflict_norm", "cosine"]
    cfg = {"norms": {"metrics": norms},
           "global": {"topk_modes": ["global"]},
           "all": {},
           "norms-eager": {"metrics": norms, "engine": "eager"},
           "all-eager": {"engine": "eager"},
           "norms64": {"metrics": norms, "delta_dtype": "float64"},
           "all64": {"delta_dtype": "float64"}}[phase]
    workers = int(sys.argv[6]) if sys.argv[6] != "auto" else None
    res = compute_conflicts(base, models, ConflictsConfig(**cfg, threads=int(sys.argv[4]), workers=workers,
                                                          chunk_elements=int(sys.argv[5])))
    extra = {"parameters": res.stats["parameters"], "passes": res.stats["passes"], "engine": res.stats["engine"]}
wall = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "imports_s": imports, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mb": hwm / 1024, **extra}))
"""


def llama_shapes(params_m: float) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A Llama-like config and tensor shapes with about ``params_m`` million parameters."""
    hidden, inter, vocab, heads, kv = 1024, 2816, 32000, 16, 4
    head_dim = hidden // heads
    per_layer = hidden * hidden * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((params_m * 1e6 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "torch_dtype": "bfloat16"}
    return config, shapes


def write_model(out: Path, config: dict, shapes: dict[str, tuple[int, ...]], seed: int, base: Path | None,
                scale: float, zero_frac: float, shard_bytes: int = 500 * 2**20) -> None:
    """Write a sharded bf16 model; experts are the base plus a sparse Gaussian delta."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}
    base_reader = None
    if base is not None:
        from rlm.core.models.reader import ModelReader

        base_reader = ModelReader(base)

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            for k in shard:
                weight_map[k] = name
            shard, size = {}, 0

    for name, shape in shapes.items():
        if base_reader is None:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        else:
            b = base_reader.get(name).to(torch.float32)
            d = torch.randn(shape, generator=g) * scale
            d[torch.rand(shape, generator=g) < zero_frac] = 0
            t = (b + d).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))


def generate(workdir: Path, params_m: float, experts: int) -> tuple[Path, dict[str, Path]]:
    """Reuse the merging benchmark's generator when it exists, else write our own models."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import merge_bench  # type: ignore

        gen = getattr(merge_bench, "generate_models", None)
    except ImportError:
        gen = None
    if gen is not None:
        base, models = gen(workdir, params_m=params_m, experts=experts)
        return Path(base), {f"expert{i}": Path(p) for i, p in enumerate(models)}
    config, shapes = llama_shapes(params_m)
    base = workdir / "base"
    if not (base / "config.json").is_file():
        write_model(base, config, shapes, 0, None, 0, 0)
    out = {}
    for i in range(experts):
        # one "SFT-like" dense large update, the rest "RL-like" sparse small updates
        scale, zero = (3e-3, 0.2) if i == 0 else (3e-4, 0.75)
        out[f"expert{i}"] = workdir / f"expert{i}"
        if not (out[f"expert{i}"] / "config.json").is_file():
            write_model(out[f"expert{i}"], config, shapes, 100 + i, base, scale, zero)
    return base, out


def run_phase(phase: str, base: Path, models: dict[str, Path], threads: int, chunk: int = 1 << 18,
              workers: str = "auto") -> dict:
    res = subprocess.run([sys.executable, "-c", PHASE_CODE, phase, str(base),
                          json.dumps({k: str(v) for k, v in models.items()}), str(threads), str(chunk), workers],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=400, help="millions of parameters per model")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the eager engine's `threads`)")
    ap.add_argument("--workers", default="auto", help="the fused engine's `workers` (auto: every CPU)")
    ap.add_argument("--chunk", type=int, default=1 << 18, help="the eager engine's chunk_elements")
    ap.add_argument("--phases", default="read,norms,global,all")
    ap.add_argument("--repeat", type=int, default=1, help="run every phase this many times, report the fastest")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rlm-conflicts-bench-"))
    try:
        t0 = time.perf_counter()
        base, models = generate(workdir, args.params, args.experts)
        print(f"models in {workdir} ({time.perf_counter() - t0:.0f} s to generate)", flush=True)
        run_phase("read", base, models, args.threads)  # warm the page cache
        rows: dict[str, dict] = {}
        for _ in range(args.repeat):  # interleaved, so that a busy moment does not hit one phase only
            for phase in args.phases.split(","):
                r = run_phase(phase, base, models, args.threads, args.chunk, args.workers)
                print(phase, json.dumps(r), flush=True)
                if phase not in rows or r["wall_s"] < rows[phase]["wall_s"]:
                    rows[phase] = r
        floor = rows.get("read", {}).get("wall_s")
        print("\n| phase | engine | passes | wall s | × read floor | × floor × passes | CPU s | imports s | "
              "peak RSS MB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for phase, r in rows.items():
            ratio = f"{r['wall_s'] / floor:.2f}" if floor else "–"
            per_pass = f"{r['wall_s'] / floor / r['passes']:.2f}" if floor else "–"
            print(f"| {phase} | {r.get('engine', '–')} | {r['passes']} | {r['wall_s']:.2f} | {ratio} | {per_pass} | "
                  f"{r['cpu_s']:.1f} | {r['imports_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
