"""Hostile programs against the sealed sandbox (issue 13 item 2): each tries to escape, exhaust a resource or
leave something behind, and each test asserts that it was contained and that the host is unchanged.

Tests marked ``ns`` need the namespace layer (skipped where :func:`isolation` reports it missing); ``fallback``
tests run the same attack with ``isolation="rlimits"`` where that layer has a meaningful guarantee."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from sandbox_support import sandboxed_procs, watch_procs

from rlm.core.eval import sandbox_root as sr
from rlm.core.eval.sandbox import SandboxConfig, _wait_and_kill, isolation, run_python

ns = pytest.mark.skipif(not isolation()["namespaces"], reason="namespace layer unavailable on this machine")
memcg = pytest.mark.skipif(not (isolation()["namespaces"] and isolation()["memory_cgroup"]),
                           reason="memory cgroup unavailable on this machine")
REPO = Path(sr.__file__).resolve().parents[2]  # the repository (core/eval/sandbox_root.py)


def cfg(mode: str = "auto", **kw) -> SandboxConfig:
    base = {"cpu_seconds": 2, "wall_seconds": 3.0, "memory_mb": 256, "max_processes": 16, "file_size_mb": 8, "disk_mb": 32,
                "isolation": mode}
    base.update(kw)
    return SandboxConfig(**base)


def probe(paths: list[str]) -> str:
    """A program that tries to list or read each path and prints ``SEEN <path> <names or bytes>`` when it can."""
    return (f"import os\nfor p in {paths!r}:\n    try:\n"
            f"        data = sorted(os.listdir(p)) if os.path.isdir(p) else open(p, 'rb').read(64)\n"
            f"        print('SEEN', p, repr(data))\n    except Exception as e:\n"
            f"        print('hidden', p, type(e).__name__)\n")


def skeleton_names() -> set[str]:
    """Path components of the bound Python installations: the only names the new root shows on the way to them
    (e.g. ``/root`` lists just ``.pyenv`` when the interpreter is installed under it)."""
    names: set[str] = set()
    for b in sr.root_spec(Path("/nonexistent"), wall_seconds=1, disk_mb=1, shm_mb=1, collect=(), collect_limit=0,
                          cmd=[], channel_fd=None)["binds"]:
        names.update(Path(b).parts[1:])
    return names


def swappiness() -> str:
    return Path("/proc/sys/vm/swappiness").read_text()


def mountinfo() -> list[str]:
    return sorted(line.split(" ", 4)[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


# ---------------------------------------------------------------- escape: the host filesystem is invisible


@ns
def test_host_files_are_invisible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    paths = [str(Path.home()), str(REPO), str(REPO / "core" / "eval" / "sandbox.py"), str(secret), str(tmp_path),
             "/etc/shadow", "/root", "/var", "/sys/fs/cgroup", "/proc/1/root/etc", "/proc/1/cwd"]
    if os.environ.get("RLM_CACHE"):
        paths.append(os.environ["RLM_CACHE"])
    r = run_python(probe(paths), config=cfg())
    assert r.ok, r.stderr
    allowed = skeleton_names()
    for line in r.stdout.splitlines():
        if line.startswith("SEEN"):  # only an empty skeleton directory leading to a bound Python installation
            names = eval(line.split(" ", 2)[2])
            assert isinstance(names, list) and set(names) <= allowed, line
    assert r.stdout.count("hidden") + r.stdout.count("SEEN") == len(paths) and "host secret" not in r.stdout
    assert f"hidden {secret}" in r.stdout and f"hidden {REPO / 'core' / 'eval' / 'sandbox.py'}" in r.stdout


@ns
def test_tmp_is_private_and_other_runs_invisible():
    # a concurrent run's working directory holds a marker; this run must not find it anywhere under /tmp
    marker = f"marker-{uuid.uuid4().hex}"
    other = threading.Thread(target=run_python, args=("import time; time.sleep(1.5)",),
                             kwargs={"files": {marker: "x"}, "config": cfg()})
    other.start()
    time.sleep(0.4)
    code = (f"import os\nhits = [r for r, d, f in os.walk('/tmp', followlinks=True) if {marker!r} in f]\n"
            f"for r, d, f in os.walk('/'):\n"
            f"    d[:] = [x for x in d if os.path.join(r, x) not in ('/usr', '/proc', '/root', '/work')]\n"
            f"    hits += [r] if {marker!r} in f else []\n"
            f"print('HITS', hits, sorted(os.listdir('/')))\n")
    r = run_python(code, config=cfg(wall_seconds=6.0))
    other.join()
    assert r.ok, r.stderr
    assert "HITS []" in r.stdout
    assert "'home'" not in r.stdout and "'var'" not in r.stdout and "'sys'" not in r.stdout


@ns
def test_python_install_and_system_are_read_only(tmp_path):
    import sys
    targets = [os.path.join(sys.prefix, "pwned.txt"), os.path.join(sys.base_prefix, "pwned.txt"), "/usr/pwned",
               "/etc/pwned", "/pwned", "/dev/pwned", "/proc/pwned"]
    code = (f"for p in {targets!r}:\n    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
            f"    except OSError as e:\n        print('refused', p, e.errno)\n")
    r = run_python(code, config=cfg())
    assert r.ok and "WROTE" not in r.stdout and r.stdout.count("refused") == len(targets)
    assert not any(os.path.exists(t) for t in targets)


# ---------------------------------------------------------------- escape: kernel interfaces


@ns
def test_proc_sys_is_read_only_host_unchanged():
    before = swappiness()
    new = "17" if before.strip() != "17" else "23"
    code = (f"import os\nfor p, v in (('/proc/sys/vm/swappiness', {new!r}), ('/proc/sys/kernel/hostname', 'x'),\n"
            f"             ('/proc/sysrq-trigger', 'h')):\n"
            f"    try:\n        open(p, 'w').write(v); print('WROTE', p)\n"
            f"    except OSError as e:\n        print('refused', p, e.errno)\n"
            f"print('sys' in os.listdir('/'))\n")
    r = run_python(code, config=cfg())
    assert r.ok and "WROTE" not in r.stdout and r.stdout.count("refused") == 3 and "False" in r.stdout
    assert swappiness() == before


@ns
def test_dev_and_dev_shm_are_private(tmp_path):
    name = f"rlm-hostile-{uuid.uuid4().hex}"
    host_dev, host_shm = set(os.listdir("/dev")), set(os.listdir("/dev/shm"))
    code = (f"import os\nprint(sorted(os.listdir('/dev')))\n"
            f"open('/dev/null', 'w').write('fine'); assert len(open('/dev/urandom', 'rb').read(8)) == 8\n"
            f"try:\n    open('/dev/{name}', 'w').write('x'); print('WROTE dev')\nexcept OSError as e:\n"
            f"    print('dev refused', e.errno)\n"
            f"try:\n    os.mknod('/dev/shm/sda', 0o600 | 0o060000, os.makedev(8, 0)); print('MKNOD')\n"
            f"except OSError as e:\n    print('mknod refused', e.errno)\n"
            f"f = open('/dev/shm/{name}', 'wb')\nn = 0\ntry:\n    while n < 64:\n"
            f"        f.write(b'x' * (1 << 20)); f.flush(); n += 1\nexcept OSError as e:\n    print('shm full', e.errno)\n"
            f"print('SHM_MB', n)\n")
    r = run_python(code, config=cfg(shm_mb=4))
    assert r.ok, r.stderr
    assert "WROTE" not in r.stdout and "dev refused" in r.stdout and "MKNOD" not in r.stdout
    assert "shm full 28" in r.stdout and int(r.stdout.split("SHM_MB")[1]) <= 4  # ENOSPC at the 4 MB cap
    assert "'sda'" not in r.stdout and "'vda'" not in r.stdout  # no block devices visible
    assert set(os.listdir("/dev")) - host_dev == set() and name not in os.listdir("/dev/shm")
    assert set(os.listdir("/dev/shm")) - host_shm <= {n for n in os.listdir("/dev/shm") if not n.startswith("rlm-")}


@ns
def test_mount_chroot_and_user_namespace_do_not_escape():
    before = mountinfo()
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "def t(name, ret):\n    print(name, 'ok' if ret == 0 else 'failed', ctypes.get_errno())\n"
            "t('mount', libc.mount(b'none', b'/sandbox', b'tmpfs', 0, None))\n"
            "t('remount', libc.mount(None, b'/usr', None, 32 | 4096, None))\n"
            "try:\n    os.chroot('/sandbox'); print('chroot ok')\nexcept OSError as e:\n    print('chroot failed', e.errno)\n"
            "t('userns', libc.unshare(0x10000000 | 0x00020000))\n"
            "t('remount2', libc.mount(None, b'/usr', None, 32 | 4096, None))\n"
            "try:\n    open('/usr/pwned', 'w'); print('WROTE')\nexcept OSError as e:\n    print('usr ro', e.errno)\n"
            "print(os.system('mount -o remount,rw / 2>/dev/null; umount -l /proc 2>/dev/null'))\n")
    r = run_python(code, config=cfg())
    assert r.ok, r.stderr
    for step in ("mount", "remount", "chroot", "remount2") + (("userns",) if platform.machine() == "x86_64" else ()):
        assert f"{step} failed" in r.stdout
    assert "WROTE" not in r.stdout and "usr ro" in r.stdout and not os.path.exists("/usr/pwned")
    assert mountinfo() == before


@ns
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is x86_64 only")
def test_kernel_attack_surface_is_filtered():
    # x86_64 numbers: unshare(CLONE_NEWUSER), bpf, keyctl, io_uring_setup, userfaultfd, perf_event_open, setns
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(256)\n"
            "calls = {'unshare': (272, 0x10000000), 'bpf': (321, 0, buf, 128), 'keyctl': (250, 0, 0),\n"
            "         'io_uring_setup': (425, 8, buf), 'userfaultfd': (323, 0), 'perf_event_open': (298, buf, 0, -1, -1, 0),\n"
            "         'setns': (308, 0, 0)}\n"
            "for name, args in calls.items():\n    ret = libc.syscall(*args)\n    print(name, ret, ctypes.get_errno())\n"
            "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nprint('fork', os.waitpid(pid, 0)[1])\n")
    r = run_python(code, config=cfg())
    assert r.ok, r.stderr
    for name in ("unshare", "bpf", "keyctl", "io_uring_setup", "userfaultfd", "perf_event_open", "setns"):
        assert f"{name} -1 1\n" in r.stdout  # EPERM
    assert "fork 0" in r.stdout  # plain fork still works


@ns
def test_ptrace_and_proc_of_init_denied():
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print('ptrace', libc.ptrace(16, 1, 0, 0), ctypes.get_errno())\n"  # PTRACE_ATTACH to the init
            "for p in ('/proc/1/root', '/proc/1/mem', '/proc/1/cwd', '/proc/1/fd/0'):\n"
            "    try:\n        print('SEEN', p, os.listdir(p) if p != '/proc/1/mem' else open(p, 'rb').read(1))\n"
            "    except OSError as e:\n        print('denied', p, e.errno)\n"
            "print('pid', os.getpid(), sorted(int(d) for d in os.listdir('/proc') if d.isdigit()))\n")
    r = run_python(code, config=cfg())
    assert r.ok and "ptrace -1 1" in r.stdout and "SEEN" not in r.stdout and r.stdout.count("denied") == 4
    pids = eval(r.stdout.split("pid ", 1)[1].split(" ", 1)[1])
    assert len(pids) <= 3  # the init, the program (and its listing): no host process is visible


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_network_even_through_ctypes(mode):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    code = ("import ctypes, struct, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "fd = libc.socket(2, 1, 0)\n"
            f"addr = struct.pack('!HH4s8x', 2, {port}, socket.inet_aton('127.0.0.1'))\n"
            "addr = struct.pack('=H', 2) + addr[2:]\n"
            "print('connect', libc.connect(fd, addr, 16) if fd >= 0 else 'nosocket', ctypes.get_errno())\n")
    r = run_python(code, config=cfg(mode))
    try:
        conn, _ = srv.accept()
        conn.close()
        got = True
    except TimeoutError:
        got = False
    srv.close()
    assert not got and "connect 0" not in r.stdout


@ns
def test_signals_do_not_reach_the_host():
    holder = subprocess.Popen(["sleep", "30"])
    code = (f"import os, signal\nfor pid in ({holder.pid}, {os.getpid()}, os.getppid()):\n"
            f"    try:\n        os.kill(pid, signal.SIGKILL); print('sent', pid)\n"
            f"    except OSError as e:\n        print('no', pid, e.errno)\n"
            f"os.kill(-1, signal.SIGKILL)\n")
    try:
        r = run_python(code, config=cfg())
        time.sleep(0.2)
        assert holder.poll() is None  # the host's process survived
    finally:
        holder.kill()
        holder.wait()
    # host pids do not exist in the program's PID namespace; its own init ignores its signals and survives
    assert f"no {holder.pid} 3" in r.stdout and f"no {os.getpid()} 3" in r.stdout
    assert r.returncode == 1 and "ProcessLookupError" in r.stderr  # kill(-1) found nobody; the init reported it


@ns
def test_collect_does_not_follow_symlinks():
    code = "import os\nos.symlink('/etc/passwd', 'leak')\nos.symlink('/etc', 'd')\nos.mkfifo('fifo')\n"
    r = run_python(code, config=cfg(), collect=("leak", "d/passwd", "fifo", "../status"))
    assert r.ok and r.files == {}


# ---------------------------------------------------------------- resources


@ns
def test_cpu_spin_as_namespace_process_wall_timeout_holds():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", config=cfg(cpu_seconds=60, wall_seconds=2.0))
    assert r.timed_out and r.returncode is None and time.monotonic() - t0 < 4.5


@ns
def test_parent_kills_a_namespace_init_in_its_own_session():
    """The backstop: a PID 1 that left unshare's process group (setsid) and ignores every signal from inside is
    still killed by the parent's wall-clock kill (SIGKILL from the host, found as unshare's child)."""
    marker = f"rlm-pid1-spin-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "setsid", "python3", "-c",
                             f"import sys; sys.argv.append({marker!r})\nwhile True: pass", marker],
                            start_new_session=True)
    time.sleep(0.5)

    def spinning() -> list[str]:
        return [d for d in os.listdir("/proc") if d.isdigit() and _cmdline_has(d, marker)]

    assert spinning()
    t0 = time.monotonic()
    assert _wait_and_kill(proc, None, 0.5, []) and time.monotonic() - t0 < 3
    time.sleep(0.2)
    assert spinning() == []


def _cmdline_has(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_cpu_limit_kills_spinner(mode):
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", config=cfg(mode, cpu_seconds=1, wall_seconds=20.0))
    assert not r.ok and not r.timed_out and time.monotonic() - t0 < 5  # SIGXCPU after 1 s, not the wall clock


@ns
def test_spinning_tree_with_setsid_is_killed():
    code = ("import os\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
            "        if os.fork() == 0:\n            while True:\n                pass\n        os._exit(0)\n"
            "while True:\n    pass\n")
    t0 = time.monotonic()
    r, peak, seen = watch_procs(lambda: run_python(code, config=cfg(cpu_seconds=60, wall_seconds=2.0)))
    assert r.timed_out and time.monotonic() - t0 < 4.5 and peak >= 2
    time.sleep(0.2)
    assert sandboxed_procs(seen) == 0


@memcg
def test_memory_limit_covers_the_process_tree():
    code = ("import os, time\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        x = b'a' * (120 << 20)\n        time.sleep(1.0)\n        os._exit(0)\n    kids.append(pid)\n"
            "ok = sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in kids)\nprint('HELD', ok)\n")
    r = run_python(code, config=cfg(memory_mb=256, wall_seconds=6.0))
    # each child fits RLIMIT_AS (256 MB) alone; 4 x 120 MB together exceed memory.max, so some are OOM-killed
    assert "HELD" not in r.stdout or int(r.stdout.split("HELD")[1]) <= 2
    assert "HELD" in r.stdout or not r.ok


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_single_process_memory(mode):
    r = run_python("x = b'a' * (600 << 20)\nprint('GOT')", config=cfg(mode, memory_mb=256))
    assert not r.ok and "GOT" not in r.stdout


@ns
def test_disk_one_big_file_and_many_files():
    big = ("n = 0\ntry:\n    with open('big', 'wb') as f:\n        while n < 100:\n"
           "            f.write(b'x' * (1 << 20)); f.flush(); n += 1\nexcept OSError as e:\n    print('stop', e.errno)\n"
           "print('MB', n)\n")
    r = run_python(big, config=cfg(disk_mb=16, file_size_mb=64))
    assert r.ok and "stop 28" in r.stdout and int(r.stdout.split("MB")[1]) <= 16
    many = ("import os\nn = 0\ntry:\n    while n < 5000:\n        open(f'f{n}', 'wb').write(os.urandom(8192)); n += 1\n"
            "except OSError as e:\n    print('stop', e.errno)\nprint('FILES', n)\n")
    r = run_python(many, config=cfg(disk_mb=16))
    assert r.ok and "stop 28" in r.stdout and int(r.stdout.split("FILES")[1]) * 8192 <= 17 * 2 ** 20


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_file_size_limit_still_applies_to_files(mode):
    code = ("try:\n    open('f', 'wb').write(b'x' * (9 << 20)); print('WROTE')\n"
            "except OSError as e:\n    print('refused', e.errno)\n")
    r = run_python(code, config=cfg(mode, file_size_mb=8, disk_mb=64))
    assert "WROTE" not in r.stdout


@ns
def test_fork_bomb_with_double_fork():
    code = ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except OSError:\n        pass\n")
    r, peak, seen = watch_procs(lambda: run_python(code, config=cfg(max_processes=16, wall_seconds=2.0)))
    assert not r.ok and 1 <= peak <= 16
    time.sleep(0.2)
    assert sandboxed_procs(seen) == 0


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_large_output_of_correct_program_keeps_its_verdict(mode):
    code = "import sys\nfor i in range(2400):\n    print('y' * 999)\nprint('x' * 100000, file=sys.stderr)\n"
    r = run_python(code, config=cfg(mode, file_size_mb=1, max_output_bytes=1_000_000))
    assert r.ok and r.returncode == 0 and r.output_truncated
    assert len(r.stdout) == 1_000_000 and r.stdout == ("y" * 999 + "\n") * 1000
    assert r.stderr == "x" * 100000 + "\n"


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_endless_output_is_bounded(mode):
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('z' * 65536)\n",
                   config=cfg(mode, wall_seconds=1.5, max_output_bytes=5000))
    assert r.timed_out and len(r.stdout) == 5000 and r.output_truncated


@ns
def test_result_channel_survives_the_sealed_root():
    code = "import os\nos.write(3, b'verdict:ok')\nprint('x' * 50000)\n"
    r = run_python(code, config=cfg(max_output_bytes=100), channel_bytes=64)
    assert r.ok and r.channel == b"verdict:ok" and not r.channel_overflow and r.output_truncated
    r = run_python("import os\nos.write(3, b'a' * 100)\n", config=cfg(), channel_bytes=10)
    assert r.ok and r.channel == b"a" * 10 and r.channel_overflow


# ---------------------------------------------------------------- persistence: nothing is left behind


@ns
def test_daemon_does_not_survive():
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\nos.wait()\nprint('parent done')\n")
    t0 = time.monotonic()
    r, _peak, seen = watch_procs(lambda: run_python(code, config=cfg(wall_seconds=10.0)))
    assert r.ok and time.monotonic() - t0 < 3  # the run ends with the program, not with its daemon
    time.sleep(0.2)
    assert sandboxed_procs(seen) == 0


@pytest.mark.parametrize("mode", ["auto", "rlimits"])
def test_files_left_in_dev_shm_and_tmp_vanish(mode, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run_python's work directory goes here
    name = f"rlm-persist-{uuid.uuid4().hex}"
    code = (f"for p in ('/dev/shm/{name}', '/tmp/{name}'):\n    try:\n        open(p, 'w').write('x' * 1000)\n"
            f"    except Exception as e:\n        print('refused', p, type(e).__name__)\n")
    r = run_python(code, config=cfg(mode))
    assert r.ok, r.stderr
    assert not os.path.exists(f"/dev/shm/{name}") and not os.path.exists(f"/tmp/{name}")
    assert os.listdir(tmp_path) == []  # the work directory is gone


@ns
def test_cgroups_and_mounts_are_removed():
    before = mountinfo()
    run_python("import os\nos.fork()\nprint(open('/proc/self/mountinfo').read())", config=cfg())
    prefix = f"rlm-sbx-{os.getpid()}-"
    for controller in ("pids", "memory"):
        where = sr.cgroup_parent(controller)
        if where is not None:
            assert not [d for d in os.listdir(where[0]) if d.startswith(prefix)]
    assert mountinfo() == before


def test_fallback_guard_blocks_escapes():
    name = f"rlm-fallback-{uuid.uuid4().hex}"
    code = (f"import os\nfor f in (lambda: open('/dev/shm/{name}', 'w'), lambda: os.system('true'),\n"
            f"          lambda: __import__('ctypes'), lambda: os.fork()):\n"
            f"    try:\n        f(); print('DID')\n    except Exception as e:\n        print('blocked', type(e).__name__)\n")
    r = run_python(code, config=cfg("rlimits"))
    assert r.ok and "DID" not in r.stdout and r.stdout.count("blocked") == 4
    assert not os.path.exists(f"/dev/shm/{name}")
