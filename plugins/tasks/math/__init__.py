"""The ``math`` task: arithmetic generator, GSM8K, MATH-500 and OpenMathInstruct-2; math-verify reward and
GSM8K strict / flexible extraction as lm-evaluation-harness scores it.

The package holds the whole task: :mod:`~rlm.plugins.tasks.math.generator` (the ``gen`` subset),
:mod:`~rlm.plugins.tasks.math.loaders` (GSM8K, MATH-500, OpenMathInstruct-2) and
:mod:`~rlm.plugins.tasks.math.verify` (answer formats, reward, lm-eval scores). This module, the entry point
``rlm plugins`` imports, holds the config and the Task class and imports the others inside its methods.
"""

from __future__ import annotations

from typing import Any, Literal

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.hookspecs import hookimpl

TEST_SEED_OFFSET = 10_000_019  # the generator's split "test" draws with seed + this


class MathConfig(PluginConfig):
    """Generator difficulty, dataset locations and verifier limits."""

    min_ops: int = 1
    max_ops: int = 1
    min_operand: int = 0
    max_operand: int = 9
    operators: str = "+"
    solution: Literal["steps", "answer"] = "steps"  # gen: a line per operation, or the final answer alone
    # gen steps: reward and accuracy also require every step line right (a right answer after a false step
    # scores 0, so RL cannot learn false derivations); off, only the final answer counts
    check_steps: bool = False
    # gen: no problem repeats within one set while the space allows (one-digit "+" holds 100, "+-" 200), so
    # each of a greedy evaluation's examples is a different problem
    distinct: bool = False
    n_train: int = 2000
    n_test: int = 200
    gsm8k: str | None = None       # file/dir/dataset name; default ../shared/data or openai/gsm8k
    math500: str = "HuggingFaceH4/MATH-500"
    openmath: str = "nvidia/OpenMathInstruct-2"
    timeout_seconds: int = 5        # math-verify parse/verify timeout (main thread only: it uses SIGALRM)
    max_chars: int = 4000           # only the completion's tail is parsed


class MathTask(Task):
    """Math word problems and arithmetic, scored with math-verify (and lm-eval's GSM8K extraction)."""

    name = "math"
    Config = MathConfig
    subsets = {"gen": "seeded arithmetic (difficulty: ops, operand range, operators)",
               "gsm8k": "GSM8K grade-school word problems", "math500": "MATH-500 competition problems",
               "openmath": "OpenMathInstruct-2 (training data)"}
    file_subsets = ("gsm8k", "math500", "openmath")

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None) -> list[Example]:
        from rlm.plugins.tasks.math import loaders
        from rlm.plugins.tasks.math.generator import generate_arithmetic

        subset = self.check_subset(subset) or "gen"
        c = self.config
        if subset == "gen":
            n = c.n_train if split == "train" else c.n_test
            return generate_arithmetic(
                n if limit is None else limit, seed=seed + (0 if split == "train" else TEST_SEED_OFFSET), split=split,
                min_ops=c.min_ops, max_ops=c.max_ops, min_operand=c.min_operand, max_operand=c.max_operand,
                operators=c.operators, solution=c.solution, distinct=c.distinct)
        if subset == "gsm8k":
            out = loaders.load_gsm8k(path or c.gsm8k, split)
        elif subset == "math500":
            out = loaders.load_math500(path or c.math500)
        else:
            out = loaders.load_openmath(path or c.openmath, "train_1M" if path is None else split, limit=limit)
        return out[:limit] if limit is not None else out

    def reward(self, example: Example, completion: str) -> float:
        """The score's ``accuracy``: math-verify on the final answer (and the derivation with ``check_steps``)."""
        return self.score(example, completion)["accuracy"]

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        from rlm.plugins.tasks.math.verify import score_answer

        return score_answer(example, completion, timeout_seconds=self.config.timeout_seconds,
                            max_chars=self.config.max_chars, check_steps=self.config.check_steps)


@hookimpl
def register_tasks(register):
    register(MathTask)
