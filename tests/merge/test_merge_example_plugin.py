"""The example third-party plugin's ``sign_consensus`` method works through ``rlm merge`` (same engine, same
command) and computes what its docstring says, checked against float64 by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_merge_engine import make_llama

from rlm.core import plugins as plugins_mod
from rlm.core.cli import main
from rlm.core.models.reader import ModelReader

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rlm-example-plugin"


@pytest.fixture()
def example_plugin(monkeypatch):
    """The process-wide plugin system with the built-ins plus the example package (as if pip-installed)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in [m for m in sys.modules if m == "rlm_example_plugin" or m.startswith("rlm_example_plugin.")]:
        sys.modules.pop(name)
    import rlm_example_plugin

    system = plugins_mod.PluginSystem()
    if "sign_consensus" not in system.registry("merge_method"):
        system.add_plugin(rlm_example_plugin, name="example", distribution="rlm-example-plugin")
    monkeypatch.setattr(plugins_mod, "_SYSTEM", system)
    return rlm_example_plugin


def reference(base, taus, weights, scale):
    """Per position: entries of w_i τ_i whose sign equals sign(Σ w_i τ_i) (a zero sum keeps nothing), averaged
    with their weights: Σ agree·w_i τ_i / Σ agree·w_i, added to the base times ``scale``."""
    out = np.array(base, dtype=np.float64).reshape(-1).copy()
    flat = [np.asarray(t, dtype=np.float64).reshape(-1) for t in taus]
    for j in range(out.size):
        u = [w * t[j] for w, t in zip(weights, flat)]
        s = np.sign(sum(u))
        num = sum(x for x in u if s != 0 and np.sign(x) == s)
        den = sum(w for w, x in zip(weights, u) if s != 0 and np.sign(x) == s)
        out[j] += scale * (num / den if den != 0 else 0.0)
    return out.reshape(np.shape(base))


def test_sign_consensus_hand_values(example_plugin):
    from rlm_example_plugin.merge import SignConsensus

    m = SignConsensus(scale=2.0)
    base = torch.tensor([1.0, 0.0, 0.0])
    deltas = torch.tensor([[0.5, 1.0, 1.0], [0.3, -2.0, -1.0]])
    params = [m.ModelParams(weight=1.0)] * 2
    # pos 0: both agree (+): (0.5+0.3)/2 = 0.4 -> 1 + 0.8; pos 1: sum −1 -> only −2 agrees: −2;
    # pos 2: zero sum -> nothing: 0
    np.testing.assert_allclose(m.merge(base, deltas, params).numpy(), [1.8, -4.0, 0.0], atol=1e-6)


def test_sign_consensus_through_rlm_merge(example_plugin, tmp_path, capsys):
    base = make_llama(tmp_path / "base", 0)
    e1 = make_llama(tmp_path / "e1", 1, base=base)
    e2 = make_llama(tmp_path / "e2", 2, base=base)
    e3 = make_llama(tmp_path / "e3", 3, base=base)
    out = tmp_path / "out"
    rc = main(["merge", "--method", "sign_consensus", "--base", str(base), "--models", f"{e1},{e2},{e3}",
               "--weights", "0.5,1.0,0.25", "--set", "params.scale=0.8", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    got = ModelReader(out)
    rb, rs = ModelReader(base), [ModelReader(e) for e in (e1, e2, e3)]
    for name in rb.tensor_names()[:6]:
        b = rb.get(name).double().numpy()
        taus = [r.get(name).double().numpy() - b for r in rs]
        np.testing.assert_allclose(got.get(name).double().numpy(), reference(b, taus, [0.5, 1.0, 0.25], 0.8),
                                   atol=2e-6, err_msg=name)
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["method"] == "sign_consensus" and man["method_params"] == {"scale": 0.8}
    rc = main(["merge", "--method", "sign_consensus", "--base", str(base), "--models", f"{e1}",
               "--set", "params.scael=1", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "scael" in capsys.readouterr().err
