"""Shared fixtures: an isolated model cache, the tiny model, fake plugins, and the shared data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RLM_SHARED_DATA", REPO.parent / "shared" / "data"))
FAKES = REPO / "tests" / "fakes"


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data; skips the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared benchmark data not available)")
    return path


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    """Each test judges code afresh: the code judge's in-process verdict cache is emptied before it."""
    judge = sys.modules.get("rlm.plugins.tasks.code.judge")
    if judge is not None:
        judge._VERDICTS.clear()
    yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("rlm-cache")
    old = os.environ.get("RLM_CACHE")
    os.environ["RLM_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield cache
    if old is None:
        os.environ.pop("RLM_CACHE", None)
    else:
        os.environ["RLM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model directory built once per test session (seed 0)."""
    from rlm.core.models.hf import init_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    init_tiny(out, seed=0)
    return out


@pytest.fixture
def fake_vllm(monkeypatch):
    """``import vllm`` gives the recording fake under tests/fakes (its call log cleared)."""
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    assert Path(vllm.__file__).is_relative_to(FAKES)
    vllm.CALLS.clear()
    vllm.INSTANCES.clear()
    return vllm
