"""Isolated execution of model-written Python code.

:func:`run_python` runs one program in its own process and returns its exit status and (bounded) output.
Layers, strongest first; :func:`isolation` reports which ones this machine allows:

``namespaces`` (root with ``unshare`` and ``setpriv``, e.g. a container or VM where rlm runs as root)
    ``unshare --net --pid --mount --mount-proc``: a new network namespace with no interfaces (every connection
    fails with "network is unreachable"), a new PID namespace (the program is PID 1 of its own process tree:
    host processes are invisible, and when it dies or is killed every process it started dies with it), a
    private mount namespace in which ``/`` is remounted read-only except the program's own working
    directory and ``/sys`` is unmounted; then ``setpriv`` drops every capability (bounding set included) and
    sets no-new-privs, so the program cannot undo the read-only mounts.
``pids cgroup`` (a writable cgroup v1 ``pids`` hierarchy, or cgroup v2 with the pids controller)
    a fresh cgroup with ``pids.max`` caps the number of processes — this is what contains a fork bomb when
    rlm runs as root, where ``RLIMIT_NPROC`` does not apply.
``rlimits`` (always)
    ``resource.setrlimit``: CPU seconds, address space, file size, open files, no core dumps; for non-root
    users also ``RLIMIT_NPROC`` (counted per user, so set to the user's current process count + the limit).
``process group`` (always)
    the program starts a new session; on timeout the whole process group is killed (and the cgroup's
    processes, and the PID namespace's init).
``guard`` (always; a Python audit hook installed before the program runs)
    blocks socket creation for every family but AF_UNIX. Where the namespace layer is missing it also blocks
    writes, deletes and renames outside the working directory, ``subprocess``/``os.system``/``exec*``,
    ``ctypes``, and, when no process-count limit is effective, ``fork``. An audit hook is a Python-level
    barrier (native code can bypass it), so it is a fallback, not a security boundary.

Always: a new temporary working directory (removed afterwards), a minimal environment (``PATH``, ``HOME``,
``LANG``, ``TMPDIR``; nothing inherited from the parent, so no secrets), ``python -I`` (ignores ``PYTHON*``
variables and the user site), stdin from ``/dev/null`` unless given, stdout/stderr written to files whose
size the file-size limit bounds and read back up to ``max_output_bytes``.

Used by the ``code`` task plugin's judge (:mod:`rlm.plugins.tasks.code.judge`), its only user today. It stays
in core, not in that task's package, because running model-written code safely is infrastructure that every
task or tool executing programs must share (a future tool-use task, third-party code tasks), and its
isolation must be hardened in one place rather than copied into each plugin.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from rlm.core.contracts import PluginConfig

CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")


class SandboxConfig(PluginConfig):
    """Limits for one sandboxed program."""

    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_mb: int = 2048
    max_processes: int = 32
    file_size_mb: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 1_000_000
    #: ``auto`` uses every layer the machine allows; ``rlimits`` skips namespaces and cgroups
    isolation: Literal["auto", "rlimits"] = "auto"


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float
    layers: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # the ``collect`` files the program left behind

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


GUARD = r'''
import os as _os, sys as _sys
_WD = _os.path.realpath(_os.getcwd())
_STRICT = {strict!r}
_NOFORK = {nofork!r}

def _inside(p):
    try:
        p = _os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    if p is None:
        return True
    q = _os.path.realpath(p)
    return q == _WD or q.startswith(_WD + _os.sep) or q == "/dev/null"

_PATH_EVENTS = {{"os.remove", "os.rmdir", "os.rename", "os.chmod", "os.chown", "os.truncate", "os.link",
                "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "os.removexattr",
                "os.setxattr"}}
_EXEC_EVENTS = {{"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
                "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.forkpty"}}

def _hook(event, args):
    if event == "socket.__new__":
        fam = args[1] if len(args) > 1 else None
        if fam != 1:  # AF_UNIX
            raise PermissionError("network access is disabled in the rlm sandbox")
    elif event in ("socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"):
        raise PermissionError("network access is disabled in the rlm sandbox")
    elif _NOFORK and event == "os.fork":
        raise PermissionError("fork is disabled in the rlm sandbox")
    elif _STRICT:
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC))
            if writing and path is not None and not _inside(path):
                raise PermissionError(f"writing outside the sandbox directory is disabled: {{path}}")
            if isinstance(path, (str, bytes)):
                q = _os.fsdecode(path)
                if q.startswith("/proc/") and not q.startswith(("/proc/self/", "/proc/" + str(_os.getpid()) + "/")):
                    raise PermissionError("other processes' /proc entries are hidden in the rlm sandbox")
        elif event in _PATH_EVENTS:
            for a in args[:2]:
                if isinstance(a, (str, bytes, _os.PathLike)) and not _inside(a):
                    raise PermissionError(f"{{event}} outside the sandbox directory is disabled")
        elif event in _EXEC_EVENTS:
            raise PermissionError(f"{{event}} is disabled in the rlm sandbox")

_sys.addaudithook(_hook)
_sys.argv = ["main.py"]
import runpy as _runpy
_runpy.run_path("main.py", run_name="__main__")
'''


def _run_quiet(cmd: list[str], timeout: float = 10.0) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=None)
def isolation() -> dict[str, bool]:
    """Which layers this machine allows (probed once per process)."""
    tools = all(shutil.which(t) for t in ("unshare", "setpriv", "mount", "umount"))
    ns = False
    if tools and hasattr(os, "geteuid") and os.geteuid() == 0:
        ns = _run_quiet(["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation",
                         "private", "--mount-proc", "sh", "-c",
                         "mount -o remount,bind,ro / && umount -l /sys; exec setpriv --no-new-privs "
                         "--bounding-set=-all --inh-caps=-all -- true"])
    cg = _cgroup_root() is not None
    return {"namespaces": ns, "pids_cgroup": cg, "rlimits": True, "process_group": True, "guard": True}


@functools.lru_cache(maxsize=None)
def _cgroup_root() -> str | None:
    if not hasattr(os, "geteuid"):
        return None
    for root in CGROUP_ROOTS:
        probe = Path(root) / f"rlm-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            if (probe / "pids.max").exists() and (probe / "cgroup.procs").exists():
                return root
        finally:
            try:
                probe.rmdir()
            except OSError:
                pass
    return None


def _count_user_processes(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _kill_cgroup(cg: Path) -> None:
    for _ in range(50):
        try:
            pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
    for _ in range(50):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.02)


def _read(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _write_program(wd: Path, code: str, files: dict[str, str | bytes] | None, *, strict: bool,
                   nofork: bool) -> None:
    """``main.py``, the given ``files`` and the guard that starts the program, in the working directory."""
    (wd / "main.py").write_text(code, encoding="utf-8", errors="surrogatepass")
    for name, content in (files or {}).items():
        if isinstance(content, bytes):
            (wd / name).write_bytes(content)
        else:
            (wd / name).write_text(content, encoding="utf-8")
    (wd / "_rlm_guard.py").write_text(GUARD.format(strict=strict, nofork=nofork), encoding="utf-8")


def _namespaced(wd: Path, py: list[str]) -> list[str]:
    """``py`` inside new network, PID and mount namespaces: ``/`` read-only but the working directory, no
    ``/sys``, every capability dropped and no-new-privs set."""
    inner = ("mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro / && umount -l /sys && "
             "cd \"$1\" && shift && exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all -- \"$@\"")
    return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            "--mount-proc", "/bin/sh", "-c", inner, "sh", str(wd), *py]


def _in_cgroup(cg: Path, max_processes: int, cmd: list[str]) -> list[str]:
    """Create the pids cgroup ``cg`` and return ``cmd`` started inside it."""
    cg.mkdir()
    (cg / "pids.max").write_text(str(max_processes))
    # the shell joins the cgroup before it execs the program, so every descendant is counted
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg / "cgroup.procs"), *cmd]


def _rlimits(cfg: SandboxConfig, nproc: int | None) -> Callable[[], None]:
    """The function the child runs between fork and exec to set its resource limits."""
    mem = cfg.memory_mb * 1024 * 1024
    fsize = cfg.file_size_mb * 1024 * 1024

    def limit() -> None:  # runs in the child between fork and exec: only async-signal-safe-ish calls
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cfg.cpu_seconds, cfg.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (cfg.max_open_files, cfg.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return limit


def _wait_and_kill(proc: subprocess.Popen, stdin: str | None, wall_seconds: float,
                   cg: Path | None) -> bool:
    """Feed ``stdin``, wait up to ``wall_seconds``, then kill the process group (and the cgroup's processes);
    returns whether the program timed out."""
    timed_out = False
    try:
        if stdin is not None:
            try:
                proc.stdin.write(stdin.encode("utf-8", errors="replace"))  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                pass
        proc.wait(timeout=wall_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if cg is not None:
            _kill_cgroup(cg)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return timed_out


def _collect(wd: Path, names: tuple[str, ...], limit: int) -> dict[str, bytes]:
    """Up to ``limit`` bytes of each named plain file the program left in its working directory."""
    got: dict[str, bytes] = {}
    for name in names:
        p = wd / name
        try:
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    got[name] = f.read(limit)
        except OSError:
            pass
    return got


def run_python(code: str, *, stdin: str | None = None, config: SandboxConfig | None = None,
               files: dict[str, str | bytes] | None = None, collect: tuple[str, ...] = ()) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox; never raises for anything the program does.

    ``files`` are written into the working directory first; ``collect`` names files whose content (at most
    ``file_size_mb``, plain files only) is returned in ``SandboxResult.files`` after the run."""
    cfg = config or SandboxConfig()
    iso = isolation() if cfg.isolation == "auto" else {"namespaces": False, "pids_cgroup": False}
    use_ns = iso["namespaces"]
    cg_root = _cgroup_root() if (cfg.isolation == "auto" and iso["pids_cgroup"]) else None
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    layers = ["rlimits", "process_group", "guard"]
    work = Path(tempfile.mkdtemp(prefix="rlm-sbx-"))
    wd = work / "wd"
    wd.mkdir()
    cg: Path | None = None
    start = time.monotonic()
    try:
        _write_program(wd, code, files, strict=not use_ns, nofork=cg_root is None and is_root)
        cmd = [sys.executable, "-I", "-B", "_rlm_guard.py"]
        if use_ns:
            layers.insert(0, "namespaces")
            cmd = _namespaced(wd, cmd)
        if cg_root is not None:
            cg = Path(cg_root) / f"rlm-sbx-{os.getpid()}-{uuid.uuid4().hex[:10]}"
            cmd = _in_cgroup(cg, cfg.max_processes, cmd)
            layers.insert(1 if use_ns else 0, "pids_cgroup")
        nproc = None if is_root else _count_user_processes(os.getuid()) + cfg.max_processes
        env = {"PATH": "/usr/bin:/bin", "HOME": str(wd), "TMPDIR": str(wd), "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        out_path, err_path = work / "stdout", work / "stderr"
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                proc = subprocess.Popen(cmd, cwd=wd, env=env, stdin=subprocess.PIPE if stdin is not None else
                                        subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                        preexec_fn=_rlimits(cfg, nproc), start_new_session=True, close_fds=True)
            except OSError as exc:
                return SandboxResult(None, "", f"sandbox could not start the program: {exc}", False,
                                     time.monotonic() - start, layers)
            timed_out = _wait_and_kill(proc, stdin, cfg.wall_seconds, cg)
            cg = None
        got = _collect(wd, collect, cfg.file_size_mb * 1024 * 1024)
        return SandboxResult(None if timed_out else proc.returncode, _read(out_path, cfg.max_output_bytes),
                             _read(err_path, cfg.max_output_bytes), timed_out, time.monotonic() - start, layers,
                             got)
    finally:
        if cg is not None:
            _kill_cgroup(cg)
        shutil.rmtree(work, ignore_errors=True)
