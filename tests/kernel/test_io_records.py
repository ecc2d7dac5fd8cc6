"""Data records: where the shared benchmark folder is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlm.core.io.records import shared_data_dir, shared_data_file

REPO = Path(__file__).resolve().parents[2]


def test_shared_data_beside_the_repository_is_found_without_the_variable(monkeypatch):
    beside = REPO.parent / "shared" / "data"
    if not beside.is_dir():
        pytest.skip(f"{beside} is absent")
    monkeypatch.delenv("RLM_SHARED_DATA", raising=False)
    assert shared_data_dir().resolve() == beside.resolve()  # ../shared may be a link
    some = next(p for p in beside.iterdir() if p.is_file())
    assert Path(shared_data_file(some.name)).resolve() == beside.resolve() / some.name


def test_the_variable_wins_and_a_missing_folder_is_none(monkeypatch, tmp_path):
    monkeypatch.setenv("RLM_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    assert shared_data_file("nothing.jsonl") is None
    monkeypatch.setenv("RLM_SHARED_DATA", str(tmp_path / "absent"))
    assert shared_data_dir() is None
