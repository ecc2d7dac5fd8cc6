"""FSDP2 with 2 processes on CPU over gloo, launched with the shipped configs/accelerate/fsdp.yaml: the same
weights as one process (fp32), an exact resume with fp32 master weights saved in bf16, PPO's critic sharded too,
and a plain HF final/ gathered on the main process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).with_name("test_train_support.py")
LAUNCHER = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
SFT = ["train", "--trainer", "sft", "--task", "digits", "--model", "tiny", "--no-progress", "--set", "num_threads=1",
       "--set", "batch_size=8", "--set", "lr=1e-3", "--set", "save_every=2", "--set", "schedule=constant",
       "--set", "warmup_ratio=0"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(LAUNCHER).exists(), reason="the accelerate launcher is not installed")]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = str(SUPPORT.parent) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def launch(args: list[str], port: int) -> None:
    cmd = [LAUNCHER, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(port), "--num_cpu_threads_per_process", "1",
           str(SUPPORT), *args]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def single(args: list[str]) -> None:
    res = subprocess.run([sys.executable, str(SUPPORT), *args], env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def weights(d: Path) -> dict:
    return load_file(str(d / "final" / "model.safetensors"))


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def test_fsdp_matches_one_process_in_fp32(tmp_path):
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    launch([*SFT, "--steps", "3", "--out", str(fsdp)], 29541)
    single([*SFT, "--steps", "3", "--out", str(one)])
    m = manifest(fsdp)
    assert (m["distributed"], m["processes"], m["status"]) == ("FSDP", 2, "complete")
    assert len(set(m["rank_weight_sha256"])) == 1
    a, b = weights(fsdp), weights(one)
    assert a.keys() == b.keys()
    for k in a:  # the same global batch: equal up to the order of the gradient sums
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-5)
    rows = [json.loads(x) for x in (fsdp / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["delta_norm"] > 0 and rows[-1]["changed_frac"] > 0.5  # whole-tensor statistics, not a shard's


def test_deepspeed_launch_and_disagreeing_mixed_precision_are_refused(monkeypatch):
    from accelerate.state import AcceleratorState

    from rlm.core.errors import RlmError
    from rlm.core.train.distributed import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RlmError, match="DeepSpeed"):
        build_accelerator("bf16-mixed")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # accelerate's state is a process-wide singleton: read the env afresh
    try:
        with pytest.raises(RlmError, match="mixed_precision=bf16 disagrees with precision=fp32"):
            build_accelerator("fp32")
        build_accelerator("bf16-mixed")  # agreeing settings pass
    finally:
        AcceleratorState._reset_state(True)


def test_fsdp_resume_is_exact_in_bf16_mixed(tmp_path):
    args = [*SFT, "--set", "precision=bf16-mixed", "--set", "save_dtype=bfloat16"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch([*args, "--steps", "4", "--out", str(full)], 29542)
    launch([*args, "--steps", "2", "--out", str(resumed)], 29543)
    launch([*args, "--steps", "4", "--out", str(resumed), "--resume"], 29544)
    a, b = weights(full), weights(resumed)
    assert {v.dtype for v in a.values()} == {torch.bfloat16}
    assert all(torch.equal(a[k], b[k]) for k in a)
    master = [load_file(str(d / "checkpoints" / "step-4" / "trainer_state" / "master.safetensors"))
              for d in (full, resumed)]
    assert {v.dtype for v in master[0].values()} == {torch.float32}
    assert all(torch.equal(master[0][k], master[1][k]) for k in master[0])
    assert manifest(resumed)["resumed_from_step"] == 2


def test_fsdp_ppo_with_critic_and_sampling(tmp_path):
    out = tmp_path / "ppo"
    launch(["train", "--trainer", "ppo", "--task", "digits", "--model", "tiny", "--steps", "2", "--no-progress",
            "--set", "num_threads=1", "--set", "prompts_per_step=4", "--set", "group_size=2",
            "--set", "max_new_tokens=6", "--set", "save_every=1", "--set", "precision=bf16-mixed",
            "--out", str(out)], 29545)
    m = manifest(out)
    assert m["status"] == "complete" and len(set(m["rank_weight_sha256"])) == 1
    state = out / "checkpoints" / "step-2" / "trainer_state"
    critic = load_file(str(state / "critic.safetensors"))
    assert "value_head.weight" in critic and all(v.dim() == 0 or v.shape[0] > 0 for v in critic.values())
    assert (state / "critic_optimizer.pt").is_file()
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()
