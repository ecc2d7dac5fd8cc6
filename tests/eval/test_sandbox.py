"""The sandbox contains hostile programs: each is stopped or fails, and the host is unaffected.

Every test runs in both modes: ``auto`` (every layer this machine allows; on the development machine
namespaces + pids cgroup) and ``rlimits`` (the fallback: rlimits, process group, audit-hook guard)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from sandbox_support import sandboxed_procs, watch_procs

from rlm.core.eval.sandbox import SandboxConfig, isolation, run_python

MODES = ["auto", "rlimits"]


def cfg(mode: str, **kw) -> SandboxConfig:
    base = {"cpu_seconds": 2, "wall_seconds": 4.0, "memory_mb": 1024, "max_processes": 16, "isolation": mode}
    base.update(kw)
    return SandboxConfig(**base)


def host_ok() -> None:
    assert subprocess.run(["true"], check=False, timeout=10).returncode == 0
    a = bytearray(50 * 1024 * 1024)  # the host can still allocate memory
    assert len(a) == 50 * 1024 * 1024


def test_isolation_report():
    iso = isolation()
    assert iso["rlimits"] and iso["process_group"] and iso["guard"]
    r = run_python("print('ok')")
    assert r.ok and r.stdout == "ok\n"
    if iso["namespaces"]:
        assert "namespaces" in r.layers


@pytest.mark.parametrize("mode", MODES)
def test_normal_program_and_exit_codes(mode):
    r = run_python("import sys\nprint(sum(range(10)))\nsys.exit(3)", config=cfg(mode))
    assert r.stdout.strip() == "45" and r.returncode == 3 and not r.ok
    r = run_python("raise ValueError('boom')", config=cfg(mode))
    assert r.returncode == 1 and "ValueError: boom" in r.stderr
    r = run_python("print(input())", stdin="hello\n", config=cfg(mode))
    assert r.ok and r.stdout == "hello\n"
    r = run_python("open('x.txt','w').write('in my dir'); print(open('x.txt').read())", config=cfg(mode))
    assert r.ok and r.stdout == "in my dir\n"


@pytest.mark.parametrize("mode", MODES)
def test_site_builtins_and_installed_packages(mode):
    """The guard starts Python with -S (no .pth files run) but keeps what a program expects of `site`: the
    exit/quit builtins and the interpreter's installed packages on sys.path."""
    r = run_python("import pluggy\nprint(pluggy.__name__)\nexit(4)", config=cfg(mode))
    assert r.stdout.strip() == "pluggy" and r.returncode == 4, r.stderr
    r = run_python("quit()", config=cfg(mode))
    assert r.returncode == 0, r.stderr
    r = run_python("import sys\nprint(sys.flags.no_site)", config=cfg(mode))
    assert r.stdout.strip() == "1"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setter", ["prlimit", "preexec_fn"])
def test_resource_limits_reach_the_program(mode, setter, monkeypatch):
    """The program runs under the configured rlimits whether util-linux ``prlimit`` sets them (where it is
    installed: no fork of the parent) or a ``preexec_fn`` does (the fallback)."""
    from rlm.core.eval import sandbox

    if setter == "preexec_fn":
        monkeypatch.setattr(sandbox, "_prlimit_path", lambda: None)
    elif sandbox._prlimit_path() is None:
        pytest.skip("no prlimit on this machine")
    code = ("import resource as r\n"
            "print([r.getrlimit(getattr(r, 'RLIMIT_' + k)) for k in ('CPU', 'AS', 'FSIZE', 'NOFILE', 'CORE')])")
    c = cfg(mode, cpu_seconds=3, memory_mb=700, file_size_mb=5, max_open_files=40)
    r = run_python(code, config=c)
    assert r.ok, r.stderr
    mb = 1024 * 1024
    assert eval(r.stdout) == [(3, 4), (700 * mb, 700 * mb), (5 * mb, 5 * mb), (40, 40), (0, 0)]


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_cpu_and_wall(mode):
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", config=cfg(mode, cpu_seconds=1, wall_seconds=5))
    assert not r.ok and time.monotonic() - t0 < 8  # SIGXCPU after 1 s of CPU (or wall-clock kill)
    t0 = time.monotonic()
    r = run_python("import time\ntime.sleep(100)\n", config=cfg(mode, wall_seconds=1.5))
    assert r.timed_out and r.returncode is None and time.monotonic() - t0 < 5
    host_ok()


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode):
    assert sandboxed_procs() == 0
    code = ("import os, time\n"
            "for _ in range(10000):\n"
            "    try:\n        os.fork()\n    except Exception:\n        pass\n"
            "time.sleep(60)\n")
    t0 = time.monotonic()
    r, peak, seen = watch_procs(lambda: run_python(code, config=cfg(mode, wall_seconds=3, max_processes=16)))
    assert not r.ok and time.monotonic() - t0 < 10
    # bounded while it ran (cgroup pids.max / RLIMIT_NPROC / no fork at all), every process gone afterwards
    assert 1 <= peak <= 16
    time.sleep(0.3)
    assert sandboxed_procs(seen) == 0
    host_ok()


@pytest.mark.parametrize("mode", MODES)
def test_memory_hog(mode):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    r = run_python(code, config=cfg(mode, memory_mb=512))
    assert not r.ok and "MemoryError" in r.stderr
    r = run_python("x = bytearray(8 * 1024 ** 3)", config=cfg(mode, memory_mb=512))
    assert not r.ok
    host_ok()


@pytest.mark.parametrize("mode", MODES)
def test_delete_files_outside(tmp_path, mode):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    code = (f"import os, shutil\n"
            f"for f in (lambda: os.remove({str(victim)!r}), lambda: shutil.rmtree({str(victim_dir)!r}),\n"
            f"          lambda: open({str(victim)!r}, 'w').write('gone'),\n"
            f"          lambda: os.rename({str(victim)!r}, {str(victim)!r} + '.x'),\n"
            f"          lambda: os.system('rm -rf {victim_dir} 2>/dev/null; mount -o remount,rw / 2>/dev/null')):\n"
            f"    try:\n        f()\n    except Exception as e:\n        print('blocked', type(e).__name__)\n")
    r = run_python(code, config=cfg(mode))
    assert r.returncode == 0 and r.stdout.count("blocked") >= 4  # each Python-level attempt raised
    assert victim.read_text() == "keep me"
    assert sorted(os.listdir(victim_dir)) == ["precious.txt"]
    host_ok()


@pytest.mark.parametrize("mode", MODES)
def test_network_connection(mode):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    code = (f"import socket\n"
            f"try:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    s.sendall(b'LEAK')\n"
            f"    print('CONNECTED')\nexcept Exception as e:\n    print('no network', type(e).__name__)\n")
    r = run_python(code, config=cfg(mode))
    try:
        conn, _ = srv.accept()
        got = conn.recv(10)
        conn.close()
    except TimeoutError:
        got = None
    srv.close()
    assert got is None and "CONNECTED" not in r.stdout and "no network" in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_is_hidden(mode, monkeypatch):
    secret = "rlm-secret-token-8d1f2a"
    monkeypatch.setenv("RLM_TEST_SECRET", secret)
    # a host process whose initial environment (what /proc/PID/environ shows) holds the secret
    holder = subprocess.Popen(["sleep", "30"], env={**os.environ})
    code = (f"import os\nprint(dict(os.environ))\n"
            f"for p in ('/proc/{holder.pid}/environ', '/proc/{os.getppid()}/environ', '/proc/1/environ'):\n"
            f"    try:\n        print(open(p, 'rb').read())\n    except Exception as e:\n        print('no', e)\n")
    try:
        r = run_python(code, config=cfg(mode))
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0
    assert secret not in r.stdout and "RLM_TEST_SECRET" not in r.stdout
    assert "HOME" in r.stdout  # the minimal environment is there


def test_output_is_bounded():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                   config=SandboxConfig(wall_seconds=3, file_size_mb=1, max_output_bytes=1000))
    assert not r.ok and len(r.stdout) <= 1000
