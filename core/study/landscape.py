"""The loss landscape around an expert (the paper's Fig. 4): :class:`Landscape` moves an in-memory model to
θ_a + α Δθ + β r.

f(α, β) = score(θ_a + α Δθ + β r) with Δθ = θ_merge − θ_a, over every floating-point parameter; r is drawn
tensor by tensor from ``N(0, 1)`` with one generator per (seed, tensor name)
(:func:`rlm.core.contracts.tensor_seed`) and scaled so that ‖r‖₂ = ‖Δθ‖₂ over all parameters. Points are
built in memory from θ_a, the merged model (read tensor by tensor) and r (redrawn per point), so memory is
one model plus one tensor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlm.core.errors import RlmError


class Landscape:
    """Moves an in-memory model to θ_a + α Δθ + β r (see the module docstring), tensor by tensor.

    ``model`` holds θ_a when created; its original values are kept (one copy) to build every point."""

    def __init__(self, model: Any, merged_dir: str | Path, seed: int = 0) -> None:
        import torch

        from rlm.core.models.reader import ModelReader

        self.model, self.seed = model, int(seed)
        self.reader = ModelReader(str(merged_dir))
        self.params: list[tuple[str, Any]] = []
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point:
                if name not in self.reader:
                    raise RlmError(f"landscape: the merged model {merged_dir} has no tensor {name}")
                self.params.append((name, p))
        self.theta_a = {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.params}
        d2 = r2 = 0.0
        for n, _ in self.params:
            d = self._delta(n)
            d2 += float((d.double() ** 2).sum())
            r2 += float((self._r(n).double() ** 2).sum())
        self.delta_norm = math.sqrt(d2)
        self.r_scale = math.sqrt(d2 / r2) if r2 > 0 else 0.0

    def _delta(self, name: str) -> Any:
        import torch

        return self.reader.get(name).to(torch.float32) - self.theta_a[name]

    def _r(self, name: str) -> Any:
        import torch

        from rlm.core.contracts import tensor_seed

        g = torch.Generator(device="cpu")
        g.manual_seed(tensor_seed(self.seed, name, 0))
        return torch.randn(tuple(self.theta_a[name].shape), generator=g, dtype=torch.float32)

    def direction(self, name: str) -> Any:
        """The scaled random direction r of one tensor."""
        return self._r(name) * self.r_scale

    def set(self, alpha: float, beta: float) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params:
                v = self.theta_a[n]
                if alpha:
                    v = v + alpha * self._delta(n)
                if beta:
                    v = v + beta * self.direction(n)
                p.copy_(v.to(p.dtype))
