"""GRPO step time: rlm against TRL's ``GRPOTrainer`` on the same tiny model, batch, lengths and CPU.

Both trainers run in fresh subprocesses with the same torch thread count on the rlm ``tiny`` preset (seed 0),
the same prompts (chat-formatted by the model's template), P prompts × G generations per step, at most L new
tokens, temperature 1, top-p 1, top-k off, lr 1e-5, one update per batch (``num_iterations=1``), KL
coefficient ``--beta`` with the k3 estimator in the loss (TRL's ``beta``; rlm's ``kl_coef``), the whole batch
in one forward/backward, no gradient checkpointing (TRL turns it on by default; it trades time for memory),
the same reward function. The first step is a warm-up and is left out; the rest are averaged. Each framework
runs ``--repeats`` times, alternating, and its fastest run is reported (a shared machine's load hits both).

What dominates a step: ``generation`` is the sampling call alone (rlm: ``generate``; TRL: ``_generate``),
``rollout`` adds reward scoring and the reference (and, when needed, old) log-probs, ``update`` is the rest
(forward, backward, optimizer; rlm also ‖θ − θ0‖).

    python benchmarks/grpo_bench.py [--prompts 8] [--generations 8] [--max-new 32] [--steps 4] [--threads 2]
                                    [--beta 0.001] [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def digits_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


PROMPTS = [f"Write some digits, please {i}." for i in range(64)]


def worker_rlm(a: argparse.Namespace) -> dict:
    from rlm.core.cli import main
    from rlm.core.contracts import Example, Task
    from rlm.core.hookspecs import hookimpl
    from rlm.core.plugins import PluginSystem, reset_system

    class Digits(Task):
        name = "bench_digits"

        def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
            return [Example(id=str(i), prompt=p) for i, p in enumerate(PROMPTS)]

        def reward(self, example, completion):
            return digits_share(completion)

    class Plugin:
        @hookimpl
        def register_tasks(self, register):
            register(Digits)

    system = PluginSystem()
    system.add_plugin(Plugin(), name="bench")
    reset_system(system)
    out = Path(a.workdir) / "rlm"
    batch = a.prompts * a.generations
    rc = main(["train", "--trainer", "grpo", "--task", "bench_digits", "--model", a.model, "--out", str(out),
               "--overwrite", "--steps", str(a.steps + 1), "--no-progress",
               "--set", f"num_threads={a.threads}", "--set", f"prompts_per_step={a.prompts}",
               "--set", f"group_size={a.generations}", "--set", f"max_new_tokens={a.max_new}",
               "--set", f"generation_batch_size={batch}", "--set", f"micro_batch_size={batch}",
               "--set", "lr=1e-5", "--set", f"kl_coef={a.beta}", "--set", "kl_estimator=k3",
               "--set", f"kl_in={'loss' if a.beta > 0 else 'none'}", "--set", "save_every=100000"])
    if rc != 0:
        raise SystemExit(f"rlm failed with exit code {rc}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"step": mean("step_time"), "generation": mean("gen_time"), "rollout": mean("rollout_time"),
            "update": mean("step_time") - mean("rollout_time"), "completion_len": mean("response_length"),
            "steps": len(rows)}


def worker_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])

    def reward(completions, **kwargs):
        return [digits_share(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    batch = a.prompts * a.generations
    cfg = GRPOConfig(output_dir=str(Path(a.workdir) / "trl"), per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, num_generations=a.generations, max_completion_length=a.max_new,
                     learning_rate=1e-5, beta=a.beta, temperature=1.0, top_p=1.0, top_k=0, num_iterations=1,
                     max_steps=a.steps + 1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     bf16=False, seed=0, gradient_checkpointing=False, lr_scheduler_type="constant",
                     dataloader_num_workers=0, disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    timing: dict[str, list[float]] = {"generation": [], "rollout": [], "step": [], "len": []}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timing[name].append(time.perf_counter() - t0)
        return wrapper

    trainer._generate = timed("generation", trainer._generate)
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timing["step"].append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                timing["len"].append(logs["completions/mean_length"])

    trainer.add_callback(Clock())
    trainer.train()
    mean = lambda k: sum(timing[k][1:]) / max(1, len(timing[k]) - 1)  # noqa: E731
    return {"step": mean("step"), "generation": mean("generation"), "rollout": mean("rollout"),
            "update": mean("step") - mean("rollout"), "completion_len": mean("len"), "steps": len(timing["step"]) - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beta", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, alternating; the fastest is kept")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", choices=["rlm", "trl"])
    ap.add_argument("--model")
    ap.add_argument("--workdir")
    a = ap.parse_args()
    if a.worker:
        res = worker_rlm(a) if a.worker == "rlm" else worker_trl(a)
        print("RESULT " + json.dumps(res))
        return
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        from rlm.core.models.hf import init_tiny

        model = Path(tmp) / "tiny"
        init_tiny(model, seed=0)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   RLM_CACHE=str(Path(tmp) / "cache"))
        runs: dict[str, list[dict]] = {"rlm": [], "trl": []}
        for _ in range(a.repeats):  # alternate, so a busy machine slows both alike
            for name in ("rlm", "trl"):
                cmd = [sys.executable, __file__, "--worker", name, "--model", str(model), "--workdir", tmp,
                       "--prompts", str(a.prompts), "--generations", str(a.generations), "--max-new",
                       str(a.max_new), "--steps", str(a.steps), "--threads", str(a.threads), "--beta", str(a.beta)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
                if res.returncode != 0 or line is None:
                    raise SystemExit(f"{name} worker failed:\n{res.stderr[-4000:]}")
                runs[name].append(json.loads(line[7:]))
        # the fastest run of each (the one least disturbed by other load)
        results = {name: min(rs, key=lambda r: r["step"]) for name, rs in runs.items()}
    setup = {"prompts": a.prompts, "generations": a.generations, "max_new_tokens": a.max_new, "threads": a.threads,
             "beta": a.beta, "timed_steps": a.steps, "repeats": a.repeats}
    print(f"GRPO step, tiny model, {a.prompts} prompts x {a.generations} generations, <= {a.max_new} new tokens, "
          f"{a.threads} CPU threads, beta {a.beta}")
    print(f"{'':6} {'step s':>8} {'generation':>11} {'rollout':>9} {'update':>8} {'gen share':>10} {'mean len':>9}")
    for name, r in results.items():
        print(f"{name:6} {r['step']:8.3f} {r['generation']:11.3f} {r['rollout']:9.3f} {r['update']:8.3f} "
              f"{r['generation'] / r['step']:10.0%} {r['completion_len']:9.1f}")
    ratio = results["trl"]["step"] / results["rlm"]["step"]
    dominant = {n: ("generation" if r["generation"] > r["update"] else "update (forward+backward)")
                for n, r in results.items()}
    print(f"TRL step time / rlm step time = {ratio:.2f} (> 1: rlm faster); a step is dominated by "
          f"{dominant['rlm']} in rlm and {dominant['trl']} in TRL")
    if a.json:
        a.json.write_text(json.dumps({"setup": setup, "results": results, "all_runs": runs,
                                       "ratio_trl_over_rlm": ratio}, indent=2))


if __name__ == "__main__":
    main()
