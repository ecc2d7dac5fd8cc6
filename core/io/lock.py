"""Exclusive locks on output directories: one rlm run at a time writes a given ``--out``.

:func:`run_lock` holds ``PARENT/.NAME.lock`` (beside the output, which may not exist yet, may be replaced by a
rename or removed by ``--overwrite``) with ``fcntl.flock(LOCK_EX | LOCK_NB)`` for the whole run; the file holds
the holder's pid. The kernel drops a flock when its process dies, even by SIGKILL, so a killed run leaves no
stale lock. A second run on the same output fails at once with :class:`RunLocked`, naming the holder's pid.

On acquiring the lock, what a killed run on that output left beside it is removed (:func:`clean_leftovers`): the
``.NAME.<random>.partial`` directories of :func:`rlm.core.io.atomic.atomic_dir` and its ``.NAME.old-PID``
directories (one is renamed back when the kill left no output). Nothing else writes them while the lock is held.

Several processes of one run (``torchrun``/``accelerate launch``): only the main process takes the lock
(:func:`holds_run_lock`, decided from the launcher's environment, before accelerate is set up)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from rlm.core.errors import RlmError


class RunLocked(RlmError):
    """Another live process holds the lock of an output; the message names the output and the holder's pid."""


def holds_run_lock(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is the one of its run that takes the output lock: the global rank 0 (``RANK``), else
    local rank 0 (``LOCAL_RANK``), else (a single process, ``WORLD_SIZE`` unset) always."""
    env = os.environ if env is None else env
    for var in ("RANK", "LOCAL_RANK"):
        value = env.get(var, "").strip()
        if value:
            try:
                return int(value) == 0
            except ValueError:
                raise RlmError(f"environment variable {var}={value!r} is not an integer rank") from None
    return True


def lock_path(out: str | Path) -> Path:
    """``PARENT/.NAME.lock`` of the output ``out`` (the parent with symbolic links resolved, so every spelling
    of one output shares one lock)."""
    out = Path(os.path.abspath(out))
    return out.parent.resolve() / f".{out.name}.lock"


def leftovers(out: str | Path) -> list[Path]:
    """What killed runs on ``out`` left beside it: ``atomic_dir``'s ``.NAME.<random>.partial`` and
    ``.NAME.old-PID`` directories (the random part has no dot, so ``a.b``'s leftovers never match ``a``)."""
    out = Path(os.path.abspath(out))
    parent = out.parent.resolve()
    if not parent.is_dir():
        return []
    name = re.escape(out.name)
    pattern = re.compile(rf"\.{name}\.(?:[^./]+\.partial|old-\d+)")
    return sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def clean_leftovers(out: str | Path) -> None:
    """Remove :func:`leftovers` of ``out`` (call it holding the lock). A run killed between ``atomic_dir``'s two
    renames left no ``out`` and the previous output in ``.NAME.old-PID``: that one is renamed back to ``out``
    (as ``atomic_dir`` does when the rename fails) rather than removed."""
    out = Path(out)
    found = leftovers(out)
    olds = [d for d in found if not d.name.endswith(".partial")]
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda d: d.stat().st_mtime)
        os.replace(newest, out)
        found.remove(newest)
    for d in found:
        shutil.rmtree(d, ignore_errors=True)


def _holder_pid(path: Path) -> str:
    """The pid written in the lock file (the holder writes it just after locking: wait briefly for it)."""
    for _ in range(20):
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


def _acquire(out: Path, path: Path) -> int:
    """Open, flock and verify the lock file; the fd of the held lock. A file unlinked by its previous holder
    between our open and our flock is not the lock any more: retry on the file now at ``path``."""
    import fcntl

    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"{out} is in use by another rlm run (pid {_holder_pid(path)}, lock {path}); "
                                f"wait for it to finish or stop it") from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            except OSError:
                os.close(fd)
                raise
            return fd
        os.close(fd)
    raise RlmError(f"cannot lock {out}: {path} keeps being replaced")


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[Path | None]:
    """Hold the exclusive lock of the output ``out`` for the block and remove killed runs' leftovers beside it.
    Yields the lock file (None on a non-main process of a multi-process run, which takes no lock). Raises
    :class:`RunLocked` when another process holds it, :class:`RlmError` naming the path when the lock file cannot
    be created (e.g. a read-only parent)."""
    if not holds_run_lock():
        yield None
        return
    out = Path(out)
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(out, path)
    except RlmError:
        raise
    except OSError as exc:
        where = exc.filename or path
        raise RlmError(f"cannot lock {out}: {exc.strerror or exc} ({where})") from None
    try:
        clean_leftovers(out)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it; a waiter that opened it before retries (see _acquire)
        os.close(fd)
