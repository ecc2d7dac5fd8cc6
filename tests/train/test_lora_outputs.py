"""What a LoRA training run writes to ``final/`` and how every command that takes a model reads it: the PEFT
adapter at the top (loadable by peft), the merged model in ``final/merged/`` (unless ``lora.merge_lora`` is
false), ``rlm merge`` / ``rlm conflicts`` reading the adapter as a task vector, and ``load_model`` /
``resolve_model`` / ``ModelReader`` finding the full model. References are computed independently: peft's own
``merge_and_unload`` and base + (alpha / r)·B@A by hand in float64."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import rlm_cli

from rlm.core.errors import ModelError

R, ALPHA = 4, 16.0
TRAIN = ["train", "--trainer", "sft", "--task", "digits", "--no-progress", "--set", "num_threads=1",
         "--set", "batch_size=4", "--set", "lr=5e-3", "--set", "lora.enabled=true", "--set", f"lora.r={R}",
         "--set", f"lora.alpha={ALPHA}"]


@pytest.fixture(scope="module")
def cli():
    with rlm_cli() as run:
        yield run


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory):
    """Two LoRA runs from the tiny model, identical but for ``lora.merge_lora``."""
    root = tmp_path_factory.mktemp("lora-runs")
    assert cli(*TRAIN, "--model", "tiny", "--steps", 2, "--out", root / "merged") == 0
    assert cli(*TRAIN, "--model", "tiny", "--steps", 2, "--set", "lora.merge_lora=false",
               "--out", root / "adapter_only") == 0
    return {"root": root, "merged": root / "merged" / "final", "adapter_only": root / "adapter_only" / "final"}


def tiny_path() -> str:
    from rlm.core.models.hf import resolve_model

    return resolve_model("tiny")


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path(), dtype=torch.float32)


def peft_merged(adapter: Path) -> dict[str, torch.Tensor]:
    """peft's own reading of the adapter: the tiny base with the adapter merged in (fp32)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(), str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def by_hand(adapter: Path) -> dict[str, torch.Tensor]:
    """base + (alpha / r)·B@A in float64 for every adapted tensor, from the adapter's safetensors."""
    a = load_file(str(adapter / "adapter_model.safetensors"))
    base = load_file(str(Path(tiny_path()) / "model.safetensors"))
    out = {}
    for key, lora_a in a.items():
        if ".lora_A." not in key:
            continue
        lora_b = a[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        out[name] = base[name].double() + ALPHA / R * (lora_b.double() @ lora_a.double())
    return out


def adapted_tensors() -> int:
    """Tensors the default LoRA targets adapt: 7 modules in each of the tiny model's layers."""
    return 7 * json.loads((Path(tiny_path()) / "config.json").read_text())["num_hidden_layers"]


def hf_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_moved_and_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 1e-6):
    """``got`` equals ``ref`` on every tensor of ``ref`` while the adapted tensors moved clearly away from the
    base (so the comparison can fail)."""
    base = hf_weights(Path(tiny_path()))
    moved = 0
    for name, value in ref.items():
        torch.testing.assert_close(got[name].double(), value.double(), rtol=1e-5, atol=atol, msg=name)
        moved += float((value.double() - base[name].double()).abs().max()) > 1000 * atol
    assert moved == adapted_tensors()


def test_final_holds_the_adapter_tokenizer_and_merged_model(runs):
    from peft import PeftModel

    final = runs["merged"]
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer_config.json").is_file()
    assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_path() and Path(cfg["base_model_name_or_path"]).is_absolute()
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA
    merged = final / "merged"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in merged.iterdir()}
    m = hf_weights(merged)
    assert not any("lora" in k for k in m)
    # peft loads the adapter on the base; its merged weights are final/merged's
    peft_model = PeftModel.from_pretrained(base_model(), str(final))
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == adapted_tensors()
    ref = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    assert set(ref) == set(m)
    assert_moved_and_close(m, ref)
    assert_moved_and_close(m, by_hand(final), atol=1e-6)


def test_full_model_readers_find_final_merged(runs):
    from rlm.core.models.hf import load_model, resolve_model
    from rlm.core.models.lora import LoraReader, open_source
    from rlm.core.models.reader import ModelReader

    final = runs["merged"]
    assert resolve_model(final) == str(final / "merged")
    assert ModelReader(final).path == final / "merged"
    model, tok = load_model(final)
    m = hf_weights(final / "merged")
    assert all(torch.equal(v, m[k]) for k, v in model.state_dict().items())
    assert tok.eos_token_id is not None
    # as an expert the directory is its adapter
    assert isinstance(open_source(final, ModelReader(tiny_path())), LoraReader)


def test_a_lora_final_as_merge_base_is_its_merged_model(cli, runs, tmp_path):
    """``--base final`` reads final/merged: averaging the tiny model into it gives (merged + tiny) / 2, with
    merged/'s config beside the weights."""
    final = runs["merged"]
    out = tmp_path / "avg"
    assert cli("merge", "--method", "averaging", "--base", final, "--models", f"{final / 'merged'},{tiny_path()}",
               "--out", out) == 0
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    got, m, t = hf_weights(out), hf_weights(final / "merged"), hf_weights(Path(tiny_path()))
    for name, value in got.items():
        torch.testing.assert_close(value, (m[name] + t[name]) / 2, rtol=1e-5, atol=1e-6, msg=name)


def test_merge_takes_the_final_dir_as_a_lora_expert(cli, runs, tmp_path):
    """Task arithmetic with λ = 1 and the run's final/ as the one expert gives base + (alpha / r)·B@A."""
    final = runs["merged"]
    out = tmp_path / "merge"
    assert cli("merge", "--method", "task_arithmetic", "--lambda", "1", "--base", "tiny", "--models", final,
               "--out", out) == 0
    got = hf_weights(out)
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["model_params"][0]["kind"] == "lora"
    assert_moved_and_close(got, by_hand(final))
    ref = peft_merged(final)
    for name, value in got.items():  # every tensor, the untouched ones equal to the base
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_conflicts_takes_the_final_dir(cli, runs, tmp_path):
    """The adapter's task vector is that of final/merged: same update norm, cosine 1, no sign conflicts."""
    final = runs["merged"]
    out = tmp_path / "conflicts"
    assert cli("conflicts", "--base", "tiny", "--models", f"lora={final},merged={final / 'merged'}",
               "--out", out) == 0
    data = json.loads((out / "conflicts.json").read_text())
    ref = by_hand(final)
    base = hf_weights(Path(tiny_path()))
    norm = sum(float((v - base[k].double()).pow(2).sum()) for k, v in ref.items()) ** 0.5
    assert data["models"]["lora"]["update_norm"] == pytest.approx(norm, rel=1e-5)
    assert data["models"]["merged"]["update_norm"] == pytest.approx(norm, rel=1e-4)
    assert data["pairs"]["lora|merged"]["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_merge_lora_false_writes_only_the_adapter_and_load_model_merges_it(runs):
    from rlm.core.models.hf import load_model, resolve_model
    from rlm.core.models.reader import ModelReader

    final = runs["adapter_only"]
    assert (final / "adapter_model.safetensors").is_file() and not (final / "merged").exists()
    # the same training as the merged run: merge_lora changes what is written, not what is trained
    a = load_file(str(final / "adapter_model.safetensors"))
    b = load_file(str(runs["merged"] / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resolve_model(final) == str(final)
    model, tok = load_model(final)
    assert tok.eos_token_id is not None
    assert_moved_and_close({k: v.detach() for k, v in model.state_dict().items()}, peft_merged(final))
    model16, _ = load_model(final, dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="LoRA adapter without a merged model"):
        ModelReader(final)


def test_adapter_with_a_missing_base_names_it(runs, tmp_path):
    from rlm.core.models.hf import load_model

    moved = tmp_path / "final"
    shutil.copytree(runs["adapter_only"], moved)
    cfg_file = moved / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"base model .*gone/base \(base_model_name_or_path in .*adapter_config"):
        load_model(moved)


def test_training_starts_from_an_adapter_only_final(cli, runs, tmp_path):
    """A previous LoRA run's adapter-only final/ is a start model: full fine-tuning starts from base + ΔW."""
    out = tmp_path / "next"
    assert cli("train", "--trainer", "sft", "--task", "digits", "--model", runs["adapter_only"], "--steps", "1",
               "--no-progress", "--set", "num_threads=1", "--set", "batch_size=4", "--set", "lr=1e-9",
               "--out", out) == 0
    got = hf_weights(out / "final")
    ref = peft_merged(runs["adapter_only"])
    # lr 1e-9: one Adam step moves each weight by at most ~1e-9
    assert_moved_and_close(got, ref, atol=1e-6)


def test_lora_on_an_adapter_only_final_chains_the_adapters(cli, runs, tmp_path):
    """A LoRA run started from an adapter-only final/ records that directory as its base; load_model applies
    both adapters in turn, as peft does."""
    from peft import PeftModel

    from rlm.core.models.hf import load_model

    out = tmp_path / "chain"
    assert cli(*TRAIN, "--model", runs["adapter_only"], "--steps", 1, "--set", "lora.merge_lora=false",
               "--out", out) == 0
    final = out / "final"
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(runs["adapter_only"].resolve())
    first = PeftModel.from_pretrained(base_model(), str(runs["adapter_only"])).merge_and_unload()
    ref = PeftModel.from_pretrained(first, str(final)).merge_and_unload().state_dict()
    model, _ = load_model(final)
    got = model.state_dict()
    assert set(got) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    one = peft_merged(runs["adapter_only"])
    assert any(not torch.allclose(got[k], one[k], atol=1e-5) for k in one)  # the second adapter moved it
