"""Instruction following: IFEval-type verifiable constraints, scored with lm-eval's IFEval registry.

The package holds the whole task: :mod:`~rlm.plugins.tasks.instruction_following.generator` (the ``generated``
subset), :mod:`~rlm.plugins.tasks.instruction_following.loaders` (IFEval / IFBench, RLVR-IF, Tulu-3) and
:mod:`~rlm.plugins.tasks.instruction_following.checks` (lm-eval's checkers, reward, IFEval metrics); the offline
NLTK data the checkers need is shared core code (:mod:`rlm.core.eval.nltk_data`). This module, the entry point
``rlm plugins`` imports, holds the config and the Task class and imports the others inside its methods.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.hookspecs import hookimpl

# subset -> (loader format, default file in the shared data folder, Hugging Face dataset name)
SOURCES = {
    "ifeval": ("ifeval", "ifeval_input_data.jsonl", "google/IFEval"),
    "ifbench": ("ifeval", "IFBench_test.jsonl", "allenai/IFBench_test"),
    "rlvr": ("rlvr", None, "allenai/RLVR-IFeval"),
    "tulu3": ("rlvr", None, "allenai/tulu-3-sft-personas-instruction-following"),
}


class InstructionFollowing(Task):
    """Follow 1-3 verifiable constraints (IFEval, IFBench, RLVR-IF); reward = fraction of constraints met."""

    name = "instruction_following"
    aliases = ("if",)
    subsets = {
        "generated": "offline generator: a topic prompt with 1-3 IFEval constraints and a reference response",
        "ifeval": "IFEval (541 prompts; path or google/IFEval)",
        "ifbench": "IFBench test; its 58 constraint ids are not in lm-eval's registry (see `unsupported`)",
        "rlvr": "Tulu-3 RLVR-IF constraint data (path or allenai/RLVR-IFeval)",
        "tulu3": "Tulu-3 SFT instruction-following data (SFT only: constraints are not machine-checkable)",
    }
    file_subsets = ("generated", "ifeval", "ifbench", "rlvr", "tulu3")  # generated: --data is RLVR-IF rows

    class Config(PluginConfig):
        num_examples: int = Field(1000, ge=1, description="generated examples when no limit is given")
        min_constraints: int = Field(1, ge=1)
        max_constraints: int = Field(3, ge=1)
        min_sentences: int = Field(4, ge=1)
        max_sentences: int = Field(7, ge=1)
        test_seed_offset: int = Field(1_000_003, description="split 'test' draws with seed + this offset")
        unsupported: Literal["skip", "fail"] = Field(
            "skip", description="instruction ids lm-eval's registry lacks: 'skip' leaves them out of reward and "
                                "metrics, 'fail' counts them as not followed")

    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        from rlm.core.io.records import shared_data_file
        from rlm.plugins.tasks.instruction_following.generator import generate
        from rlm.plugins.tasks.instruction_following.loaders import load

        subset = self.check_subset(subset) or "generated"
        c = self.config
        if subset == "generated" and path is None:
            rows = generate(limit or c.num_examples, seed + (c.test_seed_offset if split == "test" else 0),
                            c.min_constraints, c.max_constraints, c.min_sentences, c.max_sentences)
        else:
            fmt, filename, hub = SOURCES.get(subset, ("rlvr", None, None))
            if path is None:
                path = shared_data_file(filename) if filename else None
                if path is None:  # these hub datasets publish one split, "train", whatever the use
                    path, split = hub, "train"
            rows = load(path, fmt, split=split)[:limit]
        return [Example(id=r["key"], prompt=r["prompt"], reference=r.get("reference"),
                        answer={"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]},
                        meta={"key": r["key"], "subset": subset}) for r in rows]

    def _flags(self, example: Example, completion: Any, loose: bool = False) -> list[bool | None]:
        from rlm.plugins.tasks.instruction_following.checks import check

        ans = example.answer if isinstance(example.answer, dict) else {}
        return check(example.prompt, ans.get("instruction_id_list", []), ans.get("kwargs", []), completion,
                     loose=loose)

    def reward(self, example: Example, completion: str) -> float:
        from rlm.plugins.tasks.instruction_following.checks import fraction_followed

        try:
            return fraction_followed(self._flags(example, completion), self.config.unsupported)
        except Exception:
            return 0.0

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        from rlm.plugins.tasks.instruction_following.checks import fraction_followed

        strict, loose = self._flags(example, completion), self._flags(example, completion, loose=True)
        return {"reward": fraction_followed(strict, self.config.unsupported), "strict": strict, "loose": loose}

    def metrics(self, scores: list[dict[str, Any]]) -> dict[str, float]:
        from rlm.plugins.tasks.instruction_following.checks import aggregate

        out = aggregate([s.get("strict", []) for s in scores], [s.get("loose", []) for s in scores],
                        self.config.unsupported)
        out.pop("n", None)
        out["reward"] = sum(float(s.get("reward", 0.0)) for s in scores) / len(scores) if scores else 0.0
        return out


@hookimpl
def register_tasks(register):
    register(InstructionFollowing)
