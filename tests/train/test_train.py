"""rlm train: SFT loss, RFT filter, schedule and data order, every trainer end to end, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_train_support import rlm_cli

from rlm.core.contracts import Example, Task
from rlm.core.train import algorithms as rl
from rlm.core.train.config import SFTConfig
from rlm.core.train.data import TokenBatch, encode_pairs, take
from rlm.core.train.forward import forward_response
from rlm.core.train.metrics_log import METRIC_KEYS
from rlm.core.train.rft import select_correct
from rlm.core.train.session import lr_factor

FAST = ["--set", "num_threads=1", "--no-progress"]
RL_SMALL = ["--set", "prompts_per_step=2", "--set", "group_size=4", "--set", "max_new_tokens=6",
            "--set", "micro_batch_size=4"]


@pytest.fixture
def cli():
    with rlm_cli() as run:
        yield run


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# -- pieces ------------------------------------------------------------------------------------------------

def test_sft_loss_ignores_prompt_tokens(tiny_model_dir):
    from rlm.core.models.hf import load_model

    model, tok = load_model(tiny_model_dir)
    cfg = SFTConfig()
    pairs = [("What is 2 + 3?", "The answer is 5."), ("Say hi", "hi"), ("A longer question about apples?", "42")]
    batch = encode_pairs(tok, pairs, cfg, 64)
    t = batch.tensors()
    with torch.no_grad():
        logp, _ = forward_response(model, t)
        loss = rl.sft_loss(logp, t["response_mask"]).item()
        # independent reference: each sequence unpadded, prompt positions labelled -100 (ignored)
        total, count, all_tokens = 0.0, 0, 0.0
        for p, r in zip(batch.prompt_ids, batch.response_ids):
            ids = torch.tensor([p + r])
            labels = torch.tensor([[-100] * len(p) + r])
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += len(r)
            all_tokens += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert abs(loss - all_tokens / len(pairs)) > 1e-3  # counting prompt tokens would give another value
    # every response ends with eos and the prompt is the chat-formatted question
    assert all(r[-1] == tok.eos_token_id for r in batch.response_ids)
    assert tok.decode(batch.prompt_ids[0]).endswith("<|im_start|>assistant\n")


def test_token_batch_layout():
    b = TokenBatch([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    t = b.tensors()
    assert t["P"] == 2 and t["T"] == 3
    assert t["input_ids"].tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert t["position_ids"].tolist()[1][1:3] == [0, 1]
    assert t["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    sub = b.tensors([1])
    assert sub["input_ids"].tolist() == [[7, 4]] and sub["T"] == 1


class ExactTask(Task):
    name = "exact"

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        return []

    def reward(self, example, completion):
        return 1.0 if completion.strip() == str(example.answer) else 0.0


def test_rft_keeps_only_verified_correct_deduplicated_samples():
    exs = [Example("a", "1+1?", answer=2), Example("b", "2+2?", answer=4), Example("c", "3+3?", answer=6)]
    comps = [["2", "3", " 2 ", "2", "two"], ["5", "4\n", "4", "44"], ["7", "8"]]
    kept = select_correct(exs, comps, ExactTask())
    assert [(e.id, c) for e, c in kept] == [("a", "2"), ("b", "4\n")]
    kept = select_correct(exs, comps, ExactTask(), dedupe=False)
    assert [(e.id, c) for e, c in kept] == [("a", "2"), ("a", " 2 "), ("a", "2"), ("b", "4\n"), ("b", "4")]
    kept = select_correct(exs, comps, ExactTask(), dedupe=False, max_per_prompt=1)
    assert [(e.id, c) for e, c in kept] == [("a", "2"), ("b", "4\n")]
    assert all(ExactTask().reward(e, c) == 1.0 for e, c in kept)


def test_lr_schedule_warmup_and_decay():
    f = lr_factor
    assert [f(s, 10, "cosine", 2) for s in (0, 1)] == [0.5, 1.0]
    assert f(2, 10, "cosine", 2) == pytest.approx(1.0)
    assert f(6, 10, "cosine", 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10, 10, "cosine", 2, 0.1) == pytest.approx(0.1)
    assert f(6, 10, "linear", 2) == pytest.approx(0.5)
    assert f(9, 10, "constant", 0) == 1.0


def test_data_order_is_a_seeded_permutation_per_epoch():
    first = take(5, 3, 0, 5)
    second = take(5, 3, 5, 5)
    assert sorted(first) == sorted(second) == list(range(5))
    assert take(5, 3, 0, 10) == first + second
    assert take(5, 3, 3, 4) == (first + second)[3:7]
    assert take(5, 4, 0, 5) != first or take(5, 5, 0, 5) != first


# -- every trainer end to end ---------------------------------------------------------------------------------

TRAINER_ARGS = {
    "sft": ["--set", "batch_size=4"],
    "rft": ["--set", "batch_size=4", "--set", "samples_per_prompt=2", "--set", "max_new_tokens=6",
            "--set", "min_reward=0.0", "--set", "train_limit=4"],
    "ppo": ["--set", "prompts_per_step=4", "--set", "max_new_tokens=6", "--set", "mini_batches=2"],
    "reinforce_pp": RL_SMALL,
    # digits rewards are continuous: a sample counts as correct from 0.05 on (RL-Pos zeroes the others)
    "rl_pos": RL_SMALL + ["--set", "correct_threshold=0.05"],
    "grpo": RL_SMALL + ["--set", "lora.enabled=true", "--set", "lora.r=4", "--set", "lr=1e-3"],
}


@pytest.mark.parametrize("trainer", list(TRAINER_ARGS))
def test_every_trainer_writes_checkpoints_final_metrics_and_manifest(cli, tmp_path, trainer):
    out = tmp_path / trainer
    rc = cli("train", "--trainer", trainer, "--task", "digits", "--model", "tiny", "--steps", 2, "--out", out,
             "--set", "save_every=1", *FAST, *TRAINER_ARGS[trainer])
    assert rc == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(METRIC_KEYS) <= set(r)
        assert r["grad_norm"] > 0 and r["delta_norm"] > 0 and r["tokens_per_s"] > 0 and r["step_time"] > 0
        assert math.isfinite(r["entropy"])
    rl_run = trainer not in ("sft", "rft")
    for key in ("reward_mean", "accuracy", "adv_abs_mean", "adv_min", "kl", "clip_frac"):
        assert (rows[0][key] is not None) == rl_run, key
    assert rows[1]["delta_norm"] > rows[0]["delta_norm"]
    m = manifest(out)
    assert m["status"] == "complete" and m["trainer"] == trainer and m["task"] == "digits"
    assert m["config"]["num_threads"] == 1 and m["seed"] == 0
    lora = trainer == "grpo"
    final_model = out / "final" / "merged" if lora else out / "final"  # LoRA: the adapter at the top of final/
    for d in (out / "checkpoints" / "step-1", out / "checkpoints" / "step-2", final_model):
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    assert (out / "final" / "adapter_config.json").exists() == lora
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2 and state["data_position"]
    if trainer == "rl_pos":
        assert all(r["adv_min"] >= 0 for r in rows)
    if trainer == "ppo":
        assert rows[0]["vf_loss"] is not None and rows[0]["zero_std_frac"] is None
        assert (out / "checkpoints" / "step-2" / "trainer_state" / "critic.safetensors").is_file()
    if trainer == "grpo":
        assert (out / "checkpoints" / "step-2" / "trainer_state" / "adapter" / "adapter_config.json").is_file()
        from safetensors.torch import load_file

        a = load_file(str(final_model / "model.safetensors"))
        assert not any("lora" in k for k in a)
        assert any("lora_A" in k for k in load_file(str(out / "final" / "adapter_model.safetensors")))
    if trainer == "rft":
        kept = [json.loads(x) for x in (out / "rft_data.jsonl").read_text().splitlines()]
        assert m["rft_kept"] == len(kept) > 0 and m["rft_generated"] == 8


def test_grpo_metrics_match_the_definitions_on_a_step(cli, tmp_path):
    """GRPO's logged metrics obey their definitions on a real step."""
    out = tmp_path / "g"
    assert cli("train", "--trainer", "grpo", "--task", "digits", "--steps", 1, "--out", out, *FAST, *RL_SMALL) == 0
    r = metrics(out)[0]
    G = 4
    # with unbiased std, sum_i A_i^2 = G - 1 per non-constant group, so mean |A| <= sqrt((G-1)/G)
    assert 0 <= r["adv_abs_mean"] <= math.sqrt((G - 1) / G) + 1e-6
    assert r["adv_min"] <= 0 and 0 <= r["zero_std_frac"] <= 1 and 0 <= r["accuracy"] <= 1
    assert r["clip_frac"] == 0.0  # one on-policy update: ratio is 1
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)  # first step: the policy is the reference


# -- bad input ------------------------------------------------------------------------------------------------

def test_unknown_trainer_task_and_subset_name_the_closest(cli, tmp_path, capsys):
    assert cli("train", "--trainer", "grpoo", "--task", "digits", "--out", tmp_path / "x") == 2
    assert "did you mean 'grpo'" in capsys.readouterr().err
    assert cli("train", "--trainer", "grpo", "--task", "digit", "--out", tmp_path / "x") == 2
    assert "did you mean 'digits'" in capsys.readouterr().err
    assert cli("train", "--trainer", "grpo", "--task", "digits:smal", "--out", tmp_path / "x") == 2
    assert "did you mean 'small'" in capsys.readouterr().err
    assert cli("train", "--trainer", "grpo", "--task", "digits", "--set", "clip_lo=0.1", "--out", tmp_path / "x") == 2
    assert "clip_lo: unknown field" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_task_without_training_data_or_references(cli, tmp_path, capsys):
    assert cli("train", "--trainer", "grpo", "--task", "empty", "--out", tmp_path / "e", *FAST) == 2
    assert "task 'empty' has no training data" in capsys.readouterr().err
    assert cli("train", "--trainer", "sft", "--task", "noref", "--out", tmp_path / "n", *FAST) == 2
    assert "no reference responses" in capsys.readouterr().err


def test_output_dir_holding_another_run_is_refused_unless_resume_or_overwrite(cli, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--trainer", "sft", "--task", "digits:small", "--steps", 1, "--out", out, *FAST]
    assert cli(*args) == 0
    assert cli(*args) == 2
    assert "already holds a sft run on digits" in capsys.readouterr().err
    assert cli(*args, "--set", "lr=1e-3", "--resume") == 2
    err = capsys.readouterr().err
    assert "config differs" in err and "in: lr" in err
    assert cli(*args, "--resume") == 0  # already complete: nothing left to do, final rewritten
    (out / "extra.txt").write_text("x")
    assert cli(*args, "--overwrite") == 0
    assert not (out / "extra.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli("train", "--trainer", "sft", "--task", "digits", "--out", other, *FAST) == 2
    assert "already holds other files" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cli, tmp_path, capsys):
    out = tmp_path / "nan"
    # an absurd learning rate: step 1 is finite, its update overflows the weights, step 2's loss is NaN
    rc = cli("train", "--trainer", "sft", "--task", "digits", "--steps", 4, "--out", out, "--set", "lr=1e30",
             "--set", "batch_size=4", "--set", "save_every=10", "--set", "warmup_ratio=0", *FAST)
    assert rc == 2
    err = capsys.readouterr().err
    assert "NaN or infinite at step 2" in err and "last good checkpoint" in err
    assert (out / "checkpoints" / "step-1" / "model.safetensors").is_file()
    assert not (out / "final").exists()
    m = manifest(out)
    assert m["status"] == "failed" and m["failed_step"] == 2
    from safetensors.torch import load_file

    w = load_file(str(out / "checkpoints" / "step-1" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())


def test_model_without_chat_template_falls_back_or_errors(cli, tmp_path, tiny_model_dir, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = plain / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tc))
    args = ["train", "--trainer", "sft", "--task", "digits:small", "--steps", 1, "--model", plain, *FAST]
    assert cli(*args, "--out", tmp_path / "a", "--set", "require_chat_template=true") == 2
    assert "has no chat template" in capsys.readouterr().err
    assert cli(*args, "--out", tmp_path / "b") == 0
    assert "no chat template; prompts use the plain fallback" in capsys.readouterr().err


def test_tensorboard_on_request(cli, tmp_path, capsys):
    out = tmp_path / "tb"
    rc = cli("train", "--trainer", "sft", "--task", "digits:small", "--steps", 1, "--out", out, "--tensorboard",
             *FAST)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert rc == 2 and "pip install tensorboard" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert rc == 0 and list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_recomputed_logprobs_match_the_sampling_distribution(tiny_model_dir):
    """The trainer's (left-padded prompt, right-padded response) layout reproduces, token by token, the
    log-probs HF generate sampled from (prompts of different lengths, completions ending at different times)."""
    from rlm.core.eval.generation import chat_prompt
    from rlm.core.models.hf import load_model

    model, tok = load_model(tiny_model_dir)
    model.eval()
    tok.padding_side = "left"
    prompts = [chat_prompt(tok, q) for q in ("Hi", "What is 12 + 30? Answer with a number please.", "Solve 3 * 3")]
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    width = enc["input_ids"].shape[1]
    prompt_ids, resp_ids, ref = [], [], []
    for b in range(len(prompts)):
        p = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        r, lp = [], []
        for t, logits in enumerate(out.logits):
            tok_id = int(out.sequences[b, width + t])
            r.append(tok_id)
            lp.append(torch.log_softmax(logits[b].double() / 0.7, -1)[tok_id].item())
            if tok_id == tok.eos_token_id:
                break
        prompt_ids.append(p)
        resp_ids.append(r)
        ref.append(lp)
    batch = TokenBatch(prompt_ids, resp_ids, tok.pad_token_id)
    t = batch.tensors()
    with torch.no_grad():
        logp, _ = forward_response(model, t, temperature=0.7)
    for b, lp in enumerate(ref):
        assert logp[b, :len(lp)].tolist() == pytest.approx(lp, abs=1e-4)
    assert len({len(p) for p in prompt_ids}) == 3


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing_partial(cli, tmp_path, tiny_model_dir,
                                                                             monkeypatch, capsys):
    """torch.save reports a full disk as a RuntimeError without an errno: rlm names the checkpoint instead."""
    import collections

    from rlm.core.train import checkpoints

    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *a, **k)

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    out = tmp_path / "run"
    rc = cli("train", "--trainer", "sft", "--task", "digits", "--model", tiny_model_dir, "--steps", "1", "--out", out,
             "--no-progress", "--set", "num_threads=1", "--set", "batch_size=4")
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: cannot write {out / 'checkpoints' / 'step-1'}: no space left on device"
    assert not (out / "checkpoints" / "step-1").exists() and not list((out / "checkpoints").glob(".step-*"))
