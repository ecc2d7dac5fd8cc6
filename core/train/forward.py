"""The one forward pass every training engine uses: log-probs (and entropy) of the response tokens of a
:class:`rlm.core.train.data.TokenBatch`, or the hidden states before them (PPO's value head).

Used by the session (reference log-probs), the SFT and RL loops and the critic. This module does not import
torch at import time.
"""

from __future__ import annotations

from typing import Any

from rlm.core.train.algorithms import entropy_from_logits, logprobs_from_logits


def forward_response(model: Any, t: dict[str, Any], *, temperature: float = 1.0, entropy: bool | str = False,
                     hidden: bool = False) -> tuple[Any, Any]:
    """Log-probs (B, T) of the response tokens under ``model`` (logits divided by ``temperature``) and, if
    asked, the per-token entropy (detached; ``entropy="grad"``: with its gradient). ``t`` is what
    :meth:`TokenBatch.tensors` returns. ``hidden=True`` returns the final hidden states before each response token
    instead (for a value head)."""
    P, T = t["P"], t["T"]
    if hidden:
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"],
                    use_cache=False)
        return out.last_hidden_state[:, P - 1:P + T - 1], None
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"],
                use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1]
    if temperature and temperature != 1.0:
        logits = logits / temperature
    labels = t["input_ids"][:, P:P + T]
    logp = logprobs_from_logits(logits, labels)
    ent = None
    if entropy == "grad":  # the entropy bonus differentiates through it
        ent = entropy_from_logits(logits)
    elif entropy:
        import torch

        with torch.no_grad():
            ent = entropy_from_logits(logits.detach())
    return logp, ent
