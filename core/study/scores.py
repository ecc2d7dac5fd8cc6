"""From a study's evaluations to the report's inputs: the score a task's per-example dict reports
(:func:`primary_score`), and :func:`collect_scores`, which arranges evaluation results by step name into
Table 1's inputs, the start model's scores and the number-of-merged-models curve, combining seeds.

Scores. The score of a model on a task is the mean over evaluation examples of one per-example number, the
first of ``reward``, ``accuracy``, ``pass_plus``, ``pass`` in the task's per-example scores (math: math-verify
accuracy; code: pass@1 plus where there are plus tests; instruction following: the fraction of constraints
followed; puzzle: all roles right; rank: the query's passage right). These per-example numbers are what the
report's bootstrap resamples. Several seeds of the same evaluation are averaged example by example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from rlm.core.study.config import ExperimentConfig
from rlm.core.study.plan import curve_methods, curve_subsets, plan_steps
from rlm.core.study.tables import Score, as_score, shared_clusters

PRIMARY_KEYS = ("reward", "accuracy", "pass_plus", "pass")


def primary_score(scores: Mapping[str, Any]) -> float:
    """The per-example number of a task's score dict that studies report (see the module docstring)."""
    for k in PRIMARY_KEYS:
        v = scores.get(k)
        if isinstance(v, (int, float)):  # bool included
            return float(v)
    return 0.0


@dataclass
class CollectedScores:
    """Scores of a study arranged for :mod:`rlm.core.study.tables` (values are :class:`rlm.core.study.tables.Score`)."""

    unmerged: dict[str, dict[str, Any]]  # group -> task -> Score
    merged: dict[str, dict[str, dict[tuple[str, str], dict[str, Any]]]]  # group -> method -> pair -> task
    start: dict[str, Any]  # task -> Score of the start model θ0
    curve: dict[str, dict[int, list[float]]]  # "group/method" -> N -> mean score over each N-subset's tasks
    missing: list[str]  # evaluation steps without a score (failed or not run)


def mean_over_seeds(scores: list[Score]) -> Score:
    """One Score from the same evaluation under several seeds: per-example scores are averaged example by
    example when every seed has them on the same examples (so the bootstrap still resamples examples);
    otherwise the means are averaged."""
    if len(scores) == 1:
        return scores[0]
    sources = ";".join(s.source for s in scores if s.source) or None
    arrays = [s.per_example for s in scores]
    if all(a is not None for a in arrays) and len({a.size for a in arrays}) == 1:
        import numpy as np

        per = np.mean(np.stack(arrays), axis=0)
        return Score(float(per.mean()), per, sources, int(per.size), shared_clusters(scores))
    return Score(float(sum(s.value for s in scores) / len(scores)), None, sources, scores[0].n)


def _bucket_scores(cfg: ExperimentConfig, scores: Mapping[str, Any]) -> tuple[dict[tuple, list[Score]], list[str]]:
    """Evaluation scores grouped by what they measure (the seed left out), and the evaluations without one."""
    buckets: dict[tuple, list[Score]] = {}
    missing: list[str] = []
    for s in plan_steps(cfg):
        if s.kind not in ("eval_expert", "eval_merged"):
            continue
        if s.name not in scores:
            missing.append(s.name)
            continue
        c = s.config
        t = c["task"]["label"]
        if s.kind == "eval_expert":
            key = ("start", t) if c["group"] == "start" else ("unmerged", c["group"], t)
        else:
            key = ("merged", c["group"], c["method"], tuple(c["tasks"]), t)
        buckets.setdefault(key, []).append(as_score(scores[s.name], s.name))
    return buckets, missing


def _curve(cfg: ExperimentConfig, combined: Mapping[tuple, Score]) -> dict[str, dict[int, list[float]]]:
    curve: dict[str, dict[int, list[float]]] = {}
    for tr in cfg.trainers:
        for m in curve_methods(cfg, tr.id):
            points: dict[int, list[float]] = {}
            for n, subsets in curve_subsets(cfg.curve, cfg.tasks_of(tr)).items():
                for sub in subsets:
                    vals = [combined.get(("merged", tr.id, m.id, sub, t)) for t in sub]
                    if all(v is not None for v in vals):
                        points.setdefault(n, []).append(sum(v.value for v in vals) / len(vals))
            if points:
                curve[f"{tr.id}/{m.id}"] = points
    return curve


def collect_scores(cfg: ExperimentConfig, scores: Mapping[str, Any]) -> CollectedScores:
    """Arrange evaluation scores by step name (``scores[step_name]``: a number, per-example scores, a mapping
    ``{"score", "per_example", "source", "n"}`` or a Score) into Table 1's inputs, the start model's scores
    and the number-of-merged-models curve. Several seeds are combined by :func:`mean_over_seeds`."""
    buckets, missing = _bucket_scores(cfg, scores)
    unmerged: dict[str, dict[str, Any]] = {}
    merged: dict[str, dict[str, dict[tuple[str, str], dict[str, Any]]]] = {}
    start: dict[str, Any] = {}
    combined = {k: mean_over_seeds(v) for k, v in buckets.items()}
    for key, score in combined.items():
        if key[0] == "start":
            start[key[1]] = score
        elif key[0] == "unmerged":
            unmerged.setdefault(key[1], {})[key[2]] = score
        elif len(key[3]) == 2:
            merged.setdefault(key[1], {}).setdefault(key[2], {}).setdefault(key[3], {})[key[4]] = score
    return CollectedScores(unmerged, merged, start, _curve(cfg, combined), missing)
