"""What every trainer shares: configs, model loading (full or LoRA), AdamW with warm-up and decay, gradient
accumulation and clipping, atomic checkpoints with exact resume, ``metrics.jsonl``, the manifest, the progress
line, optional TensorBoard and accelerate for placement and several processes. The SFT objective lives here
too; the RL loop is in :mod:`rlm.core.train.rl`.

Run directory (``--out``)::

    manifest.json                 command, resolved config, seed, inputs, versions, status
    metrics.jsonl                 one JSON object per step (keys in METRIC_KEYS; null where not applicable)
    checkpoints/step-N/           HF directory (LoRA runs: the merged model) + trainer_state/ (optimizer,
                                  scheduler, RNG of every process, data position; adapter/ and critic/ if any)
    final/                        HF directory of the trained model

Every directory is written under a temporary name and renamed when complete, so a run killed at any moment
(SIGKILL included) resumes from its last complete checkpoint with ``--resume`` and ends with the same weights as
an uninterrupted run: data order and sampling seeds are functions of (seed, step), and the optimizer,
scheduler and RNG states are restored.

This module does not import torch at import time (``rlm plugins`` stays fast); the trainer plugins import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rlm.core.contracts import Example, PluginConfig, Task
from rlm.core.errors import RlmError

METRIC_KEYS = ("step", "reward_mean", "accuracy", "adv_abs_mean", "adv_min", "zero_std_frac", "kl", "clip_frac",
               "entropy", "grad_norm", "delta_norm", "tokens_per_s", "step_time")
STATE_DIR = "trainer_state"


# -- configs ---------------------------------------------------------------------------------------------

class LoraSettings(PluginConfig):
    """LoRA through peft (off by default: full fine-tuning)."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    lora: LoraSettings = LoraSettings()
    tensorboard: bool = False
    progress: bool = True


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the task's reference responses (paper: lr 5e-6, batch 128, 3 epochs, 3 %
    warm-up)."""

    lr: float = Field(5e-5, gt=0, description="paper: 5e-6")
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    epochs: float = Field(3.0, gt=0, description="passes over the data when steps is unset")
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step, all processes (paper: 128)")
    max_response_tokens: int = Field(512, ge=1)


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


# -- schedule --------------------------------------------------------------------------------------------

def lr_factor(step: int, total: int, schedule: str, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warm-up over ``warmup``
    steps, then constant, linear or cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise RlmError(f"unknown schedule {schedule!r}")


# -- data order ------------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def take(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices ``start .. start+count`` of the endless sequence of seeded epoch permutations of ``range(n)``."""
    out: list[int] = []
    orders: dict[int, list[int]] = {}  # one shuffle per epoch touched, not one per position
    for pos in range(start, start + count):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(orders[epoch][offset])
    return out


def load_examples(run: TrainRun, cfg: TrainConfig, *, need_reference: bool = False) -> list[Example]:
    try:
        examples = run.task.examples(run.subset, split="train", limit=cfg.train_limit, seed=cfg.seed,
                                     path=run.data_path)
    except RlmError:
        raise
    except Exception as exc:
        raise RlmError(f"task {run.task.name!r} cannot load training data: {exc}") from exc
    sub = f" (subset {run.subset!r})" if run.subset else ""
    if not examples:
        raise RlmError(f"task {run.task.name!r}{sub} has no training data")
    if need_reference:
        examples = [e for e in examples if e.reference]
        if not examples:
            raise RlmError(f"task {run.task.name!r}{sub} has no reference responses to fine-tune on; "
                           f"use --trainer rft or an RL trainer")
    return list(examples)


# -- token batches ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class TokenBatch:
    """Prompts left-padded to width P, responses right-padded to width T: ``input_ids`` is (B, P+T) and the
    response token ``t`` of row ``b`` is ``input_ids[b, P+t]`` where ``response_mask[b, t]`` is 1."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    pad_id: int

    def tensors(self, rows: list[int] | None = None, device: Any = None) -> dict[str, Any]:
        import torch

        rows = list(range(len(self.prompt_ids))) if rows is None else rows
        P = max(1, max(len(self.prompt_ids[r]) for r in rows))
        T = max(1, max(len(self.response_ids[r]) for r in rows))
        ids = torch.full((len(rows), P + T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), P + T), dtype=torch.long)
        rmask = torch.zeros((len(rows), T), dtype=torch.float32)
        for i, r in enumerate(rows):
            p, c = self.prompt_ids[r], self.response_ids[r]
            if p:
                ids[i, P - len(p):P] = torch.tensor(p)
                attn[i, P - len(p):P] = 1
            if c:
                ids[i, P:P + len(c)] = torch.tensor(c)
                attn[i, P:P + len(c)] = 1
                rmask[i, :len(c)] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "response_mask": rmask,
               "P": P, "T": T}
        if device is not None:
            for k in ("input_ids", "attention_mask", "position_ids", "response_mask"):
                out[k] = out[k].to(device)
        return out

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_response(self) -> int:
        return max((len(c) for c in self.response_ids), default=0)


def micro_batches(rows: list[int], size: int) -> list[list[int]]:
    """``rows`` cut into consecutive micro-batches of at most ``size`` (gradient accumulation, no-grad passes)."""
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id when it has none."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def forward_response(model: Any, t: dict[str, Any], *, temperature: float = 1.0, entropy: bool = False,
                     hidden: bool = False) -> tuple[Any, Any]:
    """Log-probs (B, T) of the response tokens under ``model`` (logits divided by ``temperature``) and, if
    asked, the per-token entropy (detached). ``hidden=True`` returns the final hidden states before each
    response token instead (for a value head)."""
    from rlm.core.train import algorithms as rl

    P, T = t["P"], t["T"]
    if hidden:
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"],
                    use_cache=False)
        return out.last_hidden_state[:, P - 1:P + T - 1], None
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"],
                use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1]
    if temperature and temperature != 1.0:
        logits = logits / temperature
    labels = t["input_ids"][:, P:P + T]
    logp = rl.logprobs_from_logits(logits, labels)
    ent = None
    if entropy:
        import torch

        with torch.no_grad():
            ent = rl.entropy_from_logits(logits.detach())
    return logp, ent


# -- the session: model, optimizer, checkpoints, metrics ---------------------------------------------------

def _rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    steps = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step-") and (d / STATE_DIR / "state.json").is_file():
                try:
                    steps.append(int(d.name[5:]))
                except ValueError:
                    pass
    return sorted(steps)


class Session:
    """One training run: accelerate, the policy (and its frozen start copy), optimizer, schedule,
    checkpoints, metrics and progress. Trainers drive it with ``run_steps``."""

    def __init__(self, trainer: Any, run: TrainRun, cfg: TrainConfig, total_steps: int, *,
                 updates_per_step: int = 1, extra_manifest: dict[str, Any] | None = None) -> None:
        import torch
        from accelerate import Accelerator

        self.trainer, self.run, self.cfg = trainer, run, cfg
        self.total_steps = total_steps
        self.updates_per_step = updates_per_step
        self.out = Path(run.out)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # rlm's own progress line is the one to read
        # several processes without a GPU: gloo on CPU (accelerate only picks it when told the run is on CPU)
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.acc = Accelerator(cpu=multi and not torch.cuda.is_available())
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device
        self.start_step = 0
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise RlmError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self._prepare_dir(extra_manifest or {})
        # the checkpoint this run resumes from (None: a fresh run)
        self.resume_dir = self.out / "checkpoints" / f"step-{self.start_step}" if self.start_step else None
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # LoRA initialisation and anything else random; a resume restores the saved RNG
        self._load_models()
        self._build_optimizer()
        self._metrics_file = None
        self._tb = None
        self._progress = None
        self.last_good: Path | None = self.resume_dir
        self.updates_this_step = 0

    # -- directory and manifest ---------------------------------------------------------------------------
    def _prepare_dir(self, extra: dict[str, Any]) -> None:
        from rlm.core.io.manifest import write_manifest

        out, run = self.out, self.run
        error: str | None = None
        start = 0
        if self.is_main:
            try:
                start = self._check_dir()
            except RlmError as exc:
                error = str(exc)
        # every process learns the outcome from the main one
        error, start = self._broadcast((error, start))
        if error:
            raise RlmError(error)
        self.start_step = start
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for pattern in ("checkpoints/.step-*", "checkpoints/.rng-step-*", ".final.*"):
                for d in out.glob(pattern):
                    _rmtree(d)  # partial directories of a killed run
            self.manifest_extra = {
                "kind": "train", "trainer": self.trainer.name, "task": run.task.name, "subset": run.subset,
                "model": run.model, "status": "running", "resumed_from_step": start or None,
                "processes": self.world, **extra}
            inputs = {"model": run.model} if Path(run.model).exists() else {}
            if run.data_path:
                inputs["data"] = run.data_path
            self._manifest_kwargs = dict(command=run.command, config=self.cfg, seed=self.cfg.seed, inputs=inputs)
            write_manifest(out, **self._manifest_kwargs, extra=self.manifest_extra)
            self._truncate_metrics(start)
        self.acc.wait_for_everyone()

    def _broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _check_dir(self) -> int:
        out, run = self.out, self.run
        if out.exists() and not out.is_dir():
            raise RlmError(f"output path {out} exists and is not a directory")
        if not out.is_dir() or not any(out.iterdir()):
            return 0
        manifest = out / "manifest.json"
        if run.overwrite and not run.resume:
            _rmtree(out)
            return 0
        prev: dict[str, Any] = {}
        if manifest.is_file():
            try:
                prev = json.loads(manifest.read_text())
            except ValueError:
                prev = {}
        if not run.resume:
            what = f"a {prev.get('trainer')} run on {prev.get('task')}" if prev.get("kind") == "train" else "other files"
            raise RlmError(f"output directory {out} already holds {what}; pass --resume to continue it or "
                           f"--overwrite to replace it")
        if prev.get("kind") != "train":
            raise RlmError(f"cannot resume: {out} holds no rlm training run (manifest.json missing or foreign)")
        if prev.get("trainer") != self.trainer.name or prev.get("task") != run.task.name:
            raise RlmError(f"cannot resume: {out} holds a {prev.get('trainer')} run on {prev.get('task')}, not "
                           f"{self.trainer.name} on {run.task.name}")
        old = dict(prev.get("config") or {})
        new = self.cfg.model_dump(mode="json")
        for d in (old, new):
            for k in ("steps", "progress", "tensorboard", "num_threads"):
                d.pop(k, None)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise RlmError(f"cannot resume: the config differs from the run in {out} in: {', '.join(diff)}")
        steps = checkpoint_steps(out)
        return steps[-1] if steps else 0

    def _truncate_metrics(self, start: int) -> None:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start:
                    keep.append(line)
            except ValueError:
                break  # a line cut by a kill
        from rlm.core.io.atomic import atomic_write_text

        atomic_write_text(path, "".join(x + "\n" for x in keep))

    def finish_manifest(self, **fields: Any) -> None:
        if self.is_main:
            from rlm.core.io.manifest import write_manifest

            self.manifest_extra.update(fields)
            write_manifest(self.out, **self._manifest_kwargs, extra=self.manifest_extra)

    # -- models ---------------------------------------------------------------------------------------
    def _load_models(self) -> None:
        import torch

        from rlm.core.models.hf import load_model, resolve_model

        cfg, resume_dir = self.cfg, self.resume_dir
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        self.model_path = resolve_model(self.run.model) if self.is_main else None
        self.model_path = self._broadcast(self.model_path)
        src = self.model_path if (resume_dir is None or cfg.lora.enabled) else str(resume_dir)
        model, tok = load_model(src, dtype=dtype)
        self.dtype = dtype
        if not getattr(tok, "chat_template", None):
            if cfg.require_chat_template:
                raise RlmError(f"model {self.run.model} has no chat template (require_chat_template is set)")
            self.chat_fallback = True
            if self.is_main:
                print(f"warning: model {self.run.model} has no chat template; prompts use the plain fallback "
                      f"format (the question, then a newline)", file=sys.stderr)
        else:
            self.chat_fallback = False
        if tok.eos_token_id is None:
            raise RlmError(f"the tokenizer of {self.run.model} has no eos token")
        self.tokenizer = tok
        if cfg.lora.enabled:
            from peft import LoraConfig, PeftModel, get_peft_model

            if resume_dir is not None:
                model = PeftModel.from_pretrained(model, str(resume_dir / STATE_DIR / "adapter"), is_trainable=True)
            else:
                lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
                model = get_peft_model(model, lc)
            self.ref = None  # the base model with the adapter disabled
        else:
            # the frozen start model: reference log-probs for the KL term and θ0 for delta_norm
            self.ref, _ = load_model(self.model_path, dtype=dtype, with_tokenizer=False)
            self.ref.requires_grad_(False)
            self.ref.eval()
            self.ref.to(self.device)
        model.to(self.device)
        model.train()
        if hasattr(model, "config"):
            model.config.use_cache = False
        self.raw_model = model

    def ref_logprobs(self, t: dict[str, Any], temperature: float) -> Any:
        """Log-probs of the frozen start model (LoRA: the base with the adapter switched off)."""
        import torch

        with torch.no_grad():
            if self.ref is not None:
                return forward_response(self.ref, t, temperature=temperature)[0]
            with self.policy.disable_adapter():
                return forward_response(self.model, t, temperature=temperature)[0]

    @property
    def policy(self) -> Any:
        """The unwrapped policy (generation, saving)."""
        return self.acc.unwrap_model(self.model)

    def _lr_lambda(self) -> Any:
        cfg = self.cfg

        def factor(s: int) -> float:  # reads the step count lazily (RFT knows it only after sampling)
            total = self.total_steps * self.updates_per_step
            return lr_factor(s, total, cfg.schedule, int(round(cfg.warmup_ratio * total)), cfg.min_lr_ratio)

        return factor

    def _adamw(self, params: list[Any], lr: float) -> tuple[Any, Any]:
        import torch

        cfg = self.cfg
        opt = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda())

    def _restore_optimizer(self, opt: Any, sched: Any, prefix: str = "") -> None:
        """Load ``{prefix}optimizer.pt`` and ``{prefix}scheduler.pt`` of the checkpoint this run resumes from."""
        import torch

        st = self.resume_dir / STATE_DIR
        opt.load_state_dict(torch.load(st / f"{prefix}optimizer.pt", map_location="cpu", weights_only=False))
        sched.load_state_dict(torch.load(st / f"{prefix}scheduler.pt", map_location="cpu", weights_only=False))

    def _build_optimizer(self) -> None:
        opt, sched = self._adamw([p for p in self.raw_model.parameters() if p.requires_grad], self.cfg.lr)
        if self.resume_dir is not None:
            self._restore_optimizer(opt, sched)
        self.model, self.optimizer = self.acc.prepare(self.raw_model, opt)
        self.scheduler = sched
        if self.resume_dir is not None:
            self._restore_rng(self.resume_dir)

    def make_optimizer(self, module: Any, lr: float, resume_name: str | None = None) -> tuple[Any, Any, Any]:
        """An AdamW + schedule for an extra module (PPO's critic), prepared by accelerate."""
        opt, sched = self._adamw([p for p in module.parameters() if p.requires_grad], lr)
        if self.resume_dir is not None and resume_name:
            self._restore_optimizer(opt, sched, f"{resume_name}_")
        module, opt = self.acc.prepare(module, opt)
        return module, opt, sched

    # -- optimisation helpers -------------------------------------------------------------------------------
    def grad_sync(self, model: Any, last: bool) -> Any:
        """Context for one micro-batch's backward: gradients sync across processes only on the ``last``."""
        return contextlib.nullcontext() if last else self.acc.no_sync(model)

    def reduce_sum(self, value: float | Any) -> Any:
        """Sum a number or tensor over processes (returns a float64 tensor)."""
        import torch

        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.world > 1:
            t = self.acc.reduce(t, reduction="sum")
        return t

    def optimizer_step(self, step: int, model: Any = None, optimizer: Any = None, scheduler: Any = None,
                       what: str = "loss") -> float:
        """Clip, check for non-finite gradients, step. Raises :class:`NonFiniteLoss` instead of applying a
        non-finite update."""
        import torch

        model = model or self.model
        optimizer = optimizer or self.optimizer
        scheduler = scheduler or self.scheduler
        if self.cfg.max_grad_norm is not None:
            norm = self.acc.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
        else:
            grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        norm = float(norm)
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step, what)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.updates_this_step += 1
        return norm

    def check_finite(self, value: float, step: int, what: str = "loss") -> None:
        v = float(self.reduce_sum(0.0 if math.isfinite(value) else 1.0))
        if v > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step, what)

    def delta_norm(self) -> float:
        """‖θ − θ0‖₂ over the model's weights (LoRA: the merged low-rank updates)."""
        import torch

        policy = self.policy
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            if self.ref is not None:
                ref = dict(self.ref.named_parameters())
                for name, p in policy.named_parameters():
                    total += (p.detach().double() - ref[name].detach().double()).pow(2).sum().cpu()
            else:
                for module in policy.modules():
                    if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
                        for adapter in getattr(module, "active_adapters", []):
                            if adapter in module.lora_A:
                                total += module.get_delta_weight(adapter).double().pow(2).sum().cpu()
        return float(total.sqrt())

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _hf_state(self) -> tuple[Any, Any]:
        """(model to save as a plain HF directory, adapter model or None)."""
        policy = self.policy
        if self.cfg.lora.enabled:
            import copy

            merged = copy.deepcopy(policy).merge_and_unload()
            return merged, policy
        return policy, None

    def save_checkpoint(self, step: int, data_position: dict[str, Any] | None = None,
                        extra_modules: dict[str, tuple[Any, Any, Any]] | None = None) -> Path:
        """Write ``checkpoints/step-N`` atomically (main process writes; every process saves its RNG)."""
        import torch

        from rlm.core.io.atomic import atomic_dir, atomic_write_json

        target = self.out / "checkpoints" / f"step-{step}"
        rng_dir = self.out / "checkpoints" / f".rng-step-{step}"
        if self.world > 1:  # RNG states of the other processes are collected before the atomic write
            rng_dir.mkdir(parents=True, exist_ok=True)
            if not self.is_main:
                torch.save(_rng_state(), rng_dir / f"rng-{self.rank}.pt")
        self.acc.wait_for_everyone()
        if self.is_main:
            model, adapter = self._hf_state()
            with atomic_dir(target, overwrite=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                st = tmp / STATE_DIR
                st.mkdir()
                if adapter is not None:
                    adapter.save_pretrained(st / "adapter")
                torch.save(self.optimizer.state_dict(), st / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), st / "scheduler.pt")
                torch.save(_rng_state(), st / "rng-0.pt")
                for r in range(1, self.world):
                    shutil.copy(rng_dir / f"rng-{r}.pt", st / f"rng-{r}.pt")
                for name, (module, opt, sched) in (extra_modules or {}).items():
                    from safetensors.torch import save_file

                    sd = {k: v.detach().contiguous().cpu() for k, v in self.acc.unwrap_model(module).state_dict().items()}
                    save_file(sd, str(st / f"{name}.safetensors"))
                    torch.save(opt.state_dict(), st / f"{name}_optimizer.pt")
                    torch.save(sched.state_dict(), st / f"{name}_scheduler.pt")
                atomic_write_json(st / "state.json", {"step": step, "data_position": data_position or {},
                                                      "processes": self.world})
            _rmtree(rng_dir)
            self._prune()
        self.last_good = target
        self.acc.wait_for_everyone()
        return target

    def _prune(self) -> None:
        keep = self.cfg.keep_checkpoints
        if keep is None:
            return
        for s in checkpoint_steps(self.out)[:-keep]:
            _rmtree(self.out / "checkpoints" / f"step-{s}")

    def load_extra_module(self, module: Any, name: str) -> None:
        if self.resume_dir is None:
            return
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(self.resume_dir / STATE_DIR / f"{name}.safetensors")))

    def _restore_rng(self, resume_dir: Path) -> None:
        import torch

        path = resume_dir / STATE_DIR / f"rng-{self.rank}.pt"
        if not path.is_file():
            raise RlmError(f"cannot resume with {self.world} processes: {path} is missing "
                           f"(the run was checkpointed with fewer processes)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        random.setstate(state["python"])
        import numpy as np

        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["torch"])

    def save_final(self) -> Path:
        from rlm.core.models.hf import save_model

        target = self.out / "final"
        if self.is_main:
            model, _ = self._hf_state()
            save_model(model, self.tokenizer, target, overwrite=True)
        self.acc.wait_for_everyone()
        return target

    def weight_digest(self) -> str:
        """sha256 of every parameter of this process's policy (to check that processes agree)."""
        h = hashlib.sha256()
        for name, p in sorted(self.policy.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().float().numpy().tobytes())
        return h.hexdigest()

    # -- logging --------------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: metrics.get(k) for k in METRIC_KEYS}
        row.update({k: v for k, v in metrics.items() if k not in row})
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = None  # keep metrics.jsonl strict JSON
        if not self.is_main:
            return
        if self._metrics_file is None:
            self._metrics_file = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self.cfg.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, row["step"])
        if self._progress is not None:
            prog, task = self._progress
            keys = [("loss", "loss"), ("reward_mean", "reward"), ("accuracy", "acc"), ("adv_abs_mean", "|A|"),
                    ("kl", "kl"), ("grad_norm", "gnorm"), ("delta_norm", "Δθ"), ("tokens_per_s", "tok/s")]
            info = "  ".join(f"{label} {row[k]:.4g}" for k, label in keys if isinstance(row.get(k), (int, float)))
            prog.update(task, completed=row["step"], info=info)

    def __enter__(self) -> "Session":
        if self.is_main and self.cfg.progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            prog = Progress(TextColumn(f"[bold]{self.trainer.name}[/bold]"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                            transient=False)
            task = prog.add_task("train", total=self.total_steps, completed=self.start_step, info="")
            prog.start()
            self._progress = (prog, task)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress[0].stop()
            self._progress = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()

    # -- the loop ---------------------------------------------------------------------------------------
    def run_steps(self, step_fn: Any, data_position: Any = None,
                  extra_modules: dict[str, tuple[Any, Any, Any]] | None = None) -> Path:
        """Call ``step_fn(step) -> metrics`` for steps ``start+1 .. total``; checkpoint, log, finish."""
        with self:
            step = self.start_step
            try:
                for step in range(self.start_step + 1, self.total_steps + 1):
                    t0 = time.perf_counter()
                    lr = self.scheduler.get_last_lr()[0]
                    self.updates_this_step = 0
                    metrics = step_fn(step)
                    metrics["step"] = step
                    metrics["delta_norm"] = self.delta_norm()
                    metrics["step_time"] = time.perf_counter() - t0  # checkpoint writing excluded
                    ntok = metrics.pop("_tokens", None)
                    if ntok is not None:
                        metrics["tokens_per_s"] = ntok / max(metrics["step_time"], 1e-9)
                    metrics["lr"] = lr
                    self.log(metrics)
                    if step % self.cfg.save_every == 0 or step == self.total_steps:
                        pos = data_position(step) if data_position else None
                        self.save_checkpoint(step, pos, extra_modules)
            except NonFiniteLoss as exc:
                good = step - 1
                # the weights are still those after step-1 unless an update of this step went through
                if good > 0 and self.updates_this_step == 0 and \
                        (self.last_good is None or self.last_good.name != f"step-{good}"):
                    pos = data_position(good) if data_position else None
                    self.save_checkpoint(good, pos, extra_modules)
                kept = f"; last good checkpoint: {self.last_good}" if self.last_good else ""
                self.finish_manifest(status="failed", error=str(exc), failed_step=exc.step)
                raise RlmError(f"{exc}; training stopped{kept}") from None
        final = self.save_final()
        digests = [self.weight_digest()]
        if self.world > 1:
            from accelerate.utils import gather_object

            digests = gather_object(digests)
        self.finish_manifest(status="complete", steps=self.total_steps, final=str(final),
                             rank_weight_sha256=list(digests))
        if self.is_main and len(set(digests)) > 1:
            raise RlmError(f"processes ended with different weights: {digests}")
        return final


class NonFiniteLoss(RlmError):
    def __init__(self, step: int, what: str = "loss") -> None:
        super().__init__(f"the {what} became NaN or infinite at step {step}")
        self.step = step


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}


# -- SFT -------------------------------------------------------------------------------------------------

def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], cfg: TrainConfig, max_response: int,
                 system: str | None = None) -> TokenBatch:
    """Chat-format each (user prompt, response) pair; the response ends with the eos token."""
    from rlm.core.eval.generation import chat_prompt

    prompts = [chat_prompt(tokenizer, p, system=system) for p, _ in pairs]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    P, R = [], []
    for p, r in zip(p_ids, r_ids):
        p = list(p)[-cfg.max_prompt_tokens:]
        r = (list(r) + [eos])[:max_response]
        P.append(p)
        R.append(r)
    return TokenBatch(P, R, pad_token_id(tokenizer))


def run_sft(trainer: Any, run: TrainRun, pairs_fn: Any = None) -> Path:
    """Supervised fine-tuning: token-mean NLL over the response tokens of (prompt, response) pairs. The pairs
    are the task's examples with their reference responses, or what ``pairs_fn(session)`` returns as
    ``(pairs, manifest_fields)`` (RFT samples them with the session's model)."""
    from rlm.core.train import algorithms as rl

    cfg: SFTConfig = trainer.config
    examples = None
    if pairs_fn is None:
        examples = load_examples(run, cfg, need_reference=True)
    sess = Session(trainer, run, cfg, cfg.steps or 1)
    if cfg.batch_size % sess.world:
        raise RlmError(f"batch_size {cfg.batch_size} is not divisible by the {sess.world} processes")
    if pairs_fn is None:
        pairs = [(e.prompt, e.reference or "") for e in examples]
        fields: dict[str, Any] = {}
    else:
        pairs, fields = pairs_fn(sess)
    n = len(pairs)
    sess.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * n / cfg.batch_size))
    sess.finish_manifest(train_examples=n, **fields)
    data = encode_pairs(sess.tokenizer, pairs, cfg, cfg.max_response_tokens, cfg.system_prompt)
    local = cfg.batch_size // sess.world

    def step_fn(step: int) -> dict[str, Any]:
        idx = take(n, cfg.seed, (step - 1) * cfg.batch_size, cfg.batch_size)[sess.rank * local:(sess.rank + 1) * local]
        batch = TokenBatch([data.prompt_ids[i] for i in idx], [data.response_ids[i] for i in idx], data.pad_id)
        ntok = sess.reduce_sum(sum(len(r) for r in batch.response_ids))
        micro = micro_batches(list(range(len(batch))), cfg.micro_batch_size)
        loss_sum = ent_sum = 0.0
        for i, rows in enumerate(micro):
            t = batch.tensors(rows, sess.device)
            with sess.grad_sync(sess.model, last=i == len(micro) - 1):
                logp, ent = forward_response(sess.model, t, entropy=True)
                loss = rl.sft_loss(logp, t["response_mask"], num_tokens=ntok.to(logp.dtype))
                sess.acc.backward(loss * sess.world)
            loss_sum += float(loss.detach())
            ent_sum += float((ent * t["response_mask"]).sum())
        total_loss = float(sess.reduce_sum(loss_sum))
        sess.check_finite(total_loss, step)
        gnorm = sess.optimizer_step(step)
        return {"loss": total_loss, "entropy": float(sess.reduce_sum(ent_sum)) / max(float(ntok), 1.0),
                "grad_norm": gnorm, "_tokens": float(ntok), "epoch": (step * cfg.batch_size) / n}

    def position(step: int) -> dict[str, Any]:
        epoch, offset = divmod(step * cfg.batch_size, n)
        return {"epoch": epoch, "offset": offset, "examples_seen": step * cfg.batch_size}

    return sess.run_steps(step_fn, position)

