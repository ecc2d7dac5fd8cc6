"""RFT samples in rounds only the prompts its steps need: the round planner against hand-computed sizes, the
target, and end-to-end runs with the tiny model (prompts sampled, determinism, resume, too few and none kept)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_train_support import make_system, rlm_cli

from rlm.core.contracts import Example, Task
from rlm.core.hookspecs import hookimpl
from rlm.core.train.config import RFTConfig
from rlm.core.train.data import sample_seed, take
from rlm.core.train.rft import plan_round, rft_target

FAST = ["--set", "num_threads=1", "--no-progress"]
POOL = 24
# the prompts rewarded by ThirdTask: every third one of the seeded order RFT samples in (seed 0)
REWARDED = {f"t{i}" for pos, i in enumerate(take(POOL, 0, 0, POOL)) if pos % 3 == 0}


class ThirdTask(Task):
    """Reward 1 for every completion of the prompts at positions 0, 3, 6, ... of the seed-0 sampling order and
    0 for the others, whatever the completion: what RFT keeps depends only on which prompts it samples."""

    name = "third"

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        out = [Example(id=f"t{i}", prompt=f"Say something about {i}.") for i in range(POOL)]
        return out[:limit] if limit else out

    def reward(self, example, completion):
        return 1.0 if example.id in REWARDED else 0.0


class ThirdTasks:
    @hookimpl
    def register_tasks(self, register):
        register(ThirdTask)


@pytest.fixture
def cli():
    system = make_system()
    system.add_plugin(ThirdTasks(), name="rlm-test-rft-tasks")
    with rlm_cli(system) as run:
        yield run


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def kept_pairs(out: Path) -> list[list[str]]:
    return [json.loads(x) for x in (out / "rft_data.jsonl").read_text().splitlines()]


# -- the planner -------------------------------------------------------------------------------------------------

def plan(pool, target, sizes, kept, per_prompt=8, min_round=8, max_rounds=3):
    return plan_round(pool, target, sizes, kept, per_prompt=per_prompt, min_round=min_round, max_rounds=max_rounds)


def test_first_round_assumes_every_completion_kept_and_fills_a_generation_batch():
    assert plan(1000, 11, [], 0) == 8  # ceil(11 / 8) = 2 prompts, raised to one batch of 64 // 8
    assert plan(1000, 11, [], 0, min_round=1) == 2
    assert plan(1000, 11, [], 0, per_prompt=2, min_round=1) == 6  # max_per_prompt 2: ceil(11 / 2)
    assert plan(1000, 100, [], 0, min_round=1) == 13  # ceil(100 / 8)
    assert plan(5, 100, [], 0) == 5  # never more than the pool


def test_later_rounds_follow_the_keep_rate_with_a_margin():
    # 4 kept of 8 prompts: 0.5 per prompt; 7 missing need 14 prompts, times 1.5 = 21
    assert plan(1000, 11, [8], 4) == 21
    # 9 kept of 29 prompts; 2 missing: 1.5 * 2 * 29 / 9 = 9.67 -> 10 (above one batch of 8)
    assert plan(1000, 11, [8, 21], 9) == 10
    assert plan(1000, 11, [8, 21], 9, min_round=16) == 16
    # 1 kept of 8 prompts, 5 missing: 1.5 * 5 * 8 = 60, but only 12 prompts are left
    assert plan(20, 6, [8], 1) == 12


def test_rounds_without_a_kept_sample_double():
    assert plan(1000, 11, [8], 0) == 16
    assert plan(1000, 11, [8, 16], 0, max_rounds=4) == 32
    assert plan(20, 11, [8], 0) == 12  # the rest of the pool


def test_sampling_stops_at_the_target_the_pool_or_max_rounds():
    assert plan(1000, 11, [8], 11) == 0
    assert plan(1000, 11, [8], 40) == 0
    assert plan(20, 11, [8, 12], 3) == 0
    assert plan(1000, 11, [8, 16, 32], 0) == 0  # max_rounds 3
    assert plan(1000, 11, [8, 16, 32], 0, max_rounds=4) == 32 * 2


def test_without_steps_one_round_takes_the_whole_pool():
    assert plan(1000, None, [], 0) == 1000
    assert plan(1000, None, [1000], 0) == 0
    assert plan(1000, None, [], 0, max_rounds=1) == 1000


def test_target_is_the_kept_samples_the_steps_pass_over_epochs_times():
    assert rft_target(RFTConfig(steps=2, batch_size=16)) == 11  # 32 / 3 epochs -> 10.67
    assert rft_target(RFTConfig(steps=3, batch_size=4, epochs=1)) == 12
    assert rft_target(RFTConfig(steps=1, batch_size=4, epochs=1.5)) == 3  # 8 / 3
    assert rft_target(RFTConfig(steps=2, batch_size=16, epochs=0.1)) == 320  # float division gives 320.00000000000006
    assert rft_target(RFTConfig(steps=None)) is None


# -- end to end ----------------------------------------------------------------------------------------------

# 2 steps of 4 over 1 epoch: target 8 kept; 2 completions per prompt, one generation batch is 4 // 2 = 2 prompts
THIRD = ["--task", "third", "--trainer", "rft", "--model", "tiny", "--set", "batch_size=4", "--set", "epochs=1",
         "--set", "samples_per_prompt=2", "--set", "generation_batch_size=4", "--set", "max_new_tokens=4",
         "--set", "dedupe=false", "--set", "micro_batch_size=4", *FAST]


def test_rft_samples_only_the_prompts_the_steps_need_and_is_deterministic(cli, tmp_path, monkeypatch):
    from rlm.core.eval import generation

    calls: list[tuple[int, int]] = []  # (prompts, seed) of each generate() call
    real = generation.generate

    def spy(model, tokenizer, prompts, **kw):
        calls.append((len(prompts), kw["seed"]))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    order = [f"t{i}" for i in take(POOL, 0, 0, POOL)]
    prompts = {f"t{i}": f"Say something about {i}." for i in range(POOL)}
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert cli("train", *THIRD, "--steps", 2, "--out", out, "--set", "save_every=1") == 0
    m = manifest(outs[0])
    # round 1: ceil(8 / 2) = 4 prompts (positions 0-3: rewarded 0 and 3) keep 4; round 2: 4 missing at 4 kept per
    # 4 prompts, times 1.5 = 6 prompts (positions 4-9: rewarded 6 and 9) keep 4 more, reaching the target
    assert {k: m[k] for k in m if k.startswith("rft_") and k != "rft_data"} == {
        "rft_prompts": POOL, "rft_target": 8, "rft_rounds": 2, "rft_prompts_sampled": 10, "rft_generated": 20,
        "rft_kept": 8}
    assert m["status"] == "complete" and m["train_examples"] == 8 and "rft_warning" not in m
    assert calls == [(4, sample_seed(0, 0, 0)), (6, sample_seed(0, 1, 0))] * 2  # one seed per round, both runs
    kept = kept_pairs(outs[0])
    assert [p for p, _ in kept] == [prompts[order[pos]] for pos in (0, 0, 3, 3, 6, 6, 9, 9)]
    assert (outs[0] / "rft_data.jsonl").read_bytes() == (outs[1] / "rft_data.jsonl").read_bytes()
    assert json.loads((outs[0] / "rft_sampling.json").read_text()) == {
        k: m[k] for k in ("rft_target", "rft_rounds", "rft_prompts_sampled", "rft_generated", "rft_kept")}
    # a resumed run with more steps reads the kept samples back (target 12 would sample again) and keeps the counts
    assert cli("train", *THIRD, "--steps", 3, "--out", outs[0], "--set", "save_every=1", "--resume") == 0
    r = manifest(outs[0])
    assert r["status"] == "complete" and r["resumed_from_step"] == 2 and r["steps"] == 3
    assert {k: r[k] for k in m if k.startswith("rft_")} == {k: m[k] for k in m if k.startswith("rft_")}
    assert kept_pairs(outs[0]) == kept


def test_rft_without_steps_samples_the_whole_pool_once(cli, tmp_path):
    out = tmp_path / "all"
    assert cli("train", *THIRD, "--set", "train_limit=10", "--out", out) == 0
    m = manifest(out)
    rewarded = len(REWARDED & {f"t{i}" for i in range(10)})
    assert m["rft_target"] is None and m["rft_rounds"] == 1 and m["rft_prompts_sampled"] == 10
    assert m["rft_generated"] == 20 and m["rft_kept"] == 2 * rewarded
    assert m["steps"] == math.ceil(1 * 2 * rewarded / 4)


def test_rft_with_fewer_kept_than_the_target_warns_once_and_trains(cli, tmp_path, capsys):
    out = tmp_path / "short"
    assert cli("train", *THIRD, "--steps", 2, "--out", out, "--set", "max_rounds=1") == 0
    err = capsys.readouterr().err
    assert err.count("warning: RFT kept 4 samples, fewer than the 8") == 1
    m = manifest(out)
    assert m["status"] == "complete" and m["rft_kept"] == 4 and m["rft_target"] == 8 and m["rft_rounds"] == 1
    assert m["rft_prompts_sampled"] == 4 and "fewer than the 8" in m["rft_warning"]


def test_rft_that_keeps_nothing_fails_with_one_line(cli, tmp_path, capsys):
    out = tmp_path / "none"
    # digits rewards at most 1, so nothing reaches 1.5; target ceil(4 / 3) = 2 kept: round 1 takes one batch of
    # 4 // 2 = 2 prompts, round 2 twice that, then max_rounds stops it: 6 prompts, 12 completions
    rc = cli("train", "--trainer", "rft", "--task", "digits", "--model", "tiny", "--steps", 1, "--out", out,
             "--set", "batch_size=4", "--set", "samples_per_prompt=2", "--set", "generation_batch_size=4",
             "--set", "max_new_tokens=4", "--set", "min_reward=1.5", "--set", "max_rounds=2", *FAST)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: RFT kept no samples: none of the 12 completions of the start model for 6 of the 16 "
                   "prompts (in 2 rounds) reached reward 1.5 on task 'digits'")
    m = manifest(out)
    assert m["status"] == "failed" and m["rft_prompts_sampled"] == 6 and m["rft_kept"] == 0
    assert not (out / "rft_data.jsonl").exists()
