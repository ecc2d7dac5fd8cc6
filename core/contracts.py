"""Base classes for the five kinds of plugin: Trainer, MergeMethod, Task, Metric and GenerationBackend.

Each plugin class has a ``name`` (what users type), optional ``aliases`` and a nested pydantic ``Config``
(``extra="forbid"``) holding every number it uses. The engines in ``rlm.core`` drive these classes; the issues
that implement each kind extend the contracts where their engine needs more.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict


class PluginConfig(BaseModel):
    """Base for every plugin config: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)


class Plugin:
    """Common shape of all plugin classes."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: part of the default selection wherever rlm picks plugins of this kind without being told which (the
    #: metrics of ``rlm conflicts`` without ``--metrics`` and of a study's conflicts steps, the methods of
    #: ``rlm merge-eval`` without ``--methods``); ``Registry.defaults()`` lists them
    default: ClassVar[bool] = False

    def __init__(self, config: PluginConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        if isinstance(config, PluginConfig):
            data = config.model_dump()
        else:
            data = dict(config or {})
        data.update(overrides)
        self.config = self.Config(**data)


def tensor_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The 63-bit seed of the random generator for one (seed, tensor name, model index): a hash, so a random
    mask never depends on the order of tensors or on threads."""
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}\0{tensor_name}\0{int(model_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class MergeContext:
    """What a merge method knows about the tensor at hand besides the numbers.

    ``rows`` is ``None`` when ``merge`` receives the whole tensor, else the ``(start, stop)`` block of dim 0
    it receives (large tensors are merged in row blocks); ``shape`` is the whole tensor's shape. ``stats[i]``
    is what :meth:`MergeMethod.prepare` returned for model ``i`` on the whole tensor."""

    tensor_name: str
    shape: tuple[int, ...]
    seed: int = 0
    rows: tuple[int, int] | None = None
    stats: list[Any] = field(default_factory=list)
    #: the model whose task vector :meth:`MergeMethod.prepare` is looking at (``None`` inside ``merge``)
    model_index: int | None = None

    def generator(self, model_index: int) -> Any:
        """A fresh ``torch.Generator`` seeded by :func:`tensor_seed` (seed, tensor name, model index)."""
        import torch

        g = torch.Generator(device="cpu")
        g.manual_seed(tensor_seed(self.seed, self.tensor_name, model_index))
        return g

    def block(self, whole: Any) -> Any:
        """The rows of a whole-tensor array (e.g. a mask from ``prepare``) that match the current block."""
        return whole if self.rows is None else whole[self.rows[0]:self.rows[1]]


class MergeMethod(Plugin, abc.ABC):
    """Combines task vectors tensor by tensor. ``Config`` holds global parameters (lambda, normalize, ...);
    ``ModelParams`` holds per-model parameters (weight, density, ...); ``presets`` maps a preset name (e.g.
    ``paper``) to settings ``{"params": {...global...}, "model_params": {...per model...}}``."""

    class ModelParams(PluginConfig):
        weight: float = 1.0

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def check(self, params: list[Any]) -> None:
        """Reject unusable parameters before any tensor is read (raise ``rlm.core.errors.ConfigError``)."""

    def prepare(self, delta: Any, param: Any, *, context: MergeContext) -> Any:
        """Optional whole-tensor statistic of model ``i``'s fp32 task vector ``delta`` (e.g. a magnitude
        threshold or a random mask), computed before :meth:`merge` and handed to it as ``context.stats[i]``.
        The default computes nothing (``None``)."""
        return None

    def prepare_blocks(self, blocks: Any, param: Any, *, context: MergeContext) -> Any:
        """:meth:`prepare` for a tensor too large to hold whole: ``blocks()`` yields ``(rows, delta_block)``
        over model ``i``'s task vector in row order and may be called again for another pass. The default
        assembles the whole fp32 task vector and calls :meth:`prepare`; override it to stream."""
        import torch

        full = torch.empty(context.shape, dtype=torch.float32)
        for (start, stop), block in blocks():
            full[start:stop] = block
        return self.prepare(full, param, context=context)

    @abc.abstractmethod
    def merge(self, base: Any, deltas: Any, params: list[Any], *, context: Any = None) -> Any:
        """Return the merged tensor given the base tensor and stacked fp32 task vectors ``deltas[i]``
        (``deltas`` has shape ``(n_models, *base.shape)``; ``context`` is a :class:`MergeContext`)."""


@dataclass
class Example:
    """One task example: a user prompt, the verifier's ground truth and, for SFT, a reference response."""

    id: str
    prompt: str
    answer: Any = None
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def draw_distinct(n: int, draw: Callable[[], Any], key: Callable[[Any], Hashable], *, tries: int = 1000) -> list:
    """``n`` items from ``draw()`` (a seeded generator's single draw) with no repeated ``key`` while the space
    allows: a draw whose key was seen is redrawn up to ``tries`` times; when every try repeats, the space counts
    as exhausted and a new round starts (each round covers the space before any key repeats). Deterministic
    for a seeded ``draw``."""
    out: list = []
    seen: set = set()
    for _ in range(n):
        item = draw()
        for _ in range(tries):
            if key(item) not in seen:
                break
            item = draw()
        else:
            seen.clear()
        seen.add(key(item))
        out.append(item)
    return out


class Task(Plugin, abc.ABC):
    """A verifiable task: data (generated or loaded), a reward for one completion and aggregate metrics."""

    subsets: ClassVar[dict[str, str]] = {}
    #: the subsets whose examples are read from a file, directory or dataset name (``--data``, the ``path`` of
    #: :meth:`examples`); ``--data`` with any other subset is refused (:meth:`check_data`). The default subset
    #: (``None``) is the first of ``subsets``. ``None`` here declares nothing: every subset takes ``--data``.
    file_subsets: ClassVar[tuple[str, ...] | None] = None
    #: system message put before every prompt by the chat template (``None``: no system turn)
    system_prompt: ClassVar[str | None] = None

    @abc.abstractmethod
    def examples(self, subset: str | None = None, *, split: str = "train", limit: int | None = None,
                 seed: int = 0, path: str | None = None) -> list[Example]:
        """Return examples of a subset (``None`` means the task's default)."""

    @abc.abstractmethod
    def reward(self, example: Example, completion: str) -> float:
        """Score one completion in [0, 1]; never raises on garbage input."""

    def check_subset(self, subset: str | None) -> str | None:
        """Return ``subset`` if it is one of ``subsets`` (or ``None``); otherwise raise with the closest names."""
        if subset is None or subset in self.subsets:
            return subset
        import difflib

        from rlm.core.errors import RlmError

        close = difflib.get_close_matches(subset, list(self.subsets), n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RlmError(f"unknown subset {subset!r} of task {self.name!r}{hint} "
                       f"(subsets: {', '.join(self.subsets) or 'none'})")

    def check_data(self, subset: str | None, path: str | None) -> None:
        """Refuse a data ``path`` for a subset that reads no file (one not in :attr:`file_subsets`, when the
        task declares them), naming the subset and those that do."""
        if path is None or self.file_subsets is None:
            return
        name = subset if subset is not None else next(iter(self.subsets), None)
        if name in self.file_subsets:
            return
        from rlm.core.errors import RlmError

        which = f"subset {name!r} of task {self.name!r}" if name is not None else f"task {self.name!r}"
        takes = (f"; --data applies to subsets {', '.join(self.file_subsets)}" if self.file_subsets
                 else "; no subset of it reads data files")
        raise RlmError(f"--data {path}: {which} reads no data file (its examples are generated){takes}")

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        """Per-example scores written to evaluation records (JSON-serialisable; never raises).
        Default: ``{"reward": self.reward(example, completion)}``."""
        return {"reward": self.reward(example, completion)}

    def reward_batch(self, examples: list[Example], completions: list[str]) -> list[float]:
        """:meth:`reward` of each (example, completion) pair, in order; RL rollouts score a whole batch through
        it. Override to run them in parallel (e.g. sandboxed code); the results must equal :meth:`reward`'s."""
        return [self.reward(e, c) for e, c in zip(examples, completions)]

    def score_batch(self, examples: list[Example], completions: list[str], *,
                    progress: bool = False) -> list[dict[str, Any]]:
        """:meth:`score` for many examples; override to run them in parallel (e.g. sandboxed code)."""
        return [self.score(e, c) for e, c in zip(examples, completions)]

    def metrics(self, scores: list[dict[str, Any]]) -> dict[str, float]:
        """Aggregate per-example :meth:`score` dicts into the reported metrics. Default: the mean of every
        numeric (or boolean) score key over the examples."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for s in scores:
            for k, v in s.items():
                if isinstance(v, (bool, int, float)):
                    sums[k] = sums.get(k, 0.0) + float(v)
                    counts[k] = counts.get(k, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}


class Trainer(Plugin, abc.ABC):
    """Turns a start model and a task into an expert checkpoint."""

    @abc.abstractmethod
    def train(self, run: Any) -> Any:
        """Run training described by ``run`` and return the final checkpoint directory.

        ``run`` is a :class:`rlm.core.train.config.TrainRun` (start model, task instance, subset, output
        directory, resume/overwrite). The built-in trainers hand it to the shared engines
        ``rlm.core.train.sft.run_sft``, ``rlm.core.train.rft.run_rft`` and ``rlm.core.train.rl.run_rl``, which
        write checkpoints, ``final/``, ``metrics.jsonl`` and the manifest. RL trainers subclass
        :class:`rlm.core.train.rl.RLTrainer`, which declares the advantage estimators on offer, whether a critic
        is trained and the policy loss, and runs ``run_rl``."""


@dataclass
class ReportSection:
    """What one metric adds to a Markdown report below the summary tables: a heading, a Markdown body and the
    PNG figures it wrote into the report's directory (names relative to that directory)."""

    title: str
    markdown: str
    figures: list[str] = field(default_factory=list)


class Metric(Plugin, abc.ABC):
    """A task-vector statistic accumulated tensor by tensor in one streaming pass (``rlm conflicts``).

    The engines (:mod:`rlm.core.conflicts`) read the class members below and nothing else; each has a default
    that suits a metric computing its own sums from the τ blocks. Reports (the ``report.md`` of ``rlm
    conflicts`` and the study report) are built from :meth:`columns` and :meth:`section` of the metrics that
    ran, so a plugin's metric reaches them like a built-in one."""

    #: ``"model"``: one value per model; ``"pair"``: one per pair of models (the engine refuses fewer than two)
    scope: ClassVar[str] = "model"
    #: ask the engine for top-k thresholds (``context.first_kept``, ``context.pair_joint``); they need the whole
    #: model's magnitude histograms, hence a second pass over the tensors
    needs_topk: ClassVar[bool] = False
    #: ``False`` promises that :meth:`update` uses only ``context``'s sums (``sum_squares``, ``dot``,
    #: ``conflict_sum_squares``, ``count_above`` for the thresholds in :attr:`count_thresholds`,
    #: ``pair_joint``, ``names``, ``pairs``, ``size``), never the τ blocks in ``deltas``: the engine may then run
    #: its fused kernels and pass ``deltas`` empty
    reads_deltas: ClassVar[bool] = True
    #: magnitude-bin resolution (bits of |τ|'s float32 pattern) that :meth:`update_histogram` needs; ``None``:
    #: the metric takes no histograms
    histogram_bits: ClassVar[int | None] = None

    @property
    def count_thresholds(self) -> list[float]:
        """The thresholds ``t`` whose counts ``context.count_above(name, t)`` this metric asks for (the fused
        engine counts only these). Default: none."""
        return []

    @abc.abstractmethod
    def update(self, tensor_name: str, deltas: dict[str, Any], context: Any = None) -> None:
        """Accumulate the statistic for one block of a tensor (called once or more per tensor, so keep sums
        over positions); ``deltas`` maps model name to its flat task-vector block, ``context`` is the
        engine's chunk (:class:`rlm.core.conflicts.chunk.Chunk`) with shared derived quantities. Never keep
        ``deltas`` or arrays from ``context``: their buffers are reused by the next block."""

    def update_histogram(self, tensor_name: str, hists: dict[str, Any], bits: int) -> None:
        """Called with each tensor's histograms of ``bits``-bit magnitude bins per model (``bits`` at least
        :attr:`histogram_bits`) when :attr:`histogram_bits` is set; the fused engine may hand every tensor's
        at once under the name ``"*"``. Default: nothing."""

    @abc.abstractmethod
    def result(self) -> dict[str, Any]:
        """Return ``{"models": {name: {...}}, "pairs": {"A|B": {...}}}`` (JSON-serialisable); merged into
        ``conflicts.json`` with the other metrics' results."""

    def columns(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The cells this metric adds to one row of the summary tables, ``{column header: value}``: ``entry`` is
        the merged result of one model (``scope = "model"``) or one pair (``scope = "pair"``) from
        ``conflicts.json``. Values are numbers (formatted by the report), strings or ``None``. Default: the
        entry's value under the metric's name when it is a number, else nothing."""
        if self.name not in entry:
            return {}
        v = entry[self.name]
        return {self.name: v} if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) else {}

    def section(self, data: Mapping[str, Any], out_dir: Path) -> ReportSection | None:
        """A report section of this metric beyond its table cells (a curve, a table over kept rates), given the
        whole ``conflicts.json`` data; figures are written into ``out_dir``. Default: none."""
        return None


@dataclass
class Generation:
    """One sampled completion of one prompt (what every :class:`GenerationBackend` returns)."""

    prompt_index: int
    sample_index: int
    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" (an eos token or a stop string was produced) or "length" (max_new_tokens reached)
    #: with ``SamplingParams.logprobs``: log p of each token of ``completion_ids`` under the model's own
    #: distribution (log-softmax of the raw logits: temperature 1, no top-p), one float per completion token
    logprobs: list[float] | None = None

    @property
    def num_completion_tokens(self) -> int:
        return len(self.completion_ids)


@dataclass
class SamplingParams:
    """What to generate; shared by every backend. ``stop``: strings that end a completion (the text is cut before
    the first one, ``finish_reason`` is ``"stop"``); ``logprobs``: also return per-token log-probs."""

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        from rlm.core.errors import RlmError

        if self.n < 1:
            raise RlmError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise RlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise RlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise RlmError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RlmError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class GenerationBackend(Plugin, abc.ABC):
    """An inference engine that turns chat-formatted prompt strings into :class:`Generation` objects.

    The engines (``rlm eval``, RFT sampling, RL rollouts) use only the members below. Semantics every backend
    keeps (the HF backend's, :mod:`rlm.core.eval.generation`): ``len(prompts) * params.n`` results, prompt-major
    (``result[i * n + j]`` is sample ``j`` of prompt ``i``); ``temperature == 0`` is greedy and repeats the one
    completion ``n`` times; sampling draws from softmax(logits / temperature) restricted to the top-p nucleus,
    with no other decoding default of the model switched on; a completion ends at an eos token (kept in
    ``completion_ids``), at a stop string (cut from ``text``) or after ``max_new_tokens``; ``text`` is decoded
    without special tokens; a ``seed`` makes sampling reproducible."""

    tokenizer: Any = None

    @classmethod
    @abc.abstractmethod
    def load(cls, model_path: str, *, device: str | None = None, dtype: str = "float32",
             config: PluginConfig | dict[str, Any] | None = None) -> "GenerationBackend":
        """Build the backend for the model in directory ``model_path`` (already resolved), weights in ``dtype``
        (``float32``, ``bfloat16``, ``float16`` or ``auto``) on ``device``."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Generation]:
        """Return ``len(prompts) * params.n`` generations, prompt-major."""

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Receive new policy weights (``(parameter name, tensor)`` pairs in the policy's own names, e.g. after
        an optimizer step); the next :meth:`generate` samples from them. Default: refused (an evaluation-only
        backend), with one :class:`rlm.core.errors.RlmError` line."""
        from rlm.core.errors import RlmError

        raise RlmError(f"generation backend {self.name!r} cannot receive policy weights (evaluation only)")

    def weights_checksum(self) -> float:
        """A float64 checksum of the engine's weights (the sum of every element of every distinct parameter, so
        it does not depend on how an engine fuses or names them), to compare with the policy's after a push.
        Default: refused like :meth:`load_weights`."""
        from rlm.core.errors import RlmError

        raise RlmError(f"generation backend {self.name!r} cannot report a weights checksum (evaluation only)")

    def sleep(self) -> None:
        """Release accelerator memory between rollouts and an update (colocated training). Default: nothing."""

    def wake_up(self) -> None:
        """Undo :meth:`sleep` before the next :meth:`generate`. Default: nothing."""
