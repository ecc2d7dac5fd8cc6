"""Shared data loaders for task plugins: JSONL / JSON / gzip files, with errors that name the file and line,
and a Hugging Face dataset-name fallback where the network allows.

``read_records(path)`` reads ``.jsonl``, ``.json`` (a list of objects, or an object holding one list) and
their ``.gz`` versions, plus ``.parquet`` through the ``datasets`` package. ``load_records(spec, ...)`` takes a
local path (file or directory) or a dataset name (``owner/name``, optionally ``owner/name:config``) and returns
plain dicts.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable

from rlm.core.errors import RlmError


class DataError(RlmError):
    """A data file that is missing or malformed; the message names the file and, where known, the line."""


def shared_data_dir() -> Path | None:
    """``$RLM_SHARED_DATA`` if set and present, else ``../shared/data`` beside the repository if present."""
    env = os.environ.get("RLM_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # core/io/records.py -> repository
    return here if here.is_dir() else None


def shared_data_file(name: str) -> str | None:
    """The path of ``name`` in :func:`shared_data_dir` if that file exists, else ``None``."""
    d = shared_data_dir()
    return str(d / name) if d is not None and (d / name).is_file() else None


def _existing_file(path: str | Path) -> Path:
    """``path`` as a :class:`Path`; a :class:`DataError` if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(line: bytes, path: Path, lineno: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def iter_jsonl(path: str | Path) -> Iterable[dict[str, Any]]:
    """Yield one dict per non-empty line of a JSONL(.gz) file."""
    path = _existing_file(path)
    try:
        with _open_bytes(path) as f:
            for lineno, line in enumerate(f, 1):
                text = _decode(line, path, lineno).strip()
                if not text:
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield obj
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def read_json(path: str | Path) -> list[dict[str, Any]]:
    """A ``.json(.gz)`` file holding a list of objects, or an object with one list value (e.g. ``{"data": [...]}``)."""
    path = _existing_file(path)
    try:
        with _open_bytes(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects or an object holding exactly one list")
        obj = lists[0]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise DataError(f"{path}: expected a list of JSON objects")
    return obj


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a data file by its extension: ``.jsonl``/``.json``/``.parquet``, each optionally ``.gz``."""
    path = Path(path)
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".jsonl") or base.endswith(".ndjson"):
        return list(iter_jsonl(path))
    if base.endswith(".json"):
        return read_json(path)
    if base.endswith(".parquet"):
        _existing_file(path)
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DataError(f"{path}: cannot read parquet ({exc})") from None
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    raise DataError(f"{path}: unknown data format (expected .jsonl, .json, .parquet, optionally .gz)")


def looks_like_dataset_name(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists() \
        and not any(spec.split(":")[0].endswith(ext) for ext in (".jsonl", ".json", ".gz", ".parquet"))


def load_records(spec: str | Path, *, split: str = "test", config: str | None = None,
                 dir_patterns: tuple[str, ...] = (), limit: int | None = None) -> list[dict[str, Any]]:
    """Records from a local file, a local directory or a Hugging Face dataset name.

    A directory is searched for the first of ``dir_patterns`` (``{split}`` is substituted) that exists. A
    dataset name ``owner/name`` or ``owner/name:config`` is loaded with ``datasets.load_dataset`` (network
    or a local HF cache; streamed when ``limit`` is given); without network this fails with a message that
    says to pass a local file.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        for pat in dir_patterns:
            cand = path / pat.format(split=split)
            if cand.is_file():
                return read_records(cand)
        raise DataError(f"{path}: no data file for split {split!r} "
                        f"(looked for {', '.join(p.format(split=split) for p in dir_patterns) or 'nothing'})")
    if path.exists() or not looks_like_dataset_name(text):
        return read_records(path)
    name, _, cfg = text.partition(":")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with lm-eval
        raise DataError(f"{text!r} is not a local file and the `datasets` package is not installed") from None
    try:
        if limit is not None:
            ds = datasets.load_dataset(name, cfg or config, split=split, streaming=True).take(limit)
        else:
            ds = datasets.load_dataset(name, cfg or config, split=split)
        return [dict(r) for r in ds]
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load dataset {text!r} split {split!r} ({msg}); "
                        f"without network pass a local .jsonl/.json/.parquet file instead") from None


def require_fields(rows: list[dict[str, Any]], fields: tuple[str, ...], source: str) -> None:
    """Fail with the file and record number of the first row lacking one of ``fields``."""
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{source}: record {i} lacks field(s) {', '.join(missing)} "
                            f"(has: {', '.join(list(row)[:10])})")


def numbered_records(source: str | Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs from :func:`load_records`; location = ``SOURCE: record N`` (from 1)."""
    return [(f"{source}: record {i}", row) for i, row in enumerate(load_records(source, split=split), 1)]


def record_field(row: dict[str, Any], names: tuple[str, ...], where: str,
                 kind: type | tuple[type, ...] = str) -> Any:
    """The first of ``names`` present (not ``None``) in ``row``, type-checked; an :class:`RlmError` naming
    ``where`` otherwise."""
    for n in names:
        if row.get(n) is not None:
            if not isinstance(row[n], kind):
                raise RlmError(f"{where}: field {n!r} should be {getattr(kind, '__name__', kind)}, "
                               f"got {type(row[n]).__name__}")
            return row[n]
    raise RlmError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")
