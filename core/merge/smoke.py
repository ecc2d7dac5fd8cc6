"""The smoke test of a merged model (``rlm merge --smoke``; on by default in ``rlm merge-eval`` and experiments).

A merge that "succeeds" can still produce a model that only emits garbage. After the weights are written, the
merged model generates greedily ``SMOKE_NEW_TOKENS`` tokens from each of a few fixed prompts and each
continuation is judged:

* ``empty``: no new token, or only whitespace;
* ``repeated``: one token id over and over (at least three quarters of the new tokens, and at least 3);
* ``unreadable``: under half of the decoded characters are printable, or it holds Unicode replacement
  characters (bytes that decode to no text);
* ``ok`` otherwise.

The base model (the merge's ``base`` input) answers the same prompts first, and a prompt counts against the
merge only when the merged model's continuation is degenerate and the base's is not: a small model trained on
a few tasks may well stay silent on "Once upon a time", and that is no fault of the merge. The model is flagged
(``degenerate: true``) when at least half of the prompts count against it. The result
goes into ``merge_manifest.json`` as ``smoke`` and a flagged model into a warning on the terminal; the merge is
never refused for it. A model without a tokenizer, or one that fails to load or generate, is not judged
(``ran: false`` with the reason, and a warning).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

SMOKE_PROMPTS = (
    "The capital of France is",
    "Question: What is 12 + 7?\nAnswer:",
    "def add(a, b):\n",
    "Once upon a time, there was",
)
SMOKE_NEW_TOKENS = 8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def judge_continuation(token_ids: list[int], text: str) -> str:
    """``empty`` | ``repeated`` | ``unreadable`` | ``ok`` for one continuation (see the module docstring)."""
    if not token_ids or not text.strip():
        return "empty"
    if len(token_ids) >= 3 and max(map(token_ids.count, set(token_ids))) >= max(3, math.ceil(0.75 * len(token_ids))):
        return "repeated"
    visible = [c for c in text if not c.isspace()]
    printable = sum(c.isprintable() for c in visible)
    if "\ufffd" in text or printable < 0.5 * len(visible):
        return "unreadable"
    return "ok"


def _generate(model: Any, tok: Any, prompt: str, device: Any) -> tuple[list[int], str]:
    import torch

    enc = tok(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=SMOKE_NEW_TOKENS, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = [int(t) for t in out[0, enc["input_ids"].shape[1]:]]
    if tok.eos_token_id is not None and new and new[-1] == tok.eos_token_id:
        new = new[:-1]
    return new, tok.decode(new, skip_special_tokens=True)


def _generations(model_dir: Path, device: Any) -> list[tuple[list[int], str]]:
    """(new token ids, text) of the model in ``model_dir`` for each of ``SMOKE_PROMPTS``."""
    import torch

    from rlm.core.models.hf import load_model

    model, tok = load_model(str(model_dir), dtype=torch.float32, device=device)
    model.eval()
    out = [_generate(model, tok, prompt, device) for prompt in SMOKE_PROMPTS]
    del model
    return out


def _judged(generations: Any) -> list[dict[str, str]]:
    return [{"prompt": prompt, "output": text, "verdict": judge_continuation(ids, text)}
            for prompt, (ids, text) in zip(SMOKE_PROMPTS, generations)]


def _stamp(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of a model directory's files: a changed base is generated from again."""
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in model_dir.iterdir()
                        if p.is_file() for st in [p.stat()]))


@functools.lru_cache(maxsize=4)
def _base_generations(model_dir: str, device: str, stamp: tuple) -> tuple[tuple[list[int], str], ...]:
    """The base's generations, once per base (and device) in a process: a study smoke-tests every merge
    against the same base."""
    return tuple(_generations(Path(model_dir), device))


def smoke_test(model_dir: str | Path, device: Any = "cpu", base_dir: str | Path | None = None) -> dict[str, Any]:
    """Generate from ``SMOKE_PROMPTS`` with the model in ``model_dir`` (and the base model in ``base_dir``) on
    ``device`` and judge each continuation: ``{"ran", "degenerate", "prompts": [{"prompt", "output", "verdict",
    "base_verdict"}], "seconds"}``, or ``{"ran": False, "reason"}`` when the model has no tokenizer or cannot be
    loaded. Without a base (or when the base cannot generate) every degenerate continuation counts."""
    path = Path(model_dir)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return {"ran": False, "reason": "the model has no tokenizer"}
    t0 = time.perf_counter()
    try:  # the merge itself is done and written: a model that cannot even generate is reported, not raised
        rows = _judged(_generations(path, device))
    except Exception as exc:  # noqa: BLE001 - reported in the manifest; the written merge stands
        return {"ran": False, "reason": f"the merged model cannot generate: {type(exc).__name__}: {exc}"}
    base_rows = None
    if base_dir is not None and any((Path(base_dir) / f).is_file() for f in TOKENIZER_FILES):
        try:
            base_rows = _judged(_base_generations(str(Path(base_dir).resolve()), str(device), _stamp(Path(base_dir))))
        except Exception:  # noqa: BLE001 - then every degenerate continuation counts
            base_rows = None
    for i, r in enumerate(rows):
        r["base_verdict"] = base_rows[i]["verdict"] if base_rows else None
    bad = sum(r["verdict"] != "ok" and r["base_verdict"] in ("ok", None) for r in rows)
    return {"ran": True, "degenerate": 2 * bad >= len(rows), "degenerate_prompts": bad,
            "new_tokens": SMOKE_NEW_TOKENS, "prompts": rows, "seconds": round(time.perf_counter() - t0, 3)}


def smoke_warning(smoke: dict[str, Any], out: str | Path) -> str | None:
    """The terminal warning for a flagged smoke result, or one that could not run (``None``: all is well)."""
    if not smoke.get("ran"):
        return f"warning: no smoke test of the merged model {out}: {smoke.get('reason')}"
    if not smoke.get("degenerate"):
        return None
    verdicts = ", ".join(r["verdict"] + (f" (base: {r['base_verdict']})" if r.get("base_verdict") else "")
                         for r in smoke["prompts"])
    return (f"warning: the merged model {out} gives degenerate output on {smoke['degenerate_prompts']} of "
            f"{len(smoke['prompts'])} smoke prompts ({verdicts}); see smoke in its merge_manifest.json")
