"""The study report (the ``report`` step): :func:`write_report` assembles ``report.md``, Tables 1-3
(:mod:`rlm.core.study.tables`), the figures (:mod:`rlm.core.study.figures`) and ``provenance.json`` from the
finished steps the report step depends on, one section function each.

Table 2 and the pair table come from the conflicts steps' results: the summary cells of the metrics that ran
(:meth:`rlm.core.contracts.Metric.columns`, via :func:`rlm.core.conflicts.report.summary_rows`), printed with
:func:`rlm.core.conflicts.report.format_value`; the figures the conflicts steps wrote are embedded too. No
metric is named here, so a third-party metric reaches the report like a built-in one. Table 2 is computed on
the checkpoints as saved (bf16 in the paper's regime, see ``precision`` in
:mod:`rlm.core.study.config`); where the training run's master weights are wider than the saved ones, the
rows also give the master weights' statistics from the run's last ``metrics.jsonl`` line. The report says which
dtype θ0 and every expert were saved in (read from the saved files).

Beside ``report.md`` the step writes ``summary.json`` (:mod:`rlm.core.study.summary`): the start model's and
the experts' scores with each expert's difference to θ0 and its paired bootstrap interval
(:func:`rlm.core.study.tables.delta_vs_start`), Table 1's cells and Table 2's update norm and fraction updated.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from rlm.core.study.scores import CollectedScores, collect_scores
from rlm.core.study.summary import SUMMARY_FILE, cpu_numerics_summary, decoding_text

EVAL_KINDS = ("eval_start", "eval_expert", "eval_merged")


@dataclass
class _Report:
    """What the sections share: the study config, the report step's context (its config, directory and
    inputs), and the Markdown lines and files written so far."""

    cfg: Any
    ctx: Any  # the report step's rlm.core.study.graph.StepContext
    md: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=lambda: ["report.md", SUMMARY_FILE])
    saved: dict[str, Any] = field(default_factory=dict)  # rlm.core.study.summary.saved_weights
    cpu: dict[str, Any] = field(default_factory=dict)  # rlm.core.study.summary.cpu_numerics_summary of saved

    @property
    def many_seeds(self) -> bool:
        return len(self.config["seeds"]) > 1

    def expert_key(self, group: str, task: str, seed: str) -> str:
        """How tables name an expert: ``GROUP/TASK`` (``GROUP/TASK/sSEED`` with several seeds)."""
        return f"{group}/{task}" + (f"/{seed}" if self.many_seeds else "")

    @property
    def config(self) -> Mapping[str, Any]:
        return self.ctx.config

    @property
    def out(self) -> Path:
        return self.ctx.out

    @property
    def inputs(self) -> Mapping[str, Any]:
        return self.ctx.inputs

    @property
    def figures(self) -> Path:
        return self.ctx.out / "figures"

    @property
    def scale(self) -> float:
        return self.config["scale"]

    def of_kind(self, *kinds: str) -> dict[str, Any]:
        """The inputs whose step names start with one of ``kinds`` (``eval_start``, ``conflicts``, ...)."""
        return {n: o for n, o in self.inputs.items() if n.split(".", 1)[0] in kinds}

    def source(self, output: Any) -> str:
        """A finished input step's directory, relative to the run directory."""
        return self.ctx.run_relative(output.dir)

    def copy_figure(self, src: Path, name: str) -> str | None:
        """Copy a step's figure to ``figures/NAME``; returns its path in the report (None if it is missing)."""
        if not src.is_file():
            return None
        self.figures.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, self.figures / name)
        self.files.append(f"figures/{name}")
        return f"figures/{name}"


def _number(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)


# -- sections ----------------------------------------------------------------------------------------------
def _setup(rep: _Report, scores: Mapping[str, Any], col: CollectedScores) -> None:
    c, cfg = rep.config, rep.cfg
    rep.md += [f"# {c['name']}: merging report", ""]
    if getattr(cfg, "description", ""):
        rep.md += [cfg.description, ""]
    rep.md += ["Every number below comes from a step directory of this run (paths relative to the run directory; "
               "see `provenance.json` and `table1.json` → `sources`). Rerunning `rlm experiment run` with the same "
               "config reuses every finished step.", ""]
    rep.md += ["## Setup", "", f"- base model: `{cfg.base.model}`" + (" (warm-up SFT on the task mixture → θ0)"
                                                                       if cfg.warmup_enabled else " (θ0 = base)"),
               f"- training seeds: {', '.join(str(s) for s in c['seeds'])} (Table 1 averages per example over seeds)",
               f"- trainers (groups): {', '.join(c['groups'])}; merge methods: {', '.join(c['methods'])}"]
    ns: dict[str, set[int]] = {}
    for n, r in scores.items():
        if r and r.get("n"):
            ns.setdefault(r.get("task") or n.rsplit(".", 1)[-1], set()).add(int(r["n"]))
    rep.md.append("- evaluation examples per cell (the same examples for every model): "
                  + ", ".join(f"{t}: {'/'.join(str(x) for x in sorted(v))}" for t, v in ns.items()))
    rep.md.append(f"- decoding: {decoding_text(c.get('decoding'))}")
    rep.md.append(f"- bootstrap: {c['bootstrap_resamples']} resamples of the evaluation prompts (the copies of a "
                  f"prompt an evaluation set repeats are drawn together: they are not independent), "
                  f"{c['ci'] * 100:g}% percentile interval, seed {c['bootstrap_seed']}")
    distinct = {t: s.n_prompts for t, s in col.start.items() if s.n_prompts is not None}
    if distinct:
        rep.md.append("- different prompts among the evaluation examples: "
                      + ", ".join(f"{t}: {k} of {col.start[t].n}" for t, k in distinct.items()))
    rep.md.append("- score: the mean per-example verifier score (math: math-verify accuracy; puzzle: every role "
                  "right; rank: the query's passage right; code: pass@1 plus; instruction following: fraction of "
                  "constraints followed), shown ×{:g}".format(rep.scale))
    rep.md += _precision_lines(rep)
    if col.missing:
        rep.md.append(f"- missing evaluations: {', '.join(col.missing)}")
    rep.md.append("")


def _precision_lines(rep: _Report) -> list[str]:
    """Which dtype θ0 and the experts were saved in (read from the files) and how the experts trained."""
    start = (rep.saved.get("start") or {}).get("dtype") or "unknown"
    experts = rep.saved.get("experts") or {}
    dtypes = sorted({e["dtype"] or "unknown" for e in experts.values()})
    modes = sorted({f"{e['precision']} (master weights {e.get('master_dtype')}, compute {e.get('compute_dtype')})"
                    for e in experts.values() if e.get("precision")})
    lines = [f"- weights saved in: θ0 {start}" + (f", experts {', '.join(dtypes)}" if dtypes else "")
             + f" (precision.save_dtype: {rep.config.get('save_dtype', 'auto')}); merges, Table 2 and every "
               "evaluation read these saved checkpoints"]
    if modes:
        lines.append(f"- experts trained with precision {'; '.join(modes)}")
    cpu = rep.cpu
    if cpu["torch_capability"] or cpu["cpu_capability"] not in (None, "native"):
        lines.append(f"- CPU kernels: cpu_capability {cpu['cpu_capability'] or 'native'}; torch's kernels "
                     f"{', '.join(cpu['torch_capability']) or 'unknown'} on {'; '.join(cpu['cpu']) or 'unknown CPU'} "
                     "(results are bitwise the same only on the same code paths)")
    if start != "unknown" and any(d not in (start, "unknown") for d in dtypes):
        lines.append(f"- note: θ0 and experts are saved in different dtypes, so τ = θ_expert − θ0 also holds the "
                     f"rounding of θ0 from {start} to the experts' dtype (Table 2 counts it as updated)")
    return lines


def _start_model(rep: _Report, col: CollectedScores) -> None:
    if not col.start:
        return
    rep.md += ["## Start model θ0", "", "| task | score | n | source |", "|---|---|---|---|"]
    for t in rep.config["tasks"]:
        s = col.start.get(t)
        if s is not None:
            rep.md.append(f"| {t} | {s.value * rep.scale:.1f} | {s.n} | `{s.source}` |")
    rep.md.append("")


def _experts_vs_start(rep: _Report, col: CollectedScores) -> dict[str, dict[str, dict[str, Any]]]:
    """Each expert on its own task against θ0 on the same examples: the score difference and its paired
    bootstrap interval (:func:`rlm.core.study.tables.delta_vs_start`); a Markdown table when θ0 was evaluated.
    Returns group -> task -> ``{"score", "n", "delta", "ci_low", "ci_high", "paired"}``."""
    from rlm.core.study.tables import delta_vs_start

    c = rep.config
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for g, tasks in col.unmerged.items():
        for t in (t for t in c["tasks"] if t in tasks):
            e, s = tasks[t], col.start.get(t)
            entry: dict[str, Any] = {"score": e.value, "n": e.n}
            if s is not None:
                entry.update(delta_vs_start(e, s, group=g, task=t, n_boot=c["bootstrap_resamples"], ci=c["ci"],
                                            seed=c["bootstrap_seed"]))
            out.setdefault(g, {})[t] = entry
    rows = [(g, t, e) for g, tasks in out.items() for t, e in tasks.items() if "delta" in e]
    if not rows:
        return out
    pct, sc = f"{c['ci'] * 100:g}%", rep.scale
    rep.md += ["## Experts against θ0", "",
               f"Each expert on its own task against the start model θ0 on the same examples (×{sc:g}): Δ = expert − "
               f"θ0, in brackets its {pct} bootstrap interval ({c['bootstrap_resamples']} resamples, seed "
               f"{c['bootstrap_seed']}; paired: the same resampled prompts for both models).", "",
               f"| group | task | θ0 | expert | Δ | {pct} interval of Δ | n |", "|---|---|---|---|---|---|---|"]
    for g, t, e in rows:
        ci = "–" if e["ci_low"] is None else f"[{e['ci_low'] * sc:+.1f}, {e['ci_high'] * sc:+.1f}]"
        rep.md.append(f"| {g} | {t} | {col.start[t].value * sc:.1f} | {e['score'] * sc:.1f} | {e['delta'] * sc:+.1f} "
                      f"| {ci}{'' if e['paired'] else ' (unpaired)'} | {e['n']} |")
    rep.md.append("")
    return out


def _findings(rep: _Report, experts: Mapping[str, Mapping[str, Any]], t1: Any) -> None:
    """"What the numbers show": which experts beat θ0 with the interval above 0, and per merge method the
    groups' Table 1 row-average changes from the smallest drop to the largest, with whether the extreme two
    intervals are disjoint. Statements only of the tables above, whatever direction they point."""
    from rlm.core.study.tables import AVERAGE

    sc, pct = rep.scale, f"{rep.config['ci'] * 100:g}%"
    lines: list[str] = []
    above, others = [], []
    for g, tasks in experts.items():
        for t, e in tasks.items():
            if e.get("ci_low") is not None:
                text = f"{g} on {t} {e['delta'] * sc:+.1f} [{e['ci_low'] * sc:+.1f}, {e['ci_high'] * sc:+.1f}]"
                (above if e["ci_low"] > 0 else others).append(text)
    if above or others:
        lines.append(f"- Experts whose {pct} interval of Δ against θ0 lies above 0: {len(above)} of "
                     f"{len(above) + len(others)}" + (f" ({'; '.join(above)})" if above else "")
                     + (f"; not above 0: {'; '.join(others)}" if others else "") + ".")
    for m in rep.config["methods"]:
        rows = [(g, c) for g in rep.config["groups"] if (c := t1.cells.get((g, m, AVERAGE))) is not None
                and c.rel_change is not None] if t1 is not None else []
        if len(rows) < 2:
            continue
        rows.sort(key=lambda r: -r[1].rel_change)
        (g_lo, best), (g_hi, worst) = rows[0], rows[-1]
        apart = None not in (best.ci_low, worst.ci_high) and worst.ci_high < best.ci_low
        lines.append(f"- {m}, Table 1 row average from the smallest drop to the largest: " + "; ".join(
            f"{g} {c.rel_change:+.1f} %" + ("" if c.ci_low is None else f" [{c.ci_low:+.1f}, {c.ci_high:+.1f}]")
            for g, c in rows) + f". {g_lo}'s change and {g_hi}'s "
            + ("have disjoint intervals." if apart else "have overlapping intervals: not separated here."))
    if lines:
        rep.md += ["## What the numbers show", ""] + lines + [""]


def _tables_1_and_3(rep: _Report, col: CollectedScores) -> Any:
    from rlm.core.study import tables

    c = rep.config
    t1 = tables.table1(col.unmerged, col.merged,
                       groups=[g for g in c["groups"] if g in col.unmerged or g in col.merged],
                       methods=c["methods"], tasks=list(c["tasks"]), n_boot=c["bootstrap_resamples"], ci=c["ci"],
                       seed=c["bootstrap_seed"], scale=c["scale"], seeds=c["seeds"])
    t1.write(rep.out, "table1")
    rep.md.append(t1.to_markdown(title="Table 1: merged experts per training paradigm "
                                       "(score, relative change, bootstrap interval)"))
    rep.files += ["table1.md", "table1.csv", "table1.json"]
    t3 = c.get("table3")
    if t3 and all(g in t1.groups for g in t3):
        tab3 = tables.table3(t1, t3[0], t3[1])
        tab3.write(rep.out, "table3")
        rep.files += ["table3.md", "table3.csv", "table3.json"]
        rep.md.append(tab3.to_markdown())
    return t1


def _num_models_curve(rep: _Report, col: CollectedScores) -> None:
    if not col.curve:
        return
    from rlm.core.study.figures import plot_num_models_curve

    plot_num_models_curve(col.curve, rep.figures / "num_models_curve.png")
    rep.files.append("figures/num_models_curve.png")
    allns = sorted({n for p in col.curve.values() for n in p})
    rep.md += ["## Merging more experts", "", "Mean score over the merged experts' tasks against the number of "
               "merged experts N (prefix subsets of the task order).", "",
               "![number of merged models](figures/num_models_curve.png)", "",
               "| series | " + " | ".join(f"N={n}" for n in allns) + " |", "|---|" + "---|" * len(allns)]
    for label, pts in col.curve.items():
        rep.md.append(f"| {label} | " + " | ".join(
            "–" if n not in pts else f"{sum(pts[n]) / len(pts[n]) * rep.scale:.1f}" for n in allns) + " |")
    rep.md.append("")


MASTER_NORM, MASTER_CHANGED, SAVED_CHANGED = "master ‖θ − θ0‖₂", "master: share ≠ θ0", "saved: share ≠ θ0"


def _saved_cells(rep: _Report, key: str) -> dict[str, Any]:
    """Table 2's cells from the expert's saved weights and training run: the saved dtype and, when the run's
    master weights are wider, the run's last ``delta_norm``, ``changed_frac`` and ``saved_changed_frac``."""
    e = (rep.saved.get("experts") or {}).get(key)
    if e is None:
        return {}
    cells: dict[str, Any] = {"saved dtype": e["dtype"] or "unknown"}
    fm = e["final_metrics"]
    if e.get("master_dtype") and e["master_dtype"] != e["dtype"] and fm.get("delta_norm") is not None:
        cells[MASTER_NORM] = fm["delta_norm"]
        for col, k in ((MASTER_CHANGED, "changed_frac"), (SAVED_CHANGED, "saved_changed_frac")):
            cells[col] = None if fm.get(k) is None else f"{100 * fm[k]:.2f} %"
    return cells


def _table2_entry(rep: _Report, o: Any, task: str, key: str) -> dict[str, Any]:
    """summary.json's Table 2 entry of one expert: the raw values of its conflicts step's ``conflicts.json``
    (on the saved weights) and the master-weight statistics of its training run."""
    import json

    try:
        data = json.loads((o.dir / "conflicts.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    m = (data.get("models") or {}).get(task) or {}
    e = (rep.saved.get("experts") or {}).get(key) or {"final_metrics": {}}
    fm = e["final_metrics"]
    return {"update_norm": m.get("update_norm"), "fraction_updated": m.get("fraction_updated"),
            "threshold": data.get("threshold"), "num_params": m.get("num_params"), "saved_dtype": e.get("dtype"),
            "master_dtype": e.get("master_dtype"), "master_update_norm": fm.get("delta_norm"),
            "master_fraction_changed": fm.get("changed_frac"), "saved_fraction_changed": fm.get("saved_changed_frac"),
            "source": rep.source(o)}


def _mean_over_seeds(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One Table 2 entry from several seeds' (numbers averaged; the per-seed entries under ``seeds``)."""
    if len(entries) == 1:
        return entries[0][1]
    first = entries[0][1]
    out = {k: (sum(e[k] for _, e in entries) / len(entries)
               if all(isinstance(e.get(k), (int, float)) for _, e in entries) else first.get(k))
           for k in first if k != "source"}
    out["seeds"] = {s: e for s, e in entries}
    return out


def _conflicts(rep: _Report) -> dict[str, Any]:
    """Table 2 (every model-scope column of the metrics that ran, per expert, on the saved weights, with the
    saved dtype and the master weights' statistics), the pair table (every pair-scope column, per pair of
    experts) and the figures of the conflicts steps. Returns summary.json's ``table2``."""
    from rlm.core.conflicts.report import format_value, pair_label
    from rlm.core.study import tables

    conf = rep.of_kind("conflicts")
    if not conf:
        return {}
    rows: dict[str, dict[str, Any]] = {}
    pairs: dict[str, dict[str, Any]] = {}
    figures: list[str] = []
    summary: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for n, o in conf.items():
        _, g, s = n.split(".")
        res, src, suffix = o.result or {}, rep.source(o), (f"/{s}" if rep.many_seeds else "")
        for t, cells in (res.get("models") or {}).items():
            if cells:
                key = rep.expert_key(g, t, s)
                rows[key] = {**cells, **_saved_cells(rep, key), "source": src}
                summary.setdefault(f"{g}/{t}", []).append((s, _table2_entry(rep, o, t, key)))
        for p, cells in (res.get("pairs") or {}).items():
            if cells:
                pairs[f"{g}{suffix}\0{p}"] = {"group": f"{g}{suffix}", "pair": pair_label(p), **cells,
                                               "source": f"`{src}`"}
        for f in res.get("figures") or []:
            rel = rep.copy_figure(o.dir / f, f"conflicts-{g}-{s}-{f.replace('/', '-')}")
            if rel:
                figures.append(rel)

    if rows:
        notes = ["τ = θ_expert − θ0 on the weights as saved (the dtype in `saved dtype`, θ0 likewise); the "
                 "columns before it are those of the conflict metrics that ran (each source's `report.md` has "
                 "their sections)."]
        if any(MASTER_NORM in r for r in rows.values()):
            notes.append(f"`{MASTER_NORM}`, `{MASTER_CHANGED}`: the same change measured on the training run's "
                         "master weights (wider than the saved ones) after its last step; `" + SAVED_CHANGED +
                         "`: the share of parameters whose saved value differs from θ0's at all (the run's "
                         "`metrics.jsonl`: delta_norm, changed_frac, saved_changed_frac). Updates smaller than "
                         "half a step of the saved dtype change the master weights but not the checkpoint.")
        tab2 = tables.table2(rows, formatter=format_value, notes=notes)
        tab2.write(rep.out, "table2")
        rep.files += ["table2.md", "table2.csv", "table2.json"]
        rep.md.append(tab2.to_markdown())
    if pairs:
        columns = list(dict.fromkeys(k for r in pairs.values() for k in r if k != "source"))
        table = tables.SimpleTable("", [*columns, "source"], list(pairs.values()), formatter=format_value)
        rep.md += ["## Task conflicts between experts", "",
                   "Statistics of the task vectors τ = θ_expert − θ0 of each pair within a group, from the conflict "
                   "metrics that ran (see each source's `report.md` for their sections).", "",
                   *table.table_lines(), ""]
    for f in figures:
        rep.md += [f"![{Path(f).stem}]({f})", ""]
    return {k: _mean_over_seeds(v) for k, v in summary.items()}


def _training_curves(rep: _Report) -> None:
    from rlm.core.study.figures import plot_training_curves, read_metrics_jsonl

    one_seed = len(rep.config["seeds"]) == 1
    runs: dict[str, list[dict[str, Any]]] = {}
    for n, o in rep.of_kind("train", "warmup").items():
        if (o.result or {}).get("run"):
            path = o.dir / o.result["run"] / "metrics.jsonl"
            if path.is_file():
                label = "warmup" if n == "warmup" else "/".join(n.split(".")[1:3 if one_seed else 4])
                runs[label] = read_metrics_jsonl(path)
    if not runs:
        return
    rl = {k: v for k, v in runs.items() if any(r.get("reward_mean") is not None for r in v)}
    experts = {k: v for k, v in runs.items() if k != "warmup"}
    rep.md += ["## Training curves", "", "Mean reward, mean |advantage| (RL only) and ‖θ − θ_start‖₂ per step "
               "(each run's `metrics.jsonl`; θ_start is θ0 for the experts, the base model for the warm-up).", ""]
    if experts:
        plot_training_curves(experts, rep.figures / "training_curves.png")
        rep.files.append("figures/training_curves.png")
        rep.md += ["![training curves](figures/training_curves.png)", ""]
    if "warmup" in runs:
        plot_training_curves({"warmup": runs["warmup"]}, rep.figures / "warmup_curve.png", keys=("loss", "delta_norm"))
        rep.files.append("figures/warmup_curve.png")
        rep.md += ["![warm-up](figures/warmup_curve.png)", ""]
    if rl:
        rep.md += ["| run | steps | first reward | last reward | last ‖θ − θ0‖ |", "|---|---|---|---|---|"]
        for k, v in rl.items():
            rw = [r.get("reward_mean") for r in v if r.get("reward_mean") is not None]
            rep.md.append(f"| {k} | {len(v)} | {_number(rw[0] if rw else None)} | {_number(rw[-1] if rw else None)} | "
                          f"{_number(v[-1].get('delta_norm'))} |")
        rep.md.append("")


def _landscapes(rep: _Report) -> None:
    lands = rep.of_kind("landscape")
    if not lands:
        return
    rep.md += ["## Landscape around an expert", "",
               "f(α, β) = score(θ_a + α Δθ + β r), Δθ = θ_merge − θ_a, r random with ‖r‖ = ‖Δθ‖; (0, 0) is the "
               "expert, (1, 0) the merged model.", ""]
    for n, o in lands.items():
        _, g, s = n.split(".")
        rel = rep.copy_figure(o.dir / "landscape.png", f"landscape-{g}-{s}.png")
        if rel:
            rep.md += [f"![landscape {g}]({rel})", ""]
        res = o.result or {}
        if res.get("values"):
            rep.md += [f"{g} (source `{rep.source(o)}`, {res.get('n')} examples per point, "
                       f"‖Δθ‖ = {_number(res.get('delta_norm'))}):", "",
                       "| α \\ β | " + " | ".join(f"{b:g}" for b in res["betas"]) + " |",
                       "|---|" + "---|" * len(res["betas"])]
            for a, row in zip(res["alphas"], res["values"]):
                rep.md.append(f"| {a:g} | " + " | ".join(f"{v * rep.scale:.1f}" for v in row) + " |")
            rep.md.append("")


def _provenance(rep: _Report) -> None:
    from rlm.core.io.atomic import atomic_write_json

    prov = {}
    for n, o in rep.inputs.items():
        entry = {"dir": rep.source(o), "key": o.key}
        if n.startswith("eval") and o.result:
            entry.update(score=o.result.get("score"), n=o.result.get("n"))
        prov[n] = entry
    atomic_write_json(rep.out / "provenance.json", prov)
    rep.files.append("provenance.json")
    rep.md += ["## Provenance", "", "Each evaluation: step → directory (summary.json and records.jsonl inside).", "",
               "| step | score | n | directory |", "|---|---|---|---|"]
    for n, p in prov.items():
        if "score" in p:
            rep.md.append(f"| {n} | {_number(p['score'] * rep.scale if p['score'] is not None else None)} | "
                          f"{p['n']} | `{p['dir']}` |")
    rep.md.append("")


def write_report(cfg: Any, ctx: Any) -> dict[str, Any]:
    """Assemble ``report.md`` and the tables and figures from the finished steps the report depends on
    (``ctx`` is the report step's :class:`rlm.core.study.graph.StepContext`, ``cfg`` the study's config)."""
    from rlm.core.io.atomic import atomic_write_text

    rep = _Report(cfg, ctx)
    rep.saved = _saved_weights(rep)
    rep.cpu = cpu_numerics_summary(rep.config.get("cpu_capability"), rep.saved.get("experts") or {})
    scores = {n: o.result for n, o in rep.of_kind(*EVAL_KINDS).items()}
    col = collect_scores(cfg, scores)
    _setup(rep, scores, col)
    _start_model(rep, col)
    experts = _experts_vs_start(rep, col)
    t1 = _tables_1_and_3(rep, col)
    _findings(rep, experts, t1)
    _num_models_curve(rep, col)
    table2 = _conflicts(rep)
    _training_curves(rep)
    _landscapes(rep)
    _provenance(rep)
    _write_summary(rep, col, experts, t1, table2)
    atomic_write_text(rep.out / "report.md", "\n".join(rep.md))
    return {"files": rep.files, "table1": "table1.md", "summary": SUMMARY_FILE, "missing": col.missing}


def _saved_weights(rep: _Report) -> dict[str, Any]:
    """:func:`rlm.core.study.summary.saved_weights` of θ0 (the warm-up's or init's model) and every expert."""
    from rlm.core.study.graph import model_of
    from rlm.core.study.summary import saved_weights

    start = next(((n, model_of(rep.inputs[n])) for n in ("warmup", "init") if n in rep.inputs), None)
    experts = {}
    for n, o in rep.of_kind("train").items():
        _, g, t, s = n.split(".")
        res = o.result or {}
        experts[rep.expert_key(g, t, s)] = (model_of(o), o.dir / res["run"] if res.get("run") else None,
                                            res.get("final_metrics"))
    return saved_weights(start, experts)


def _write_summary(rep: _Report, col: CollectedScores, experts: Mapping[str, Any], t1: Any,
                   table2: Mapping[str, Any]) -> None:
    from rlm.core.io.atomic import atomic_write_json
    from rlm.core.study.summary import build_summary, steps_seconds

    c = rep.config
    seconds, steps = steps_seconds(rep.ctx.run_dir, [o.dir for o in rep.inputs.values()])
    data = build_summary(preset=c["name"], elapsed_s=seconds, steps=steps, start=col.start, experts=experts, t1=t1,
                         table2=table2, precision={"save_dtype": c.get("save_dtype"), **rep.saved},
                         bootstrap={"resamples": c["bootstrap_resamples"], "ci": c["ci"],
                                    "seed": c["bootstrap_seed"]}, cpu=rep.cpu, decoding=c.get("decoding"))
    atomic_write_json(rep.out / SUMMARY_FILE, data)
