"""Exact resume after SIGKILL, and two processes under accelerate (subprocesses; the test tasks are
registered by tests/train/test_train_support.py run as a script)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SUPPORT = Path(__file__).with_name("test_train_support.py")
ARGS = ["train", "--trainer", "grpo", "--task", "digits", "--model", "tiny", "--steps", "6", "--no-progress",
        "--set", "num_threads=1", "--set", "prompts_per_step=2", "--set", "group_size=4",
        "--set", "max_new_tokens=6", "--set", "lr=6e-3", "--set", "save_every=2", "--set", "mini_batches=2"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = str(SUPPORT.parent) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    """The full model's tensors of an HF directory or of a LoRA run's final/ (its merged model in merged/)."""
    from safetensors.torch import load_file

    if (path / "adapter_config.json").is_file():
        path = path / "merged"
    return load_file(str(path / "model.safetensors"))


PPO_LORA = ["train", "--trainer", "ppo", "--task", "digits", "--model", "tiny", "--steps", "4", "--no-progress",
            "--set", "num_threads=1", "--set", "prompts_per_step=4", "--set", "max_new_tokens=6", "--set", "lr=1e-3",
            "--set", "save_every=2", "--set", "lora.enabled=true", "--set", "lora.r=4"]


BF16_MIXED = [*ARGS, "--set", "precision=bf16-mixed", "--set", "save_dtype=bfloat16"]


@pytest.mark.parametrize("args", [ARGS, PPO_LORA, BF16_MIXED], ids=["grpo-full", "ppo-critic-lora", "grpo-bf16-mixed"])
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, args):
    ARGS = args  # noqa: N806
    full, killed = tmp_path / "full", tmp_path / "killed"
    res = subprocess.run([sys.executable, str(SUPPORT), *ARGS, "--out", str(full)], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, str(SUPPORT), *ARGS, "--out", str(killed)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-2").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "final").exists()
    res = subprocess.run([sys.executable, str(SUPPORT), *ARGS, "--out", str(killed), "--resume"], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(full / "final"), weights(killed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if args is PPO_LORA:  # the adapter at the top of final/ agrees too
        from safetensors.torch import load_file

        aa, ab = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (full, killed))
        assert aa.keys() == ab.keys() and all(torch.equal(aa[k], ab[k]) for k in aa)
    if args is BF16_MIXED:  # saved in bf16; the fp32 master weights of the last checkpoint agree bit for bit
        from safetensors.torch import load_file

        assert {v.dtype for v in a.values()} == {torch.bfloat16}
        ma, mb = (load_file(str(d / "checkpoints" / "step-6" / "trainer_state" / "master.safetensors"))
                  for d in (full, killed))
        assert {v.dtype for v in ma.values()} == {torch.float32}
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
        assert [r["saved_changed_frac"] for r in rows(killed)] == [r["saved_changed_frac"] for r in rows(full)]
    m = json.loads((killed / "manifest.json").read_text())
    assert m["status"] == "complete" and m["resumed_from_step"] >= 2
    rows_full = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_killed = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_killed] == list(range(1, len(rows_full) + 1))
    assert [r["reward_mean"] for r in rows_killed] == [r["reward_mean"] for r in rows_full]
    # the resumed run moved: the final weights are not the step-2 checkpoint's
    c2 = weights(killed / "checkpoints" / "step-2")
    assert any(not torch.equal(a[k], c2[k]) for k in a)


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    # `accelerate launch --cpu` starts a single process unless MPI is configured; --multi_gpu starts the
    # processes with torchrun and rlm selects gloo on CPU when no GPU is present.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", "--main_process_port", "29517",
           str(SUPPORT), *ARGS[:ARGS.index("--steps")], "--steps", "3", *ARGS[ARGS.index("--steps") + 2:],
           "--set", "prompts_per_step=4", "--out", str(out)]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["processes"] == 2 and m["status"] == "complete"
    digests = m["rank_weight_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    state = out / "checkpoints" / "step-2" / "trainer_state"
    assert (state / "rng-0.pt").is_file() and (state / "rng-1.pt").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_end_distributed_destroys_the_process_group(tmp_path):
    """A finished run tears its process group down (``rlm train`` and the study's launches call this); in one
    process without a group it does nothing."""
    import torch.distributed as dist

    from rlm.core.train.distributed import end_distributed

    end_distributed()  # no group: nothing to do
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_distributed()
    assert not dist.is_initialized()
