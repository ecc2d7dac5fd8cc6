"""RFT samples through the generation backend of ``generation.backend``: with ``hf`` it keeps exactly what the
policy's own ``generate`` returns for the round's seed; with ``vllm`` (the fake in tests/fakes) the engine gets the
config's sampling parameters, the policy's current weights before every round (checksum-checked), and its samples
are kept prompt-major in sample-index order."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train_support import make_system, rlm_cli

from rlm.core.contracts import Example, SamplingParams, Task
from rlm.core.errors import RlmError
from rlm.core.hookspecs import hookimpl
from rlm.core.train.data import sample_seed, take

FAST = ["--set", "num_threads=1", "--no-progress"]
POOL = 12
# the prompts HalfTask rewards: every other one of the seed-0 order RFT samples in
HALF = {f"h{i}" for pos, i in enumerate(take(POOL, 0, 0, POOL)) if pos % 2 == 0}


def prompt_of(i: int) -> str:
    return f"Tell me about {i}."


class HalfTask(Task):
    """Reward 1 for every completion of the prompts at even positions of the seed-0 sampling order, else 0."""

    name = "half"

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        out = [Example(id=f"h{i}", prompt=prompt_of(i)) for i in range(POOL)]
        return out[:limit] if limit else out

    def reward(self, example, completion):
        return 1.0 if example.id in HALF else 0.0


class EveryTask(HalfTask):
    """Reward 1 for every completion: RFT keeps all it samples."""

    name = "every"

    def reward(self, example, completion):
        return 1.0


class Tasks:
    @hookimpl
    def register_tasks(self, register):
        register(HalfTask)
        register(EveryTask)


@pytest.fixture
def cli():
    system = make_system()
    system.add_plugin(Tasks(), name="rlm-test-rft-backend-tasks")
    with rlm_cli(system) as run:
        yield run


def kept_pairs(out: Path) -> list[tuple[str, str]]:
    return [tuple(json.loads(x)) for x in (out / "rft_data.jsonl").read_text().splitlines()]


def rft_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--trainer", "rft", "--model", str(model), "--out", str(out), "--set", "batch_size=4",
            "--set", "epochs=1", "--set", "samples_per_prompt=2", "--set", "generation_batch_size=4",
            "--set", "dedupe=false", "--set", "micro_batch_size=4", *FAST, *extra]


def test_rft_hf_backend_keeps_what_the_policy_generates(cli, tiny_model_dir, tmp_path):
    """The default backend: one round over the 6-prompt pool under sample_seed(0, 0, 0); every completion is kept,
    and they are the completions generate() gives the start model for those prompts and that seed."""
    from rlm.core.eval.generation import chat_prompt, generate
    from rlm.core.models.hf import load_model

    outs = {name: tmp_path / name for name in ("default", "hf")}
    for name, out in outs.items():
        backend = ["--set", "generation.backend=hf"] if name == "hf" else []
        assert cli(*rft_args(tiny_model_dir, out, "--task", "every", "--set", "train_limit=6",
                             "--set", "max_new_tokens=6", *backend)) == 0
    model, tok = load_model(tiny_model_dir)
    order = take(6, 0, 0, 6)
    prompts = [chat_prompt(tok, prompt_of(i)) for i in order]
    gens = generate(model, tok, prompts, n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=4,
                    seed=sample_seed(0, 0, 0))
    expected = [(prompt_of(order[g.prompt_index]), g.text) for g in gens]
    assert len({text for _, text in expected}) > 1  # really sampled
    assert kept_pairs(outs["default"]) == expected
    assert (outs["hf"] / "rft_data.jsonl").read_bytes() == (outs["default"] / "rft_data.jsonl").read_bytes()


def test_rft_through_vllm_passes_settings_pushes_weights_and_keeps_order(fake_vllm, cli, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """Target 2 steps × 4 = 8 kept: round 1 samples positions 0-3 (2 rewarded, 4 kept), round 2 positions 4-9
    (3 rewarded, 6 kept). One engine; before each round a push of the start model's weights and a checksum;
    per prompt one SamplingParams with the config's settings and seed sample_seed(0, round, 0) + prompt index."""
    import torch

    from rlm.core.eval.generation import chat_prompt
    from rlm.core.eval.vllm_worker import WeightSyncExtension
    from rlm.core.models.hf import load_model

    pushed: list[dict[str, torch.Tensor]] = []
    original = WeightSyncExtension.rlm_load_weights

    def recording(self, named_tensors):
        pushed.append({n: t.detach().clone() for n, t in named_tensors})
        return original(self, named_tensors)

    monkeypatch.setattr(WeightSyncExtension, "rlm_load_weights", recording)
    out = tmp_path / "vllm"
    assert cli(*rft_args(tiny_model_dir, out, "--task", "half", "--steps", 2, "--set", "max_new_tokens=5",
                         "--set", "temperature=0.7", "--set", "top_p=0.9", "--set", "generation.backend=vllm")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["rft_rounds"], m["rft_prompts_sampled"], m["rft_kept"], m["status"]) == (2, 10, 10, "complete")
    assert len(fake_vllm.INSTANCES) == 1
    calls = [(name, args) for name, args in fake_vllm.CALLS if name not in ("LLM", "SamplingParams")]
    assert [(n, a.get("method")) for n, a in calls] == [
        ("collective_rpc", "rlm_load_weights"), ("reset_prefix_cache", None),
        ("collective_rpc", "rlm_weights_checksum"), ("generate", None)] * 2
    start, tok = load_model(tiny_model_dir)
    want = dict(start.named_parameters())
    assert len(pushed) == 2
    for push in pushed:
        assert set(push) == set(want) and all(torch.equal(push[n], want[n]) for n in want)
    order = take(POOL, 0, 0, POOL)
    engine = fake_vllm.INSTANCES[0]
    eos = engine.tokenizer.eos_token_id
    expected: list[tuple[str, str]] = []
    for rnd, positions in enumerate([range(4), range(4, 10)]):
        generate_call = [a for n, a in calls if n == "generate"][rnd]
        assert generate_call["prompts"] == [chat_prompt(tok, prompt_of(order[p])) for p in positions]
        for i, (p, sp) in enumerate(zip(positions, generate_call["sampling_params"])):
            assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.stop, sp.seed, sp.logprobs) == \
                (2, 0.7, 0.9, 5, None, sample_seed(0, rnd, 0) + i, 0)
            assert eos in sp.stop_token_ids
            if f"h{order[p]}" in HALF:
                prompt = generate_call["prompts"][i]
                expected += [(prompt_of(order[p]), engine._sample(prompt, j, sp).text) for j in range(2)]
    assert kept_pairs(out) == expected


def test_sync_gives_the_engine_the_policys_current_weights(fake_vllm, tiny_model_dir, monkeypatch):
    """RolloutBackend.sync: the first loads the engine (pushing), later ones push the policy's weights as they are
    now; a push the engine did not take is an error; hf needs no engine."""
    import torch

    from rlm.core.eval.vllm_worker import WeightSyncExtension
    from rlm.core.models.hf import load_model
    from rlm.core.train.config import RFTConfig
    from rlm.core.train.rollout_backend import RolloutBackend

    policy, tok = load_model(tiny_model_dir)
    sess = SimpleNamespace(policy=policy, tokenizer=tok, model_path=tiny_model_dir, world=1)
    hf = RolloutBackend(sess, RFTConfig())
    hf.sync()
    assert not hf.external and hf._engine is None and not fake_vllm.CALLS
    sampler = RolloutBackend(sess, RFTConfig(generation={"backend": "vllm"}))
    sampler.sync()
    assert sampler.pushes == 1 and len(fake_vllm.INSTANCES) == 1
    name, param = next(iter(policy.named_parameters()))
    with torch.no_grad():
        param.add_(0.25)
    sampler.sync()
    engine_params = dict(fake_vllm.INSTANCES[0].worker.model_runner.model.hf.named_parameters())
    assert sampler.pushes == 2 and len(fake_vllm.INSTANCES) == 1
    assert torch.equal(engine_params[name], param)
    gens = sampler.generate(["a"], SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=1))
    assert [g.sample_index for g in gens] == [0, 1] and all(g.logprobs is not None for g in gens)
    monkeypatch.setattr(WeightSyncExtension, "rlm_load_weights", lambda self, named_tensors: 0)
    with torch.no_grad():
        param.add_(0.25)
    with pytest.raises(RlmError, match="after weight push 3 the engine's weights checksum"):
        sampler.sync()
    sampler.close()
    assert sampler._engine is None


def test_rft_through_vllm_refuses_lora(fake_vllm, cli, tiny_model_dir, tmp_path, capsys):
    rc = cli(*rft_args(tiny_model_dir, tmp_path / "lora", "--task", "every", "--set", "train_limit=2",
                       "--set", "max_new_tokens=2", "--set", "generation.backend=vllm",
                       "--set", "lora.enabled=true"))
    assert rc != 0
    assert "LoRA policies sample with the hf backend" in capsys.readouterr().err
    assert not fake_vllm.INSTANCES
