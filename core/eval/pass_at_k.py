"""The unbiased pass@k estimator (Chen et al., 2021) over problems with ``n`` samples each.

For one problem with ``n`` samples of which ``c`` are correct, pass@k = 1 - C(n - c, k) / C(n, k): the
probability that at least one of ``k`` samples drawn without replacement is correct. It is computed as
``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which never forms the (huge) binomials. The reported pass@k is the
mean over problems. Used by ``rlm eval --n N --pass-k 1,10`` (:mod:`rlm.core.eval.engine`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from rlm.core.errors import RlmError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct (``1 <= k <= n``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise RlmError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(n: int, correct: Sequence[int], ks: Iterable[int]) -> dict[int, float]:
    """``{k: mean over problems of pass@k}`` for problems with ``n`` samples each and ``correct[p]`` correct."""
    if not correct:
        raise RlmError("pass@k over no problems")
    return {k: sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in ks}


def parse_ks(text: str | None, n: int) -> list[int]:
    """``--pass-k 1,10`` -> ``[1, 10]`` (each ``1 <= k <= n``); ``None``: ``[1, n]`` when ``n > 1``, else none."""
    if text is None:
        return sorted({1, n}) if n > 1 else []
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise RlmError(f"--pass-k {text!r}: give comma-separated integers, e.g. --pass-k 1,10") from None
    bad = [k for k in ks if not 1 <= k <= n]
    if not ks or bad:
        raise RlmError(f"--pass-k {text!r}: every k must be between 1 and --n {n}")
    return ks
