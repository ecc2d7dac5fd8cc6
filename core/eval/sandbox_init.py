"""The init (PID 1) of a sandbox's PID namespace: builds the sealed root, runs the program as its child, enforces
the wall-clock limit and hands results back (see :mod:`rlm.core.eval.sandbox`).

Run as ``python -I -S sandbox_init.py SPEC`` by ``unshare --net --pid --fork --mount --propagation private``, so
it starts as root with every capability in fresh network, PID and (private) mount namespaces; it never changes
the host's mounts. ``SPEC`` is a JSON file written by :func:`rlm.core.eval.sandbox.run_python`:

``root``        an empty host directory on which the new root (a small tmpfs) is mounted
``stage``       host directory holding the program's files, copied into the working directory
``out``         host directory the ``collect`` files are copied back into after the run
``status``      host file that receives ``exit N``, ``signal N`` or ``timeout``
``binds``       host directories bound read-only (nosuid, nodev) at the same path in the new root
``links``       ``[path, target]`` symlinks recreated in the new root (``/bin -> usr/bin``)
``etc``         host files under ``/etc`` bound read-only
``workdir``     the working directory inside (a tmpfs of ``disk_mb``); ``/tmp`` is a symlink to it
``setpriv``     path of the ``setpriv`` program (inside a bound directory)
``disk_mb``, ``shm_mb``, ``wall_seconds``, ``collect``, ``collect_limit``, ``cmd`` (argv run inside),
``channel_fd`` (the result channel's inherited descriptor, kept open for the program, or null)

Inside: ``/dev`` is a read-only tmpfs with ``null zero full random urandom tty`` bound from the host and a
private ``/dev/shm`` of ``shm_mb``; ``/proc`` belongs to the new PID namespace with ``sys``, ``sysrq-trigger``,
``irq``, ``bus`` and ``fs`` read-only; there is no ``/sys``. The program runs in a further mount namespace
whose root is pivoted to the new root (the old root is detached, so no host path is reachable), with every
capability dropped and no-new-privs set (``setpriv``). When it exits or the wall clock runs out, every process
in the namespace is killed; the init then copies the ``collect`` files out (regular files only, never following
a symlink) and exits, which tears down the namespaces and every tmpfs with them.

Standard library only, and nothing that could import from the working directory (``-I -S``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import signal
import stat
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
PIVOT_ROOT_NR = {"x86_64": 155, "aarch64": 41, "arm64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
#: x86_64 system calls the program gets EPERM for (namespaces, mounts, kernel keyrings, BPF, io_uring, ptrace and
#: other attack surface no Python program needs); other architectures run without the filter
DENIED_X86_64 = {"unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
                 "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "bpf": 321, "keyctl": 250,
                 "add_key": 248, "request_key": 249, "userfaultfd": 323, "perf_event_open": 298, "kexec_load": 246,
                 "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
                 "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163, "open_by_handle_at": 304,
                 "name_to_handle_at": 303, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
                 "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
                 "mount_setattr": 442, "quotactl": 179, "iopl": 172, "ioperm": 173}
CLONE_X86_64, CLONE3_X86_64, AUDIT_ARCH_X86_64 = 56, 435, 0xC000003E
#: CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME: refused in clone's flags
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(e)}")


def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def bind_ro(src: str, dst: str, extra: int = MS_NOSUID | MS_NODEV) -> None:
    """Bind ``src`` (not its submounts) on ``dst``, then make that mount read-only."""
    mount(src, dst, None, MS_BIND)
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra)


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        open(path, "wb").close()


def build_root(spec: dict) -> None:
    """Mount the new root's tmpfs and everything in it (in this init's private mount namespace)."""
    root = spec["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path, target in spec["links"]:
        os.makedirs(os.path.dirname(_inside(root, path)), exist_ok=True)
        os.symlink(target, _inside(root, path))
    for src in spec["binds"]:
        dst = _inside(root, src)
        os.makedirs(dst, exist_ok=True)
        bind_ro(src, dst)
    for src in spec["etc"]:
        dst = _inside(root, src)
        _touch(dst)
        bind_ro(src, dst)
    dev = _inside(root, "/dev")
    os.makedirs(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEV_NODES:
        if os.path.exists("/dev/" + name):
            _touch(os.path.join(dev, name))
            mount("/dev/" + name, os.path.join(dev, name), None, MS_BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", os.path.join(dev, name))
    os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
    os.makedirs(os.path.join(dev, "shm"))
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={spec['shm_mb']}m,mode=1777")
    mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    proc = _inside(root, "/proc")
    os.makedirs(proc)
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in PROC_READ_ONLY:
        p = os.path.join(proc, name)
        if os.path.exists(p):
            bind_ro(p, p, MS_NOSUID | MS_NODEV | MS_NOEXEC)
    wd = _inside(root, spec["workdir"])
    os.makedirs(wd)
    mount("tmpfs", wd, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['disk_mb']}m,mode=755")
    shutil.copytree(spec["stage"], wd, dirs_exist_ok=True, symlinks=True)
    if not os.path.lexists(_inside(root, "/tmp")):  # (a bound Python installation may live under /tmp)
        os.symlink(spec["workdir"], _inside(root, "/tmp"))
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")


def enter_root(spec: dict) -> None:
    """In the program's child: a mount namespace of its own whose root is the new root, the host's detached."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    os.chdir(spec["root"])
    nr = PIVOT_ROOT_NR.get(platform.machine())
    if nr is None:
        raise SetupError(f"pivot_root: unknown system call number on {platform.machine()}")
    _check(_libc.syscall(ctypes.c_long(nr), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir(spec["workdir"])


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The x86_64 BPF filter: other ABIs (i386, x32) are killed, ``DENIED_X86_64`` and ``clone`` with any
    namespace flag get EPERM, ``clone3`` gets ENOSYS (so the C library falls back to ``clone``)."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, kill), (ld, 0, 0, 0),
            (jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]
    for nr in sorted(DENIED_X86_64.values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, CLONE3_X86_64), (ret, 0, 0, enosys),
             (jeq, 0, 3, CLONE_X86_64), (ld, 0, 0, 16), (jset, 0, 1, CLONE_NEW_ANY), (ret, 0, 0, eperm),
             (ret, 0, 0, allow)]
    return prog


def install_seccomp() -> bool:
    """Set no-new-privs and install :func:`seccomp_program` (x86_64 only); returns whether it is installed."""
    if platform.machine() != "x86_64":
        return False
    prog = seccomp_program()
    arr = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    _check(_libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "no-new-privs")  # PR_SET_NO_NEW_PRIVS
    _check(_libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "seccomp filter")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return True


def run_child(spec: dict, keep_fds: set[int]) -> None:
    """The forked child: enter the new root and exec the program without capabilities (never returns)."""
    try:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        enter_root(spec)
        for fd in _open_fds():
            if fd > 2 and fd not in keep_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        install_seccomp()
        os.execv(spec["setpriv"], ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
                                      "--", *spec["cmd"]])
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the init's code
        try:
            os.write(2, f"rlm sandbox: could not start the program: {exc}\n".encode())
        finally:
            os._exit(125)


def _open_fds() -> list[int]:
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def supervise(pid: int, wall_seconds: float) -> str:
    """Reap children until ``pid`` ends or the wall clock runs out; returns the status line."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(wall_seconds, 0.01))
    try:
        while True:
            got, st = os.wait()
            if got == pid:
                signal.setitimer(signal.ITIMER_REAL, 0)
                return f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else f"exit {os.waitstatus_to_exitcode(st)}"
    except _Timeout:
        return "timeout"
    except ChildProcessError:
        return "exit 125"


def reap_all() -> None:
    """Kill every other process of this PID namespace and reap them."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for _ in range(100):
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)


def copy_out(spec: dict) -> None:
    """Copy each ``collect`` file (regular files only, no symlink followed anywhere on its path) out."""
    wd = _inside(spec["root"], spec["workdir"])
    for name in spec["collect"]:
        parts = [p for p in name.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            continue
        fds = [os.open(wd, os.O_RDONLY | os.O_DIRECTORY)]
        try:
            for p in parts[:-1]:
                fds.append(os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
            fds.append(os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1]))
            if not stat.S_ISREG(os.fstat(fds[-1]).st_mode):
                continue
            data = os.read(fds[-1], spec["collect_limit"])
            while len(data) < spec["collect_limit"]:
                more = os.read(fds[-1], spec["collect_limit"] - len(data))
                if not more:
                    break
                data += more
            dst = os.path.join(spec["out"], *parts)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(data)
        except OSError:
            continue
        finally:
            for fd in fds:
                os.close(fd)


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    keep = {int(spec["channel_fd"])} if spec.get("channel_fd") is not None else set()
    try:
        build_root(spec)
    except (OSError, SetupError) as exc:
        os.write(2, f"rlm sandbox: could not build the sandbox root: {exc}\n".encode())
        return 125
    pid = os.fork()
    if pid == 0:
        run_child(spec, keep)
    for fd in keep:  # the program holds the channel's write end now
        os.close(fd)
    status = supervise(pid, float(spec["wall_seconds"]))
    reap_all()
    copy_out(spec)
    with open(spec["status"], "w", encoding="utf-8") as f:
        f.write(status)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except OSError as exc:
        if exc.errno != errno.EINTR:
            raise
        sys.exit(125)
