"""The step-graph runner: caching, invalidation, resume after failure, interruption, malformed graphs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rlm.core.errors import RlmError
from rlm.core.study.graph import (
    GRAPH_FILE,
    STEP_FILE,
    Graph,
    GraphError,
    StepFailed,
    read_step_json,
    stale_step_dirs,
    step_key,
)


class Recorder:
    """Step functions that record each call; ``fail`` makes named steps raise."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.interrupt: set[str] = set()

    def fn(self, ctx):
        self.calls.append(ctx.name)
        (ctx.out / "partial.txt").write_text("started")
        if ctx.name in self.interrupt:
            raise KeyboardInterrupt
        if ctx.name in self.fail:
            raise ValueError(f"boom in {ctx.name}")
        total = int(ctx.config.get("value", 0)) + sum(o.result["total"] for o in ctx.inputs.values())
        for o in ctx.inputs.values():  # dependencies' files are readable from their final directories
            assert (o.dir / "out.txt").read_text() == str(o.result["total"])
        (ctx.out / "out.txt").write_text(str(total))
        return {"total": total}


def diamond(rec: Recorder, values: dict[str, int] | None = None) -> Graph:
    """a -> b, a -> c, (b, c) -> d; e independent."""
    v = {"a": 1, "b": 10, "c": 100, "d": 1000, "e": 5, **(values or {})}
    g = Graph()
    g.add("a", rec.fn, config={"value": v["a"]})
    g.add("b", rec.fn, deps=["a"], config={"value": v["b"]})
    g.add("c", rec.fn, deps=["a"], config={"value": v["c"]})
    g.add("d", rec.fn, deps=["b", "c"], config={"value": v["d"]})
    g.add("e", rec.fn, config={"value": v["e"]})
    return g


def test_runs_in_dependency_order_and_caches(tmp_path):
    rec = Recorder()
    s = diamond(rec).run(tmp_path, progress=False)
    assert s.ok and rec.calls == ["a", "b", "c", "d", "e"]
    assert s.steps["d"].result == {"total": 1 + 10 + 1 + 100 + 1000}
    d_dir = s.output("d").dir
    assert d_dir.parent == tmp_path.resolve() / "steps" and d_dir.name.startswith("d-")
    info = json.loads((d_dir / STEP_FILE).read_text())
    assert info["status"] == "done" and info["config"] == {"value": 1000}
    assert set(info["inputs"]) == {"b", "c"} and info["inputs"]["b"]["key"] == s.steps["b"].key
    assert info["seconds"] >= 0 and info["started"] and info["finished"]
    assert (d_dir / "out.txt").read_text() == "1112"

    rec2 = Recorder()
    s2 = diamond(rec2).run(tmp_path, progress=False)
    assert rec2.calls == [] and s2.executed == [] and s2.names("cached") == ["a", "b", "c", "d", "e"]
    assert s2.steps["d"].result == {"total": 1112}  # results come back from step.json
    graph = json.loads((tmp_path / GRAPH_FILE).read_text())
    assert {x["name"]: x["status"] for x in graph["steps"]}["d"] == "cached" and graph["ok"]


def test_ready_steps_go_longest_path_first(tmp_path):
    """Among ready steps the one with the costliest path to the end runs first (costs are hints: not in the
    keys); equal costs keep the order steps were added in."""
    rec = Recorder()
    g = Graph()
    g.add("warm", rec.fn, config={}, cost=1)
    g.add("sft", rec.fn, deps=["warm"], config={}, cost=1)
    g.add("rl_math", rec.fn, deps=["warm"], config={}, cost=3)
    g.add("rl_code", rec.fn, deps=["warm"], config={}, cost=5)
    g.add("eval_code", rec.fn, deps=["rl_code"], config={})
    g.add("report", rec.fn, deps=["sft", "rl_math", "eval_code"], config={})
    assert g.path_costs(g.order()) == {"warm": 6, "sft": 1, "rl_math": 3, "rl_code": 5, "eval_code": 0, "report": 0}
    assert g.run(tmp_path, progress=False).ok
    assert rec.calls == ["warm", "rl_code", "rl_math", "sft", "eval_code", "report"]
    same = Graph()
    for name, step in g.steps.items():
        same.add(name, rec.fn, deps=step.deps, config={})  # no costs: the same keys
    assert same.keys() == g.keys()
    with pytest.raises(GraphError, match="cost must be >= 0"):
        Graph().add("x", rec.fn, cost=-1)


def test_config_change_invalidates_only_step_and_dependents(tmp_path):
    diamond(Recorder()).run(tmp_path, progress=False)
    rec = Recorder()
    s = diamond(rec, {"c": 200}).run(tmp_path, progress=False)
    assert rec.calls == ["c", "d"]
    assert s.steps["d"].result == {"total": 1 + 10 + 1 + 200 + 1000}
    # the old outputs stay as a cache for the old config; switching back executes nothing
    rec_back = Recorder()
    diamond(rec_back).run(tmp_path, progress=False)
    assert rec_back.calls == []
    stale = {p.name.split("-")[0] for p in stale_step_dirs(diamond(Recorder()), tmp_path)}
    assert stale == {"c", "d"}


def test_version_change_invalidates_like_config(tmp_path):
    rec = Recorder()
    g = diamond(rec)
    g.run(tmp_path, progress=False)
    g2 = diamond(rec)
    g2.steps["b"].version = "2"
    rec.calls.clear()
    g2.run(tmp_path, progress=False)
    assert rec.calls == ["b", "d"]


def test_keys_are_hashes_of_config_version_and_input_keys():
    g = diamond(Recorder())
    keys = g.keys()
    assert keys["a"] == step_key({"value": 1}, "1", {})
    assert keys["d"] == step_key({"value": 1000}, "1", {"b": keys["b"], "c": keys["c"]})
    assert step_key({"x": 1, "y": 2}, "1", {}) == step_key({"y": 2, "x": 1}, "1", {})  # key order irrelevant
    assert step_key({"x": 1}, "1", {}) != step_key({"x": 1.5}, "1", {})
    assert len(keys["a"]) == 12 and int(keys["a"], 16) >= 0


def test_failed_step_blocks_dependents_keeps_siblings_and_resumes(tmp_path):
    rec = Recorder()
    rec.fail = {"b"}
    s = diamond(rec).run(tmp_path, progress=False)
    assert not s.ok
    assert s.failed == ["b"] and s.blocked == ["d"]
    assert set(s.executed) == {"a", "c", "e"}  # independent steps still ran
    b_dir = s.steps["b"].dir
    assert not b_dir.exists()  # no completed-looking output
    failure = json.loads(b_dir.with_name(b_dir.name + ".failed.json").read_text())
    assert failure["status"] == "failed" and "boom in b" in failure["error"] and "ValueError" in failure["traceback"]
    assert not [p for p in b_dir.parent.iterdir() if p.name.endswith(".partial")]
    with pytest.raises(StepFailed, match="boom in b") as exc:
        s.raise_for_failures()
    assert isinstance(exc.value, RlmError)

    rec.fail.clear()  # the failing function is fixed
    rec.calls.clear()
    s2 = diamond(rec).run(tmp_path, progress=False)
    assert s2.ok and rec.calls == ["b", "d"]
    assert not b_dir.with_name(b_dir.name + ".failed.json").exists()
    assert s2.steps["d"].result == {"total": 1112}


def test_keep_going_false_stops_at_first_failure(tmp_path):
    rec = Recorder()
    rec.fail = {"a"}
    s = diamond(rec).run(tmp_path, progress=False, keep_going=False)
    assert rec.calls == ["a"] and s.failed == ["a"]
    assert set(s.blocked) == {"b", "c", "d", "e"}


def test_keyboard_interrupt_leaves_no_output_and_resumes(tmp_path):
    rec = Recorder()
    rec.interrupt = {"c"}
    with pytest.raises(KeyboardInterrupt):
        diamond(rec).run(tmp_path, progress=False)
    steps = tmp_path / "steps"
    assert sorted(p.name.split("-")[0] for p in steps.iterdir()) == ["a", "b"]  # nothing for c, no partial
    graph = json.loads((tmp_path / GRAPH_FILE).read_text())
    assert {x["name"]: x["status"] for x in graph["steps"]}["c"] == "interrupted"
    rec.interrupt.clear()
    rec.calls.clear()
    s = diamond(rec).run(tmp_path, progress=False)
    assert s.ok and rec.calls == ["c", "d", "e"]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from rlm.core.study.graph import Graph

    def ok(ctx):
        (ctx.out / "out.txt").write_text("ok")
        return {"ok": True}

    def dies(ctx):
        (ctx.out / "half-written.bin").write_bytes(b"x" * 1000)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return {"ok": True}

    g = Graph()
    g.add("first", ok)
    g.add("second", dies, deps=["first"])
    g.add("third", ok, deps=["second"])
    s = g.run(sys.argv[1], progress=False)
    print(",".join(s.executed))
""")


def test_killed_step_leaves_no_completed_output_and_resumes(tmp_path):
    script = tmp_path / "kill_graph.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(script), str(run), "kill"], capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr
    names = [p.name for p in (run / "steps").iterdir()]
    finished = [n for n in names if not n.startswith(".")]
    assert [n.split("-")[0] for n in finished] == ["first"]
    assert any(n.startswith(".second-") and n.endswith(".partial") for n in names)  # the killed attempt
    r = subprocess.run([sys.executable, str(script), str(run), "ok"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "second,third"
    names = sorted(p.name for p in (run / "steps").iterdir())
    assert [n.split("-")[0] for n in names] == ["first", "second", "third"]  # leftovers cleaned
    assert all(read_step_json(run / "steps" / n) for n in names)


def test_targets_force_and_status(tmp_path):
    rec = Recorder()
    g = diamond(rec)
    assert set(g.status(tmp_path).values()) == {"pending"}
    s = g.run(tmp_path, targets=["b"], progress=False)
    assert rec.calls == ["a", "b"] and s.names("skipped") == ["c", "d", "e"] and s.ok
    assert g.status(tmp_path) == {"a": "done", "b": "done", "c": "pending", "d": "pending", "e": "pending"}
    rec.calls.clear()
    g.run(tmp_path, force=["a"], progress=False)
    assert rec.calls == ["a", "c", "d", "e"]  # b keeps its output: its key did not change


def test_step_function_results_must_be_json(tmp_path):
    g = Graph()
    g.add("bad", lambda ctx: object())
    s = g.run(tmp_path, progress=False)
    assert s.failed == ["bad"] and "JSON-serialisable" in s.steps["bad"].error


def test_malformed_graphs_are_rejected():
    g = Graph()
    g.add("a", lambda c: None)
    with pytest.raises(GraphError, match="duplicate step name 'a'"):
        g.add("a", lambda c: None)
    with pytest.raises(GraphError, match="bad step name"):
        g.add("has space", lambda c: None)
    g.add("b", lambda c: None, deps=["aa"])
    with pytest.raises(GraphError, match="unknown step 'aa'.*did you mean 'a'"):
        g.order()
    g2 = Graph()
    g2.add("x", lambda c: None, deps=["z"])
    g2.add("y", lambda c: None, deps=["x"])
    g2.add("z", lambda c: None, deps=["y"])
    with pytest.raises(GraphError, match="dependency cycle"):
        g2.order()
    with pytest.raises(GraphError, match="not JSON-serialisable"):
        Graph().add("c", lambda c: None, config={"f": object()})


def test_second_runner_on_same_directory_is_refused(tmp_path):
    g = Graph()
    inner: list[str] = []

    def nested(ctx):
        try:
            Graph().run(tmp_path, progress=False)
        except RlmError as exc:
            inner.append(str(exc))
        return None

    g.add("outer", nested)
    assert g.run(tmp_path, progress=False).ok
    assert inner and "in use by another rlm process" in inner[0]


def test_progress_output_does_not_break(tmp_path):
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    rec = Recorder()
    diamond(rec).run(tmp_path, console=Console(file=buf, force_terminal=False, width=100))
    text = buf.getvalue()
    assert "✓ d" in text
    buf2 = StringIO()
    diamond(rec).run(tmp_path, console=Console(file=buf2, force_terminal=False, width=100))
    assert "0 run, 5 cached, 0 failed" in buf2.getvalue() and "✓" not in buf2.getvalue()


def test_work_dir_survives_failure_and_is_removed_after_success(tmp_path):
    attempts: list[bool] = []

    def resumable(ctx):
        marker = ctx.work_dir / "checkpoint"
        attempts.append(marker.exists())
        if not marker.exists():
            marker.write_text("half way")
            raise RuntimeError("crash after a checkpoint")
        (ctx.out / "final.txt").write_text(marker.read_text())
        return None

    g = Graph()
    g.add("train", resumable)
    assert g.run(tmp_path, progress=False).failed == ["train"]
    s = g.run(tmp_path, progress=False)
    assert s.ok and attempts == [False, True]
    assert (s.output("train").dir / "final.txt").read_text() == "half way"
    assert not (tmp_path / "steps" / ".work" / s.output("train").dir.name).exists()


def ephemeral_chain(rec: Recorder, c_value: int = 100) -> Graph:
    """a -> m (ephemeral, a large output) -> (b, c)."""
    g = Graph()
    g.add("a", rec.fn, config={"value": 1})
    g.add("m", rec.fn, deps=["a"], config={"value": 2}, ephemeral=True)
    g.add("b", rec.fn, deps=["m"], config={"value": 10})
    g.add("c", rec.fn, deps=["m"], config={"value": c_value})
    return g


def test_ephemeral_step_is_pruned_after_its_dependents_and_revived_only_when_needed(tmp_path):
    rec = Recorder()
    s = ephemeral_chain(rec).run(tmp_path, progress=False)
    assert s.ok and rec.calls == ["a", "m", "b", "c"]
    m_dir = s.steps["m"].dir
    assert sorted(p.name for p in m_dir.iterdir()) == [STEP_FILE]  # output files gone, record kept
    assert read_step_json(m_dir)["pruned"] is True
    assert (s.steps["a"].dir / "out.txt").is_file()  # ordinary steps keep their files

    rec.calls.clear()
    s = ephemeral_chain(rec).run(tmp_path, progress=False)
    assert s.ok and rec.calls == []  # everything cached: the pruned step is not recomputed

    rec.calls.clear()
    s = ephemeral_chain(rec, c_value=200).run(tmp_path, progress=False)
    assert s.ok and rec.calls == ["m", "c"]  # c must run and reads m's files, so m is recomputed first
    assert s.steps["c"].result == {"total": 200 + (2 + 1)}
    assert read_step_json(s.steps["m"].dir)["pruned"] is True


def test_ephemeral_step_is_kept_while_a_dependent_failed(tmp_path):
    rec = Recorder()
    rec.fail = {"c"}
    s = ephemeral_chain(rec).run(tmp_path, progress=False)
    assert s.failed == ["c"]
    assert (s.steps["m"].dir / "out.txt").is_file()
    rec.fail, rec.calls = set(), []
    s = ephemeral_chain(rec).run(tmp_path, progress=False)
    assert s.ok and rec.calls == ["c"]
    assert read_step_json(s.steps["m"].dir)["pruned"] is True
