"""Table 1 arithmetic against hand-computed values, bootstrap intervals, Tables 2 and 3, figures."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from rlm.core.study.figures import plot_landscape, plot_num_models_curve
from rlm.core.study.tables import (
    ReportError,
    as_score,
    bootstrap_relative_change,
    delta_vs_start,
    parse_pair,
    prompt_clusters,
    relative_change,
    table1,
    table2,
    table3,
)

# one group, three tasks, one method; numbers chosen so every cell is easy to compute by hand
UNMERGED = {"sft": {"math": 0.5, "code": 0.4, "puzzle": 0.8}}
MERGED = {"sft": {"ties": {
    ("math", "code"): {"math": 0.4, "code": 0.3},
    "math|puzzle": {"math": 0.3, "puzzle": 0.6},
    "code+puzzle": {"code": 0.2, "puzzle": 0.7},
}}}


def test_relative_change_and_pairs():
    assert relative_change(0.35, 0.5) == pytest.approx(-30.0)
    assert relative_change(0.6, 0.5) == pytest.approx(20.0)
    assert relative_change(0.1, 0.0) is None
    assert parse_pair("a|b") == ("a", "b") and parse_pair("a+b") == ("a", "b") and parse_pair(["a", "b"]) == ("a", "b")
    with pytest.raises(ReportError):
        parse_pair("a|a")


def test_table1_cells_match_hand_computation():
    t = table1(UNMERGED, MERGED, n_boot=0)
    # math: partners code (0.4) and puzzle (0.3): (0.4 + 0.3) / 2 = 0.35; (0.35 - 0.5) / 0.5 = -30 %
    c = t.cell("sft", "ties", "math")
    assert c.score == pytest.approx(0.35) and c.rel_change == pytest.approx(-30.0)
    assert sorted(c.partners) == ["code", "puzzle"] and c.complete
    # code: (0.3 + 0.2) / 2 = 0.25; (0.25 - 0.4) / 0.4 = -37.5 %
    c = t.cell("sft", "ties", "code")
    assert c.score == pytest.approx(0.25) and c.rel_change == pytest.approx(-37.5)
    # puzzle: (0.6 + 0.7) / 2 = 0.65; (0.65 - 0.8) / 0.8 = -18.75 %
    c = t.cell("sft", "ties", "puzzle")
    assert c.score == pytest.approx(0.65) and c.rel_change == pytest.approx(-18.75)
    # Average: (0.35 + 0.25 + 0.65) / 3 = 0.416667 against (0.5 + 0.4 + 0.8) / 3 = 0.566667 -> -26.4706 %
    avg = t.cell("sft", "ties", "Average")
    assert avg.score == pytest.approx(1.25 / 3) and avg.unmerged == pytest.approx(1.7 / 3)
    assert avg.rel_change == pytest.approx((1.25 - 1.7) / 1.7 * 100)
    assert t.unmerged_average["sft"] == pytest.approx(1.7 / 3)
    # equal to the mean of per-partner relative changes (same denominator)
    assert t.cell("sft", "ties", "math").rel_change == pytest.approx(np.mean([(0.4 - 0.5) / 0.5, (0.3 - 0.5) / 0.5]) * 100)


def test_table1_writers(tmp_path):
    t = table1(UNMERGED, MERGED, n_boot=0, seeds=[0, 1])
    md = t.to_markdown()
    assert "| group | method | math | code | puzzle | Average |" in md
    assert "| sft | unmerged | 50.0 | 40.0 | 80.0 | 56.7 |" in md
    assert "|  | ties | 35.0 (-30.0%) | 25.0 (-37.5%) | 65.0 (-18.8%) | 41.7 (-26.5%) |" in md
    assert "Training seeds: 0, 1." in md
    paths = t.write(tmp_path)
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    row = next(r for r in rows if r["method"] == "ties" and r["task"] == "code")
    assert float(row["score"]) == pytest.approx(0.25) and float(row["rel_change_pct"]) == pytest.approx(-37.5)
    assert row["n_partners"] == "2"
    assert [r["method"] for r in rows].count("unmerged") == 4  # three tasks + Average
    data = json.loads(paths["json"].read_text())
    cell = data["groups"]["sft"]["methods"]["ties"]["puzzle"]
    assert cell["score"] == pytest.approx(0.65) and cell["rel_change"] == pytest.approx(-18.75)
    assert data["groups"]["sft"]["unmerged"]["Average"]["score"] == pytest.approx(1.7 / 3)
    assert data["bootstrap"]["resamples"] == 0 and paths["md"].read_text() == md


def test_table1_two_groups_missing_partner_and_zero_unmerged():
    unmerged = {"sft": {"a": 0.5, "b": 0.0}, "grpo": {"a": 0.6, "b": 0.2}}
    merged = {"sft": {"averaging": {"a|b": {"a": 0.25, "b": 0.1}}},
              "grpo": {"averaging": {"a|b": {"a": 0.6}}}}  # b's evaluation is missing
    t = table1(unmerged, merged, n_boot=0)
    assert t.groups == ["sft", "grpo"] and t.tasks == ["a", "b"]
    assert t.cell("sft", "averaging", "b").rel_change is None  # unmerged 0 -> undefined
    assert t.cell("sft", "averaging", "Average").rel_change == pytest.approx((0.175 - 0.25) / 0.25 * 100)
    miss = t.cell("grpo", "averaging", "b")
    assert miss.score is None and not miss.complete
    assert t.cell("grpo", "averaging", "Average").score is None
    assert "†" not in t.format_cell(t.cell("grpo", "averaging", "a")) and "–" in t.to_markdown()
    with pytest.raises(ReportError, match="not a task of the pair"):
        table1(unmerged, {"sft": {"ties": {"a|b": {"c": 0.1}}}})


def _bernoulli(rng, p, n):
    return (rng.random(n) < p).astype(float)


def test_bootstrap_interval_deterministic_and_contains_estimate():
    rng = np.random.default_rng(123)
    n = 200
    unmerged = {"sft": {"math": _bernoulli(rng, 0.6, n), "code": _bernoulli(rng, 0.5, n)}}
    merged = {"sft": {"ties": {"math|code": {"math": _bernoulli(rng, 0.45, n), "code": _bernoulli(rng, 0.4, n)}}}}
    t1 = table1(unmerged, merged, n_boot=1000, seed=7)
    t2 = table1(unmerged, merged, n_boot=1000, seed=7)
    t3 = table1(unmerged, merged, n_boot=1000, seed=8)
    for task in ("math", "code", "Average"):
        c1, c2, c3 = (t.cell("sft", "ties", task) for t in (t1, t2, t3))
        assert (c1.ci_low, c1.ci_high) == (c2.ci_low, c2.ci_high)
        assert (c1.ci_low, c1.ci_high) != (c3.ci_low, c3.ci_high)
        assert c1.ci_low < c1.rel_change < c1.ci_high
        assert c1.n_examples == (None if task == "Average" else n)
    assert "[" in t1.to_markdown() and "1000 resamples" in t1.to_markdown()


def test_bootstrap_width_matches_normal_approximation():
    # unmerged expert always right -> change = (mean(m) - 1) * 100 with SE = 100 sqrt(p (1 - p) / n)
    rng = np.random.default_rng(0)
    n = 400
    m = _bernoulli(rng, 0.6, n)
    p = m.mean()
    lo, hi = bootstrap_relative_change([m], np.ones(n), n_boot=2000, seed=1)
    half = (hi - lo) / 2
    expected = 1.96 * 100 * math.sqrt(p * (1 - p) / n)
    assert half == pytest.approx(expected, rel=0.15)
    assert lo < (p - 1) * 100 < hi
    # two partners: the interval is for the mean over partners, so it is narrower than either alone
    m2 = _bernoulli(rng, 0.6, n)
    lo2, hi2 = bootstrap_relative_change([m, m2], np.ones(n), n_boot=2000, seed=1)
    assert (hi2 - lo2) < (hi - lo)


def test_repeated_prompts_are_resampled_together():
    """An evaluation set that repeats each prompt five times (greedy: one answer, five copies) gets, with its
    prompt clusters, exactly the interval of the set of distinct prompts; counted as independent examples it
    would be narrower. With no repeat the clusters change nothing. Bad clusters are refused."""
    assert prompt_clusters(["a", "b", "a", "c", "b"]) == [0, 1, 0, 3, 1]
    rng = np.random.default_rng(5)
    start = (rng.random(40) < 0.4).astype(float)
    expert = np.where(rng.random(40) < 0.3, 1.0, start)
    order = rng.permutation(200)  # five copies of each of the 40 prompts, shuffled
    labels = np.repeat(np.arange(40), 5)[order]
    clusters = prompt_clusters([f"p{i}" for i in labels])
    firsts = list(dict.fromkeys(labels.tolist()))  # the prompts in the order the clusters number them
    expert, start = expert[firsts], start[firsts]
    labels = np.array([firsts.index(i) for i in labels])
    one = delta_vs_start(expert, start, group="grpo", task="math", n_boot=400, seed=2)
    copies = {"e": {"per_example": expert[labels], "clusters": clusters},
              "s": {"per_example": start[labels], "clusters": clusters}}
    got = delta_vs_start(copies["e"], copies["s"], group="grpo", task="math", n_boot=400, seed=2)
    assert got["delta"] == pytest.approx(one["delta"])
    assert [got["ci_low"], got["ci_high"]] == pytest.approx([one["ci_low"], one["ci_high"]])
    naive = delta_vs_start(expert[labels], start[labels], group="grpo", task="math", n_boot=400, seed=2)
    assert naive["ci_high"] - naive["ci_low"] < 0.6 * (got["ci_high"] - got["ci_low"])
    own = list(range(40))
    same = delta_vs_start({"per_example": expert, "clusters": own}, {"per_example": start, "clusters": own},
                          group="grpo", task="math", n_boot=400, seed=2)
    assert (same["ci_low"], same["ci_high"]) == (one["ci_low"], one["ci_high"])
    t1 = table1({"g": {"math": copies["s"], "code": copies["s"]}},
                {"g": {"avg": {("math", "code"): {"math": copies["e"], "code": copies["e"]}}}}, n_boot=300)
    t1_plain = table1({"g": {"math": start, "code": start}},
                      {"g": {"avg": {("math", "code"): {"math": expert, "code": expert}}}}, n_boot=300)
    cell, plain = t1.cells[("g", "avg", "math")], t1_plain.cells[("g", "avg", "math")]
    assert cell.rel_change == pytest.approx(plain.rel_change)
    assert [cell.ci_low, cell.ci_high] == pytest.approx([plain.ci_low, plain.ci_high])
    with pytest.raises(ReportError, match="clusters"):
        as_score({"per_example": [1.0, 0.0], "clusters": [1, 0]}, "x")


def test_delta_vs_start_is_the_paired_bootstrap_of_the_differences():
    """An expert against θ0 on the same examples: the interval is that of the resampled mean differences, the
    same indices drawn for both models, from the generator seeded (seed, crc32("GROUP|start|TASK"))."""
    import zlib

    rng = np.random.default_rng(7)
    start = (rng.random(60) < 0.3).astype(float)
    expert = np.where(rng.random(60) < 0.4, 1.0, start)  # θ0's right answers plus some more
    got = delta_vs_start(expert, start, group="grpo", task="math", n_boot=500, ci=0.9, seed=3)
    assert got["paired"] and got["delta"] == pytest.approx(expert.mean() - start.mean())
    draw = np.random.default_rng([3, zlib.crc32(b"grpo|start|math")]).integers(0, 60, size=(500, 60))
    diffs = (expert - start)[draw].mean(axis=1)
    assert [got["ci_low"], got["ci_high"]] == pytest.approx(list(np.percentile(diffs, [5, 95])))
    assert 0 < got["ci_low"] <= got["delta"] <= got["ci_high"]
    # pairing narrows the interval against resampling the two models on their own
    unpaired = delta_vs_start(expert, start[:59], group="grpo", task="math", n_boot=500, ci=0.9, seed=3)
    assert not unpaired["paired"] and unpaired["ci_high"] - unpaired["ci_low"] > got["ci_high"] - got["ci_low"]
    assert delta_vs_start(0.5, 0.25, group="g", task="t") == {"delta": 0.25, "ci_low": None, "ci_high": None,
                                                              "paired": False}
    assert delta_vs_start(expert, start, group="g", task="t", n_boot=0)["ci_low"] is None


def test_scores_from_mappings_keep_sources():
    s = as_score({"per_example": [1, 0, 1, 1], "source": "steps/eval-abc"})
    assert s.value == 0.75 and s.n == 4 and s.source == "steps/eval-abc"
    with pytest.raises(ReportError, match="not the mean"):
        as_score({"score": 0.5, "per_example": [1, 1]})
    with pytest.raises(ReportError, match="NaN"):
        as_score([1.0, float("nan")])
    t = table1({"g": {"a": {"score": 0.5, "source": "A"}, "b": 0.5}},
               {"g": {"m": {"a|b": {"a": {"score": 0.25, "source": "M1"}, "b": 0.5}}}}, n_boot=0)
    assert t.cell("g", "m", "a").sources == ["M1"] and t.unmerged["g"]["a"].source == "A"
    assert "Cells without brackets" in t.to_markdown()


def test_table2_and_table3(tmp_path):
    # Table 2: whatever cells the rows have, columns in order of first appearance, "|" escaped in Markdown
    t2 = table2({"sft/math": {"norm": 6.5, "updated (|τ| > 1e-05)": "77.00 %", "source": "steps/c"},
                 "grpo/math": {"norm": 0.78, "extra": 3}},
                formatter=lambda v: f"<{v}>", notes=["a note"])
    assert t2.columns == ["model", "norm", "updated (|τ| > 1e-05)", "source", "extra"]
    md = t2.to_markdown()
    assert "| model | norm | updated (\\|τ\\| > 1e-05) | source | extra |" in md
    assert "| <sft/math> | <6.5> | <77.00 %> | <steps/c> | – |" in md and "| <grpo/math> | <0.78> | – | – | <3> |" in md
    assert "- a note" in md
    paths = t2.write(tmp_path, "table2")
    assert json.loads(paths["json"].read_text())["rows"][1]["norm"] == pytest.approx(0.78)
    assert "updated (|τ| > 1e-05)" in paths["csv"].read_text().splitlines()[0]
    with pytest.raises(ReportError, match="no models"):
        table2({})

    unmerged = {"grpo": {"a": 0.5, "b": 0.4}, "rl_pos": {"a": 0.5, "b": 0.5}, "sft": {"a": 0.9, "b": 0.9}}
    merged = {g: {"ties": {"a|b": {"a": 0.45, "b": 0.4}}} for g in unmerged}
    t1 = table1(unmerged, merged, n_boot=0)
    t3 = table3(t1, "grpo", "rl_pos")
    md3 = t3.to_markdown()
    assert "| grpo | ties | 45.0 (-10.0%) | 40.0 (+0.0%) | 42.5 (-5.6%) |" in md3
    assert "| rl_pos | ties | 45.0 (-10.0%) | 40.0 (-20.0%) | 42.5 (-15.0%) |" in md3
    assert "sft" not in md3
    assert table3(t1.to_json()["groups"], "grpo", "rl_pos").rows == t3.rows  # from the plain JSON mapping as well
    with pytest.raises(ReportError, match="no group 'ppo'"):
        table3(t1, "ppo", "rl_pos")


def test_pngs_written_and_nonempty(tmp_path):
    p1 = plot_num_models_curve({"sft/ties": {2: [0.5, 0.4], 3: 0.3, 4: [0.2]}, "grpo/ties": {2: 0.6, 3: 0.58}},
                               tmp_path / "curve.png")
    alphas = np.linspace(-0.5, 1.5, 5)
    betas = np.linspace(-1, 1, 3)
    values = np.add.outer(-(alphas - 0.5) ** 2, -betas ** 2)
    p2 = plot_landscape(alphas, betas, values, tmp_path / "fig" / "landscape.png")
    for p in (p1, p2):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert not [x for x in tmp_path.rglob("*.tmp")]
    with pytest.raises(ReportError, match="shape"):
        plot_landscape(alphas, betas, values.T, tmp_path / "bad.png")
    with pytest.raises(ReportError, match="no series"):
        plot_num_models_curve({}, tmp_path / "none.png")


def test_training_curves(tmp_path):
    from rlm.core.study.figures import plot_training_curves, read_metrics_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": s, "reward_mean": s / 10, "adv_abs_mean": 1 / (s + 1),
                                          "delta_norm": 0.01 * s, "kl": None}) for s in range(1, 11)) + "\n\n")
    rows = read_metrics_jsonl(path)
    assert len(rows) == 10 and rows[2]["step"] == 3
    sft = [{"step": s, "reward_mean": None, "adv_abs_mean": None, "delta_norm": 0.1 * s} for s in range(1, 5)]
    out = plot_training_curves({"grpo/math": rows, "sft/math": sft}, tmp_path / "curves.png",
                               keys=("reward_mean", "adv_abs_mean", "delta_norm", "kl"))
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 2000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ReportError, match="bad.jsonl:2"):
        read_metrics_jsonl(bad)
