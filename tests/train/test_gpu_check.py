"""benchmarks/gpu_check.py: skips cleanly without CUDA, and its chain (train, eval, merge, conflicts) runs
on the CPU with --allow-cpu, so the script a GPU session runs is known to work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_skips_without_cuda():
    res = run()
    assert res.returncode == 0 and "skipped: no CUDA device" in res.stdout


@pytest.mark.slow
def test_chain_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    res = run("--allow-cpu", "--steps", "1", "--prompts", "2", "--max-new-tokens", "8", "--eval-limit", "4",
              "--workdir", str(tmp_path / "work"), "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == ["train-grpo", "train-sft", "eval", "merge", "conflicts"]
    assert all(r["error"] is None for r in rows)
    manifest = json.loads((tmp_path / "work" / "m0" / "grpo" / "manifest.json").read_text())
    assert (manifest["precision"], manifest["save_dtype"]) == ("bf16-mixed", "bfloat16")
