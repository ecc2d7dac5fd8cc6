"""What the sandbox tests share: counting this test process's sandboxed programs (other workers on the machine may
run sandboxes of their own, which do not count) and watching that count while a program runs."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def sandboxed_procs(seen: set[int] | None = None) -> int:
    """This test process's running sandboxed programs (forked children keep the parent's command line):
    descendants of this process, plus any pid in ``seen`` (recorded while it was one) that still runs one."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    mine = b"_rlm_guard.py" in f.read()
            except OSError:
                continue
            if mine and (_descends(int(d), os.getpid()) or (seen is not None and int(d) in seen)):
                n += 1
                if seen is not None:
                    seen.add(int(d))
    return n


def watch_procs(fn: Callable[[], Any]) -> tuple[Any, int, set[int]]:
    """Run ``fn()`` while recording this test's sandboxed processes; returns (result, peak count, pids seen)."""
    seen: set[int] = set()
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sandboxed_procs(seen))
            time.sleep(0.03)

    w = threading.Thread(target=watch)
    w.start()
    try:
        res = fn()
    finally:
        stop.set()
        w.join()
    return res, peak[0], seen
