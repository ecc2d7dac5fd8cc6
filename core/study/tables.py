"""The paper's tables: Table 1 arithmetic with bootstrap intervals, Tables 2 and 3.

Table 1 (:func:`table1`)
    Inputs, per group (a training paradigm such as ``"sft"`` or ``"grpo"``):

    * ``unmerged[group][task]``: the score of the group's expert for ``task`` on ``task``;
    * ``merged[group][method][pair][task]``: the score on ``task`` of the model merged by ``method`` from the
      group's two experts of ``pair`` (``("math", "code")``, ``"math|code"`` or ``"math+code"``), for both
      tasks of the pair.

    A score is a number, a sequence of per-example scores (its mean is the score; it enables the bootstrap),
    a mapping ``{"score": x, "per_example": [...], "source": "RUN/steps/...", "n": N}`` or a :class:`Score`.

    Cell (group, method, task) = the merged score on ``task`` averaged over the partners of ``task`` (every
    pair of the group that contains ``task``). In parentheses: the relative change against the unmerged row
    of the same column, ``(cell - unmerged) / unmerged * 100`` (negative = a drop). Because the denominator
    is the same for every partner, this equals the mean of the per-partner relative changes. The Average
    column is the mean of the task cells of the row (the unmerged row: the mean of its task scores) and its
    parenthesis is, by the same rule, the relative change of the row's Average against the unmerged
    Average; it is left empty unless every task of the row has a value.

    Bootstrap interval of each relative change (``n_boot`` = 1000 resamples, ``seed``, ``ci`` = 0.95): in
    each resample the evaluation examples of a task are drawn with replacement; when the unmerged expert and
    all merged models of a cell were scored on the same number of examples (the same evaluation set), the
    same drawn indices are used for all of them (a paired bootstrap), otherwise each is resampled on its own.
    When the scores carry prompt clusters (:func:`prompt_clusters`: the evaluation set repeats prompts), the
    draw picks prompts with all their copies and each resampled mean is the drawn sums over the drawn counts; with
    no repeated prompt this is the same draw and the same means.
    The relative change is recomputed from the resampled means exactly as for the point estimate; the
    interval is the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles of the resampled changes (numpy's
    linear interpolation), resamples whose unmerged mean is 0 being left out (counted in ``n_undefined``).
    The Average column's interval resamples every task within the same replicate. Each cell's generator is
    seeded by ``(seed, crc32("group|method|task"))``, so intervals do not depend on which other cells exist.
    Cells without per-example scores get no interval.

Experts against θ0 (:func:`delta_vs_start`): each expert's score minus the start model's on the expert's
task, with a paired bootstrap interval of the difference (same resampling and seeding as Table 1's cells).

Table 2 (:func:`table2`): one row per model with whatever cells the caller gives (the study report: the
model-scope columns of the conflict metrics that ran, see :meth:`rlm.core.contracts.Metric.columns`).
Table 3 (:func:`table3`): RL against RL-Pos, the Table 1 layout restricted to two groups, built from a
:class:`Table1` or from its JSON ``groups`` mapping.

Everything here is numbers and Markdown/CSV/JSON; the report's figures are :mod:`rlm.core.study.figures`.
"""

from __future__ import annotations

import csv
import io
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rlm.core.errors import RlmError
from rlm.core.io.atomic import atomic_write_json, atomic_write_text

AVERAGE = "Average"
UNMERGED = "unmerged"


class ReportError(RlmError):
    """Inputs to a table or figure that cannot be used; the message names the group, method, pair or task."""


# -- scores ----------------------------------------------------------------------------------------------
@dataclass
class Score:
    """One evaluated score: the mean, optionally the per-example scores and where it came from."""

    value: float
    per_example: np.ndarray | None = None
    source: str | None = None
    n: int | None = None
    #: per example, the index of the first example with the same prompt (:func:`prompt_clusters`): copies of
    #: one prompt are resampled together (None: every example on its own)
    clusters: np.ndarray | None = None

    @property
    def n_prompts(self) -> int | None:
        """The different prompts among the examples (None without clusters)."""
        return None if self.clusters is None else int(np.unique(self.clusters).size)


def prompt_clusters(prompts: Sequence[str]) -> list[int]:
    """Per example, the index of the first example with the same prompt: ``[0, 1, 0]`` for prompts
    ``a, b, a``. An evaluation set that repeats a prompt scores one greedy answer several times; the bootstrap
    then draws prompts (with all their copies), not examples, so the copies do not count as independent."""
    first: dict[str, int] = {}
    return [first.setdefault(p, i) for i, p in enumerate(prompts)]


def shared_clusters(scores: Sequence[Score]) -> np.ndarray | None:
    """The prompt clusters shared by every score (all of the same length); None if any lacks them or they
    differ."""
    labels = [s.clusters for s in scores]
    if any(c is None for c in labels) or any(not np.array_equal(c, labels[0]) for c in labels[1:]):
        return None
    return labels[0]


def as_score(x: Any, where: str = "score") -> Score:
    """Normalise a number, a per-example sequence, a mapping or a :class:`Score`."""
    if isinstance(x, Score):
        return x
    if isinstance(x, Mapping):
        per = x.get("per_example")
        value = x.get("score", x.get("value"))
        if per is not None:
            s = as_score(per, where)
            if value is not None and not math.isclose(float(value), s.value, rel_tol=1e-9, abs_tol=1e-12):
                raise ReportError(f"{where}: score {value} is not the mean of its per-example scores ({s.value})")
            s.source, s.n = x.get("source"), int(x.get("n") or s.n)
            clusters = x.get("clusters")
            if clusters is not None:
                s.clusters = np.asarray(clusters, dtype=np.int64).reshape(-1)
                if s.clusters.size != s.per_example.size or np.any(s.clusters < 0) \
                        or np.any(s.clusters > np.arange(s.clusters.size)):
                    raise ReportError(f"{where}: 'clusters' must give, per example, an earlier or its own index")
            return s
        if value is None:
            raise ReportError(f"{where}: a score mapping needs 'score' or 'per_example'")
        return Score(float(value), None, x.get("source"), x.get("n"))
    if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool):
        return Score(float(x))
    if isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, str):
        arr = np.asarray(x, dtype=np.float64).reshape(-1)
        if arr.size == 0:
            raise ReportError(f"{where}: no per-example scores")
        if not np.all(np.isfinite(arr)):
            raise ReportError(f"{where}: per-example scores contain NaN or Inf")
        return Score(float(arr.mean()), arr, None, int(arr.size))
    raise ReportError(f"{where}: cannot read a score from {type(x).__name__} {x!r}")


def parse_pair(pair: Any) -> tuple[str, str]:
    """``("a", "b")``, ``"a|b"`` or ``"a+b"`` -> ``("a", "b")``."""
    if isinstance(pair, str):
        sep = "|" if "|" in pair else "+"
        parts = pair.split(sep)
    else:
        parts = list(pair)
    if len(parts) != 2 or parts[0] == parts[1] or not all(isinstance(p, str) and p for p in parts):
        raise ReportError(f"a pair names two different tasks, got {pair!r}")
    return parts[0], parts[1]


def relative_change(merged: float, unmerged: float) -> float | None:
    """``(merged - unmerged) / unmerged * 100``; ``None`` when the unmerged score is 0."""
    if unmerged == 0:
        return None
    return (merged - unmerged) / unmerged * 100.0


def _cell_rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32("|".join(names).encode("utf-8"))])


def _resampled_means(rng: np.random.Generator, arrays: list[np.ndarray], n_boot: int,
                     clusters: np.ndarray | None = None) -> list[np.ndarray]:
    """Bootstrap means (``n_boot`` each) of every array; one shared index draw when all lengths are equal.
    ``clusters`` (:func:`prompt_clusters`, for arrays of that length): the draw picks prompts with all their
    copies, and a mean is the ratio of the drawn sums to the drawn counts; with no repeated prompt this is the
    same draw and the same means as without."""
    lengths = {a.size for a in arrays}
    if len(lengths) == 1 and clusters is not None and clusters.size == next(iter(lengths)):
        _, label = np.unique(clusters, return_inverse=True)
        k = int(label.max()) + 1
        idx = rng.integers(0, k, size=(n_boot, k))
        counts = np.bincount(label, minlength=k)[idx].sum(axis=1)
        return [np.bincount(label, weights=a, minlength=k)[idx].sum(axis=1) / counts for a in arrays]
    if len(lengths) == 1:
        n = lengths.pop()
        idx = rng.integers(0, n, size=(n_boot, n))
        return [a[idx].mean(axis=1) for a in arrays]
    return [a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1) for a in arrays]


def _percentile_interval(changes: np.ndarray, ci: float) -> tuple[float | None, float | None, int]:
    ok = changes[np.isfinite(changes)]
    undefined = int(changes.size - ok.size)
    if ok.size == 0:
        return None, None, undefined
    lo, hi = np.percentile(ok, [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100])
    return float(lo), float(hi), undefined


def bootstrap_relative_change(merged: Sequence[Any], unmerged: Any, *, n_boot: int = 1000, ci: float = 0.95,
                              seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of ``(mean over partners of merged means - unmerged mean) / unmerged mean * 100``
    for per-example score arrays (the procedure described in the module docstring, for one cell)."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(m, dtype=np.float64) for m in merged] + [np.asarray(unmerged, dtype=np.float64)]
    means = _resampled_means(rng, arrays, n_boot)
    cell = np.mean(means[:-1], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        changes = (cell - means[-1]) / means[-1] * 100.0
    lo, hi, _ = _percentile_interval(changes, ci)
    return lo, hi


# -- generic tables --------------------------------------------------------------------------------------
@dataclass
class SimpleTable:
    """A titled table of rows (dicts) with Markdown, CSV and JSON writers."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # extra JSON payload
    formatter: Callable[[Any], str] | None = None  # Markdown text of a set, finite cell (default: str)

    def _fmt(self, v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        return self.formatter(v) if self.formatter is not None else str(v)

    def table_lines(self) -> list[str]:
        """The Markdown table alone (header, rule, rows; a "|" inside a header or cell is escaped)."""
        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        lines = ["| " + " | ".join(esc(c) for c in self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(esc(self._fmt(r.get(c))) for c in self.columns) + " |")
        return lines

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", "", *self.table_lines()]
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in self.columns})
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes, **self.data}

    def write(self, out_dir: str | Path, stem: str) -> dict[str, Path]:
        out = Path(out_dir)
        return {"md": atomic_write_text(out / f"{stem}.md", self.to_markdown()),
                "csv": atomic_write_text(out / f"{stem}.csv", self.to_csv()),
                "json": atomic_write_json(out / f"{stem}.json", _json_safe(self.to_json()))}


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


# -- Table 1 ---------------------------------------------------------------------------------------------
@dataclass
class Cell:
    group: str
    method: str
    task: str
    score: float | None
    unmerged: float | None
    rel_change: float | None  # percent; negative = drop
    ci_low: float | None = None
    ci_high: float | None = None
    n_undefined: int = 0
    partners: list[str] = field(default_factory=list)
    n_partners_expected: int = 0
    n_examples: int | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.partners) == self.n_partners_expected


@dataclass
class Table1:
    groups: list[str]
    methods: list[str]
    tasks: list[str]
    unmerged: dict[str, dict[str, Score]]
    cells: dict[tuple[str, str, str], Cell]
    unmerged_average: dict[str, float | None]
    n_boot: int
    ci: float
    seed: int
    scale: float = 100.0
    digits: int = 1
    seeds: list[int] | None = None
    title: str = "Table 1: merged scores (relative change against the unmerged experts)"

    @property
    def columns(self) -> list[str]:
        return [*self.tasks, AVERAGE]

    def cell(self, group: str, method: str, task: str) -> Cell:
        return self.cells[(group, method, task)]

    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per unmerged score and per cell (the CSV layout)."""
        out: list[dict[str, Any]] = []
        for g in self.groups:
            for t in self.columns:
                if t == AVERAGE:
                    value, n, src = self.unmerged_average.get(g), None, None
                else:
                    s = self.unmerged.get(g, {}).get(t)
                    value, n, src = (s.value, s.n, s.source) if s else (None, None, None)
                out.append({"group": g, "method": UNMERGED, "task": t, "score": value, "unmerged": value,
                            "rel_change_pct": None, "ci_low_pct": None, "ci_high_pct": None, "n_partners": None,
                            "n_examples": n, "partners": "", "sources": src or ""})
            for m in self.methods:
                for t in self.columns:
                    c = self.cells.get((g, m, t))
                    if c is None:
                        continue
                    out.append({"group": g, "method": m, "task": t, "score": c.score, "unmerged": c.unmerged,
                                "rel_change_pct": c.rel_change, "ci_low_pct": c.ci_low, "ci_high_pct": c.ci_high,
                                "n_partners": len(c.partners), "n_examples": c.n_examples,
                                "partners": ";".join(c.partners), "sources": ";".join(c.sources)})
        return out

    # -- writers -----------------------------------------------------------------------------------------
    def _num(self, v: float | None) -> str:
        return "–" if v is None else f"{v * self.scale:.{self.digits}f}"

    def format_cell(self, c: Cell, with_ci: bool = True) -> str:
        if c.score is None:
            return "–"
        text = self._num(c.score)
        if c.rel_change is not None:
            text += f" ({c.rel_change:+.{self.digits}f}%)"
            if with_ci and c.ci_low is not None:
                text += f" [{c.ci_low:+.{self.digits}f}, {c.ci_high:+.{self.digits}f}]"
        if not c.complete:
            text += " †"
        return text

    def method_notes(self) -> list[str]:
        pct = f"{self.ci * 100:g}%"
        notes = [
            f"Each cell: the merged model's score on the column's task (×{self.scale:g}), averaged over the "
            "task's partners within the group; in parentheses the relative change (merged − unmerged) / "
            "unmerged in percent (negative = a drop); in brackets its "
            f"{pct} percentile bootstrap interval ({self.n_boot} resamples of the evaluation examples with "
            f"replacement, seed {self.seed}; paired: the same resampled examples for the unmerged expert and "
            "the merged models when they have the same number of examples, i.e. share the evaluation set). Average: the mean over tasks; its change "
            "is relative to the unmerged Average.",
        ]
        ns: dict[str, set[int]] = {}
        for g in self.groups:
            for t in self.tasks:
                s = self.unmerged.get(g, {}).get(t)
                if s is not None and s.n:
                    ns.setdefault(t, set()).add(s.n)
            for (gg, _m, t), c in self.cells.items():
                if gg == g and c.n_examples:
                    ns.setdefault(t, set()).add(c.n_examples)
        if ns:
            notes.append("Evaluation examples per cell: " + ", ".join(
                f"{t} {'/'.join(str(n) for n in sorted(v))}" for t, v in ns.items()) + ".")
        if self.seeds:
            notes.append(f"Training seeds: {', '.join(str(s) for s in self.seeds)}.")
        if any(not c.complete for c in self.cells.values()):
            notes.append("† averaged over fewer partners than the group has (some merges or evaluations are "
                         "missing); see the JSON for which.")
        if any(c.rel_change is not None and c.ci_low is None for c in self.cells.values()):
            notes.append("Cells without brackets had no per-example scores to resample.")
        return notes

    def to_markdown(self, with_ci: bool = True, groups: Sequence[str] | None = None, title: str | None = None) -> str:
        cols = self.columns
        lines = [f"## {title or self.title}", "", "| group | method | " + " | ".join(cols) + " |",
                 "|---|---|" + "|".join("---" for _ in cols) + "|"]
        for g in groups or self.groups:
            row = [self._num(self.unmerged[g][t].value) if t in self.unmerged.get(g, {}) else "–" for t in self.tasks]
            row.append(self._num(self.unmerged_average.get(g)))
            lines.append(f"| {g} | {UNMERGED} | " + " | ".join(row) + " |")
            for m in self.methods:
                cells = [self.cells.get((g, m, t)) for t in cols]
                if all(c is None or c.score is None for c in cells):
                    continue
                lines.append(f"|  | {m} | " + " | ".join("–" if c is None else self.format_cell(c, with_ci)
                                                         for c in cells) + " |")
        lines.append("")
        lines.extend(f"- {n}" for n in self.method_notes())
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        rows = self.rows()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["group"], lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        groups: dict[str, Any] = {}
        for g in self.groups:
            um = {t: {"score": s.value, "n": s.n, "source": s.source} for t, s in self.unmerged.get(g, {}).items()}
            um[AVERAGE] = {"score": self.unmerged_average.get(g)}
            methods = {}
            for m in self.methods:
                methods[m] = {t: _cell_json(c) for t in self.columns if (c := self.cells.get((g, m, t)))}
            groups[g] = {UNMERGED: um, "methods": methods}
        return _json_safe({
            "table": "table1", "title": self.title, "groups_order": self.groups, "methods": self.methods,
            "tasks": self.tasks, "columns": self.columns, "scale": self.scale, "seeds": self.seeds,
            "relative_change": "(merged - unmerged) / unmerged * 100; negative = drop",
            "bootstrap": {"resamples": self.n_boot, "ci": self.ci, "seed": self.seed, "interval": "percentile",
                          "paired": "when the unmerged and merged scores of a cell have the same number of "
                                    "examples"},
            "groups": groups, "notes": self.method_notes()})

    def write(self, out_dir: str | Path, stem: str = "table1") -> dict[str, Path]:
        out = Path(out_dir)
        return {"md": atomic_write_text(out / f"{stem}.md", self.to_markdown()),
                "csv": atomic_write_text(out / f"{stem}.csv", self.to_csv()),
                "json": atomic_write_json(out / f"{stem}.json", self.to_json())}


def _cell_json(c: Cell) -> dict[str, Any]:
    d = asdict(c)
    for k in ("group", "method", "task"):
        d.pop(k)
    d["complete"] = c.complete
    return d


def _ordered(explicit: Sequence[str] | None, found: Iterable[str]) -> list[str]:
    """The explicit order if given, else the order of first appearance."""
    return list(explicit) if explicit is not None else list(dict.fromkeys(found))


_Boot = tuple[np.ndarray, np.ndarray]  # bootstrap means of a cell and of its unmerged score


def _merged_scores(groups: Sequence[str], merged: Mapping[str, Mapping[str, Mapping[Any, Mapping[str, Any]]]]
                   ) -> tuple[dict[str, dict[str, dict[tuple[str, str], dict[str, Score]]]], list[str], list[str]]:
    """Merged scores normalised to group -> method -> pair -> task -> Score, with the methods and tasks found
    (in order of appearance)."""
    mm: dict[str, dict[str, dict[tuple[str, str], dict[str, Score]]]] = {}
    found_methods: list[str] = []
    found_tasks: list[str] = []
    for g in groups:
        for m, pairs in (merged.get(g) or {}).items():
            found_methods.append(m)
            for pair, scores in pairs.items():
                a, b = parse_pair(pair)
                found_tasks += [a, b]
                for t, v in scores.items():
                    if t not in (a, b):
                        raise ReportError(f"merged {g}/{m}/{a}|{b}: a score for {t!r}, which is not a task of the pair")
                    mm.setdefault(g, {}).setdefault(m, {}).setdefault((a, b), {})[t] = as_score(v, f"merged {g}/{m}/{a}|{b}/{t}")
    return mm, found_methods, found_tasks


def _task_cell(g: str, m: str, t: str, pairs: Mapping[tuple[str, str], Mapping[str, Score]], u: Score | None,
               expected: int, n_boot: int, ci: float, seed: int) -> tuple[Cell, _Boot | None]:
    """One task cell of Table 1 and its bootstrap means (None without per-example scores)."""
    got = [(p, s[t]) for p, s in pairs.items() if t in s]
    cell = Cell(g, m, t, None, u.value if u else None, None, n_partners_expected=expected)
    if not got:
        return cell, None
    cell.score = float(np.mean([s.value for _, s in got]))
    cell.partners = [p[1] if p[0] == t else p[0] for p, _ in got]
    cell.sources = [s.source for _, s in got if s.source]
    ns = {s.n for _, s in got if s.n}
    cell.n_examples = ns.pop() if len(ns) == 1 else None
    if u is not None:
        cell.rel_change = relative_change(cell.score, u.value)
    if u is None or u.per_example is None or any(s.per_example is None for _, s in got) or n_boot <= 0:
        return cell, None
    rng = _cell_rng(seed, g, m, t)
    means = _resampled_means(rng, [s.per_example for _, s in got] + [u.per_example], n_boot,
                             shared_clusters([s for _, s in got] + [u]))
    cell_b, u_b = np.mean(means[:-1], axis=0), means[-1]
    if cell.rel_change is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ch = (cell_b - u_b) / u_b * 100.0
        cell.ci_low, cell.ci_high, cell.n_undefined = _percentile_interval(ch, ci)
    return cell, (cell_b, u_b)


def _average_cell(g: str, m: str, task_cells: Sequence[Cell], unmerged_avg: float | None,
                  boots: Sequence[_Boot | None], ci: float) -> Cell:
    """The Average cell of a row from its task cells and their bootstrap means."""
    avg = Cell(g, m, AVERAGE, None, unmerged_avg, None,
               n_partners_expected=sum(c.n_partners_expected for c in task_cells))
    avg.partners = [f"{c.task}:{p}" for c in task_cells for p in c.partners]
    if not all(c.score is not None for c in task_cells):
        return avg
    avg.score = float(np.mean([c.score for c in task_cells]))
    if unmerged_avg is not None:
        avg.rel_change = relative_change(avg.score, unmerged_avg)
        if all(b is not None for b in boots):
            cb = np.mean([b[0] for b in boots], axis=0)
            ub = np.mean([b[1] for b in boots], axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ch = (cb - ub) / ub * 100.0
            avg.ci_low, avg.ci_high, avg.n_undefined = _percentile_interval(ch, ci)
    return avg


def table1(unmerged: Mapping[str, Mapping[str, Any]],
           merged: Mapping[str, Mapping[str, Mapping[Any, Mapping[str, Any]]]], *,
           groups: Sequence[str] | None = None, methods: Sequence[str] | None = None,
           tasks: Sequence[str] | None = None, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
           scale: float = 100.0, digits: int = 1, seeds: Sequence[int] | None = None,
           title: str | None = None) -> Table1:
    """Compute Table 1 (see the module docstring for every rule). Missing merges or evaluations are allowed:
    a cell then averages over the partners it has (marked † and ``complete: false``)."""
    if n_boot < 0 or not 0 < ci < 1:
        raise ReportError(f"need n_boot >= 0 and 0 < ci < 1, got n_boot={n_boot}, ci={ci}")
    groups = _ordered(groups, [*unmerged, *merged])
    um: dict[str, dict[str, Score]] = {
        g: {t: as_score(v, f"unmerged {g}/{t}") for t, v in (unmerged.get(g) or {}).items()} for g in groups}
    mm, found_methods, found_tasks = _merged_scores(groups, merged)
    methods = _ordered(methods, found_methods)
    tasks = _ordered(tasks, [t for g in groups for t in um[g]] + found_tasks)

    cells: dict[tuple[str, str, str], Cell] = {}
    unmerged_avg: dict[str, float | None] = {}
    for g in groups:
        # tasks of this group: those with an expert or in a merged pair
        g_tasks = [t for t in tasks if t in um[g] or any(t in p for mth in mm.get(g, {}).values() for p in mth)]
        unmerged_avg[g] = (float(np.mean([um[g][t].value for t in tasks])) if all(t in um[g] for t in tasks)
                           else None)
        for m in methods:
            pairs = mm.get(g, {}).get(m, {})
            if not pairs:
                continue
            boots: list[_Boot | None] = []
            for t in tasks:
                expected = len(g_tasks) - 1 if t in g_tasks else 0
                cells[(g, m, t)], boot = _task_cell(g, m, t, pairs, um[g].get(t), expected, n_boot, ci, seed)
                boots.append(boot)
            cells[(g, m, AVERAGE)] = _average_cell(g, m, [cells[(g, m, t)] for t in tasks], unmerged_avg[g],
                                                   boots, ci)
    return Table1(groups=groups, methods=methods, tasks=tasks, unmerged=um, cells=cells,
                  unmerged_average=unmerged_avg, n_boot=n_boot, ci=ci, seed=seed, scale=scale, digits=digits,
                  seeds=list(seeds) if seeds is not None else None, **({"title": title} if title else {}))


# -- experts against θ0 ----------------------------------------------------------------------------------
VS_START = "start"  # the middle name of an expert-vs-θ0 interval's generator seed


def delta_vs_start(expert: Any, start: Any, *, group: str, task: str, n_boot: int = 1000, ci: float = 0.95,
                   seed: int = 0) -> dict[str, Any]:
    """The expert's score minus θ0's on the same task, with its bootstrap interval: ``{"delta", "ci_low",
    "ci_high", "paired"}`` (score units, not scaled). In each of ``n_boot`` resamples the evaluation examples
    are drawn with replacement, the same indices for both models when they were scored on the same number of
    examples (``paired``: the same evaluation set, so the interval is that of the per-example differences);
    the interval is the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles of the resampled differences. The
    generator is seeded by ``(seed, crc32("GROUP|start|TASK"))`` as Table 1's cells are. No interval without
    per-example scores or with ``n_boot`` 0."""
    e, s = as_score(expert, f"expert {group}/{task}"), as_score(start, f"start/{task}")
    out: dict[str, Any] = {"delta": e.value - s.value, "ci_low": None, "ci_high": None,
                           "paired": e.per_example is not None and s.per_example is not None
                           and e.per_example.size == s.per_example.size}
    if e.per_example is None or s.per_example is None or n_boot <= 0:
        return out
    rng = _cell_rng(seed, group, VS_START, task)
    e_b, s_b = _resampled_means(rng, [e.per_example, s.per_example], n_boot, shared_clusters([e, s]))
    out["ci_low"], out["ci_high"], _ = _percentile_interval(e_b - s_b, ci)
    return out


# -- Table 2 and Table 3 ---------------------------------------------------------------------------------
def table2(models: Mapping[str, Mapping[str, Any]], *, title: str = "Table 2: task vectors of the experts",
           notes: Sequence[str] = (),
           formatter: Callable[[Any], str] | None = None) -> SimpleTable:
    """Rows: ``{model: {column: value}}`` in the given order; columns: every column of any row, in order of
    first appearance (a row without a column shows "–"). ``formatter`` renders the Markdown cells."""
    if not models:
        raise ReportError("table 2: no models")
    columns = list(dict.fromkeys(c for cells in models.values() for c in cells))
    rows = [{"model": name, **cells} for name, cells in models.items()]
    return SimpleTable(title, ["model", *columns], rows, list(notes), formatter=formatter)


def table3(source: Table1 | Mapping[str, Any], rl: str, rl_pos: str, *,
           title: str = "Table 3: RL against RL-Pos (positive-advantage-only RL)") -> SimpleTable:
    """The Table 1 layout for the groups ``rl`` (an RL trainer's) and ``rl_pos`` (its positive-advantage-only
    variant's) only. ``source`` is a :class:`Table1` or its JSON (``Table1.to_json()``, or just its ``groups``
    mapping)."""
    data = source.to_json() if isinstance(source, Table1) else dict(source)
    groups = data.get("groups", data)
    scale = float(data.get("scale", 100.0))
    for g in (rl, rl_pos):
        if g not in groups:
            raise ReportError(f"table 3: no group {g!r} (groups: {', '.join(groups)})")
    columns = data.get("columns") or [t for t in groups[rl][UNMERGED]]
    rows: list[dict[str, Any]] = []
    for g in (rl, rl_pos):
        um = groups[g][UNMERGED]
        rows.append({"group": g, "method": UNMERGED,
                     **{t: _fmt_cell(um.get(t, {}).get("score"), None, None, None, scale) for t in columns}})
        for m, cells in groups[g].get("methods", {}).items():
            rows.append({"group": g, "method": m, **{
                t: _fmt_cell(c.get("score"), c.get("rel_change"), c.get("ci_low"), c.get("ci_high"), scale)
                for t in columns if (c := cells.get(t))}})
    notes = ["Cells as in Table 1: merged score averaged over partners, (relative change in %) "
             "[bootstrap interval]."]
    return SimpleTable(title, ["group", "method", *columns], rows, notes, data={"table": "table3", "source": groups})


def _fmt_cell(score: Any, change: Any, lo: Any, hi: Any, scale: float) -> str:
    if score is None:
        return "–"
    text = f"{float(score) * scale:.1f}"
    if change is not None:
        text += f" ({float(change):+.1f}%)"
        if lo is not None and hi is not None:
            text += f" [{float(lo):+.1f}, {float(hi):+.1f}]"
    return text
