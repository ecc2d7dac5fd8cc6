"""``rlm merge --config FILE.yml`` with mergekit's YAML: the same file merged by mergekit (its Python API, as in
test_merge_mergekit.py) and by ``rlm merge --config`` agrees within the same rules (fp32: 1e-6 relative; bf16:
one bf16 step, TIES disagreements only at the magnitude cut); DARE uses rlm's seeded masks (the YAML merge
equals rlm's own config with the same seed) and mergekit's DARE defaults; every field rlm does not support is
refused in one line naming it (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from test_merge_engine import load, make_llama

from rlm.core.merge.engine import MergeRunConfig, merge_models

mergekit = pytest.importorskip("mergekit")


def make_trio(root, dtype: str):
    """A random tiny Llama base and two experts of it (as in test_merge_mergekit.py)."""
    base = make_llama(root / "base", 0, dtype=getattr(torch, dtype))
    e1 = make_llama(root / "e1", 1, base=base, dtype=getattr(torch, dtype), scale=0.02)
    e2 = make_llama(root / "e2", 2, base=base, dtype=getattr(torch, dtype), scale=0.02)
    return dtype, base, e1, e2


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def trio(request, tmp_path_factory):
    """fp32 models (exact comparison up to fp32 rounding) and bf16 models (within bf16 rounding)."""
    return make_trio(tmp_path_factory.mktemp(f"mky-{request.param}"), request.param)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """fp32 models for what does not depend on the dtype (mapping, refusals)."""
    return make_trio(tmp_path_factory.mktemp("mky-fp32"), "float32")


def rlm_merge(*args):
    """``rlm merge ARGS`` in-process: the exit code."""
    from rlm.core.cli import main

    return main(["merge", *map(str, args)])


def mergekit_merge(text: str, out):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


def assert_agrees(ours, theirs, dtype, *, base=None, experts=(), densities=()):
    """The agreement rules of test_merge_mergekit.py: fp32 within 1e-6 relative; bf16 within one bf16 step; with
    ``densities`` (TIES in bf16) a disagreement must sit where some model's |τ| equals its magnitude cut."""
    a, b = load(ours), load(theirs)
    assert set(a) == set(b)
    bt, ts = (load(base), [load(e) for e in experts]) if densities else (None, [])
    tie_diffs = 0
    for name in a:
        x, y = a[name].double(), b[name].double()
        assert a[name].dtype == b[name].dtype == getattr(torch, dtype), name
        tol = 1e-6 * (1 + y.abs()) if dtype == "float32" else 2.0 ** -7 * y.abs() + 1e-30
        bad = (x - y).abs() > tol
        if densities and dtype == "bfloat16" and bool(bad.any()):
            at_cut = torch.zeros_like(bad)
            for t, d in zip(ts, densities):
                tau = (t[name].float() - bt[name].float()).abs()
                cut = tau.reshape(-1).sort(descending=True).values[max(1, int(d * tau.numel())) - 1]
                at_cut |= tau == cut
            assert bool((bad & ~at_cut).sum() == 0), f"{name}: disagreement away from the magnitude cut"
            tie_diffs += int(bad.sum())
            continue
        assert not bool(bad.any()), f"{name}: max |diff| {float((x - y).abs().max())}"
    assert tie_diffs <= 0.01 * sum(t.numel() for t in a.values())


# (id, YAML with {base} {e1} {e2} {dtype}, the densities of e1 and e2 for the bf16 TIES rule)
CASES = [
    ("linear-base-listed", """
merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {e1}
    parameters: {{weight: 0.3}}
  - model: {e2}
    parameters: {{weight: 0.5}}
dtype: float32
out_dtype: {dtype}
""", ()),
    ("linear-no-base", """
merge_method: linear
models:
  - model: {e1}
    parameters: {{weight: 1.0}}
  - model: {e2}
    parameters: {{weight: 3.0}}
parameters: {{normalize: true}}
dtype: float32
out_dtype: {dtype}
""", ()),
    ("linear-base-global-weight", """
merge_method: linear
base_model: {base}
models:
  - model: {e1}
  - model: {e2}
    parameters: {{weight: 2.0}}
parameters: {{weight: 0.5, normalize: false}}
dtype: float32
out_dtype: {dtype}
""", ()),
    ("task-arithmetic", """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {base}
  - model: {e1}
    parameters: {{weight: 0.8}}
  - model: {e2}
parameters: {{weight: 0.4, lambda: 0.7, int8_mask: true}}
dtype: float32
out_dtype: {dtype}
""", ()),
    ("task-arithmetic-normalize", """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {e1}
    parameters: {{weight: 0.8}}
  - model: {e2}
    parameters: {{weight: -0.3}}
parameters: {{normalize: true}}
dtype: float32
out_dtype: {dtype}
""", ()),
    ("ties", """
merge_method: ties
base_model: {base}
models:
  - model: {e1}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {e2}
    parameters: {{weight: 0.4, density: 0.6}}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
out_dtype: {dtype}
""", (0.3, 0.6)),
    ("ties-lambda", """
merge_method: ties
base_model: {base}
models:
  - model: {e1}
  - model: {e2}
parameters: {{weight: 0.5, density: 0.8, lambda: 1.3, normalize: false}}
dtype: float32
out_dtype: {dtype}
""", (0.8, 0.8)),
    # DARE at density 1 drops nothing in either tool: the sign election (dare_ties) and sum (dare_linear) compare
    ("dare-ties-density-1", """
merge_method: dare_ties
base_model: {base}
models:
  - model: {e1}
    parameters: {{weight: 0.6}}
  - model: {e2}
    parameters: {{weight: 0.5}}
parameters: {{int8_mask: true}}
dtype: float32
out_dtype: {dtype}
""", ()),
    ("dare-linear-density-1", """
merge_method: dare_linear
base_model: {base}
models:
  - model: {e1}
    parameters: {{weight: 0.6, density: 1.0}}
  - model: {e2}
    parameters: {{weight: 0.5, density: 1.0}}
parameters: {{lambda: 0.9}}
dtype: float32
out_dtype: {dtype}
""", ()),
]


@pytest.mark.parametrize("case,text,densities", CASES, ids=[c[0] for c in CASES])
def test_same_yaml_agrees_with_mergekit(trio, tmp_path, case, text, densities):
    dtype, base, e1, e2 = trio
    yml = tmp_path / "merge.yml"
    yml.write_text(text.format(base=base, e1=e1, e2=e2, dtype=dtype))
    ours, theirs = tmp_path / "rlm", tmp_path / "mergekit"
    assert rlm_merge("--config", yml, "--out", ours) == 0
    mergekit_merge(yml.read_text(), theirs)
    assert_agrees(ours, theirs, dtype, base=base, experts=(e1, e2), densities=densities)


def test_dare_uses_rlm_seeded_masks_and_mergekit_defaults(fp32, tmp_path):
    """DARE below density 1 draws random masks: mergekit's are its own, rlm's come from its seeded generators,
    so the YAML merge equals rlm's own config with the same seed, and takes mergekit's DARE defaults
    (rescale on, normalize off)."""
    _, base, e1, e2 = fp32
    for method in ("dare_ties", "dare_linear"):
        yml = tmp_path / f"{method}.yml"
        yml.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                       f"  - model: {e1}\n    parameters: {{weight: 0.6, density: 0.4}}\n"
                       f"  - model: {e2}\n    parameters: {{weight: 0.5}}\n"
                       f"parameters: {{density: 0.7}}\n")
        via_yaml, native, other_seed = tmp_path / f"{method}-y", tmp_path / f"{method}-n", tmp_path / f"{method}-s"
        assert rlm_merge("--config", yml, "--seed", 7, "--out", via_yaml) == 0
        merge_models(MergeRunConfig(method=method, base=str(base), seed=7,
                                    models=[{"path": str(e1), "weight": 0.6, "density": 0.4},
                                            {"path": str(e2), "weight": 0.5, "density": 0.7}]), native)
        assert rlm_merge("--config", yml, "--seed", 8, "--out", other_seed) == 0
        a, b, c = load(via_yaml), load(native), load(other_seed)
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert any(not torch.equal(a[n], c[n]) for n in a)
        man = json.loads((via_yaml / "merge_manifest.json").read_text())
        assert man["method"] == method and man["seed"] == 7
        assert man["method_params"] == {"lambda": 1.0, "normalize": False, "rescale": True}
        assert [(p["weight"], p["density"]) for p in man["model_params"]] == [(0.6, 0.4), (0.5, 0.7)]


def test_linear_maps_to_averaging_and_drops_base_from_task_vectors(fp32, tmp_path):
    _, base, e1, e2 = fp32
    from rlm.core.merge.mergekit import from_mergekit

    lin = from_mergekit({"merge_method": "linear", "models": [{"model": str(e1), "parameters": {"weight": 1}},
                                                             {"model": str(e2), "parameters": {"weight": 2}}]}, "x")
    assert lin == {"method": "averaging", "base": str(e1), "params": {},
                   "models": [{"path": str(e1), "weight": 1}, {"path": str(e2), "weight": 2}]}
    ta = from_mergekit({"merge_method": "ties", "base_model": str(base), "out_dtype": "bfloat16",
                        "models": [{"model": str(base)}, {"model": str(e1), "parameters": {"density": 0.5}}],
                        "parameters": {"weight": 0.5, "int8_mask": False, "rescale": True}}, "x")
    assert ta == {"method": "ties", "base": str(base), "params": {"rescale": True}, "dtype": "bfloat16",
                  "models": [{"path": str(e1), "weight": 0.5, "density": 0.5}]}


REFUSED = [
    ("slices", "slices:\n  - sources:\n      - model: {e1}\n        layer_range: [0, 2]\n", "slices: layer slices"),
    ("modules", "modules: {{}}\n", "modules: "),
    ("tokenizer_source", "tokenizer_source: union\n", "tokenizer_source: rlm keeps the base model's tokenizer"),
    ("tokenizer", "tokenizer: {{source: base}}\n", "tokenizer: rlm keeps"),
    ("chat_template", "chat_template: chatml\n", "chat_template: "),
    ("unknown top-level", "merge_methd: ties\n", "merge_methd: unknown field"),
    ("out_dtype", "out_dtype: float64\n", "out_dtype: 'float64' is not supported"),
    ("dtype", "dtype: int8\n", "dtype: 'int8' is not supported"),
    ("gradient", "parameters: {{lambda: [0.5, 1.0]}}\n", "parameters.lambda: per-layer gradients"),
    ("filter", "parameters:\n  normalize:\n    - filter: mlp\n      value: false\n    - value: true\n",
     "parameters.normalize: filtered values"),
    ("filter-dict", "parameters: {{normalize: {{value: true}}}}\n", "parameters.normalize: filtered values"),
    ("unknown parameter", "parameters: {{densty: 0.5}}\n", "parameters.densty: not a parameter of ties"),
    ("epsilon (della)", "parameters: {{epsilon: 0.1}}\n", "parameters.epsilon: not a parameter of ties"),
]


@pytest.mark.parametrize("field,extra,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_fields_are_refused_in_one_line(fp32, tmp_path, capsys, field, extra, message):
    _, base, e1, _ = fp32
    yml = tmp_path / "m.yml"
    models = f"models:\n  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
    if field == "slices":
        models = ""
    yml.write_text(f"merge_method: ties\nbase_model: {base}\n{models}" + extra.format(e1=e1))
    capsys.readouterr()
    assert rlm_merge("--config", yml, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: mergekit config {yml}: "), err
    assert message in err[0], err[0]
    assert not (tmp_path / "out").exists()


MODEL_REFUSALS = [
    ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {e1}\n", "merge_method: 'slerp' is not supported"),
    ("merge_method: della\nbase_model: {base}\nmodels:\n  - model: {e1}\n", "merge_method: 'della' is not supported"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {e1}\n",
     "merge_method: 'model_stock' is not supported"),
    ("merge_method: ties\nmodels:\n  - model: {e1}\n    parameters: {{weight: 1}}\n", "base_model: required by ties"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{density: 0.5}}\n",
     "models.0.parameters.weight: missing"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 1, normalize: 1}}\n",
     "models.0.parameters.normalize: a global parameter"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: [1, 0]}}\n",
     "models.0.parameters.weight: per-layer gradients"),
    ("merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 1}}\n",
     "base_model: mergekit's linear averages the base_model too"),
    ("merge_method: linear\nmodels:\n  - model: {e1}\n    parameters: {{weight: 1}}\nparameters: {{int8_mask: true}}\n",
     "parameters.int8_mask: not a parameter of averaging"),
    ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n",
     "models: every entry is the base_model"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e1}+some/lora\n    parameters: {{weight: 1}}\n",
     "model+lora references are not supported"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e1}\n    weight: 1\n",
     "models.0.weight: unknown field"),
    ("merge_method: ties\nbase_model: {base}\nmodels: []\n", "models: a non-empty list"),
]


@pytest.mark.parametrize("text,message", MODEL_REFUSALS, ids=[m[1].split(":")[0] + str(i)
                                                               for i, m in enumerate(MODEL_REFUSALS)])
def test_unsupported_methods_and_model_entries_are_refused(fp32, tmp_path, capsys, text, message):
    _, base, e1, _ = fp32
    yml = tmp_path / "m.yml"
    yml.write_text(text.format(base=base, e1=e1))
    capsys.readouterr()
    assert rlm_merge("--config", yml, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_flags_and_set_still_apply_over_a_mergekit_file(fp32, tmp_path):
    """``--set`` and flags override the translated mergekit file like rlm's own config."""
    _, base, e1, e2 = fp32
    yml = tmp_path / "m.yml"
    yml.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {e1}\n"
                   f"  - model: {e2}\nparameters: {{weight: 0.5, lambda: 2.0}}\n")
    out = tmp_path / "out"
    assert rlm_merge("--config", yml, "--lambda", 0.5, "--set", "workers=0", "--weights", "1,0.25", "--out", out) == 0
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["method_params"]["lambda"] == 0.5 and man["config"]["workers"] == 0
    assert [p["weight"] for p in man["model_params"]] == [1.0, 0.25]
