"""Studies end to end: the ``micro`` preset through the real step functions, resume after a failed step, the
landscape geometry, and ``rlm merge-eval`` on tiny experts made by perturbing the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlm.core.cli import main
from rlm.core.errors import RlmError
from rlm.core.study.graph import StepFailed
from rlm.core.study.plan import plan_steps
from rlm.core.study.presets import load_experiment


def _results(run: Path) -> dict[str, dict]:
    """step name -> step.json of every finished step of the run directory (from graph.json)."""
    graph = json.loads((run / "graph.json").read_text())
    out = {}
    for s in graph["steps"]:
        if s["dir"] and (run / s["dir"] / "step.json").is_file():
            out[s["name"]] = json.loads((run / s["dir"] / "step.json").read_text())
    return out


def _check_table1(run: Path, groups: list[str], tasks: list[str], methods: list[str],
                  check: list[str] | None = None) -> None:
    """Every Table 1 number of the groups ``check`` (default: all) against the evaluation steps' own results,
    recomputed here by hand."""
    t1 = json.loads((run / "report" / "table1.json").read_text())
    res = _results(run)
    assert t1["groups_order"] == groups and t1["tasks"] == tasks
    for g in check or groups:
        for t in tasks:
            um = res[f"eval_expert.{g}.{t}.s0"]["result"]
            cell = t1["groups"][g]["unmerged"][t]
            assert cell["score"] == pytest.approx(np.mean(um["per_example"]))
            assert cell["source"] == um["source"] and (run / cell["source"] / "records.jsonl").is_file()
            for m in methods:
                partners = [p for p in tasks if p != t]
                vals = []
                for p in partners:
                    pair = "+".join(x for x in tasks if x in (t, p))
                    vals.append(res[f"eval_merged.{g}.{pair}.{m}.s0.{t}"]["result"]["score"])
                c = t1["groups"][g]["methods"][m][t]
                assert c["score"] == pytest.approx(sum(vals) / len(vals))
                if um["score"] == 0:
                    assert c["rel_change"] is None
                else:
                    assert c["rel_change"] == pytest.approx((c["score"] - um["score"]) / um["score"] * 100)
                assert c["complete"] and len(c["sources"]) == len(partners)


def _saved_weights(run: Path, step_glob: str) -> dict:
    """The tensors of the final model of the training step matching ``step_glob`` (torch: they are bf16)."""
    from safetensors.torch import load_file

    return load_file(str(next((run / "steps").glob(step_glob)) / "run" / "final" / "model.safetensors"))


# -- the micro preset end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    from rlm.core.study.run import run_study

    cfg = load_experiment("micro")
    run = tmp_path_factory.mktemp("micro") / "run"
    summary = run_study(cfg, run, progress=False)
    return cfg, run, summary


def test_micro_end_to_end(micro_run):
    cfg, run, summary = micro_run
    plan = plan_steps(cfg)
    assert summary.ok and set(summary.executed) == {s.name for s in plan}
    rep = run / "report"
    for f in ("report.md", "table1.md", "table1.csv", "table1.json", "table2.md", "table3.md", "provenance.json",
              "figures/training_curves.png", "figures/landscape-sft-s0.png", "figures/conflicts-sft-s0-sign_conflict.png"):
        assert (rep / f).is_file(), f
    _check_table1(run, ["sft", "grpo", "rl_pos"], ["math", "puzzle"],
                  ["averaging", "task_arithmetic", "ties", "dare_ties"])
    md = (rep / "report.md").read_text()
    for needle in ("Table 1", "Table 2", "Table 3", "Training curves", "Landscape", "Provenance",
                   "evaluation examples per cell", "bootstrap: 200 resamples", "training seeds: 0"):
        assert needle in md, needle
    # Table 2 comes from the conflicts steps (every model-scope column of the metrics that ran), which agree
    # with the weights on disk
    res = _results(run)
    t2 = json.loads((rep / "table2.json").read_text())
    row = next(r for r in t2["rows"] if r["model"] == "sft/math")
    conflicts = res["conflicts.sft.s0"]["result"]
    assert {k: v for k, v in row.items() if k in conflicts["models"]["math"]} == conflicts["models"]["math"]
    assert (run / row["source"] / "conflicts.json").is_file()
    base, expert = _saved_weights(run, "warmup-*"), _saved_weights(run, "train.sft.math.s0-*")
    norm = math.sqrt(sum(float(((expert[k].double() - base[k].double()) ** 2).sum()) for k in base))
    data = json.loads((run / row["source"] / "conflicts.json").read_text())
    assert data["models"]["math"]["update_norm"] == pytest.approx(norm, rel=1e-6)
    assert any(isinstance(v, float) and v == pytest.approx(norm, rel=1e-6) for v in row.values())
    # the pair table holds every pair-scope column; the conflicts steps' figures are embedded
    pair_columns = [c for cells in conflicts["pairs"].values() for c in cells]
    assert pair_columns and all(c in md for c in pair_columns)
    assert all(f"figures/conflicts-sft-s0-{f.replace('/', '-')}" in md for f in conflicts["figures"])
    # the landscape's (0, 0) is the expert and (1, 0) the merged model, on the same first examples
    land = json.loads((next((run / "steps").glob("landscape.sft.s0-*")) / "landscape.json").read_text())
    n = land["n"]
    expert_pe = res["eval_expert.sft.math.s0"]["result"]["per_example"][:n]
    merged_pe = res["eval_merged.sft.math+puzzle.averaging.s0.math"]["result"]["per_example"][:n]
    assert land["per_example"][0][0] == expert_pe and land["per_example"][1][0] == merged_pe
    # Table 1 printed by the CLI path is the same file; a rerun finds every step finished
    from rlm.core.study.run import run_study

    again = run_study(cfg, run, progress=False)
    assert again.executed == [] and again.ok


def _check_summary_shape(data: dict) -> None:
    """``report/summary.json`` has the documented shape (more keys allowed): types, scores in [0, 1], intervals
    ordered and holding their point estimate; ``None`` only where a value is undefined (a relative change
    against 0, an interval without resamples)."""
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def interval(ci, value):
        if ci is None:
            return True
        return (isinstance(ci, list) and len(ci) == 2 and all(num(v) for v in ci)
                and ci[0] - 1e-12 <= value <= ci[1] + 1e-12)

    def score(x):
        return num(x) and 0.0 <= x <= 1.0

    assert isinstance(data["preset"], str) and num(data["elapsed_s"]) and data["elapsed_s"] > 0
    assert data["start"] and data["experts"] and data["table1"] and data["table2"]
    for e in data["start"].values():
        assert score(e["score"]) and isinstance(e["n"], int) and e["n"] > 0
    for tasks in data["experts"].values():
        for t, e in tasks.items():
            assert t in data["start"] and score(e["score"]) and isinstance(e["n"], int) and e["n"] > 0
            assert num(e["delta_vs_start"]) and e["delta_ci"] is not None
            assert interval(e["delta_ci"], e["delta_vs_start"])
            assert e["delta_vs_start"] == pytest.approx(e["score"] - data["start"][t]["score"])
    for methods in data["table1"].values():
        for cells in methods.values():
            for t, c in cells.items():
                assert t in data["start"] and score(c["score"])
                assert c["relative_change"] is None or num(c["relative_change"])
                assert c["relative_change"] is not None or c["ci"] is None
                assert interval(c["ci"], c["relative_change"]) if c["ci"] is not None else True
    for key, e in data["table2"].items():
        group, task = key.split("/")
        assert group in data["experts"] and task in data["experts"][group]
        assert num(e["update_norm"]) and e["update_norm"] >= 0 and score(e["fraction_updated"])


def _per_example(run: Path, step: str) -> np.ndarray:
    """The per-example scores of an evaluation step, read from its ``records.jsonl``."""
    lines = (next((run / "steps").glob(f"{step}-*")) / "records.jsonl").read_text().splitlines()
    return np.array([json.loads(line)["score"] for line in lines], dtype=np.float64)


def _st_dtypes(path: Path) -> set[str]:
    """The dtypes a safetensors file's header declares."""
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_micro_summary_and_bf16_experts(micro_run):
    """summary.json beside report.md; θ0 and every expert saved in bf16 (as the manifests and the report say);
    Table 2 and summary.json's table2 computed on those saved weights; each expert's interval against θ0 is
    the paired bootstrap of its records."""
    import zlib

    cfg, run, _ = micro_run
    rep = run / "report"
    data = json.loads((rep / "summary.json").read_text())
    _check_summary_shape(data)
    assert data["preset"] == "micro" and set(data["start"]) == {"math", "puzzle"}
    assert data["decoding"] == {"temperature": 0.0}  # micro evaluates greedily
    assert "\n- decoding: greedy\n" in (rep / "report.md").read_text()
    assert set(data["experts"]) == set(data["table1"]) == {"sft", "grpo", "rl_pos"}
    assert set(data["table1"]["sft"]) == {"averaging", "task_arithmetic", "ties", "dare_ties"}
    assert data["steps"] == len(plan_steps(cfg)) - 1  # every step but the report itself
    # the paired bootstrap of one cell, recomputed from the evaluation records
    expert, start = _per_example(run, "eval_expert.sft.math.s0"), _per_example(run, "eval_start.math")
    cell = data["experts"]["sft"]["math"]
    assert cell["n"] == expert.size == start.size and cell["score"] == pytest.approx(expert.mean())
    n_boot, ci = cfg.report.bootstrap_resamples, cfg.report.ci
    # the bootstrap draws prompts: the copies of a prompt the set repeats go together (numbered by first use)
    lines = (next((run / "steps").glob("eval_start.math-*")) / "records.jsonl").read_text().splitlines()
    first: dict[str, int] = {}
    label = np.array([first.setdefault(json.loads(line)["prompt"], len(first)) for line in lines])
    k = len(first)
    assert data["start"]["math"]["n_prompts"] == k <= expert.size
    rng = np.random.default_rng([cfg.report.seed, zlib.crc32(b"sft|start|math")])
    idx = rng.integers(0, k, size=(n_boot, k))
    count = np.bincount(label, minlength=k)[idx].sum(axis=1)
    diffs = (np.bincount(label, weights=expert - start, minlength=k)[idx].sum(axis=1)) / count
    lo, hi = np.percentile(diffs, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])
    assert cell["delta_ci"] == pytest.approx([lo, hi])
    assert cell["delta_vs_start"] == pytest.approx(expert.mean() - start.mean())
    assert "## Experts against θ0" in (rep / "report.md").read_text()
    # "What the numbers show" counts the experts whose interval lies above 0, from the same intervals
    cells = [e for tasks in data["experts"].values() for e in tasks.values()]
    n_above = sum(e["delta_ci"][0] > 0 for e in cells)
    assert (f"- Experts whose 95% interval of Δ against θ0 lies above 0: {n_above} of {len(cells)}"
            in (rep / "report.md").read_text())
    rows = [g for g, ms in data["table1_average"].items()
            if ms.get("averaging", {}).get("relative_change") is not None]
    assert (len(rows) >= 2) == ("- averaging, Table 1 row average from the smallest drop to the largest: "
                                in (rep / "report.md").read_text())
    # θ0 and the experts are bf16 checkpoints trained with fp32 master weights, and every record says so
    for step in ("warmup", "train.sft.math.s0", "train.grpo.puzzle.s0", "train.rl_pos.math.s0"):
        final = next((run / "steps").glob(f"{step}-*")) / "run"
        assert _st_dtypes(final / "final" / "model.safetensors") == {"BF16"}, step
        manifest = json.loads((final / "manifest.json").read_text())
        assert (manifest["save_dtype"], manifest["master_dtype"]) == ("bfloat16", "float32"), step
    assert "weights saved in: θ0 bfloat16, experts bfloat16" in (rep / "report.md").read_text()
    assert data["precision"]["start"]["dtype"] == "bfloat16"
    # which CPU kernels trained the experts (the same seeds give the same numbers only on the same ones)
    import torch

    assert data["cpu_numerics"]["cpu_capability"] == "native"
    assert data["cpu_numerics"]["torch_capability"] == [torch.backends.cpu.get_cpu_capability()]
    assert "- CPU kernels: cpu_capability native; torch's kernels" in (rep / "report.md").read_text()
    assert {e["dtype"] for e in data["precision"]["experts"].values()} == {"bfloat16"}
    # Table 2 on the saved bf16 weights: recomputed from the files; the master weights' statistics beside it
    base, saved = _saved_weights(run, "warmup-*"), _saved_weights(run, "train.sft.math.s0-*")
    tau = {k: saved[k].double() - base[k].double() for k in base}
    total = sum(t.numel() for t in tau.values())
    t2 = data["table2"]["sft/math"]
    assert t2["saved_dtype"] == "bfloat16" and t2["master_dtype"] == "float32"
    assert t2["update_norm"] == pytest.approx(math.sqrt(sum(float((t ** 2).sum()) for t in tau.values())), rel=1e-9)
    assert t2["fraction_updated"] == pytest.approx(
        sum(int((t.abs() > t2["threshold"]).sum()) for t in tau.values()) / total)
    assert t2["saved_fraction_changed"] == pytest.approx(sum(int((t != 0).sum()) for t in tau.values()) / total)
    assert t2["master_fraction_changed"] >= t2["saved_fraction_changed"]
    grpo = data["table2"]["grpo/math"]  # one RL step moves (nearly) every fp32 master weight, few bf16 values
    assert grpo["master_fraction_changed"] > 0.9 and grpo["fraction_updated"] < grpo["master_fraction_changed"]
    row = next(r for r in json.loads((rep / "table2.json").read_text())["rows"] if r["model"] == "sft/math")
    assert row["saved dtype"] == "bfloat16" and row["master ‖θ − θ0‖₂"] == pytest.approx(t2["master_update_norm"])


def test_resume_after_failed_step(micro_run):
    """A failing merge blocks only what depends on it; the rerun (real step functions) redoes exactly those."""
    from rlm.core.study.run import run_study
    from rlm.core.study.steps import StudySteps

    _, run, _ = micro_run
    cfg = load_experiment("micro", quick=True)  # shares the warm-up and the GRPO experts with micro_run
    bad = "merge.sft.math+puzzle.ties.s0"
    fns = StudySteps(cfg).functions()
    real_merge = fns["merge"]

    def failing_merge(ctx):
        if ctx.name == bad:
            raise RuntimeError("disk full (simulated)")
        return real_merge(ctx)

    with pytest.raises(StepFailed, match="disk full"):
        run_study(cfg, run, progress=False, functions={**fns, "merge": failing_merge})
    graph = {s["name"]: s for s in json.loads((run / "graph.json").read_text())["steps"]}
    assert graph[bad]["status"] == "failed"
    assert graph["eval_merged.sft.math+puzzle.ties.s0.math"]["status"] == "blocked"
    assert graph["report"]["status"] == "blocked"
    assert not (run / "report").exists()  # the full run's report is not left standing for this config
    assert graph["train.grpo.math.s0"]["status"] == "cached"  # same config as in the full micro run
    assert graph["merge.sft.math+puzzle.averaging.s0"]["status"] == "done"
    assert list((run / "steps").glob(f"{bad}-*.failed.json"))
    summary = run_study(cfg, run, progress=False)
    assert sorted(summary.executed) == sorted([bad, "eval_merged.sft.math+puzzle.ties.s0.math",
                                               "eval_merged.sft.math+puzzle.ties.s0.puzzle", "report"])
    assert not list((run / "steps").glob(f"{bad}-*.failed.json"))


# -- the landscape geometry ------------------------------------------------------------------------------
def _perturbed(src: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A copy of the model in ``src`` with every float tensor moved by seeded Gaussian noise."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, out)
    w = load_file(str(src / "model.safetensors"))
    rng = np.random.default_rng(seed)
    new = {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in w.items()}
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_landscape_directions(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file

    from rlm.core.models.hf import load_model
    from rlm.core.study.landscape import Landscape

    merged = _perturbed(tiny_model_dir, tmp_path / "merged", 7)
    a = {k: v.astype(np.float64) for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    m = {k: v.astype(np.float64) for k, v in load_file(str(merged / "model.safetensors")).items()}
    model, _ = load_model(str(tiny_model_dir))
    land = Landscape(model, merged, seed=3)
    delta_norm = math.sqrt(sum(((m[k] - a[k]) ** 2).sum() for k in a))
    assert land.delta_norm == pytest.approx(delta_norm, rel=1e-6)
    r = {n: land.direction(n).double().numpy() for n, _ in land.params}
    assert math.sqrt(sum((v ** 2).sum() for v in r.values())) == pytest.approx(delta_norm, rel=1e-5)

    def weights():
        return {n: p.detach().double().numpy() for n, p in model.named_parameters()}

    land.set(1.0, 0.0)  # the merged model
    assert all(np.allclose(w, m[n], atol=1e-6) for n, w in weights().items())
    land.set(0.5, -2.0)
    assert all(np.allclose(w, a[n] + 0.5 * (m[n] - a[n]) - 2.0 * r[n], atol=1e-5) for n, w in weights().items())
    land.set(0.0, 0.0)  # back to θ_a exactly
    assert all(np.array_equal(w, a[n]) for n, w in weights().items())
    # r depends on the seed only (not on the model's values)
    model2, _ = load_model(str(tiny_model_dir))
    assert np.array_equal(Landscape(model2, merged, seed=3).direction("lm_head.weight").numpy(),
                          land.direction("lm_head.weight").numpy())
    assert not np.array_equal(Landscape(model2, merged, seed=4).direction("lm_head.weight").numpy(),
                              land.direction("lm_head.weight").numpy())


# -- merge-eval ------------------------------------------------------------------------------------------
def test_parse_experts_errors():
    from rlm.core.study.run import parse_experts

    assert parse_experts("sft:math=a, sft:puzzle=b,grpo:math=c,grpo:puzzle=d") == {
        "sft": {"math": "a", "puzzle": "b"}, "grpo": {"math": "c", "puzzle": "d"}}
    with pytest.raises(RlmError, match="GROUP:TASK=DIR"):
        parse_experts("sft=a")
    with pytest.raises(RlmError, match="one expert"):
        parse_experts("sft:math=a,grpo:math=b,grpo:puzzle=c")
    with pytest.raises(RlmError, match="twice"):
        parse_experts("sft:math=a,sft:math=b")


def test_merge_eval_on_perturbed_experts(tiny_model_dir, tmp_path, capsys):
    experts = {(g, t): _perturbed(tiny_model_dir, tmp_path / f"{g}-{t}", seed)
               for seed, (g, t) in enumerate([("sft", "math"), ("sft", "puzzle"), ("sft", "rank"),
                                              ("grpo", "math"), ("grpo", "puzzle")])}
    spec = ",".join(f"{g}:{t}={p}" for (g, t), p in experts.items())
    out = tmp_path / "me"
    args = ["merge-eval", "--base", str(tiny_model_dir), "--experts", spec, "--methods", "averaging,ties",
            "--limit", "2", "--max-new-tokens", "4", "--batch-size", "4", "--no-progress",
            "--tasks", "puzzle=puzzle:id", "--set", "landscape.groups=[grpo]", "--set", "landscape.alphas=[0,1]",
            "--set", "landscape.betas=[0]", "--set", "report.bootstrap_resamples=50", "--threads", "1",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "| sft | unmerged |" in printed
    rep = out / "report"
    for f in ("table1.md", "table1.csv", "table1.json", "figures/num_models_curve.png",
              "figures/landscape-grpo-s0.png"):
        assert (rep / f).is_file(), f
    res = _results(out)
    # each expert evaluated on its own task only; every pair of a group merged with each method
    assert sorted(n for n in res if n.startswith("eval_expert.")) == sorted(
        f"eval_expert.{g}.{t}.s0" for g, t in experts)
    assert "merge.sft.math+puzzle+rank.ties.s0" in res  # the curve's N = 3
    assert not any(n.startswith(("warmup", "eval_start", "conflicts")) for n in res)
    merged = res["merge.sft.math+rank.ties.s0"]["result"]
    assert merged["tasks"] == ["math", "rank"] and merged["method"] == "ties"
    _check_table1(out, ["sft", "grpo"], ["math", "puzzle", "rank"], ["averaging", "ties"], check=["sft"])
    t1 = json.loads((rep / "table1.json").read_text())
    assert set(t1["groups"]["grpo"]["methods"]["ties"]) >= {"math", "puzzle"}
    assert t1["groups"]["grpo"]["methods"]["ties"]["rank"]["score"] is None  # grpo has no rank expert
    # the experts are used in place; rerunning reuses everything, touching an expert redoes what depends on it
    assert main(args) == 0
    assert all(s["status"] == "cached" for s in json.loads((out / "graph.json").read_text())["steps"])
    w = experts[("grpo", "math")] / "config.json"
    w.write_text(w.read_text() + "\n")
    assert main(args) == 0
    ran = {s["name"] for s in json.loads((out / "graph.json").read_text())["steps"] if s["status"] == "done"}
    assert "train.grpo.math.s0" in ran and "merge.grpo.math+puzzle.ties.s0" in ran and "report" in ran
    assert not any(n.startswith(("merge.sft", "eval_expert.sft")) for n in ran)


def test_merge_eval_bad_input(tiny_model_dir, tmp_path, capsys):
    args = ["merge-eval", "--base", str(tiny_model_dir), "--experts",
            f"sft:math={tiny_model_dir},sft:puzzle={tmp_path / 'missing'}", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    args = ["merge-eval", "--base", str(tiny_model_dir), "--experts",
            f"sft:math={tiny_model_dir},sft:puzzle={tiny_model_dir}", "--methods", "avg", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "averaging" in capsys.readouterr().err  # the closest name is suggested
