"""Evaluation throughput: `rlm eval` against lm-evaluation-harness's HF backend on the same model, the same GSM8K
test examples, batch size and generation length, in one run.

    python benchmarks/eval_bench.py [--model tiny] [--n 32] [--batch-size 8] [--max-new-tokens 64] [--out FILE]

Both sides run end to end in this process (model load, prompt building, batched greedy generation, scoring) and
are timed with a wall clock; examples/s = n / seconds. lm-eval runs 0-shot (its GSM8K default is 5-shot) on the
local GSM8K file (``dataset_path: json``), without a chat template; rlm uses the model's chat template and its
own prompt. Both generate at most ``--max-new-tokens`` tokens (lm-eval: ``max_gen_toks``; for the tiny model
the generation config's ``max_new_tokens`` applies to lm-eval as well, so keep the two equal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--data", default=None, help="folder holding gsm8k_test.jsonl and gsm8k_train.jsonl")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from rlm.core.eval.engine import evaluate
    from rlm.core.eval.lm_eval import run_lm_eval
    from rlm.core.io.records import shared_data_dir
    from rlm.core.models.hf import resolve_model

    data = Path(args.data) if args.data else shared_data_dir()
    if data is None or not (data / "gsm8k_test.jsonl").is_file():
        raise SystemExit("need gsm8k_test.jsonl (pass --data DIR or set RLM_SHARED_DATA)")
    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        evaluate(model, ["math:gsm8k"], Path(tmp) / "rlm", data=[str(data / "gsm8k_test.jsonl")], limit=args.n,
                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)
        rlm_s = time.perf_counter() - t0
        timing = json.loads((Path(tmp) / "rlm" / "manifest.json").read_text())["timing"]["math:gsm8k"]
        t0 = time.perf_counter()
        run_lm_eval(model, ["gsm8k"], Path(tmp) / "lm", limit=args.n, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, num_fewshot=0, data_dir=data)
        lm_s = time.perf_counter() - t0
    result = {
        "model": args.model, "n": args.n, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "rlm_eval_s": rlm_s, "rlm_examples_per_s": args.n / rlm_s,
        "rlm_generation_s": timing["generation_s"], "rlm_scoring_s": timing["scoring_s"],
        "lm_eval_s": lm_s, "lm_eval_examples_per_s": args.n / lm_s, "ratio_rlm_over_lm_eval": lm_s / rlm_s,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "platform": platform.platform(),
    }
    print(json.dumps(result, indent=2))
    print(f"| {args.model} | GSM8K test[:{args.n}] | {args.batch_size} | {args.max_new_tokens} | "
          f"{result['rlm_examples_per_s']:.2f} | {result['lm_eval_examples_per_s']:.2f} | "
          f"{result['ratio_rlm_over_lm_eval']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
