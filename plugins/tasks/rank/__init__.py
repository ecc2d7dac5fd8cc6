"""Negation-sensitive ranking (NevIR, Rank1 data): pick the relevant passage; NevIR paired accuracy.

The package holds the whole task: :mod:`~rlm.plugins.tasks.rank.prompts` (pairwise and pointwise prompts),
:mod:`~rlm.plugins.tasks.rank.generator` (the ``generated`` subset), :mod:`~rlm.plugins.tasks.rank.loaders`
(NevIR, Rank1) and :mod:`~rlm.plugins.tasks.rank.verify` (answer parsing, paired accuracy). This module, the
entry point ``rlm plugins`` imports, holds the config and the Task class and imports the others inside its
methods.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.hookspecs import hookimpl


class Rank(Task):
    """Which passage answers the query, negation included; a pair counts only if both queries are right."""

    name = "rank"
    subsets = {
        "generated": "offline generator of negation pairs (q1 matches p1, negated q2 matches p2)",
        "nevir": "NevIR pairs (local path or Hugging Face dataset name, e.g. orionweller/NevIR)",
        "rank1": "Rank1-format pointwise relevance data (query, passage, true/false, reasoning)",
    }
    file_subsets = ("generated", "nevir", "rank1")  # generated with --data reads NevIR pairs

    class Config(PluginConfig):
        num_pairs: int = Field(500, ge=1, description="generated pairs when no limit is given")
        nevir_dataset: str = "orionweller/NevIR"
        rank1_dataset: str = "jhu-clsp/rank1-training-data"
        test_seed_offset: int = Field(1_000_003, description="split 'test' draws with seed + this offset")
        distinct: bool = Field(False, description="generated: no pair repeats within one set while the space "
                               "allows (360 pairs), so a greedy evaluation scores n different prompts")
        reasoning: Literal["claims", "compare"] = Field(
            "claims", description="generated: the reference responses' style: 'claims' restates the query and "
            "both passages' claims; 'compare' copies the query's and Passage A's predicates and says whether "
            "they are the same (shorter; rank.generator)")

    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        from rlm.plugins.tasks.rank.generator import generate_pairs
        from rlm.plugins.tasks.rank.loaders import load_nevir, load_rank1

        subset = self.check_subset(subset) or "generated"
        c = self.config
        if subset == "generated" and path is None:
            n_pairs = -(-limit // 2) if limit else c.num_pairs
            rows = generate_pairs(n_pairs, seed + (c.test_seed_offset if split == "test" else 0),
                                  distinct=c.distinct, reasoning=c.reasoning)
        elif subset == "rank1":
            rows = load_rank1(path or c.rank1_dataset, split=split)
        else:
            rows = load_nevir(path or c.nevir_dataset, split=split, seed=seed)
        rows = rows[:limit] if limit else rows
        return [Example(id=r["id"], prompt=r["prompt"], answer=r["answer"], reference=r["reference"],
                        meta={"pair": r["pair"], "query": r["query"]}) for r in rows]

    def reward(self, example: Example, completion: str) -> float:
        from rlm.plugins.tasks.rank.verify import parse_bool, parse_choice

        if isinstance(example.answer, bool):
            return 1.0 if parse_bool(completion) is example.answer else 0.0
        if example.answer not in ("A", "B"):
            return 0.0
        return 1.0 if parse_choice(completion) == example.answer else 0.0

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        return {"reward": self.reward(example, completion), "pair": example.meta.get("pair")}

    def metrics(self, scores: list[dict[str, Any]]) -> dict[str, float]:
        from rlm.plugins.tasks.rank.verify import paired_accuracy

        out = {"accuracy": sum(float(s.get("reward", 0.0)) for s in scores) / len(scores) if scores else 0.0}
        paired = [(s["pair"], float(s.get("reward", 0.0)) == 1.0) for s in scores if s.get("pair") is not None]
        if paired:
            out["paired_accuracy"], out["n_pairs"] = paired_accuracy(paired)
        return out


@hookimpl
def register_tasks(register):
    register(Rank)
