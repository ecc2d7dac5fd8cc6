"""Differential test of rlm's code judge against evalplus (0.3.1) itself, on inputs nobody on the project wrote.

The candidate set is generated (``code_mutants.py``): for a seeded choice of HumanEval+ and MBPP+ problems (the
ones with special oracles always in), each canonical solution plus up to ``PER_TASK`` program mutants that
compile. evalplus scores it as its users run it (``evalplus.evaluate`` in a separate process, on a subset file
through ``HUMANEVAL_OVERRIDE_PATH`` / ``MBPP_OVERRIDE_PATH``, its ground truth cached in a temporary folder);
rlm scores it with ``rlm score``. Base and plus verdicts must be identical, sample by sample, except for the
exceptions listed in ``EXCEPTIONS`` (each explained there).

A reviewer can run a further set: ``RLM_DIFF_SEED`` (default 0), ``RLM_DIFF_HE_TASKS`` / ``RLM_DIFF_MBPP_TASKS``
(problems drawn, default 90 / 70), ``RLM_DIFF_PER_TASK`` (mutants per problem, default 3).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from code_mutants import candidate_set, read_problems
from conftest import shared_file

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("RLM_DIFF_SEED", "0"))
PER_TASK = int(os.environ.get("RLM_DIFF_PER_TASK", "3"))
#: dataset -> (shared file, rlm subset, problems drawn, problems always included)
DATASETS = {
    "humaneval": ("HumanEvalPlus.jsonl.gz", "humaneval_plus", int(os.environ.get("RLM_DIFF_HE_TASKS", "90")),
                  ["HumanEval/32", "HumanEval/2", "HumanEval/4", "HumanEval/21", "HumanEval/71"]),
    "mbpp": ("MbppPlus.jsonl.gz", "mbpp_plus", int(os.environ.get("RLM_DIFF_MBPP_TASKS", "70")),
             # special oracles: set equality, the two second readings (not-None tasks are added by entry point;
             # are_equivalent, sum_div and Mbpp/249 are not in MBPP+ v0.2.0), and tasks whose inputs evalplus's
             # loader types (tuples, complex numbers, dicts of tuples)
             ["Mbpp/2", "Mbpp/7", "Mbpp/111", "Mbpp/140", "Mbpp/232", "Mbpp/579", "Mbpp/769", "Mbpp/581",
              "Mbpp/558", "Mbpp/124", "Mbpp/252", "Mbpp/106", "Mbpp/722", "Mbpp/259", "Mbpp/580"]),
}
#: problems left out of the draw: their canonical solution takes more than 0.05 s on one input or 0.5 s on all
#: (evalplus's ``trusted_exec`` on this project's 2-core machine), so both tools' verdicts there depend on machine
#: load through the time limits (4x the reference time, at least 1 s) rather than on the judging rules; in a first
#: run on a loaded machine evalplus failed its own canonical solutions of Mbpp/255 and Mbpp/392 on time
SLOW = frozenset({
    "HumanEval/15", "HumanEval/36", "HumanEval/59", "HumanEval/83", "HumanEval/94", "HumanEval/100",
    "HumanEval/130", "HumanEval/139", "Mbpp/84", "Mbpp/123", "Mbpp/255", "Mbpp/271", "Mbpp/300", "Mbpp/389",
    "Mbpp/392", "Mbpp/583", "Mbpp/589", "Mbpp/592", "Mbpp/599", "Mbpp/603", "Mbpp/630"
})
#: (task_id, "canonical" | "any") -> why rlm's verdict differs from evalplus 0.3.1's
EXCEPTIONS = {
    ("HumanEval/32", "any"): "evalplus 0.3.1 fails every find_zero solution, the canonical one included: the "
                             "`continue` after its oracle skips recording the passed input; rlm applies the "
                             "oracle (|poly(xs, x)| <= atol) and passes correct roots",
}


def _not_none_ids(problems: list[dict]) -> list[str]:
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS

    return [p["task_id"] for p in problems if p["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS]


def _subset(dataset: str, path: Path) -> list[dict]:
    _, _, n, always = DATASETS[dataset]
    problems = read_problems(path)
    always = always + (_not_none_ids(problems) if dataset == "mbpp" else [])
    assert set(always) <= {p["task_id"] for p in problems}, f"{path} lacks some of {always}"
    rest = [p for p in problems if p["task_id"] not in always and p["task_id"] not in SLOW]
    chosen = set(always) | {p["task_id"] for p in random.Random(SEED).sample(rest, max(0, n - len(always)))}
    return [p for p in problems if p["task_id"] in chosen]


def _evalplus_verdicts(dataset: str, data: Path, samples: Path, cache: Path) -> list[tuple[bool, bool]]:
    """``evalplus.evaluate`` in its own process (it forks its checkers); (base, base-and-plus) per sample line."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), HUMANEVAL_OVERRIDE_PATH=str(data), MBPP_OVERRIDE_PATH=str(data))
    code = ("import os, sys\nfrom evalplus.evaluate import evaluate\n"
            f"evaluate({dataset!r}, samples={str(samples)!r}, parallel=2, i_just_wanna_run=True)\n"
            "sys.stdout.flush()\nos._exit(0)\n")  # not waiting for evalplus's 20 s watchdog thread
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL, timeout=3000)
    results = json.loads(samples.with_name(samples.stem + "_eval_results.json").read_text())["eval"]
    by_task = {t: iter(rs) for t, rs in results.items()}  # evalplus keeps each task's samples in file order
    out = []
    for line in samples.read_text().splitlines():
        r = next(by_task[json.loads(line)["task_id"]])
        base = r["base_status"] == "pass"
        out.append((base, base and r["plus_status"] == "pass"))
    return out


def _rlm_verdicts(subset: str, data: Path, rows: list[dict], work: Path) -> list[tuple[bool, bool]]:
    """``rlm score`` once per sample round (one completion per problem and file), in sample-line order."""
    from rlm.core.cli import main

    rounds: dict[int, list[int]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    for i, r in enumerate(rows):
        rounds[seen[r["task_id"]]].append(i)
        seen[r["task_id"]] += 1
    out: list[tuple[bool, bool]] = [(False, False)] * len(rows)
    for k, idx in sorted(rounds.items()):
        comp = work / f"round{k}.jsonl"
        comp.write_text("".join(json.dumps({"task_id": rows[i]["task_id"], "completion": rows[i]["solution"]}) + "\n"
                                for i in idx))
        rc = main(["score", "--task", f"code:{subset}", "--data", str(data), "--completions", str(comp),
                   "--out", str(work / f"scored{k}"), "--no-progress"])
        assert rc == 0
        recs = [json.loads(x) for x in (work / f"scored{k}" / "records.jsonl").read_text().splitlines()]
        by_line = {rec["line"]: rec["scores"] for rec in recs}
        for line, i in enumerate(idx, start=1):
            s = by_line[line]
            out[i] = (s["pass_base"] == 1.0, s["pass_plus"] == 1.0)
    return out


@pytest.mark.parametrize("dataset", ["humaneval", "mbpp"])
def test_rlm_score_agrees_with_evalplus_evaluate(dataset, tmp_path):
    filename, subset, _, _ = DATASETS[dataset]
    src = shared_file(filename)
    problems = _subset(dataset, src)
    data = tmp_path / f"{dataset}_subset.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    rows = list(candidate_set(problems, seed=SEED, per_task=PER_TASK))
    assert len(rows) >= (300 if dataset == "humaneval" else 200)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": r["task_id"], "solution": r["solution"]}) + "\n" for r in rows))

    theirs = _evalplus_verdicts(dataset, data, samples, tmp_path / "evalplus_cache")
    ours = _rlm_verdicts(subset, data, rows, tmp_path)

    differ, excused = [], []
    for r, a, b in zip(rows, ours, theirs):
        if a == b:
            continue
        why = EXCEPTIONS.get((r["task_id"], r["kind"])) or EXCEPTIONS.get((r["task_id"], "any"))
        (excused if why else differ).append((r["task_id"], r["kind"], "rlm", a, "evalplus", b, r["solution"]))
    n_pass = sum(b[1] for b in theirs)
    print(f"{dataset}: {len(rows)} samples over {len(problems)} problems; evalplus passes {n_pass} (plus); "
          f"{len(excused)} listed exceptions, {len(differ)} disagreements")
    assert not differ, "\n\n".join(map(str, differ[:5]))
    # the set discriminates: canonical solutions pass, most mutants fail
    assert 0 < n_pass < len(rows)
    assert all(a == (True, True) for r, a in zip(rows, ours) if r["kind"] == "canonical")
