"""The configs of the training engines and what ``rlm train`` hands a trainer.

:class:`TrainConfig` holds the fields every trainer shares; :class:`SFTConfig`, :class:`RLConfig` and
:class:`RFTConfig` add those of the SFT loop, the RL loop and rejection-sampling fine-tuning. The built-in trainer
plugins (``rlm.plugins.trainers``) use them as, or derive, their ``Config``; third-party trainers do the same.
:class:`TrainRun` is built by ``rlm train`` (:mod:`rlm.core.cli.train`) and by the study's train steps
(:mod:`rlm.core.study.steps`).

This module does not import torch (``rlm --help`` imports it through the trainer plugins).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from rlm.core.contracts import PluginConfig, Task


class LoraSettings(PluginConfig):
    """LoRA through peft (off by default: full fine-tuning)."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    merge_lora: bool = Field(True, description="also write the merged full model to final/merged/ (the "
                                               "adapter is always at the top of final/)")


class TrainConfig(PluginConfig):
    """Fields shared by every trainer. Research defaults are scaled for the tiny CPU model; the paper's values
    are given in the descriptions."""

    seed: int = 0
    steps: int | None = Field(None, ge=1, description="optimizer steps (SFT: derived from epochs when unset)")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="share of the steps with a linear warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / peak lr for linear and cosine decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (None: off)")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward (gradient accumulation)")
    save_every: int = Field(50, ge=1, description="write checkpoints/step-N every this many steps")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep only the newest N checkpoints (None: all)")
    train_limit: int | None = Field(None, ge=1, description="use at most this many training examples")
    max_prompt_tokens: int = Field(512, ge=1, description="longer prompts keep their last tokens")
    system_prompt: str | None = None
    require_chat_template: bool = Field(False, description="fail on a model without a chat template instead of "
                                                           "using the plain fallback prompt")
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"] = Field(
        "fp32", description="fp32; bf16-mixed / fp16-mixed: fp32 master weights and optimizer state, compute in "
                            "bf16 / fp16 (autocast; fp16 with a loss scaler) — the regime of verl and OpenRLHF "
                            "(paper: bf16-mixed); bf16-pure: the parameters themselves in bf16 (updates smaller than "
                            "half a bf16 step are lost)")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the weights in checkpoints and final/ (auto: the start model's)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="deprecated: float32 means precision fp32; bfloat16 / float16 mean bf16-mixed / "
                          "fp16-mixed saved in that dtype")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    ref_offload: bool = Field(False, description="full fine-tuning: keep the frozen reference model on the CPU "
                                                 "and move it to the device only for its log-prob passes")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    lora: LoraSettings = LoraSettings()
    tensorboard: bool = False
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _deprecated_dtype(cls, data: Any) -> Any:
        """Map the deprecated ``dtype`` onto ``precision`` and ``save_dtype`` (with a warning)."""
        if not isinstance(data, dict) or data.get("dtype") is None:
            return data
        data = dict(data)
        dtype = data.pop("dtype")
        precision = {"float32": "fp32", "bfloat16": "bf16-mixed", "float16": "fp16-mixed"}.get(dtype)
        if precision is None:
            return {**data, "dtype": dtype}  # the field's own validation names the bad value
        save = "auto" if dtype == "float32" else dtype
        warnings.warn(f"the training config field dtype is deprecated: dtype={dtype} now means "
                      f"precision={precision}, save_dtype={save} (fp32 master weights); set those fields instead "
                      f"(precision=bf16-pure keeps the parameters themselves in bf16)", FutureWarning, stacklevel=2)
        data.setdefault("precision", precision)
        data.setdefault("save_dtype", save)
        return data


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the task's reference responses (paper: lr 5e-6, batch 128, 3 epochs, 3 %
    warm-up)."""

    lr: float = Field(5e-5, gt=0, description="paper: 5e-6")
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    epochs: float = Field(3.0, gt=0, description="passes over the data when steps is unset")
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step, all processes (paper: 128)")
    max_response_tokens: int = Field(512, ge=1)


class GenerationSettings(PluginConfig):
    """Which generation backend RL rollouts and RFT sampling draw from (:mod:`rlm.core.train.rollout_backend`)."""

    backend: str = Field("hf", description="a registered generation backend (rlm plugins): hf samples from the "
                                           "policy itself; vllm from its own engine, synced after every update")
    dtype: str = Field("auto", description="the engine's weights dtype (external backends)")
    config: dict[str, Any] = Field(default_factory=dict, description="the backend's config, e.g. "
                                                                    "{gpu_memory_utilization: 0.3}")
    checksum_rtol: float = Field(1e-3, ge=0, description="relative tolerance of the engine-vs-policy weights "
                                                          "checksum after a push (a lower-precision engine rounds)")


class RLConfig(TrainConfig):
    """Fields of every RL trainer. Research defaults (verl GRPO / the paper: lr 1e-6, 512 prompts × G = 8,
    KL 1e-3 with k3 in the loss, temperature 1, top-p 1, ε = 0.2, one epoch per batch) scaled for a tiny CPU
    model: a larger lr and fewer prompts per step."""

    steps: int | None = Field(100, ge=1)
    lr: float = Field(1e-5, gt=0, description="paper: 1e-6")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (verl's actor default 0.01)")
    prompts_per_step: int = Field(8, ge=1, description="prompts per step, all processes (paper: 512)")
    group_size: int = Field(8, ge=1, description="completions per prompt (G)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    generation_batch_size: int = Field(64, ge=1, description="sequences per generate() call")
    advantage: str = Field("grpo", description="advantage estimator: one of the names the trainer offers "
                                               "(its advantages; e.g. grpo, dr_grpo, rloo)")
    adv_eps: float = Field(1e-6, gt=0, description="GRPO: A = (r - mean) / (std + adv_eps)")
    single_sample_groups: Literal["verl", "zero"] = Field(
        "verl", description="a group of one sample: verl keeps its reward as its advantage (GRPO: r / (1 + eps)); "
                            "zero gives it advantage 0")
    baseline_mode: Literal["verl", "openrlhf"] = Field(
        "verl", description="REINFORCE++-baseline: verl subtracts the group mean of r - beta * sum(kl) and "
                            "broadcasts it; openrlhf subtracts the group mean of r, then adds per-token KL and "
                            "returns-to-go")
    positive_only: bool = Field(False, description="RL-Pos: keep only the positive samples' push (positive_mode)")
    positive_mode: Literal["incorrect", "clamp"] = Field(
        "incorrect", description="RL-Pos: incorrect zeroes the advantages of samples whose reward is below "
                                 "correct_threshold (the paper's wording); clamp sets every negative advantage to 0 "
                                 "(the same with 0/1 rewards, not with continuous ones)")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus: loss -= entropy_coef * aggregated entropy "
                                                       "(verl's entropy_coeff; 0: off)")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda")
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(3.0, gt=1, description="dual-clip constant c for A < 0 (None: off)")
    kl_coef: float = Field(1e-3, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["loss", "reward", "none"] = Field("loss", description="where the KL penalty goes")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = \
        "token-mean"
    norm_len: int | None = Field(None, ge=1, description="seq-mean-token-sum-norm divisor (None: max_new_tokens)")
    sum_norm_by_seqs: bool = Field(False, description="seq-mean-token-sum-norm: also divide by the number of "
                                                      "sequences (verl does not)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    mini_batches: int = Field(1, ge=1, description="optimizer updates per pass (1: on-policy, ratio = 1)")
    correct_threshold: float = Field(1.0, description="a completion counts as correct (accuracy) at this reward")
    critic_lr: float = Field(1e-4, gt=0, description="PPO critic (verl: 1e-5)")
    value_clip: float = Field(0.5, gt=0)
    critic_warmup_steps: int = Field(0, ge=0, description="PPO: steps that train only the critic")
    disable_dropout: bool = Field(True, description="dropout off in policy and critic (old log-probs stay exact)")
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class RFTConfig(SFTConfig):
    """Rejection-sampling fine-tuning: sample k responses per prompt from the start model, keep the verified-
    correct ones (deduplicated), then SFT on them."""

    samples_per_prompt: int = Field(8, ge=1, description="k")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    generation_batch_size: int = Field(64, ge=1)
    min_reward: float = Field(1.0, description="keep samples whose reward is at least this")
    dedupe: bool = True
    max_per_prompt: int | None = Field(None, ge=1, description="keep at most this many samples per prompt")
    max_rounds: int = Field(3, ge=1, description="sampling rounds at most when steps is set (each samples more "
                                                 "prompts until the steps have enough kept samples)")
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


@dataclasses.dataclass
class TrainRun:
    """What ``rlm train`` hands a trainer: the start model, the task, where to write, and how."""

    model: str
    task: Task
    out: Path
    subset: str | None = None
    data_path: str | None = None
    resume: bool = False
    overwrite: bool = False
    command: list[str] | None = None
