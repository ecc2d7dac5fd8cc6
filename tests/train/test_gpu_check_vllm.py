"""benchmarks/gpu_check.py's vLLM section: skipped with its reason where CUDA or vllm is missing, and its phases
(HF vs vLLM throughput, a GRPO step with vLLM rollouts) run end to end against the fake ``vllm`` in tests/fakes on
the CPU, so the script a GPU session runs is known to work."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("rlm_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_vllm_section_prints_why_it_skipped(gpu_check, capsys):
    assert gpu_check.vllm_skip_reason() == "no CUDA device (torch.cuda.is_available() is False)"
    assert gpu_check.main(["--allow-cpu", "--vllm-only"]) == 0
    out = capsys.readouterr().out
    assert "gpu_check vllm: skipped: no CUDA device" in out
    assert "| model | phase |" in out and "vllm-throughput" not in out


def test_vllm_skip_reason_names_a_missing_vllm(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    reason = gpu_check.vllm_skip_reason()
    assert reason.startswith("vllm is not importable (ModuleNotFoundError") and "rlm[vllm]" in reason


def test_vllm_phases_run_against_the_fake(gpu_check, fake_vllm, tiny_model_dir, tmp_path):
    a = argparse.Namespace(vllm_prompts=4, vllm_max_new_tokens=6, vllm_memory=0.3, prompts=2, max_new_tokens=4)
    rows = gpu_check.check_vllm(str(tiny_model_dir), tmp_path, a, cuda=False, device="cpu")
    assert [r["phase"] for r in rows] == ["vllm-throughput-hf", "vllm-throughput-vllm", "grpo-vllm-step"]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    for r in rows[:2]:
        d = r["detail"]
        assert d["prompts"] == 4 and d["max_new_tokens"] == 6 and 4 <= d["tokens"] <= 24
        assert math.isclose(d["tokens_per_s"], d["tokens"] / d["seconds"], rel_tol=0.01)  # seconds are rounded
    llms = [args for name, args in fake_vllm.CALLS if name == "LLM"]
    assert len(llms) == 2 and all(x["gpu_memory_utilization"] == 0.3 and x["dtype"] == "bfloat16" for x in llms)
    # the vllm throughput phase: the same 4 prompts, one sample each, 6 tokens at most
    timed = [args for name, args in fake_vllm.CALLS if name == "generate"][1]
    assert len(timed["prompts"]) == 4 and all(sp.max_tokens == 6 and sp.n == 1 for sp in timed["sampling_params"])
    step = rows[2]["detail"]
    assert 0 <= step["rollout_logp_diff_mean"] <= step["rollout_logp_diff_max"] and step["rollout_ratio_mean"] > 0
    assert 0 <= step["rollout_checksum_rel_diff"] <= 1e-3
    lines = gpu_check.vllm_summary(rows)
    assert len(lines) == 2 and "vllm/hf" in lines[0] and "weights checksum relative difference" in lines[1]
