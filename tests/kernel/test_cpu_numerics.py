"""Pinning the CPU code paths (``cpu_capability``): the variables, their effect on a fresh process, the refusal
once torch is loaded with other kernels, and what manifests record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlm.core.cpu_numerics import capability_env, cpu_numerics, cpu_supports, pin_cpu_capability
from rlm.core.errors import ConfigError


def test_capability_env():
    assert capability_env("native") == {}
    assert capability_env("avx2") == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    with pytest.raises(ConfigError, match="cpu_capability: 'avx512x'"):
        capability_env("avx512x")


# one backward pass of the tiny model: its gradients' bits, torch's kernel capability and the manifest facts
_BACKWARD = """
import hashlib, json, sys, tempfile
from rlm.core.cpu_numerics import pin_cpu_capability, cpu_numerics
pin_cpu_capability(sys.argv[1])
import torch
from rlm.core.models.hf import init_tiny, load_model
torch.set_num_threads(1)
d = tempfile.mkdtemp(); init_tiny(d, seed=0); model, _ = load_model(d)
ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
model(input_ids=ids, labels=ids).loss.backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
print(json.dumps([hashlib.sha256(grads.numpy().tobytes()).hexdigest(), torch.backends.cpu.get_cpu_capability(),
                  cpu_numerics()]))
"""


@pytest.mark.skipif(not cpu_supports("avx2"), reason="this CPU has no AVX2")
def test_pinned_before_torch_loads_gives_avx2_kernels():
    """A process that pins avx2 before importing torch computes with torch's AVX2 kernels whatever its CPU
    offers, and its manifest facts say so. On a CPU whose own kernels are others (AVX-512), the same backward
    pass of the tiny model then gives other gradient bits: the pin is what makes two CPUs agree."""
    env = {k: v for k, v in os.environ.items() if k not in capability_env("avx2")}

    def run(capability):
        out = subprocess.run([sys.executable, "-c", _BACKWARD, capability], env=env, capture_output=True,
                             text=True, check=True, timeout=300).stdout
        return json.loads(out.strip().splitlines()[-1])

    pinned_grads, pinned, facts = run("avx2")
    assert pinned == "AVX2" and facts["torch_capability"] == "AVX2"
    assert facts["env"] == capability_env("avx2")
    native_grads, native, facts = run("native")
    assert facts["env"] == {} and native == facts["torch_capability"]
    if native == "AVX2":
        assert native_grads == pinned_grads
    else:
        assert native_grads != pinned_grads, f"{native} and AVX2 kernels gave the same gradients"


def test_pinning_after_torch_loaded_with_other_kernels_is_refused(monkeypatch):
    import torch

    for k in capability_env("avx2"):  # whatever the test sets is undone afterwards
        if k in os.environ:
            monkeypatch.setenv(k, os.environ[k])
        else:
            monkeypatch.delenv(k, raising=False)
    have = torch.backends.cpu.get_cpu_capability()
    if have == "AVX2" or not cpu_supports("avx2"):
        assert pin_cpu_capability("avx2")  # already on those kernels (or none to pin): nothing to refuse
        return
    before = dict(os.environ)
    with pytest.raises(ConfigError, match="must be set before torch is imported"):
        pin_cpu_capability("avx2")
    assert dict(os.environ) == before  # nothing half-set
    assert pin_cpu_capability("native") == {}


def test_manifest_records_the_cpu_numerics(tmp_path):
    import torch

    from rlm.core.io.manifest import write_manifest

    data = json.loads(write_manifest(tmp_path, command=["x"]).read_text())
    assert data["cpu_numerics"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert data["cpu_numerics"] == cpu_numerics()
