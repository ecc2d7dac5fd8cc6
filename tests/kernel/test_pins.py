"""The package metadata admits the torch releases the stack needs (vLLM's 2.14.x) while make installs the
2.13.0 CPU build here."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def test_torch_pin_admits_2_14_and_make_installs_2_13_0():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    for v in ("2.13.0", "2.14.0", "2.14.3"):
        assert torch_req.specifier.contains(v), (str(torch_req), v)
    assert re.search(r"^TORCH \?= torch==2\.13\.0$", (REPO / "Makefile").read_text(), re.M)
