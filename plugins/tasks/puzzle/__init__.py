"""Knights and Knaves logic puzzles: 2-8 people in-domain, 9-13 out-of-domain; every role must be right.

The package holds the whole task: :mod:`~rlm.plugins.tasks.puzzle.logic` (statements, truth values, brute-force
solver), :mod:`~rlm.plugins.tasks.puzzle.generator` (unique-solution puzzles), :mod:`~rlm.plugins.tasks.puzzle.render`
(prompt and reference text) and :mod:`~rlm.plugins.tasks.puzzle.verify` (answer parsing, reward). The task has
no data files. This module, the entry point ``rlm plugins`` imports, holds the config and the Task class and
imports the others inside its methods.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.hookspecs import hookimpl


class Puzzle(Task):
    """Knights and Knaves puzzles with exactly one solution; reward 1 only if every role is right."""

    name = "puzzle"
    subsets = {
        "id": "in-domain: 2-8 people (the default)",
        "ood": "out-of-domain: 9-13 people",
        "all": "in-domain and out-of-domain, alternating",
    }
    file_subsets = ()  # every example comes from the built-in generator

    class Config(PluginConfig):
        num_examples: int = Field(1000, ge=1, description="examples when no limit is given")
        id_min_people: int = Field(2, ge=1)
        id_max_people: int = Field(8, ge=1)
        ood_min_people: int = Field(9, ge=1)
        ood_max_people: int = Field(13, ge=1, le=20)
        depth: int = Field(2, ge=0, le=4, description="maximum nesting of not/and/or/if/iff in a statement")
        width: int = Field(2, ge=2, le=4, description="maximum operands of and/or")
        test_seed_offset: int = Field(1_000_003, description="split 'test' draws with seed + this offset")

    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        import random

        from rlm.core.errors import RlmError
        from rlm.plugins.tasks.puzzle.generator import make

        subset = self.check_subset(subset) or "id"
        if path is not None:
            raise RlmError("the puzzle task has no data files: its examples come from the built-in generator")
        c = self.config
        ranges = {"id": [(c.id_min_people, c.id_max_people)], "ood": [(c.ood_min_people, c.ood_max_people)]}
        ranges["all"] = ranges["id"] + ranges["ood"]
        for lo, hi in ranges[subset]:
            if lo > hi:
                raise RlmError(f"puzzle config: minimum people {lo} > maximum {hi}")
        rng = random.Random(seed + (c.test_seed_offset if split == "test" else 0))
        out = []
        for i in range(limit or c.num_examples):
            lo, hi = ranges[subset][i % len(ranges[subset])]
            n = rng.randint(lo, hi)
            p = make(n, rng, c.depth, c.width)
            domain = "id" if c.id_min_people <= n <= c.id_max_people else "ood"
            out.append(Example(id=f"kk-{split}-{seed}-{i}", prompt=p["prompt"], answer=p["solution"],
                               reference=p["reference"],
                               meta={"people": n, "domain": domain, "names": p["names"],
                                     "statements": p["statements"]}))
        return out

    def reward(self, example: Example, completion: str) -> float:
        from rlm.plugins.tasks.puzzle.verify import is_correct

        sol = example.answer if isinstance(example.answer, dict) else {}
        return 1.0 if is_correct(completion, sol) else 0.0

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        return {"reward": self.reward(example, completion), "people": example.meta.get("people"),
                "domain": example.meta.get("domain")}

    def metrics(self, scores: list[dict[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {}
        groups: dict[str, list[float]] = {"accuracy": []}
        for s in scores:
            r = float(s.get("reward", 0.0))
            groups["accuracy"].append(r)
            if s.get("domain") in ("id", "ood"):
                groups.setdefault(f"accuracy_{s['domain']}", []).append(r)
            if isinstance(s.get("people"), int):
                groups.setdefault(f"accuracy_{s['people']}ppl", []).append(r)
        for k in sorted(groups, key=lambda k: (k != "accuracy", len(k), k)):
            out[k] = sum(groups[k]) / len(groups[k]) if groups[k] else 0.0
        return out


@hookimpl
def register_tasks(register):
    register(Puzzle)
