"""``rlm conflicts`` end to end: experts built by perturbing the tiny model with known deltas, statistics
checked against float64 NumPy on the saved files, the JSON contract, reports, plots, over-steps and bad input."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlm.core.cli import main
from rlm.core.conflicts.config import ConflictsConfig
from rlm.core.conflicts.engine import compute_conflicts
from rlm.core.conflicts.over_steps import compute_over_steps
from rlm.core.errors import ModelError, RlmError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_np(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def make_expert(base_dir: Path, out: Path, seed: int, scale: float = 1e-3, zero_frac: float = 0.5,
                edit=None) -> Path:
    """A copy of the base with τ = scale·N(0,1) on a random (1 − zero_frac) share of every tensor."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    sd = load_np(base_dir)
    new = {}
    for name, w in sd.items():
        d = (rng.standard_normal(w.shape) * scale).astype(w.dtype)
        d[rng.random(w.shape) < zero_frac] = 0
        new[name] = w + d
    if edit is not None:
        edit(new)
    out.mkdir(parents=True)
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base_dir / "config.json", out / "config.json")
    return out


@pytest.fixture(scope="module")
def experts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {"sft": make_expert(tiny_model_dir, root / "sft", 1, scale=3e-3, zero_frac=0.2),
            "rl": make_expert(tiny_model_dir, root / "rl", 2, scale=1e-4, zero_frac=0.8),
            "rft": make_expert(tiny_model_dir, root / "rft", 3, scale=1e-3, zero_frac=0.5)}


def np_task_vectors(base_dir: Path, experts: dict[str, Path]) -> dict[str, np.ndarray]:
    base = load_np(base_dir)
    names = sorted(base)
    out = {}
    for n, d in experts.items():
        sd = load_np(d)
        out[n] = np.concatenate([sd[t].astype(np.float64).ravel() - base[t].astype(np.float64).ravel()
                                 for t in names])
    return out


def np_kept(x: np.ndarray, k: float, bits: int = 20) -> np.ndarray:
    q = (np.abs(x).astype(np.float32).view(np.int32) >> (32 - bits)).astype(np.int64)
    need = max(1, math.floor(k * x.size + 0.5))
    return (q >= np.sort(q)[::-1][need - 1]) & (x != 0)


def test_engine_matches_numpy_and_is_independent_of_block_size(tiny_model_dir, experts):
    cfg = ConflictsConfig(kept_rates=[0.01, 0.1, 0.5, 1.0], topk_modes=["global"])
    small = ConflictsConfig(kept_rates=[0.01, 0.1, 0.5, 1.0], topk_modes=["global"], chunk_elements=20000)
    res = compute_conflicts(tiny_model_dir, experts, cfg).data
    res_small = compute_conflicts(tiny_model_dir, experts, small).data
    tv = np_task_vectors(tiny_model_dir, experts)
    kept = {(n, k): np_kept(x, k) for n, x in tv.items() for k in cfg.kept_rates}
    for n, x in tv.items():
        m = res["models"][n]
        assert m["update_norm"] == pytest.approx(np.linalg.norm(x), rel=1e-12)
        assert m["fraction_updated"] == pytest.approx((np.abs(x) > 1e-5).mean(), abs=1e-15)
        assert m["num_params"] == x.size
        assert m["kept_fraction"]["global"] == [kept[n, k].sum() / x.size for k in cfg.kept_rates]
        assert res_small["models"][n]["update_norm"] == pytest.approx(m["update_norm"], rel=1e-12)
    for a, b in itertools.combinations(experts, 2):
        p = res["pairs"][f"{a}|{b}"]
        prod = tv[a] * tv[b]
        assert p["conflict_norm"] == pytest.approx(np.sqrt(np.sum(prod[prod < 0] ** 2)), rel=1e-10)
        assert p["cosine"] == pytest.approx(np.dot(tv[a], tv[b]) / np.linalg.norm(tv[a]) / np.linalg.norm(tv[b]),
                                            rel=1e-9, abs=1e-12)
        for g, k in enumerate(cfg.kept_rates):
            ka, kb = kept[a, k], kept[b, k]
            both = ka & kb
            assert p["sign_conflict"]["both_kept"][g] == both.sum()
            assert p["sign_conflict"]["rate"][g] == pytest.approx((both & (prod < 0)).sum() / both.sum())
        assert res_small["pairs"][f"{a}|{b}"]["sign_conflict"] == p["sign_conflict"]
        assert res_small["pairs"][f"{a}|{b}"]["conflict_norm"] == pytest.approx(p["conflict_norm"], rel=1e-12)
    # the paper's ordering by construction: SFT moves most, RL least
    assert res["models"]["sft"]["update_norm"] > res["models"]["rft"]["update_norm"] > res["models"]["rl"]["update_norm"]


def test_cli_writes_contract_json_report_plots_and_manifest(tiny_model_dir, experts, tmp_path):
    out = tmp_path / "conf"
    models = ",".join(f"{n}={p}" for n, p in experts.items())
    assert main(["conflicts", "--base", str(tiny_model_dir), "--models", models, "--out", str(out),
                 "--set", "kept_rates=[0.01,0.1,0.2,0.5,1.0]"]) == 0
    data = json.loads((out / "conflicts.json").read_text())
    assert list(data) == ["threshold", "models", "pairs"]
    assert data["threshold"] == 1e-05
    assert list(data["models"]) == ["sft", "rl", "rft"]
    assert list(data["pairs"]) == ["sft|rl", "sft|rft", "rl|rft"]  # command-line order
    for v in data["models"].values():
        assert isinstance(v["update_norm"], float) and isinstance(v["fraction_updated"], float)
        assert 0 <= v["fraction_updated"] <= 1
    for v in data["pairs"].values():
        assert isinstance(v["conflict_norm"], float) and isinstance(v["cosine"], float)
        sc = v["sign_conflict"]
        assert sc["kept_rate"] == [0.01, 0.1, 0.2, 0.5, 1.0]
        assert len(sc["rate"]) == len(sc["kept_rate"]) and all(0 <= r <= 1 for r in sc["rate"])
        assert len(sc["per_tensor"]["rate"]) == len(sc["kept_rate"])
    report = (out / "report.md").read_text()
    assert "| sft |" in report and "sft vs rl" in report and "conflict norm" in report
    for png in ("sign_conflict.png", "layer_norms.png"):
        raw = (out / png).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 5000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["kept_rates"] == [0.01, 0.1, 0.2, 0.5, 1.0]
    assert set(manifest["inputs"]) == {"base", "sft", "rl", "rft"}
    assert not list(tmp_path.glob(".conf.*"))  # no temporary directory left behind
    # an existing output is refused unless --overwrite
    assert main(["conflicts", "--base", str(tiny_model_dir), "--models", models, "--out", str(out)]) == 2
    assert main(["conflicts", "--base", str(tiny_model_dir), "--models", models, "--out", str(out),
                 "--metrics", "update_norm,fraction_updated,conflict_norm,cosine", "--overwrite",
                 "--threshold", "1e-3"]) == 0
    data = json.loads((out / "conflicts.json").read_text())
    assert data["threshold"] == 1e-3 and "sign_conflict" not in data["pairs"]["sft|rl"]
    assert not (out / "sign_conflict.png").exists()


def test_base_tiny_is_accepted(tmp_path, capsys):
    from rlm.core.models.hf import resolve_model

    base = Path(resolve_model("tiny"))
    a = make_expert(base, tmp_path / "a", 7, zero_frac=0.9)
    out = tmp_path / "o"
    assert main(["conflicts", "--base", "tiny", "--models", f"a={a}", "--out", str(out),
                 "--metrics", "update_norm,fraction_updated"]) == 0
    data = json.loads((out / "conflicts.json").read_text())
    assert data["pairs"] == {} and 0.05 < data["models"]["a"]["fraction_updated"] < 0.15


def test_fewer_than_two_models_is_a_clear_error(tiny_model_dir, experts, tmp_path, capsys):
    assert main(["conflicts", "--base", str(tiny_model_dir), "--models", f"sft={experts['sft']}",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "at least two models" in err and "sft" in err
    assert not (tmp_path / "o").exists()


def test_bad_inputs_name_the_model_and_tensor(tiny_model_dir, experts, tmp_path):
    def nan(sd):
        sd["model.layers.1.mlp.up_proj.weight"][0, 3] = np.nan

    bad = make_expert(tiny_model_dir, tmp_path / "nan", 9, edit=nan)
    with pytest.raises(ModelError, match=r"nan.*model\.layers\.1\.mlp\.up_proj\.weight.*non-finite"):
        compute_conflicts(tiny_model_dir, {"a": experts["sft"], "b": bad})

    def shape(sd):
        sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"][:, :-1].copy()

    wrong = make_expert(tiny_model_dir, tmp_path / "shape", 10, edit=shape)
    with pytest.raises(ModelError, match=r"shape.*model\.layers\.0\.mlp\.down_proj\.weight"):
        compute_conflicts(tiny_model_dir, {"a": experts["sft"], "b": wrong})

    def drop(sd):
        del sd["model.norm.weight"]

    missing = make_expert(tiny_model_dir, tmp_path / "missing", 11, edit=drop)
    with pytest.raises(ModelError, match=r"missing.*model\.norm\.weight"):
        compute_conflicts(tiny_model_dir, {"a": experts["sft"], "b": missing})
    with pytest.raises(ModelError, match="does not exist"):
        compute_conflicts(tiny_model_dir, {"a": experts["sft"], "b": tmp_path / "nowhere"})
    from rlm.core.cli.conflicts import parse_named_dirs

    with pytest.raises(RlmError, match="given twice"):
        parse_named_dirs(f"a={experts['sft']},a={experts['rl']}", "models")
    with pytest.raises(RlmError, match="may not contain"):
        parse_named_dirs(f"a|b={experts['sft']}", "models")
    assert parse_named_dirs(f"x={experts['sft']}, {experts['rl']}", "models") == {
        "x": str(experts["sft"]), "rl": str(experts["rl"])}


def test_over_steps_norms_and_conflict_norms(tiny_model_dir, tmp_path):
    runs = {}
    for r, seed in (("grpo", 20), ("sft", 30)):
        for step in (10, 20, 30):
            if r == "grpo" and step == 30:
                continue  # steps common to both runs: 10, 20
            make_expert(tiny_model_dir, tmp_path / r / "checkpoints" / f"step-{step}", seed + step,
                        scale=1e-4 * step, zero_frac=0.5)
        runs[r] = tmp_path / r
    out = tmp_path / "steps"
    spec = ",".join(f"{n}={p}" for n, p in runs.items())
    assert main(["conflicts", "--over-steps", "--base", str(tiny_model_dir), "--runs", spec, "--out", str(out)]) == 0
    data = json.loads((out / "over_steps.json").read_text())
    assert data["steps"] == [10, 20]
    for i, step in enumerate(data["steps"]):
        dirs = {n: p / "checkpoints" / f"step-{step}" for n, p in runs.items()}
        tv = np_task_vectors(tiny_model_dir, dirs)
        for n in runs:
            assert data["models"][n]["update_norm"][i] == pytest.approx(np.linalg.norm(tv[n]), rel=1e-12)
        prod = tv["grpo"] * tv["sft"]
        assert data["pairs"]["grpo|sft"]["conflict_norm"][i] == pytest.approx(
            np.sqrt(np.sum(prod[prod < 0] ** 2)), rel=1e-10)
    assert data["models"]["sft"]["update_norm"][1] > data["models"]["sft"]["update_norm"][0]
    for png in ("norm_vs_step.png", "conflict_norm_vs_step.png"):
        raw = (out / png).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 5000
    assert (out / "manifest.json").is_file() and "| 10 |" in (out / "report.md").read_text()
    with pytest.raises(RlmError, match="at least two runs"):
        compute_over_steps(tiny_model_dir, {"grpo": runs["grpo"]})
    with pytest.raises(RlmError, match="no checkpoints"):
        compute_over_steps(tiny_model_dir, {"grpo": runs["grpo"], "x": tmp_path})


def test_lora_adapter_is_read_as_a_task_vector(tiny_model_dir, experts, tmp_path):
    """A PEFT LoRA adapter directory (written by hand in PEFT's layout) works as a model: its τ is
    (lora_alpha / r)·B@A on the target tensors and zero elsewhere."""
    from safetensors.numpy import save_file

    base = load_np(tiny_model_dir)
    rng = np.random.default_rng(5)
    r, alpha = 4, 8
    adapter, tau = {}, {}
    for t in sorted(base):
        if t.endswith(("q_proj.weight", "v_proj.weight")):
            out_f, in_f = base[t].shape
            a = rng.standard_normal((r, in_f)).astype(np.float32) * 0.01
            b = rng.standard_normal((out_f, r)).astype(np.float32) * 0.01
            mod = "base_model.model." + t[: -len(".weight")]
            adapter[mod + ".lora_A.weight"], adapter[mod + ".lora_B.weight"] = a, b
            tau[t] = (alpha / r) * (b.astype(np.float64) @ a.astype(np.float64))
        else:
            tau[t] = np.zeros(base[t].size)
    (tmp_path / "lora").mkdir()
    save_file(adapter, str(tmp_path / "lora" / "adapter_model.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"]}))
    flat = np.concatenate([tau[t].ravel() for t in sorted(base)])
    res = compute_conflicts(tiny_model_dir, {"lora": tmp_path / "lora", "sft": experts["sft"]},
                              ConflictsConfig(metrics=["update_norm", "cosine"])).data
    assert res["models"]["lora"]["update_norm"] == pytest.approx(np.linalg.norm(flat), rel=1e-6)
    assert res["models"]["lora"]["update_norm_per_module"]["mlp.up_proj"] == 0.0
    sft = np_task_vectors(tiny_model_dir, {"sft": experts["sft"]})["sft"]
    assert res["pairs"]["lora|sft"]["cosine"] == pytest.approx(
        np.dot(flat, sft) / np.linalg.norm(flat) / np.linalg.norm(sft), rel=1e-4, abs=1e-9)
