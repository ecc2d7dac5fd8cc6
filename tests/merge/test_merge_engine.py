"""The streaming merge engine end to end on small random Llama models: results equal the per-tensor method
applied to whole tensors, whatever the row chunking, worker threads or shard size; the output loads in
transformers with the base's config and tokenizer; LoRA adapters, .bin checkpoints, vocabulary policies;
the reader and writer on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlm.core.merge.engine import MergeRunConfig, merge_models
from rlm.core.models.reader import ModelReader
from rlm.core.models.validate import validate_models
from rlm.core.models.writer import ShardedWriter

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def make_llama(path: Path, seed: int, *, base: Path | None = None, scale: float = 0.01, dtype=torch.float32,
               shard: str | None = None, **overrides):
    """A random tiny Llama saved as an HF directory; with ``base``, the base's weights plus noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    if base is not None:
        ref = ModelReader(base)
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for name, value in model.state_dict().items():
            b = ref.get(name).float()
            if b.shape != value.shape:  # a larger vocabulary: new rows random
                b = torch.cat([b, value[b.shape[0]:].float()])
            sd[name] = b + scale * torch.randn(b.shape, generator=g)
        model.load_state_dict(sd)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-models")
    base = make_llama(root / "base", 0, shard="40KB")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    e1 = make_llama(root / "e1", 1, base=base)
    e2 = make_llama(root / "e2", 2, base=base, shard="30KB")
    return {"root": root, "base": base, "e1": e1, "e2": e2}


def load(path: Path) -> dict[str, torch.Tensor]:
    r = ModelReader(path)
    return {n: r.get(n) for n in r.tensor_names()}


def merge_whole(method, base, deltas, params, *, name="w", seed=0):
    """What the engine does for one whole fp32 tensor: prepare per model, then merge."""
    from rlm.core.contracts import MergeContext

    ctx = MergeContext(tensor_name=name, shape=tuple(base.shape), seed=seed)
    for i in range(len(deltas)):
        ctx.model_index = i
        ctx.stats.append(method.prepare(deltas[i], params[i], context=ctx))
    ctx.model_index = None
    return method.merge(base, deltas, params, context=ctx)


def direct(method_cls, base, experts, params, config=None, seed=0):
    """Reference: the method applied to whole tensors (prepare per model, then merge) in fp32."""
    m = method_cls(config or {})
    mp = [m.ModelParams(**p) for p in params]
    b, es = load(base), [load(e) for e in experts]
    out = {}
    for name, bt in b.items():
        bf = bt.float()
        d = torch.stack([e[name].float() - bf for e in es])
        out[name] = merge_whole(m, bf, d, mp, name=name, seed=seed).to(bt.dtype)
    return out


METHODS = ["averaging", "task_arithmetic", "ties", "dare_ties", "dare_linear"]


def _cls(name):
    from rlm.core.plugins import get_plugin

    return get_plugin("merge_method", name)


def _params(name):
    return [{"weight": 0.6}, {"weight": 0.4}] if name in ("averaging", "task_arithmetic") else \
        [{"weight": 0.6, "density": 0.7}, {"weight": 0.4, "density": 0.5}]


@pytest.mark.parametrize("method", METHODS)
def test_engine_equals_whole_tensor_method_under_chunks_threads_and_shards(models, tmp_path, method):
    params = _params(method)
    entries = [{"path": str(models["e1"]), **params[0]}, {"path": str(models["e2"]), **params[1]}]
    ref = direct(_cls(method), models["base"], [models["e1"], models["e2"]], params, seed=5)
    outs = []
    configs = [dict(workers=0), dict(workers=3, chunk_elements=100, whole_elements=100, max_shard_bytes=20_000),
               dict(workers=1, chunk_elements=100, threads=0)]  # streamed / whole-then-blocks
    for i, extra in enumerate(configs):
        run = MergeRunConfig(method=method, base=str(models["base"]), models=entries, seed=5, **extra)
        out = tmp_path / f"out{i}"
        merge_models(run, out)
        got = load(out)
        assert list(got) == list(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=2e-7, msg=name)
        outs.append(out)
    assert (outs[1] / "model.safetensors.index.json").is_file()
    assert len(list(outs[1].glob("model-*-of-*.safetensors"))) > 1
    assert (outs[0] / "model.safetensors").is_file()


def test_ties_with_tied_magnitudes_is_chunk_invariant(tmp_path):
    """bf16 task vectors have many equal magnitudes; the exact-k cut must not depend on row blocks."""
    base = make_llama(tmp_path / "b", 0, dtype=torch.bfloat16)
    e1 = make_llama(tmp_path / "e1", 1, base=base, dtype=torch.bfloat16, scale=0.002)
    e2 = make_llama(tmp_path / "e2", 2, base=base, dtype=torch.bfloat16, scale=0.002)
    outs = []
    for i, (chunk, whole) in enumerate(((1 << 30, 1 << 30), (64, 64), (7, 1 << 30), (7, 7))):
        run = MergeRunConfig(method="ties", base=str(base), models=[str(e1), str(e2)], preset="paper",
                             chunk_elements=chunk, whole_elements=whole, workers=i)
        merge_models(run, tmp_path / f"o{i}")
        outs.append(load(tmp_path / f"o{i}"))
    for o in outs[1:]:
        assert all(torch.equal(o[n], outs[0][n]) for n in o)
    ref = direct(_cls("ties"), base, [e1, e2], [{"weight": 0.5, "density": 0.8}] * 2)
    assert all(torch.equal(outs[0][n], ref[n]) for n in ref)


def test_output_is_a_loadable_model_with_base_config_tokenizer_and_manifest(models, tmp_path):
    from transformers import AutoModelForCausalLM

    run = MergeRunConfig(method="ties", base=str(models["base"]), models=[str(models["e1"]), str(models["e2"])],
                         preset="paper", seed=11, max_shard_bytes=30_000)
    out = tmp_path / "merged"
    merge_models(run, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    ref = direct(_cls("ties"), models["base"], [models["e1"], models["e2"]], [{"weight": 0.5, "density": 0.8}] * 2)
    for name, value in ref.items():
        torch.testing.assert_close(sd[name], value, rtol=0, atol=2e-7)
    assert json.loads((out / "config.json").read_text()) == json.loads((models["base"] / "config.json").read_text())
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 77}
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["method"] == "ties" and man["seed"] == 11 and man["config"]["preset"] == "paper"
    assert [p["weight"] for p in man["model_params"]] == [0.5, 0.5]
    assert [p["density"] for p in man["model_params"]] == [0.8, 0.8]
    assert man["method_params"] == {"lambda": 1.0, "normalize": True, "rescale": False}
    assert man["versions"]["rlm"] and man["inputs"]["model_1"]["path"].endswith("e2")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_dare_is_reproducible_and_seed_dependent(models, tmp_path):
    def go(seed, name):
        run = MergeRunConfig(method="dare_ties", base=str(models["base"]),
                             models=[str(models["e1"]), str(models["e2"])], preset="paper", seed=seed)
        merge_models(run, tmp_path / name)
        return load(tmp_path / name)

    a, b, c = go(1, "a"), go(1, "b"), go(2, "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_bf16_inputs_give_bf16_output_and_dtype_option(models, tmp_path):
    root = tmp_path
    base = make_llama(root / "b16", 0, dtype=torch.bfloat16)
    e1 = make_llama(root / "e16", 1, base=base, dtype=torch.bfloat16)
    merge_models(MergeRunConfig(method="task_arithmetic", base=str(base), models=[str(e1)]), root / "o1")
    got = load(root / "o1")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    torch.testing.assert_close(got["model.norm.weight"], load(e1)["model.norm.weight"], rtol=0, atol=0)
    merge_models(MergeRunConfig(method="task_arithmetic", base=str(base), models=[str(e1)], dtype="float32"),
                 root / "o2")
    assert all(t.dtype == torch.float32 for t in load(root / "o2").values())
    assert json.loads((root / "o2" / "config.json").read_text())["dtype"] == "float32"


def test_bin_checkpoint_input_matches_safetensors(models, tmp_path):
    import shutil

    binned = tmp_path / "e1bin"
    binned.mkdir()
    shutil.copy(models["e1"] / "config.json", binned)
    torch.save(load(models["e1"]), binned / "pytorch_model.bin")
    r = ModelReader(binned)
    assert r.format == "bin" and r.tensor_names() == list(load(models["e1"]))
    a = tmp_path / "a"
    merge_models(MergeRunConfig(method="ties", base=str(models["base"]), models=[str(binned), str(models["e2"])]), a)
    b = tmp_path / "b"
    merge_models(MergeRunConfig(method="ties", base=str(models["base"]), models=[str(models["e1"]), str(models["e2"])]), b)
    la, lb = load(a), load(b)
    assert all(torch.equal(la[n], lb[n]) for n in la)


def test_lora_adapter_is_a_task_vector(models, tmp_path):
    """ΔW = scaling·B@A without materialising the model: task arithmetic with the adapter equals peft's
    merge_and_unload of the same adapter (an independent reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["base"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                     rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6})
    torch.manual_seed(3)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_ref = peft_model.merge_and_unload().state_dict()
    out = tmp_path / "out"
    merge_models(MergeRunConfig(method="task_arithmetic", base=str(models["base"]),
                                models=[str(tmp_path / "adapter")]), out)
    got = load(out)
    changed = 0
    for name, value in got.items():
        torch.testing.assert_close(value, merged_ref[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(value, load(models["base"])[name])
    assert changed == 2 * 3  # q, v, down in each of 2 layers
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["model_params"][0]["kind"] == "lora"


def test_vocab_policies(models, tmp_path):
    from rlm.core.errors import ModelError

    big = make_llama(tmp_path / "big", 4, base=models["base"], vocab_size=72)
    base_r = ModelReader(models["base"])
    with pytest.raises(ModelError, match=r"big.*model.embed_tokens.weight.*vocabulary size 72.*--vocab"):
        validate_models(base_r, [ModelReader(big)])
    runs = {}
    for policy in ("truncate", "base"):
        out = tmp_path / policy
        merge_models(MergeRunConfig(method="task_arithmetic", base=str(models["base"]), vocab=policy,
                                    models=[str(big), str(models["e1"])]), out)
        runs[policy] = load(out)
        assert runs[policy]["lm_head.weight"].shape == (64, 32)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    b, e1, bg = load(models["base"]), load(models["e1"]), load(big)
    expect = b["lm_head.weight"] + (bg["lm_head.weight"][:64] - b["lm_head.weight"]) + (e1["lm_head.weight"] - b["lm_head.weight"])
    torch.testing.assert_close(runs["truncate"]["lm_head.weight"], expect, rtol=0, atol=1e-6)
    # a smaller expert vocabulary under the base policy: rows the expert lacks keep a zero task vector
    small = make_llama(tmp_path / "small", 5, base=None, vocab_size=60)
    out = tmp_path / "small_out"
    with pytest.raises(ModelError):
        merge_models(MergeRunConfig(method="task_arithmetic", base=str(models["base"]), models=[str(small)]), out)
    merge_models(MergeRunConfig(method="task_arithmetic", base=str(models["base"]), vocab="base",
                                models=[str(small)], check_descent=False), out)  # small is unrelated
    got, sm = load(out)["model.embed_tokens.weight"], load(small)["model.embed_tokens.weight"]
    torch.testing.assert_close(got[:60], sm, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[60:], b["model.embed_tokens.weight"][60:], rtol=0, atol=0)


def test_reader_plans_from_headers_in_shard_order(models):
    r = ModelReader(models["base"])
    index = json.loads((models["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    files = [index[n] for n in r.tensor_names()]
    assert files == sorted(files) and len(set(files)) > 1  # shard order
    assert set(r.tensor_names()) == set(index)
    assert r.shape("model.embed_tokens.weight") == (64, 32) and r.dtype("model.norm.weight") == torch.float32
    full = r.get("lm_head.weight")
    assert torch.equal(r.get("lm_head.weight", rows=(10, 20)), full[10:20])


def test_writer_positional_blocks_any_order(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(10, 3), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(()).bfloat16(),
               "d": torch.randn(5, 2, 2).half()}
    w = ShardedWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=60)
    w.write("d", tensors["d"])
    w.write("a", tensors["a"][4:], rows_offset=4)
    w.write("c", tensors["c"])
    w.write("a", tensors["a"][:4])
    w.write("b", tensors["b"])
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    back = {}
    for f in set(index["weight_map"].values()):
        back.update(load_file(tmp_path / f))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_writer_refuses_incomplete_output(tmp_path):
    from rlm.core.errors import ModelError

    w = ShardedWriter(tmp_path, [("a", (4, 2), torch.float32), ("b", (3,), torch.float32)])
    w.write("a", torch.zeros(2, 2), rows_offset=0)
    w.write("b", torch.zeros(3))
    with pytest.raises(ModelError, match="tensor a was never written"):
        w.close()


def test_cli_config_file_set_and_flags(models, tmp_path, capsys):
    """``--config`` file < ``--set`` < flags; per-model entries in the file; tiny:SEED accepted as a model."""
    from rlm.core.cli import main

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"""
method: task_arithmetic
base: {models['base']}
models:
  - path: {models['e1']}
    weight: 0.25
  - {models['e2']}
params:
  lambda: 2.0
model_params:
  weight: 0.5
""")
    out = tmp_path / "out"
    rc = main(["merge", "--config", str(cfg), "--lambda", "0.5", "--set", "params.normalize=true", "--set", "seed=3",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["method_params"] == {"lambda": 0.5, "normalize": True} and man["seed"] == 3
    assert [p["weight"] for p in man["model_params"]] == [0.25, 0.5]
    ref = direct(_cls("task_arithmetic"), models["base"], [models["e1"], models["e2"]],
                 [{"weight": 0.25}, {"weight": 0.5}], config={"lambda": 0.5, "normalize": True})
    got = load(out)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=2e-7)
    # flags --weights/--density override per model; an existing output needs --overwrite
    rc = main(["merge", "--config", str(cfg), "--method", "ties", "--weights", "1,0.5", "--density", "0.5",
               "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["merge", "--config", str(cfg), "--method", "ties", "--weights", "1,0.5", "--density", "0.5",
               "--overwrite", "--out", str(out)])
    assert rc == 0
    man = json.loads((out / "merge_manifest.json").read_text())
    assert [(p["weight"], p["density"]) for p in man["model_params"]] == [(1.0, 0.5), (0.5, 0.5)]


def test_tiny_preset_models_merge_through_the_cli(tmp_path, capsys):
    from rlm.core.cli import main

    out = tmp_path / "t"
    rc = main(["merge", "--method", "averaging", "--base", "tiny", "--models", "tiny:1,tiny:0", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    from rlm.core.models.hf import resolve_model

    a, b, m = load(Path(resolve_model("tiny:1"))), load(Path(resolve_model("tiny"))), load(out)
    for name in list(m)[:5]:
        torch.testing.assert_close(m[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
