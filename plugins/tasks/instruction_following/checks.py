"""Checks and scoring of the ``instruction_following`` task, through lm-eval's IFEval instruction registry,
offline.

:func:`check` calls lm-eval's own ``test_instruction_following_strict`` / ``_loose``
(``lm_eval.tasks.ifeval.utils``) one instruction at a time, so results are those of lm-eval (and of the
official IFEval scorer); :func:`fraction_followed` is the reward and :func:`aggregate` the IFEval metrics.

**Offline NLTK data**: :mod:`rlm.core.eval.nltk_data` (lm-eval's checkers need ``punkt_tab``).

**Unsupported instruction ids** (IFBench's 58 constraint types, unmapped RLVR-IF functions): they are kept
in the example and reported as ``None`` by :func:`check`; the reward and metrics count only supported
instructions (``unsupported="skip"``) or count them as not followed (``unsupported="fail"``); the number of
unsupported instructions and of prompts with none supported is reported in the metrics.
"""

from __future__ import annotations

import contextlib
import random
import threading
from typing import Any, Iterable, Sequence

from rlm.core.eval.nltk_data import ensure_punkt_tab

_LOCK = threading.RLock()
_REGISTRY: Any = None


def registry() -> Any:
    """lm-eval's ``instructions_registry`` module, imported after the offline punkt_tab is in place."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None:
            ensure_punkt_tab()
            from lm_eval.tasks.ifeval import instructions_registry

            _REGISTRY = instructions_registry
    return _REGISTRY


def _as_text(response: Any) -> str:
    if response is None:
        return ""
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    if not isinstance(response, str):
        response = str(response)
    # lone surrogates (from bad decoding) break langdetect/regex users downstream: replace them
    return response.encode("utf-8", errors="replace").decode("utf-8")


@contextlib.contextmanager
def _deterministic(seed: int = 0):
    """Fix the randomness some checkers use: ``build_description`` draws from the global ``random`` when a
    kwarg is invalid (IFEval key 1122 asks for the letter '#'), and langdetect reseeds from the OS on every
    call unless ``DetectorFactory.seed`` is set. The global ``random`` state is restored afterwards."""
    import langdetect

    with _LOCK:
        state = random.getstate()
        old_seed = langdetect.DetectorFactory.seed
        random.seed(seed)
        langdetect.DetectorFactory.seed = seed
        try:
            yield
        finally:
            random.setstate(state)
            langdetect.DetectorFactory.seed = old_seed


def check(prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any] | None],
          response: Any, *, loose: bool = False) -> list[bool | None]:
    """Per instruction: True (followed), False (not followed or the checker failed) or None (unsupported id).

    Never raises on a bad response; each supported instruction is checked exactly as lm-eval checks it.
    """
    reg = registry()
    from lm_eval.tasks.ifeval import utils as lm_utils

    text = _as_text(response)
    fn = lm_utils.test_instruction_following_loose if loose else lm_utils.test_instruction_following_strict
    out: list[bool | None] = []
    kwargs = list(kwargs) + [{}] * (len(instruction_ids) - len(kwargs))
    for iid, kw in zip(instruction_ids, kwargs):
        if iid not in reg.INSTRUCTION_DICT:
            out.append(None)
            continue
        inp = lm_utils.InputExample(key=0, instruction_id_list=[iid], prompt=prompt, kwargs=[dict(kw or {})])
        try:
            with _deterministic():
                res = fn(inp, text)
            out.append(bool(res.follow_instruction_list[0]))
        except Exception:  # a checker crashing on odd text counts as not followed
            out.append(False)
    return out


def _scored(flags: Sequence[bool | None], unsupported: str) -> list[bool]:
    """The flags that count: unsupported (``None``) ones left out under ``"skip"``, else counted as not followed."""
    return [bool(f) for f in flags if f is not None] if unsupported == "skip" else [bool(f) for f in flags]


def fraction_followed(flags: Sequence[bool | None], unsupported: str = "skip") -> float:
    """Reward: fraction of (supported) instructions followed; 0.0 when nothing can be scored."""
    vals = _scored(flags, unsupported)
    return sum(vals) / len(vals) if vals else 0.0


def aggregate(strict: Iterable[Sequence[bool | None]], loose: Iterable[Sequence[bool | None]],
              unsupported: str = "skip") -> dict[str, Any]:
    """IFEval metrics: prompt- and instruction-level accuracy, strict and loose (as lm-eval aggregates)."""
    result: dict[str, Any] = {}
    n_unsup = n_unscored = n_prompts = 0
    for mode, rows in (("strict", list(strict)), ("loose", list(loose))):
        prompt_ok: list[bool] = []
        inst_ok: list[bool] = []
        unsup = unscored = 0
        for flags in rows:
            unsup += sum(f is None for f in flags)
            vals = _scored(flags, unsupported)
            if not vals:
                unscored += 1
                continue
            prompt_ok.append(all(vals))
            inst_ok.extend(vals)
        result[f"prompt_level_{mode}_acc"] = sum(prompt_ok) / len(prompt_ok) if prompt_ok else 0.0
        result[f"inst_level_{mode}_acc"] = sum(inst_ok) / len(inst_ok) if inst_ok else 0.0
        n_unsup, n_unscored, n_prompts = unsup, unscored, len(rows)
    result["n_unsupported_instructions"] = n_unsup
    result["n_unscored_prompts"] = n_unscored
    result["n"] = n_prompts
    return result
