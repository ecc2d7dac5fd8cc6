"""The RL trainer contract (rlm.core.train.rl.RLTrainer): the built-in trainers' declarations, and fake
third-party RL trainers registered through a private plugin system: their own advantage estimator reaches the
update, an overridden policy loss replaces PPO's, a misspelt estimator names the closest ones, and an estimator
that needs a critic's values is refused on a trainer without one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_train_support import make_system

from rlm.core.contracts import Example, Task, Trainer
from rlm.core.errors import ConfigError
from rlm.core.hookspecs import hookimpl
from rlm.core.train import algorithms as rl
from rlm.core.train.config import RLConfig
from rlm.core.train.rl import RLTrainer

FAST = ["--no-progress", "--set", "num_threads=1", "--steps", "1", "--set", "prompts_per_step=2",
        "--set", "group_size=4", "--set", "max_new_tokens=6", "--set", "micro_batch_size=8"]
# what the loop passes every estimator
ESTIMATOR_INPUTS = {"rewards", "mask", "index", "kl", "beta", "gamma", "lam", "values", "eps", "whiten_stats",
                    "single_sample_groups", "baseline_mode"}
RECORD: dict[str, list] = {}


class LengthTask(Task):
    """Rewards that differ between the completions of a group: the completion's length, capped at 1."""

    name = "length"

    def examples(self, subset=None, *, split="train", limit=None, seed=0, path=None):
        return [Example(id=f"l{i}", prompt=f"Say something about {i}.") for i in range(4)]

    def reward(self, example, completion):
        r = min(1.0, len(completion) / 40)
        RECORD.setdefault("task_rewards", []).append(r)
        return r


def max_baseline_advantage(*, rewards, mask, index, **_):
    """A_i = r_i - max of the rewards of i's group (never positive)."""
    RECORD.setdefault("estimator_calls", []).append({"rewards": rewards.tolist(), "index": list(index)})
    best = torch.stack([rewards[[j for j in range(len(index)) if index[j] == g]].max() for g in index])
    adv = (rewards - best).unsqueeze(-1) * mask.to(rewards.dtype)
    return adv, adv


def recording_estimator(**inputs):
    RECORD.setdefault("inputs", []).append(set(inputs))
    return max_baseline_advantage(**inputs)


class MaxBaseline(RLTrainer):
    """A third party's trainer with its own estimator, recording what reaches the policy loss."""

    name = "max_baseline"
    advantages = {"max_baseline": recording_estimator, "grpo": rl.grpo_advantage}

    class Config(RLConfig):
        advantage: str = "max_baseline"

    def policy_loss(self, logp, old_logp, advantages, mask, **agg_kwargs):
        RECORD.setdefault("policy_loss", []).append({"advantages": advantages.detach().clone(), "mask": mask.clone()})
        return super().policy_loss(logp, old_logp, advantages, mask, **agg_kwargs)


class PlainReinforce(RLTrainer):
    """A third party's trainer with its own policy loss: -A log p, token mean, no ratio and no clip."""

    name = "plain_reinforce"
    advantages = {"grpo": rl.grpo_advantage}

    def policy_loss(self, logp, old_logp, advantages, mask, **agg_kwargs):
        loss = rl.aggregate(-advantages * logp, mask, "token-mean", **agg_kwargs)
        RECORD.setdefault("reinforce_losses", []).append(float(loss.detach()))
        return loss, {}


class GaeWithoutCritic(RLTrainer):
    name = "gae_without_critic"
    advantages = {"gae": rl.gae_advantage, "grpo": rl.grpo_advantage}

    class Config(RLConfig):
        advantage: str = "gae"


class ThirdParty:
    @hookimpl
    def register_trainers(self, register):
        register(MaxBaseline)
        register(PlainReinforce)
        register(GaeWithoutCritic)

    @hookimpl
    def register_tasks(self, register):
        register(LengthTask)


@pytest.fixture
def cli():
    from rlm.core.cli import main
    from rlm.core.plugins import reset_system

    system = make_system()
    system.add_plugin(ThirdParty(), name="rlm-test-rl-trainers")
    reset_system(system)
    RECORD.clear()
    try:
        yield lambda *args: main([str(a) for a in args])
    finally:
        reset_system(None)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- the built-in trainers are declarations ----------------------------------------------------------------------

def test_builtin_rl_trainers_declare_estimators_and_critic():
    from rlm.core.plugins import PluginSystem

    trainers = PluginSystem().registry("trainer")
    offered = {name: set(trainers.get(name).advantages) for name in ("grpo", "rl_pos", "reinforce_pp", "ppo")}
    assert offered == {"grpo": {"grpo", "dr_grpo", "rloo"}, "rl_pos": {"grpo", "dr_grpo", "rloo"},
                       "reinforce_pp": {"reinforce_pp", "reinforce_pp_baseline"}, "ppo": {"gae"}}
    assert [trainers.get(n).critic for n in ("grpo", "rl_pos", "reinforce_pp", "ppo")] == [False] * 3 + [True]
    assert trainers.get("rl_pos")().config.positive_only is True
    for name in offered:
        cls = trainers.get(name)
        assert issubclass(cls, RLTrainer) and cls().config.advantage in cls.advantages
    for name in ("sft", "rft"):
        assert issubclass(trainers.get(name), Trainer) and not issubclass(trainers.get(name), RLTrainer)
    assert trainers.get("grpo")().advantage_estimator() is rl.grpo_advantage
    assert trainers.get("grpo")({"advantage": "rloo"}).advantage_estimator() is rl.rloo_advantage


def test_default_policy_loss_is_ppo_clip_with_dual_clip_from_the_config():
    from rlm.plugins.trainers.grpo import GRPO

    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(2, 3, generator=g), -torch.rand(2, 3, generator=g)
    adv, mask = torch.randn(2, 3, generator=g), torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    trainer = GRPO({"clip_low": 0.1, "clip_high": 0.3, "dual_clip": None, "loss_agg": "seq-mean-token-mean"})
    loss, stats = trainer.policy_loss(logp, old, adv, mask, num_seqs=4.0)
    ref, ref_stats = rl.policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.3, dual_clip=None,
                                    agg="seq-mean-token-mean", num_seqs=4.0)
    assert torch.equal(loss, ref) and torch.equal(stats["clip_frac"], ref_stats["clip_frac"])


# -- config-time refusals ----------------------------------------------------------------------------------------

def test_misspelt_estimator_names_the_field_trainer_and_closest_names(cli, tmp_path, capsys):
    from rlm.plugins.trainers.grpo import GRPO

    with pytest.raises(ConfigError) as err:
        GRPO({"advantage": "dr_grp"})
    msg = str(err.value)
    assert msg == ("advantage: unknown advantage estimator 'dr_grp' for trainer 'grpo'; did you mean 'dr_grpo' or "
                   "'grpo'? (it offers: grpo, dr_grpo, rloo)")
    with pytest.raises(ConfigError, match="unknown advantage estimator 'gae'"):
        GRPO({"advantage": "gae"})  # another trainer's estimator
    out = tmp_path / "x"
    assert cli("train", "--trainer", "max_baseline", "--task", "length", "--out", out,
               "--set", "advantage=max_baselin", *FAST) == 2
    err_text = capsys.readouterr().err
    assert "did you mean 'max_baseline'" in err_text and "offers: max_baseline, grpo" in err_text
    assert len(err_text.strip().splitlines()) == 1
    assert not out.exists()  # refused before the run directory is touched


def test_estimator_needing_values_is_refused_without_a_critic(cli, tmp_path, capsys):
    with pytest.raises(ConfigError, match="estimator 'gae' needs a critic's values and trainer "
                                          "'gae_without_critic' has none"):
        GaeWithoutCritic()
    assert GaeWithoutCritic({"advantage": "grpo"}).advantage_estimator() is rl.grpo_advantage
    assert cli("train", "--trainer", "gae_without_critic", "--task", "length", "--out", tmp_path / "y", *FAST) == 2
    assert "needs a critic's values" in capsys.readouterr().err

    class CriticGae(GaeWithoutCritic):
        critic = True

    assert CriticGae().advantage_estimator() is rl.gae_advantage


# -- third-party trainers end to end ---------------------------------------------------------------------------

def test_own_estimator_reaches_the_update(cli, tmp_path):
    out = tmp_path / "max"
    assert cli("train", "--trainer", "max_baseline", "--task", "length", "--out", out, "--set", "kl_in=none",
               *FAST) == 0
    assert RECORD["inputs"] == [ESTIMATOR_INPUTS]
    (call,) = RECORD["estimator_calls"]
    rewards, index = call["rewards"], call["index"]
    assert rewards == pytest.approx(RECORD["task_rewards"]) and len(rewards) == 8
    assert len(set(rewards)) > 2  # the hand check below is not trivial
    # by hand: A_i = r_i - max of its group, on every valid token, 0 on padding
    best = {g: max(r for r, h in zip(rewards, index) if h == g) for g in index}
    (seen,) = RECORD["policy_loss"]  # one update, one micro-batch holding every sequence in order
    adv, mask = seen["advantages"], seen["mask"]
    assert adv.shape[0] == 8
    for i, (r, g) in enumerate(zip(rewards, index)):
        for t in range(adv.shape[1]):
            assert adv[i, t].item() == pytest.approx((r - best[g]) * mask[i, t].item(), abs=1e-6)
    assert (adv <= 0).all() and (adv < 0).any()
    row = metrics(out)[0]
    assert row["adv_min"] == pytest.approx(min(r - best[g] for r, g in zip(rewards, index)), abs=1e-6)
    assert row["delta_norm"] > 0


def test_overridden_policy_loss_replaces_ppo_clip(cli, tmp_path, monkeypatch):
    def no_ppo(*args, **kwargs):
        raise AssertionError("the default PPO loss was used")

    monkeypatch.setattr(rl, "policy_loss", no_ppo)
    out = tmp_path / "reinforce"
    assert cli("train", "--trainer", "plain_reinforce", "--task", "length", "--out", out, *FAST) == 0
    (loss,) = RECORD["reinforce_losses"]
    row = metrics(out)[0]
    assert row["loss"] == pytest.approx(loss, abs=1e-7)  # one update of one micro-batch
    assert row["clip_frac"] == 0.0  # the override reports no clipping
    assert math.isfinite(row["kl"]) and row["delta_norm"] > 0
