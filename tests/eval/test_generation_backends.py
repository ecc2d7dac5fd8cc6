"""Generation backends as plugins: the hf backend's stop strings and log-probs, the vllm backend against the fake
``vllm`` in tests/fakes (parameters, sample order, token ids and log-probs, sleep/wake, weight push), pass@k and
``rlm eval`` with sampling on both backends."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from math import comb

import pytest

from rlm.core.contracts import GenerationBackend, SamplingParams
from rlm.core.errors import RlmError
from rlm.core.eval.pass_at_k import mean_pass_at_k, parse_ks, pass_at_k
from rlm.core.plugins import get_plugin



@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    return get_plugin("generation_backend", "hf").load(str(tiny_model_dir))


def test_both_builtins_are_registered_backends():
    for name in ("hf", "vllm"):
        cls = get_plugin("generation_backend", name)
        assert issubclass(cls, GenerationBackend) and cls.name == name


def test_hf_logprobs_match_a_forward_pass(hf_backend):
    import torch

    gens = hf_backend.generate(["Hello there"], SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=3,
                                                               logprobs=True))
    model = hf_backend.model
    for g in gens:
        assert len(g.logprobs) == len(g.completion_ids)
        ids = torch.tensor([g.prompt_ids + g.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(g.prompt_ids) - 1:-1]
        want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(g.completion_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4)


def test_hf_stop_string_cuts_text_and_ids(hf_backend):
    free = hf_backend.generate(["Hi"], SamplingParams(max_new_tokens=12))[0]
    assert len(free.text) > 3
    stop = free.text[2:4]
    cut = hf_backend.generate(["Hi"], SamplingParams(max_new_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    assert cut.completion_ids == free.completion_ids[:len(cut.completion_ids)]
    decoded = hf_backend.tokenizer.decode(cut.completion_ids, skip_special_tokens=True)
    assert stop in decoded and stop not in hf_backend.tokenizer.decode(cut.completion_ids[:-1],
                                                                        skip_special_tokens=True)


def test_vllm_parameters_order_ids_and_logprobs(fake_vllm, tiny_model_dir):
    backend = get_plugin("generation_backend", "vllm").load(str(tiny_model_dir), dtype="bfloat16",
                                                            config={"gpu_memory_utilization": 0.3})
    llm_args = dict(fake_vllm.CALLS[0][1])
    assert fake_vllm.CALLS[0][0] == "LLM" and llm_args["gpu_memory_utilization"] == 0.3
    assert llm_args["dtype"] == "bfloat16" and llm_args["generation_config"] == "vllm"
    assert llm_args["worker_extension_cls"] == "rlm.core.eval.vllm_worker.WeightSyncExtension"
    fake_vllm.CALLS.clear()
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=6, seed=5, stop=("zz",), logprobs=True)
    gens = backend.generate(["a", "b"], params)
    sp = [c[1] for c in fake_vllm.CALLS if c[0] == "SamplingParams"]
    assert [s["seed"] for s in sp] == [5, 6]
    assert sp[0] | {"seed": None} == dict(n=3, temperature=0.7, top_p=0.9, max_tokens=6, stop=["zz"],
                                          stop_token_ids=backend.eos_ids, skip_special_tokens=True, logprobs=0,
                                          seed=None)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(i, j) for i in range(2) for j in range(3)]
    # the fake lists a request's outputs in reverse: rlm orders them by CompletionOutput.index
    raw = backend.llm.generate(["a"], sampling_params=backend._request_params(params, 1))[0]
    by_index = sorted(raw.outputs, key=lambda c: c.index)
    for g, c in zip(gens[:3], by_index):
        assert g.completion_ids == c.token_ids and g.text == c.text
        assert g.logprobs == [c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)]
        assert g.prompt_ids == raw.prompt_token_ids


def test_vllm_greedy_repeats_one_completion(fake_vllm, tiny_model_dir):
    backend = get_plugin("generation_backend", "vllm").load(str(tiny_model_dir))
    gens = backend.generate(["a"], SamplingParams(n=3, max_new_tokens=4))
    sp = [c[1] for c in fake_vllm.CALLS if c[0] == "SamplingParams"][-1]
    assert sp["n"] == 1 and sp["temperature"] == 0.0
    assert len({tuple(g.completion_ids) for g in gens}) == 1 and [g.sample_index for g in gens] == [0, 1, 2]


def test_vllm_sleep_push_wake_and_checksum(fake_vllm, tiny_model_dir):
    import torch

    backend = get_plugin("generation_backend", "vllm").load(str(tiny_model_dir),
                                                            config={"enable_sleep_mode": True, "sleep_level": 2})
    name, tensor = next(iter(backend.llm.worker.model_runner.model.hf.named_parameters()))
    before, old_sum = backend.weights_checksum(), tensor.double().sum().item()
    backend.sleep()
    with pytest.raises(RlmError, match="level-2 sleep"):
        backend.generate(["a"], SamplingParams())
    fake_vllm.CALLS.clear()
    new = torch.full_like(tensor, 0.5)
    backend.load_weights([(name, new)])
    backend.generate(["a"], SamplingParams(max_new_tokens=2))
    names = [c[0] for c in fake_vllm.CALLS if c[0] != "SamplingParams"]
    assert names == ["wake_up", "collective_rpc", "reset_prefix_cache", "wake_up", "generate"]
    assert fake_vllm.CALLS[0][1]["tags"] == ["weights"] and fake_vllm.CALLS[3][1]["tags"] == ["kv_cache"]
    expected = before - old_sum + new.double().sum().item()
    assert math.isclose(backend.weights_checksum(), expected, rel_tol=1e-9)


def test_pass_at_k_matches_exact_combinatorics_and_evalplus():
    from evalplus.eval import estimate_pass_at_k

    for n in (1, 2, 5, 10, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert math.isclose(pass_at_k(n, c, k), float(exact), rel_tol=1e-12, abs_tol=1e-12)
    correct = [0, 3, 10, 1, 7]
    for k in (1, 4, 10):
        assert math.isclose(mean_pass_at_k(10, correct, [k])[k], float(estimate_pass_at_k(10, correct, k).mean()),
                            rel_tol=1e-12)
    assert parse_ks(None, 4) == [1, 4] and parse_ks("10,1", 10) == [1, 10] and parse_ks(None, 1) == []
    with pytest.raises(RlmError, match="between 1 and --n 4"):
        parse_ks("1,5", 4)


def _eval(args, capsys):
    from rlm.core.cli import main

    rc = main(["eval", "--no-progress", *args])
    return rc, capsys.readouterr()


def test_rlm_eval_sampling_reports_pass_at_k(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    rc, cap = _eval(["--model", str(tiny_model_dir), "--task", "code:gen", "--n", "4", "--temperature", "0.8",
                     "--limit", "3", "--max-new-tokens", "8", "--out", str(out)], capsys)
    assert rc == 0, cap.err
    entry = json.loads((out / "summary.json").read_text())["code:gen"]
    assert {"pass@1", "pass@4"} <= set(entry) and entry["n"] == 3 and entry["samples_per_example"] == 4
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 and [r["sample"] for r in records[:4]] == [0, 1, 2, 3]
    rc, cap = _eval(["--model", str(tiny_model_dir), "--task", "code:gen", "--n", "4", "--limit", "2",
                     "--out", str(tmp_path / "bad")], capsys)
    assert rc != 0 and "--temperature > 0" in cap.err


def test_rlm_eval_vllm_has_the_hf_shape(fake_vllm, tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--task", "math:gen", "--n", "2", "--temperature", "1.0",
              "--limit", "2", "--max-new-tokens", "6", "--system-prompt", "Be brief."]
    outs = {}
    for backend in ("hf", "vllm"):
        rc, cap = _eval([*common, "--backend", backend, "--out", str(tmp_path / backend)], capsys)
        assert rc == 0, cap.err
        outs[backend] = (json.loads((tmp_path / backend / "summary.json").read_text()),
                         [json.loads(x) for x in (tmp_path / backend / "records.jsonl").read_text().splitlines()])
    (s_hf, r_hf), (s_v, r_v) = outs["hf"], outs["vllm"]
    assert {k: set(v) for k, v in s_hf.items()} == {k: set(v) for k, v in s_v.items()}
    assert [set(r) for r in r_hf] == [set(r) for r in r_v] and [r["id"] for r in r_hf] == [r["id"] for r in r_v]
    prompts = [c[1]["prompts"] for c in fake_vllm.CALLS if c[0] == "generate"][-1]
    assert len(prompts) == 2 and all("Be brief." in p for p in prompts)


def test_lm_eval_bridge_passes_model_args_and_gen_kwargs(tiny_model_dir):
    from rlm.core.eval.lm_eval import _gen_kwargs, _model_args, lm_eval_model

    assert lm_eval_model("vllm") == "vllm" and lm_eval_model("hf") == "hf"
    with pytest.raises(RlmError, match="--backend 'sglang'"):
        lm_eval_model("sglang")
    assert _model_args(str(tiny_model_dir), "bf16", "vllm", "gpu_memory_utilization=0.5") == \
        f"pretrained={tiny_model_dir},dtype=bfloat16,gpu_memory_utilization=0.5"
    assert _gen_kwargs(64, "temperature=0.7,do_sample=True") == "max_gen_toks=64,temperature=0.7,do_sample=True"
    assert _gen_kwargs(64, "max_gen_toks=8") == "max_gen_toks=8"


def test_rl_rollouts_through_vllm_push_weights_after_every_update(fake_vllm, tiny_model_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """generation.backend vllm: the engine gets the policy's weights at the start and after each of the
    steps × mini_batches optimizer updates (each push checksum-checked); the step metrics carry the
    rollout-vs-trainer log-prob diagnostics; the engine ends with the final policy's weights."""
    import torch

    from rlm.core.eval.vllm_worker import WeightSyncExtension
    from rlm.core.models.hf import load_model

    pushed: list[float] = []
    original = WeightSyncExtension.rlm_load_weights

    def recording(self, named_tensors):
        pushed.append(sum(t.double().sum().item() for _, t in named_tensors))
        return original(self, named_tensors)

    monkeypatch.setattr(WeightSyncExtension, "rlm_load_weights", recording)
    out = tmp_path / "grpo"
    rc, cap = _train(["--trainer", "grpo", "--task", "math:gen", "--model", str(tiny_model_dir), "--steps", "2",
                      "--out", str(out), "--set", "generation.backend=vllm", "--set", "mini_batches=2",
                      "--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "max_new_tokens=4",
                      "--set", "micro_batch_size=4", "--set", "lr=1e-3", "--set", "num_threads=1"], capsys)
    assert rc == 0, cap.err
    assert len(pushed) == 1 + 2 * 2 and len(set(pushed)) == len(pushed)  # every update changed the weights
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["rollout_logp_diff_mean"] >= 0 and row["rollout_logp_diff_max"] >= row["rollout_logp_diff_mean"]
        assert row["rollout_ratio_mean"] > 0
        assert 0 <= row["rollout_checksum_rel_diff"] <= 1e-3  # the push before the rollout: the policy's weights
    final, _ = load_model(out / "final")
    engine = {n: p for n, p in fake_vllm.INSTANCES[-1].worker.model_runner.model.hf.named_parameters()}
    for name, p in final.named_parameters():
        assert torch.allclose(engine[name].float(), p.float(), atol=1e-2), name


def _train(args, capsys):
    from rlm.core.cli import main

    rc = main(["train", "--no-progress", *args])
    return rc, capsys.readouterr()


def test_rl_stops_when_the_engine_did_not_take_the_weights(fake_vllm, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from rlm.core.eval.vllm_worker import WeightSyncExtension

    monkeypatch.setattr(WeightSyncExtension, "rlm_load_weights", lambda self, named_tensors: 0)  # a lost push
    rc, cap = _train(["--trainer", "grpo", "--task", "math:gen", "--model", str(tiny_model_dir), "--steps", "1",
                      "--out", str(tmp_path / "x"), "--set", "generation.backend=vllm", "--set", "lr=1e-2",
                      "--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "max_new_tokens=4",
                      "--set", "micro_batch_size=4", "--set", "num_threads=1"], capsys)
    assert rc != 0 and "weights checksum" in cap.err and "after weight push 2" in cap.err
