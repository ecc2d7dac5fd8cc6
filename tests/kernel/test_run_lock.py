"""Locked outputs: one run at a time writes a given ``--out`` (rlm.core.io.lock). A helper subprocess holds the
lock; every command that writes a run directory is refused at once naming its pid, leaves ``--out`` untouched,
and runs once the holder is gone (also after SIGKILL), removing killed runs' ``.partial`` leftovers then."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from rlm.core.cli import main
from rlm.core.errors import RlmError
from rlm.core.io.lock import RunLocked, clean_leftovers, holds_run_lock, leftovers, lock_path, run_lock

HOLDER = textwrap.dedent("""
    import sys, time
    from rlm.core.io.lock import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


class Holder:
    """A subprocess holding the lock of ``out`` for ``seconds`` (it prints ``locked`` once it holds it)."""

    def __init__(self, out: Path, seconds: float = 120) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(var, None)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], stdout=subprocess.PIPE,
                                     text=True, env=env)
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", f"holder did not take the lock (rc {self.proc.poll()})"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture
def holder_of():
    holders: list[Holder] = []

    def start(out: Path, seconds: float = 120) -> Holder:
        holders.append(Holder(out, seconds))
        return holders[-1]

    yield start
    for h in holders:
        if h.proc.poll() is None:
            h.kill()


def refused_line(capsys, pid: int) -> str:
    """The one error line of a refused command; it names the holder's pid."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert f"pid {pid}" in err and "in use by another rlm run" in err, err
    return err


@pytest.mark.parametrize("env, main_process", [
    ({}, True), ({"WORLD_SIZE": "1"}, True), ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, True),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, False),  # node 1's first process: not the main one
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False), ({"LOCAL_RANK": "1"}, False),
    ({"LOCAL_RANK": "0"}, True), ({"RANK": " 0 "}, True)])
def test_only_the_main_process_of_a_launch_takes_the_lock(env, main_process):
    assert holds_run_lock(env) is main_process


def test_a_malformed_rank_is_an_error():
    with pytest.raises(RlmError, match="RANK='x'"):
        holds_run_lock({"RANK": "x"})


def test_other_ranks_of_a_locked_run_pass(tmp_path, holder_of, monkeypatch):
    out = tmp_path / "run"
    holder_of(out)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with run_lock(out) as held:
        assert held is None
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunLocked), run_lock(out):
        pass


def test_lock_file_sits_beside_the_output_with_the_holders_pid(tmp_path, holder_of):
    out = tmp_path / "sub" / "out"
    assert lock_path(out) == tmp_path.resolve() / "sub" / ".out.lock"
    assert lock_path(tmp_path / "sub" / "." / "out") == lock_path(tmp_path / "sub" / "x" / ".." / "out")
    h = holder_of(out)
    assert lock_path(out).read_text().strip() == str(h.pid)
    with pytest.raises(RunLocked, match=f"pid {h.pid}"), run_lock(out):
        pass
    with run_lock(tmp_path / "sub" / "out2"):  # another output next to it is free
        pass


def test_released_on_exit_and_on_sigkill(tmp_path, holder_of):
    out = tmp_path / "out"
    h = holder_of(out, seconds=0)
    assert h.proc.wait(timeout=30) == 0
    assert not lock_path(out).exists()  # a clean exit removes the lock file
    with run_lock(out) as path:
        assert path.read_text().strip() == str(os.getpid())
    h = holder_of(out)
    h.kill()
    assert lock_path(out).read_text().strip() == str(h.pid)  # the killed holder's file stays, its flock does not
    with run_lock(out) as path:
        assert path.read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_leftovers_match_only_this_outputs_partial_dirs(tmp_path):
    out = tmp_path / "x"
    mine = [Path(tempfile.mkdtemp(prefix=".x.", suffix=".partial", dir=tmp_path)), tmp_path / ".x.old-4242"]
    others = [Path(tempfile.mkdtemp(prefix=".x.b.", suffix=".partial", dir=tmp_path)),  # output "x.b"
              Path(tempfile.mkdtemp(prefix=".xy.", suffix=".partial", dir=tmp_path)), tmp_path / ".x.lock.d",
              tmp_path / "x.abcdefgh.partial"]
    for d in mine + others:
        d.mkdir(exist_ok=True)
    (tmp_path / ".x.file.partial").write_text("a file, not a partial directory")
    assert leftovers(out) == sorted(mine)
    with run_lock(out):
        assert all(not d.exists() for d in mine)
    assert all(d.is_dir() for d in others) and (tmp_path / ".x.file.partial").is_file()


def test_an_interrupted_replacement_is_restored_not_removed(tmp_path):
    """Killed between atomic_dir's renames: no output, the previous one in .X.old-PID and the new one in a
    partial. The previous output comes back; with an output in place the .old directory is garbage."""
    out = tmp_path / "X"
    old, partial = tmp_path / ".X.old-4242", Path(tempfile.mkdtemp(prefix=".X.", suffix=".partial", dir=tmp_path))
    old.mkdir()
    (old / "config.json").write_text("previous")
    clean_leftovers(out)
    assert (out / "config.json").read_text() == "previous" and not old.exists() and not partial.exists()
    old.mkdir()
    clean_leftovers(out)
    assert not old.exists() and (out / "config.json").read_text() == "previous"


def test_a_lock_that_cannot_be_created_is_one_line_naming_the_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RlmError, match=f"cannot lock {blocker / 'out'}: .*{blocker}"), run_lock(blocker / "out"):
        pass
    rc = main(["merge", "--method", "averaging", "--base", "tiny", "--models", "tiny:1,tiny:0",
               "--out", str(blocker / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and str(blocker) in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(RlmError, match=f"cannot lock .*Permission denied.*{parent}"), run_lock(parent / "out"):
            pass
    finally:
        parent.chmod(0o755)


MERGE = ["merge", "--method", "averaging", "--base", "tiny", "--models", "tiny:1,tiny:0"]


def test_merge_is_refused_while_locked_and_cleans_stale_partials_after(tmp_path, holder_of, capsys):
    out = tmp_path / "X"
    h = holder_of(out)
    stale = Path(tempfile.mkdtemp(prefix=".X.", suffix=".partial", dir=tmp_path))  # as the holder's atomic_dir
    (stale / "model-00001.safetensors").write_bytes(b"\0" * 1024)
    assert main([*MERGE, "--out", str(out)]) == 2
    refused_line(capsys, h.pid)
    assert not out.exists() and stale.is_dir()  # the live lock covers the partial: left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".X.lock", stale.name])
    h.kill()
    assert main([*MERGE, "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "config.json").is_file() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # no lock file, no partials


def test_a_second_merge_into_a_locked_existing_output_leaves_it_untouched(tmp_path, holder_of, capsys):
    out = tmp_path / "X"
    assert main([*MERGE, "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    h = holder_of(out)
    assert main([*MERGE, "--out", str(out), "--overwrite"]) == 2
    refused_line(capsys, h.pid)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_train_resume_on_a_locked_run_is_refused(tmp_path, holder_of, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    h = holder_of(out)
    rc = main(["train", "--trainer", "sft", "--task", "math", "--model", "tiny", "--steps", "1", "--out", str(out),
               "--resume", "--no-progress", "--set", "num_threads=1"])
    assert rc == 2
    refused_line(capsys, h.pid)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "tiny", "--task", "math", "--limit", "1"],
    ["score", "--task", "math", "--completions", "c.jsonl"],
    ["conflicts", "--base", "tiny", "--models", "a=tiny:1,b=tiny:2"],
    ["merge-eval", "--base", "tiny", "--experts", "sft:math=a,sft:puzzle=b", "--no-progress"],
    ["experiment", "run", "micro", "--quick", "--no-progress"],
    ["model", "init", "tiny"],
], ids=lambda a: a[0] if a[0] != "experiment" else "experiment-run")
def test_every_run_directory_command_is_refused_while_locked(argv, tmp_path, holder_of, capsys):
    out = tmp_path / "X"
    h = holder_of(out)
    assert main([*argv, "--out", str(out)]) == 2
    refused_line(capsys, h.pid)
    assert not out.exists()
