"""Which CPU code paths compute a run, and pinning them so that the same seeds give the same numbers on
different CPUs.

torch picks its vectorised kernels (ATen), MKL its BLAS kernels and oneDNN its JIT kernels for the CPU it
finds: AVX-512 on one machine, AVX2 on another. The kernels round differently, and training amplifies the
difference: the cpu-tiny warm-up gave a start model scoring 50.5 % (math) and 65.0 % (code) with the AVX-512
paths and 57.0 % / 72.5 % with the AVX2 paths, on the same machine and seed (docs/study.md). ``avx2`` pins
all three to their AVX2 paths through the variables each library reads when it loads — torch's
``ATEN_CPU_CAPABILITY``, MKL's conditional numerical reproducibility ``MKL_CBWR`` and oneDNN's
``ONEDNN_MAX_CPU_ISA`` — so they must be set before torch is imported; :func:`pin_cpu_capability` refuses
when it is too late. No library offers this as one switch, hence the few lines here. MKL applies a branch other
than ``AUTO`` or ``COMPATIBLE`` on Intel processors only, so ``avx2`` makes Intel CPUs agree with each other, not
with AMD ones (``COMPATIBLE`` would, at about twice the training time of the tiny model: docs/study.md).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from rlm.core.errors import ConfigError

CPU_CAPABILITIES = ("native", "avx2")

# what each library reads at load time, per pinned capability
_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
ENV_NAMES = tuple(_ENV["avx2"])


def capability_env(capability: str) -> dict[str, str]:
    """The environment variables that pin ``capability`` (none for ``native``)."""
    if capability not in CPU_CAPABILITIES:
        raise ConfigError(f"cpu_capability: {capability!r} is not one of {', '.join(CPU_CAPABILITIES)}")
    return dict(_ENV.get(capability, {}))


def pin_cpu_capability(capability: str) -> dict[str, str]:
    """Set the variables of ``capability`` in this process's environment (inherited by the processes it
    starts: Ray workers, ``accelerate launch``, sandboxes); returns them. Refuses when torch is already loaded
    with another capability, since the libraries read the variables only when they load."""
    env = capability_env(capability)
    if not env:
        return env
    if "torch" in sys.modules:
        have = sys.modules["torch"].backends.cpu.get_cpu_capability()
        if have.lower() != env["ATEN_CPU_CAPABILITY"] and cpu_supports(capability):
            raise ConfigError(f"cpu_capability: {capability} must be set before torch is imported (this process "
                              f"loaded torch with {have}); run it in a new process, or export "
                              + " ".join(f"{k}={v}" for k, v in env.items()))
    os.environ.update(env)
    return env


def cpu_supports(capability: str) -> bool:
    """Whether this CPU has the instructions of ``capability`` (Linux: /proc/cpuinfo flags; else assumed)."""
    if capability == "native":
        return True
    flags = _cpuinfo().get("flags", "").split()
    return not flags or capability in flags


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (read once per process; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def cpu_numerics() -> dict[str, Any]:
    """What a manifest records about the CPU numerics: the CPU model, the pinning variables that are set and
    torch's kernel capability (when torch is loaded in this process)."""
    info: dict[str, Any] = {"cpu": _cpuinfo().get("model name"),
                            "env": {k: os.environ[k] for k in ENV_NAMES if k in os.environ}}
    if "torch" in sys.modules:
        info["torch_capability"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
    return info
