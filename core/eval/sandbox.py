"""Isolated execution of model-written Python code.

:func:`run_python` runs one program in its own process and returns its exit status and (bounded) output.
Layers, strongest first; :func:`isolation` reports which ones this machine allows:

``namespaces`` (root with ``unshare`` and ``setpriv``, e.g. a container or VM where rlm runs as root; probed by
    building a sealed root once) ``unshare --net --pid --mount --propagation private`` starts
    :mod:`rlm.core.eval.sandbox_init` as PID 1 of new network, PID and mount namespaces; the host's mounts are
    never changed. The init builds a *sealed root* on a small tmpfs: read-only bind mounts of ``/usr`` (and
    ``/bin``, ``/lib*`` when they are directories, not links), of the Python installation(s) the interpreter
    needs (``sys.base_prefix`` and the venv's ``sys.prefix``, at their own paths) and of a few ``/etc`` files
    (dynamic loader cache, time zone, passwd/group) — nothing else of the host: no home directory, no
    ``$RLM_CACHE``, no repository, no ``/tmp``, no other run, no ``/sys``. ``/dev`` is a read-only tmpfs holding
    only ``null zero full random urandom tty`` (bound from the host) and a private ``/dev/shm`` tmpfs of
    ``shm_mb``; ``/proc`` belongs to the new PID namespace, with ``/proc/sys``, ``sysrq-trigger``, ``irq``,
    ``bus`` and ``fs`` read-only (so e.g. ``vm.swappiness`` cannot be changed). The working directory
    (``/sandbox``, also ``HOME``/``TMPDIR``; ``/tmp`` links to it) is a tmpfs of ``disk_mb``: the disk quota for
    everything the program writes. The program runs as the init's *child* in a further mount namespace
    pivoted into that root (the host's root is detached, not just hidden), with every capability dropped and
    no-new-privs set (``setpriv``) and, on x86_64, a seccomp filter that refuses namespace creation (``unshare``,
    ``setns``, ``clone`` with namespace flags), mounts, ``ptrace``, BPF, kernel keyrings, ``io_uring``,
    ``userfaultfd``, ``perf_event_open`` and module/kexec/swap calls (see ``DENIED_X86_64`` there). Because the program is not PID 1, ``RLIMIT_CPU``'s SIGXCPU works as usual;
    the init enforces ``wall_seconds`` itself and, when the program ends or the time is up, kills every process
    of the namespace (double-forked daemons included), copies the ``collect`` files out (regular files only, no
    symlink followed) and exits, which frees every tmpfs. The parent kills the init from outside as a backstop
    (SIGKILL from an ancestor namespace always reaches a namespace's init). On other architectures there
    is no seccomp filter: the program may then create a user namespace of its own, in which it still sees
    only the sealed root (its mounts locked read-only) and no host process, but reaches more kernel code.
``pids cgroup`` / ``memory cgroup`` (cgroup v1 ``pids``/``memory`` hierarchies or cgroup v2 with those
    controllers, writable: see :mod:`rlm.core.eval.sandbox_root`)
    a fresh cgroup per run with ``pids.max`` (``max_processes`` + 2, for ``unshare`` and the init) caps the
    number of processes — this is what contains a fork bomb when rlm runs as root, where ``RLIMIT_NPROC`` does
    not apply — and ``memory.max`` (v2) / ``memory.limit_in_bytes`` (v1, swap included where accounted) caps
    the memory of the whole process tree at ``memory_mb``, tmpfs pages the program wrote (working directory,
    ``/dev/shm``) included. The cgroups are removed after the run.
``rlimits`` (always)
    ``resource.setrlimit``: CPU seconds, address space (per process), file size (files the program writes;
    stdout and stderr are pipes, so a large output never hits it), open files, no core dumps; for non-root
    users also ``RLIMIT_NPROC`` (counted per user, so set to the user's current process count + the limit).
``process group`` (always)
    the program starts a new session; on timeout the whole process group is killed (and the cgroups'
    processes, and the PID namespace's init).
``guard`` (always; a Python audit hook installed before the program runs)
    blocks socket creation for every family but AF_UNIX. Where the namespace layer is missing it also blocks
    writes, deletes and renames outside the working directory, ``subprocess``/``os.system``/``exec*``,
    ``ctypes``, and, when no process-count limit is effective, ``fork``. An audit hook is a Python-level
    barrier (native code can bypass it), so it is a fallback, not a security boundary.

Fallbacks, each weaker: without the namespace layer (not root, no ``unshare``/``setpriv``, a kernel without
mount/PID namespaces or ``isolation="rlimits"``) the program runs in a host directory under ``/tmp`` and can
*read* whatever the user can (home, ``$RLM_CACHE``, the repository); writes outside that directory, ``/dev/shm``
included, are refused only by the guard, disk use is bounded per file (``file_size_mb``) only, and a process
that leaves the process group (``setsid``) outlives the run unless a pids cgroup kills it. Without a memory
cgroup, memory is bounded per process (``RLIMIT_AS``), so a tree of N processes may use N × ``memory_mb``.
Without a pids cgroup, root cannot fork at all (the guard) and other users are bounded by ``RLIMIT_NPROC``.
``isolation="rlimits"`` skips namespaces and cgroups.

Always: a new temporary work directory (removed afterwards), a minimal environment (``PATH``, ``HOME``,
``LANG``, ``TMPDIR``; nothing inherited from the parent, so no secrets), ``python -I`` (ignores ``PYTHON*``
variables and the user site), stdin from ``/dev/null`` unless given, stdout/stderr read through pipes by
threads that keep the first ``max_output_bytes`` of each and discard the rest (``SandboxResult.output_truncated``)
without slowing or failing the program; the result channel (file descriptor 3) works the same way.

Used by the ``code`` task plugin's judge (:mod:`rlm.plugins.tasks.code.judge`), its only user today. It stays
in core, not in that task's package, because running model-written code safely is infrastructure that every
task or tool executing programs must share (a future tool-use task, third-party code tasks), and its
isolation must be hardened in one place rather than copied into each plugin.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlm.core.contracts import PluginConfig
from rlm.core.eval import sandbox_root as sr

#: the file descriptor of the result channel inside the program (``run_python(channel_bytes=N)``)
CHANNEL_FD = 3


class SandboxConfig(PluginConfig):
    """Limits for one sandboxed program."""

    #: CPU seconds per process (``RLIMIT_CPU``: SIGXCPU)
    cpu_seconds: int = 10
    #: wall-clock limit of the whole run; every process of the program is killed when it runs out
    wall_seconds: float = 20.0
    #: memory of the whole process tree with a memory cgroup (tmpfs files included), and of each process
    #: (``RLIMIT_AS``) always
    memory_mb: int = 2048
    #: processes (and threads) at once, with a pids cgroup; ``RLIMIT_NPROC`` for non-root users otherwise
    max_processes: int = 32
    #: largest file the program may write (``RLIMIT_FSIZE``; stdout and stderr are pipes, not bound by it)
    file_size_mb: int = 16
    max_open_files: int = 64
    #: bytes of stdout and of stderr kept (the rest is read and discarded; ``SandboxResult.output_truncated``)
    max_output_bytes: int = 1_000_000
    #: size of the working directory (a tmpfs, counted in ``memory_mb``) under the namespace layer
    disk_mb: int = 1024
    #: size of the private ``/dev/shm`` (a tmpfs, counted in ``memory_mb``) under the namespace layer
    shm_mb: int = 16
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
    #: what the program wrote to the result channel (file descriptor ``CHANNEL_FD``), at most ``channel_bytes``
    channel: bytes = b""
    #: whether the program wrote more than ``channel_bytes`` to the channel (the rest was discarded)
    channel_overflow: bool = False
    #: whether stdout or stderr was longer than ``max_output_bytes`` (the rest was read and discarded)
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


GUARD = r'''
import os as _os, sys as _sys, site as _site
_sys.path.extend(_p for _p in {site_dirs!r} if _p not in _sys.path)
_site.setquit(), _site.setcopyright(), _site.sethelper()
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

_chan = _os.environ.pop("RLM_SANDBOX_CHANNEL", None)
if _chan is not None and int(_chan) != {channel_fd}:
    _os.dup2(int(_chan), {channel_fd})
    _os.close(int(_chan))
del _chan
_sys.addaudithook(_hook)
_sys.argv = ["main.py"]
import runpy as _runpy
_runpy.run_path("main.py", run_name="__main__")
'''


def _run_quiet(cmd: list[str], timeout: float = 10.0) -> bool:
    try:
        return subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def isolation() -> dict[str, bool]:
    """Which layers this machine allows (probed once per process: the namespace layer by building a sealed
    root and running ``python -c pass`` in it)."""
    ns = False
    if shutil.which("unshare") and shutil.which("setpriv") and hasattr(os, "geteuid") and os.geteuid() == 0:
        work = Path(tempfile.mkdtemp(prefix="rlm-sbx-probe-"))
        try:
            for d in ("root", "wd", "out"):
                (work / d).mkdir()
            spec = sr.root_spec(work, wall_seconds=10.0, disk_mb=1, shm_mb=1, collect=(), collect_limit=0,
                                cmd=[sys.executable, "-I", "-c", "pass"], channel_fd=None)
            (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
            ns = _run_quiet(sr.namespaced(work / "spec.json"), timeout=20.0) and \
                (work / "status").read_text(encoding="utf-8") == "exit 0"
        except OSError:
            ns = False
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"namespaces": ns, "pids_cgroup": sr.cgroup_parent("pids") is not None,
            "memory_cgroup": sr.cgroup_parent("memory") is not None, "rlimits": True, "process_group": True,
            "guard": True}


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


@functools.lru_cache(maxsize=1)
def _site_dirs() -> tuple[str, ...]:
    """The interpreter's site-packages directories. The guard runs with ``-S`` and puts them on ``sys.path``
    itself: ``site`` would also run every ``.pth`` file there (editable-install finders, namespace shims),
    which took two thirds of a sandboxed program's start (0.16 s against 0.05 s on 2 busy cores)."""
    import site

    return tuple(p for p in site.getsitepackages() if os.path.isdir(p))


def _write_program(wd: Path, code: str, files: dict[str, str | bytes] | None, *, strict: bool,
                   nofork: bool) -> None:
    """``main.py``, the given ``files`` and the guard that starts the program, in the working directory."""
    (wd / "main.py").write_text(code, encoding="utf-8", errors="surrogatepass")
    for name, content in (files or {}).items():
        if isinstance(content, bytes):
            (wd / name).write_bytes(content)
        else:
            (wd / name).write_text(content, encoding="utf-8")
    guard = GUARD.format(strict=strict, nofork=nofork, channel_fd=CHANNEL_FD, site_dirs=_site_dirs())
    (wd / "_rlm_guard.py").write_text(guard, encoding="utf-8")


def _limits(cfg: SandboxConfig, nproc: int | None) -> list[tuple[str, int, int]]:
    """``(name, soft, hard)`` of every resource limit a program runs under (``resource.RLIMIT_<name>``, and
    ``prlimit --<name lower>``)."""
    mem, fsize = cfg.memory_mb * 1024 * 1024, cfg.file_size_mb * 1024 * 1024
    out = [("CPU", cfg.cpu_seconds, cfg.cpu_seconds + 1), ("AS", mem, mem), ("FSIZE", fsize, fsize),
           ("NOFILE", cfg.max_open_files, cfg.max_open_files), ("CORE", 0, 0)]
    return out + ([("NPROC", nproc, nproc)] if nproc is not None else [])


def _rlimits(cfg: SandboxConfig, nproc: int | None) -> Callable[[], None]:
    """The function the child runs between fork and exec to set its resource limits (where there is no
    ``prlimit``)."""
    limits = [(getattr(resource, f"RLIMIT_{name}"), soft, hard) for name, soft, hard in _limits(cfg, nproc)]

    def limit() -> None:  # runs in the child between fork and exec: only setrlimit calls
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))

    return limit


def _prlimit_prefix(cfg: SandboxConfig, nproc: int | None) -> list[str] | None:
    """The same limits, set by util-linux ``prlimit`` on the command it then executes, or None where there is no
    ``prlimit``. Preferred because a ``preexec_fn`` makes ``subprocess`` fork the whole parent instead of using
    ``vfork``: from a trainer holding a model in memory (1.6 GB) that costs about 40 ms per sandboxed program."""
    exe = _prlimit_path()
    if exe is None:
        return None
    return [exe, *(f"--{name.lower()}={soft}:{hard}" for name, soft, hard in _limits(cfg, nproc)), "--"]


@functools.lru_cache(maxsize=1)
def _prlimit_path() -> str | None:
    return shutil.which("prlimit", path="/usr/bin:/bin:/usr/sbin:/sbin")


def _init_pid(pid: int) -> int | None:
    """The namespace's init: the only child of ``unshare`` (whose pid is ``pid``), or None."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def _wait_exit(proc: subprocess.Popen, seconds: float) -> None:
    """``proc.wait(timeout=seconds)`` without its polling: ``Popen.wait`` with a timeout sleeps in steps of up
    to 50 ms, which cost a short sandboxed program about a third of its wall time. A pidfd (Linux 5.3+) becomes
    readable the moment the process exits; elsewhere the plain wait is used."""
    import select

    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        proc.wait(timeout=seconds)
        return
    try:
        if not select.select([fd], [], [], max(seconds, 0.0))[0]:
            raise subprocess.TimeoutExpired(proc.args, seconds)
    finally:
        os.close(fd)
    proc.wait()


def _wait_and_kill(proc: subprocess.Popen, stdin: str | None, wall_seconds: float,
                   cgroups: list[Path]) -> bool:
    """Feed ``stdin``, wait up to ``wall_seconds``, then SIGKILL the process group, the namespace's init (from
    outside its PID namespace, where that always works) and every process of the cgroups, and remove these;
    returns whether the wait ran out."""
    timed_out = False
    try:
        if stdin is not None:
            try:
                proc.stdin.write(stdin.encode("utf-8", errors="replace"))  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                pass
        _wait_exit(proc, wall_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        init = _init_pid(proc.pid) if proc.returncode is None else None
        for kill, target in ((os.killpg, proc.pid), (os.kill, init)):
            try:
                if target is not None:
                    kill(target, signal.SIGKILL)
            except OSError:
                pass
        for cg in cgroups:
            sr.kill_cgroup(cg)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return timed_out


def _collect(wd: Path, names: tuple[str, ...], limit: int) -> dict[str, bytes]:
    """Up to ``limit`` bytes of each named plain file the program left in its working directory."""
    got: dict[str, bytes] = {}
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            continue
        p = wd / name
        try:
            if p.is_file() and not p.is_symlink():
                with open(p, "rb") as f:
                    got[name] = f.read(limit)
        except OSError:
            pass
    return got


class _Channel:
    """The result channel: a pipe whose write end is the program's file descriptor ``CHANNEL_FD``, drained by
    a thread into at most ``limit`` bytes (the rest is read and discarded, so the program never blocks)."""

    def __init__(self, limit: int) -> None:
        import threading

        self.limit = limit
        self.read_fd, self.write_fd = os.pipe()
        self.data = bytearray()
        self.overflow = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            room = self.limit - len(self.data)
            if len(chunk) > room:
                self.overflow = True
            self.data += chunk[:max(room, 0)]

    def close_writer(self) -> None:
        try:
            os.close(self.write_fd)
        except OSError:
            pass

    def finish(self) -> tuple[bytes, bool]:
        """Wait for the drain (every writer is gone once the program's process tree is killed)."""
        self._thread.join(timeout=5)
        try:
            os.close(self.read_fd)
        except OSError:
            pass
        return bytes(self.data), self.overflow


def _prepare(cfg: SandboxConfig, work: Path, use_ns: bool, collect: tuple[str, ...],
             chan: _Channel | None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start the guard (inside the sealed root under ``use_ns``)."""
    cmd = [sys.executable, "-I", "-B", "-S", "_rlm_guard.py"]
    home = str(work / "wd")
    if use_ns:
        home = sr.INNER_WORKDIR
        for d in ("root", "out"):
            (work / d).mkdir()
        spec = sr.root_spec(work, wall_seconds=cfg.wall_seconds, disk_mb=cfg.disk_mb, shm_mb=cfg.shm_mb,
                            collect=collect, collect_limit=cfg.file_size_mb * 1024 * 1024, cmd=cmd,
                            channel_fd=chan.write_fd if chan is not None else None)
        (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        cmd = sr.namespaced(work / "spec.json")
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if chan is not None:  # the guard moves the inherited write end to CHANNEL_FD before the program runs
        env["RLM_SANDBOX_CHANNEL"] = str(chan.write_fd)
    return cmd, env


def _outcome(work: Path, use_ns: bool, waited_out: bool, returncode: int | None) -> tuple[int | None, bool]:
    """(returncode, timed_out) from the init's status file (namespace layer) or the process itself."""
    try:
        status = (work / "status").read_text(encoding="utf-8").split() if use_ns else []
    except OSError:
        status = []
    if waited_out or status == ["timeout"]:
        return None, True
    if len(status) == 2 and status[1].lstrip("-").isdigit():
        return (int(status[1]) if status[0] == "exit" else -int(status[1])), False
    return returncode, False


def run_python(code: str, *, stdin: str | None = None, config: SandboxConfig | None = None,
               files: dict[str, str | bytes] | None = None, collect: tuple[str, ...] = (),
               channel_bytes: int = 0) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox; never raises for anything the program does.

    ``files`` are written into the working directory first; ``collect`` names files whose content (at most
    ``file_size_mb``, plain files only) is returned in ``SandboxResult.files`` after the run. With
    ``channel_bytes`` > 0 the program also gets a result channel, file descriptor ``CHANNEL_FD`` (3), whose
    first ``channel_bytes`` bytes come back in ``SandboxResult.channel`` — separate from stdout and stderr, so
    output of any size neither hides nor fills it. What arrives there is data from an untrusted program:
    parse it as such."""
    cfg = config or SandboxConfig()
    auto = cfg.isolation == "auto"
    iso = isolation() if auto else {}
    use_ns = bool(iso.get("namespaces"))
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    work = Path(tempfile.mkdtemp(prefix="rlm-sbx-"))
    (work / "wd").mkdir()
    cgroups: list[Path] = []
    pipes: list[_Channel] = []
    start = time.monotonic()
    try:
        if auto:
            try:
                cgroups = sr.make_cgroups(cfg.max_processes + 2 if iso["pids_cgroup"] else None,
                                          cfg.memory_mb * 1024 * 1024 if iso["memory_cgroup"] else None)
            except OSError:
                cgroups = []
        limits = {f.name for c in cgroups for f in c.iterdir() if f.name in ("pids.max", "memory.max",
                                                                           "memory.limit_in_bytes")}
        layers = (["namespaces"] if use_ns else []) + (["pids_cgroup"] if "pids.max" in limits else []) + \
            (["memory_cgroup"] if limits - {"pids.max"} else []) + ["rlimits", "process_group", "guard"]
        _write_program(work / "wd", code, files, strict=not use_ns, nofork="pids.max" not in limits and is_root)
        chan = _Channel(channel_bytes) if channel_bytes > 0 else None
        out, err = _Channel(cfg.max_output_bytes), _Channel(cfg.max_output_bytes)
        pipes = [p for p in (chan, out, err) if p is not None]
        cmd, env = _prepare(cfg, work, use_ns, collect, chan)
        nproc = None if is_root else _count_user_processes(os.getuid()) + cfg.max_processes
        prefix = _prlimit_prefix(cfg, nproc)
        # without prlimit: only setrlimit calls, safe between fork and exec with threads running
        limit = _rlimits(cfg, nproc) if prefix is None else None
        try:
            proc = subprocess.Popen((prefix or []) + sr.join_cgroups(cgroups, cmd), cwd=work / "wd", env=env,
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=out.write_fd, stderr=err.write_fd,
                                    preexec_fn=limit,  # noqa: PLW1509
                                    start_new_session=True, close_fds=True,
                                    pass_fds=(chan.write_fd,) if chan is not None else ())
        except OSError as exc:
            return SandboxResult(None, "", f"sandbox could not start the program: {exc}", False,
                                 time.monotonic() - start, layers)
        finally:
            for p in pipes:
                p.close_writer()  # the program holds the only write ends now
        waited_out = _wait_and_kill(proc, stdin, cfg.wall_seconds + (1.0 if use_ns else 0.0), cgroups)
        cgroups = []
        returncode, timed_out = _outcome(work, use_ns, waited_out, proc.returncode)
        (o, o_over), (e, e_over) = out.finish(), err.finish()
        channel, overflow = chan.finish() if chan is not None else (b"", False)
        pipes = []
        got = _collect(work / ("out" if use_ns else "wd"), collect, cfg.file_size_mb * 1024 * 1024)
        return SandboxResult(returncode, o.decode("utf-8", errors="replace"), e.decode("utf-8", errors="replace"),
                             timed_out, time.monotonic() - start, layers, got, channel, overflow, o_over or e_over)
    finally:
        for cg in cgroups:
            sr.kill_cgroup(cg)
        for p in pipes:
            p.close_writer()
            p.finish()
        shutil.rmtree(work, ignore_errors=True)
