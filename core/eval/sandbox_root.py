"""Host-side helpers of :mod:`rlm.core.eval.sandbox`: the cgroups that bound a program's whole process tree, and
the description (``spec``) of the sealed root that :mod:`rlm.core.eval.sandbox_init` builds inside the namespaces.

Cgroups: for each controller (``pids``, ``memory``) the first place where a child cgroup can be created and has
the controller's limit file: cgroup v1 (``/sys/fs/cgroup/<controller>``, under this process's own cgroup first,
then at the hierarchy's root) or cgroup v2 (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``, the same order).
A sandbox gets one fresh cgroup per distinct directory (one on v2, one per controller on v1), joined by the shell
that execs ``unshare`` so every descendant is counted, and removed after its processes are killed.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

#: the limit file that proves a controller is enabled in a cgroup, per (controller, cgroup version)
LIMIT_FILES = {("pids", 1): "pids.max", ("pids", 2): "pids.max",
               ("memory", 1): "memory.limit_in_bytes", ("memory", 2): "memory.max"}
#: the working directory inside the sealed root (also ``HOME`` and ``TMPDIR``; ``/tmp`` links to it)
INNER_WORKDIR = "/sandbox"
#: top-level directories bound read-only (or recreated as the same symlink) when they exist
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/alternatives")
#: the only files of the host's ``/etc`` the program sees (dynamic loader, time zone, user names)
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/passwd", "/etc/group",
             "/etc/nsswitch.conf", "/etc/hosts", "/etc/mime.types")
INIT_SCRIPT = str(Path(__file__).with_name("sandbox_init.py"))


def _own_cgroup(controller: str, version: int) -> str:
    """This process's cgroup path in the hierarchy of ``controller`` (v1) or the unified one (v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if (version == 2 and parts[0] == "0" and parts[1] == "") or \
                (version == 1 and controller in parts[1].split(",")):
            return parts[2] or "/"
    return "/"


def _candidates(controller: str) -> list[tuple[Path, int]]:
    out: list[tuple[Path, int]] = []
    for base, version in ((f"/sys/fs/cgroup/{controller}", 1), ("/sys/fs/cgroup", 2), ("/sys/fs/cgroup/unified", 2)):
        own = _own_cgroup(controller, version).strip("/")
        for d in ([Path(base) / own] if own else []) + [Path(base)]:
            if (d, version) not in out:
                out.append((d, version))
    return out


@functools.cache
def cgroup_parent(controller: str) -> tuple[str, int] | None:
    """(directory in which to create sandbox cgroups, cgroup version) for ``controller``, or None."""
    if not hasattr(os, "geteuid"):
        return None
    for d, version in _candidates(controller):
        probe = d / f"rlm-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            if (probe / LIMIT_FILES[(controller, version)]).exists() and (probe / "cgroup.procs").exists():
                return str(d), version
        finally:
            try:
                probe.rmdir()
            except OSError:
                pass
    return None


def make_cgroups(max_processes: int | None, memory_bytes: int | None) -> list[Path]:
    """Fresh cgroups carrying ``pids.max`` and the memory limit (each None to skip); raises OSError (after
    removing what it made) if a limit cannot be written."""
    made: dict[str, Path] = {}
    name = f"rlm-sbx-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    try:
        for controller, value in (("pids", max_processes), ("memory", memory_bytes)):
            where = cgroup_parent(controller) if value is not None else None
            if where is None:
                continue
            d = Path(where[0]) / name
            if str(d) not in made:
                d.mkdir()
                made[str(d)] = d
            if controller == "pids":
                (d / "pids.max").write_text(str(value))
            elif where[1] == 2:
                (d / "memory.max").write_text(str(value))
                _try_write(d / "memory.swap.max", "0")
            else:
                (d / "memory.limit_in_bytes").write_text(str(value))
                _try_write(d / "memory.memsw.limit_in_bytes", str(value))
    except OSError:
        for d in made.values():
            kill_cgroup(d)
        raise
    return list(made.values())


def _try_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass


def join_cgroups(cgroups: list[Path], cmd: list[str]) -> list[str]:
    """``cmd`` started by a shell that first moves itself into every cgroup of ``cgroups``."""
    if not cgroups:
        return cmd
    script = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", str(len(cgroups)), *(str(c / "cgroup.procs") for c in cgroups), *cmd]


def kill_cgroup(cg: Path) -> None:
    """SIGKILL every process of ``cg`` until it is empty, then remove it."""
    for _ in range(100):
        try:
            pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
        except OSError:
            break
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
    for _ in range(100):
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _prefixes() -> list[str]:
    """The Python installation(s) ``sys.executable -I`` needs: base prefix, venv prefix, the interpreter's dir."""
    paths = {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix}
    paths.add(str(Path(os.path.realpath(sys.executable)).parent.parent))
    return [os.path.realpath(p) for p in paths if p and os.path.isdir(p)]


def root_spec(work: Path, *, wall_seconds: float, disk_mb: int, shm_mb: int, collect: tuple[str, ...],
              collect_limit: int, cmd: list[str], channel_fd: int | None) -> dict:
    """The JSON spec :mod:`rlm.core.eval.sandbox_init` reads (see its docstring); ``work`` holds ``root``,
    ``stage`` (the program's files), ``out`` and ``status``."""
    links: list[list[str]] = []
    binds: list[str] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            links.append([d, os.readlink(d)])
        elif os.path.isdir(d):
            binds.append(d)
    for p in sorted(_prefixes(), key=len):
        if p != "/" and not any(p == b or p.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(p)
    binds.sort(key=len)
    etc = [f for f in ETC_FILES if os.path.isfile(f)]
    return {"root": str(work / "root"), "stage": str(work / "wd"), "out": str(work / "out"),
            "status": str(work / "status"), "binds": binds, "links": links, "etc": etc,
            "setpriv": os.path.realpath(shutil.which("setpriv") or "/usr/bin/setpriv"), "workdir": INNER_WORKDIR, "disk_mb": disk_mb, "shm_mb": shm_mb, "wall_seconds": wall_seconds,
            "collect": list(collect), "collect_limit": collect_limit, "cmd": cmd, "channel_fd": channel_fd}


def namespaced(spec_path: Path) -> list[str]:
    """The command that runs the init with ``spec_path`` in new network, PID and private mount namespaces."""
    return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            sys.executable, "-I", "-S", INIT_SCRIPT, str(spec_path)]
