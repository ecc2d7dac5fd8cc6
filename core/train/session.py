"""The training session every engine drives: accelerate (placement, several processes), the policy and its
frozen start copy, AdamW with warm-up and decay, gradient accumulation and clipping, and the step loop, which
logs each step, checkpoints, stops on a non-finite loss and writes ``final/``.

The session composes the pieces of their own modules: the run directory and manifest
(:mod:`rlm.core.train.run_dir`), checkpoints (:mod:`rlm.core.train.checkpoints`), the metrics log and progress
line (:mod:`rlm.core.train.metrics_log`) and the policy (:mod:`rlm.core.train.policy`). The SFT, RFT and RL loops
(:mod:`rlm.core.train.sft`, which :mod:`rlm.core.train.rft` runs, and :mod:`rlm.core.train.rl_engine`) build one.

Every directory is written under a temporary name and renamed when complete, so a run killed at any moment
(SIGKILL included) resumes from its last complete checkpoint with ``--resume`` and ends with the same weights as
an uninterrupted run: data order and sampling seeds are functions of (seed, step), and the optimizer,
scheduler and RNG states are restored.

This module does not import torch at import time.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

from rlm.core.errors import RlmError
from rlm.core.train.checkpoints import Checkpoints, ExtraModules, Gathered
from rlm.core.train.distributed import (
    build_accelerator,
    clip_grad_norm,
    full_model_state,
    full_optimizer_state,
    generation_context,
    is_fsdp,
)
from rlm.core.train.config import TrainConfig, TrainRun
from rlm.core.train.metrics_log import MetricsLog, require_tensorboard, truncate_metrics
from rlm.core.train.policy import load_policy, model_to_save, reference_logprobs, update_stats, weight_digest
from rlm.core.train.run_dir import RunManifest, check_run_dir, remove_partial_dirs

#: ``step_fn(step) -> metrics`` of one optimizer step (``_tokens``: tokens processed, for ``tokens_per_s``)
StepFn = Callable[[int], dict[str, Any]]
#: ``data_position(step) -> dict`` saved in a checkpoint's ``state.json``
DataPosition = Callable[[int], dict[str, Any]]


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


class NonFiniteLoss(RlmError):
    """A loss or gradient norm became NaN or infinite; the session stops at the last good checkpoint."""

    def __init__(self, step: int, what: str = "loss") -> None:
        super().__init__(f"the {what} became NaN or infinite at step {step}")
        self.step = step


class Session:
    """One training run: accelerate, the policy (and its frozen start copy), its optimizer and schedule, and
    the step loop (:meth:`run_steps`); it holds the run's :class:`Checkpoints`, :class:`MetricsLog` and
    manifest. ``total_steps`` may be set after construction (RFT knows it only after sampling)."""

    def __init__(self, trainer: Any, run: TrainRun, cfg: TrainConfig, total_steps: int, *,
                 updates_per_step: int = 1, extra_manifest: dict[str, Any] | None = None) -> None:
        import torch
        from accelerate.utils import set_seed
        from transformers.utils import logging as hf_logging

        self.trainer, self.run, self.cfg = trainer, run, cfg
        self.total_steps = total_steps
        self.updates_per_step = updates_per_step
        self.out = Path(run.out)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        hf_logging.disable_progress_bar()  # rlm's own progress line is the one to read
        self.acc = build_accelerator(cfg.precision)
        self.sharded = is_fsdp(self.acc)
        if self.sharded and cfg.lora.enabled:
            raise RlmError("lora.enabled under FSDP is not supported: a LoRA policy is small enough for plain "
                           "data parallelism (accelerate launch --multi_gpu)")
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device
        if cfg.tensorboard:
            require_tensorboard()
        self.manifest: RunManifest | None = None
        self.start_step = self._prepare_dir(extra_manifest or {})
        # the checkpoint this run resumes from (None: a fresh run)
        self.resume_dir = self.out / "checkpoints" / f"step-{self.start_step}" if self.start_step else None
        self.checkpoints = Checkpoints(self.out, self.acc, cfg.keep_checkpoints, self.resume_dir)
        self.metrics_log = MetricsLog(self.out, enabled=self.is_main, tensorboard=cfg.tensorboard,
                                      progress=cfg.progress)
        set_seed(cfg.seed)  # LoRA initialisation and anything else random; a resume restores the saved RNG
        self._load_policy()
        self.scaler = self._build_scaler()
        self._build_optimizer()
        self.updates_this_step = 0
        self.skipped_updates = 0  # fp16-mixed: updates the loss scaler skipped (non-finite gradients)

    # -- run directory and manifest ---------------------------------------------------------------------------
    def _prepare_dir(self, extra: dict[str, Any]) -> int:
        """Check the run directory on the main process and tell every process the step it starts from;
        clean a killed run's leftovers, write the manifest and cut ``metrics.jsonl`` back to that step."""
        error: str | None = None
        start = 0
        if self.is_main:
            try:
                start = check_run_dir(self.out, self.run, self.trainer.name, self.cfg)
            except RlmError as exc:
                error = str(exc)
        error, start = self._broadcast((error, start))  # every process learns the outcome from the main one
        if error:
            raise RlmError(error)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_partial_dirs(self.out)
            self.manifest = RunManifest(self.out, self.run, self.cfg, self.trainer.name, processes=self.world,
                                        start_step=start, extra=extra)
            self.manifest.update()
            truncate_metrics(self.out, start)
        self.acc.wait_for_everyone()
        return start

    def _broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def finish_manifest(self, **fields: Any) -> None:
        """Add ``fields`` to the manifest (main process)."""
        if self.manifest is not None:
            self.manifest.update(**fields)

    # -- the policy -------------------------------------------------------------------------------------------
    def _load_policy(self) -> None:
        from rlm.core.models.hf import resolve_model

        model_path = self._broadcast(resolve_model(self.run.model) if self.is_main else None)
        loaded = load_policy(self.run.model, model_path, self.cfg, self.device, resume_dir=self.resume_dir,
                             is_main=self.is_main)
        self.model_path, self.precision = loaded.model_path, loaded.precision
        self.dtype = self.precision.master
        self.tokenizer, self.chat_fallback = loaded.tokenizer, loaded.chat_fallback
        self.raw_model, self.ref, self.start_weights = loaded.model, loaded.ref, loaded.start
        self.finish_manifest(**self.precision.describe(), distributed=str(self.acc.distributed_type.value))

    def autocast(self) -> Any:
        """The context of every forward pass: autocast to the compute dtype in the mixed precisions."""
        return self.precision.autocast(self.device)

    def generation(self) -> Any:
        """The context of sampling from the policy: autocast, and an FSDP2 model gathered once for the call."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast())
        stack.enter_context(generation_context(self.acc, self.model))
        return stack

    @contextlib.contextmanager
    def reference_on_device(self) -> Any:
        """Context of the reference log-prob passes: with ``ref_offload`` the reference model is moved to the
        device for them and back to the CPU after."""
        offload = self.ref is not None and self.cfg.ref_offload and self.device.type != "cpu"
        if offload:
            self.ref.to(self.device)
        try:
            yield
        finally:
            if offload:
                self.ref.to("cpu")

    @property
    def policy(self) -> Any:
        """The unwrapped policy (generation, saving)."""
        return self.acc.unwrap_model(self.model)

    def ref_logprobs(self, t: dict[str, Any], temperature: float) -> Any:
        """Log-probs of the frozen start model (LoRA: the base with the adapter switched off)."""
        return reference_logprobs(self.ref, self.policy, self.model, t, temperature)

    def update_stats(self) -> dict[str, float]:
        """``delta_norm`` ‖θ − θ0‖₂, ``changed_frac`` and ``saved_changed_frac`` (the share of parameters that
        differ from θ0 in the master and in the saved dtype; LoRA: the merged low-rank updates)."""
        return update_stats(self.policy, self.start_weights, self.precision.save)

    def weight_digest(self) -> str:
        """sha256 of every parameter of this process's policy (to check that processes agree)."""
        return weight_digest(self.policy)

    def _model_to_save(self) -> tuple[Any, Any]:
        return model_to_save(self.policy, self.cfg.lora.enabled)

    # -- optimizers ---------------------------------------------------------------------------------------------
    def _lr_lambda(self) -> Callable[[int], float]:
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

    def _build_scaler(self) -> Any:
        """fp16-mixed: a dynamic loss scaler (restored on resume); else None."""
        if not self.precision.needs_scaler:
            return None
        import torch

        scaler = torch.amp.GradScaler(self.device.type)
        if self.resume_dir is not None:
            self.checkpoints.restore_scaler(scaler)
        return scaler

    def _build_optimizer(self) -> None:
        opt, sched = self._adamw([p for p in self.raw_model.parameters() if p.requires_grad], self.cfg.lr)
        if self.resume_dir is not None and not self.sharded:
            self.checkpoints.restore_optimizer(opt, sched)
        self.model, self.optimizer = self.acc.prepare(self.raw_model, opt)
        if self.resume_dir is not None and self.sharded:  # a sharded optimizer takes its full state after prepare
            self.checkpoints.restore_optimizer(self.optimizer, sched, sharded_model=self.model)
        self.scheduler = sched
        if self.resume_dir is not None:
            self.checkpoints.restore_rng()

    def make_optimizer(self, module: Any, lr: float, resume_name: str | None = None) -> tuple[Any, Any, Any]:
        """An AdamW + schedule for an extra module (PPO's critic), prepared by accelerate; a resumed run
        restores the states saved under ``resume_name``."""
        opt, sched = self._adamw([p for p in module.parameters() if p.requires_grad], lr)
        resume = self.resume_dir is not None and resume_name
        if resume and not self.sharded:
            self.checkpoints.restore_optimizer(opt, sched, f"{resume_name}_")
        module, opt = self.acc.prepare(module, opt)
        if resume and self.sharded:
            self.checkpoints.restore_optimizer(opt, sched, f"{resume_name}_", sharded_model=module)
        return module, opt, sched

    def load_extra_module(self, module: Any, name: str) -> None:
        """Load the weights of the extra module ``name`` from the checkpoint this run resumes from, if any."""
        self.checkpoints.load_module(module, name)

    # -- optimisation helpers -------------------------------------------------------------------------------
    def grad_sync(self, model: Any, last: bool) -> Any:
        """Context for one micro-batch's backward: gradients sync across processes only on the ``last``."""
        return contextlib.nullcontext() if last else self.acc.no_sync(model)

    def backward(self, loss: Any) -> None:
        """Backward of ``loss`` through accelerate (fp16-mixed: scaled by the loss scaler)."""
        self.acc.backward(self.scaler.scale(loss) if self.scaler is not None else loss)

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
        non-finite update; in fp16-mixed the loss scaler skips such an update and lowers its scale instead (the
        schedule still advances, as in torch's AMP recipe)."""
        import torch

        model = model or self.model
        optimizer = optimizer or self.optimizer
        scheduler = scheduler or self.scheduler
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.cfg.max_grad_norm is not None:
            norm = clip_grad_norm(self.acc, model, self.cfg.max_grad_norm)
        elif self.sharded:
            norm = clip_grad_norm(self.acc, model, math.inf)  # the norm only
        else:
            grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        norm = float(norm)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)  # skipped when a gradient is not finite
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.skipped_updates += 1
        elif not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step, what)
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.updates_this_step += 1
        return norm

    def check_finite(self, value: float, step: int, what: str = "loss") -> None:
        """Raise :class:`NonFiniteLoss` on every process when ``value`` is not finite on any."""
        v = float(self.reduce_sum(0.0 if math.isfinite(value) else 1.0))
        if v > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step, what)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, data_position: dict[str, Any] | None = None,
                        extra_modules: ExtraModules | None = None) -> Path:
        """Write ``checkpoints/step-N`` atomically (main process writes; every process saves its RNG)."""
        master = self.policy if self.precision.save_master and not self.cfg.lora.enabled else None
        gathered = None
        if self.sharded:  # every process takes part in gathering the full states
            gathered = Gathered(full_model_state(self.model), full_optimizer_state(self.model, self.optimizer),
                                {name: (full_model_state(m), full_optimizer_state(m, o))
                                 for name, (m, o, _s) in (extra_modules or {}).items()})
        return self.checkpoints.save(step, self._model_to_save, self.tokenizer, self.optimizer, self.scheduler,
                                     data_position, extra_modules, dtype=self.precision.save, master=master,
                                     scaler=self.scaler, gathered=gathered)

    def save_final(self) -> Path:
        lora = self.cfg.lora
        full = full_model_state(self.model) if self.sharded else None
        return self.checkpoints.save_final(lambda: model_to_save(self.policy, lora.enabled, merge=lora.merge_lora),
                                           self.tokenizer, dtype=self.precision.save, state_dict=full)

    # -- the loop ---------------------------------------------------------------------------------------
    def run_steps(self, step_fn: StepFn, data_position: DataPosition | None = None,
                  extra_modules: ExtraModules | None = None) -> Path:
        """Call ``step_fn(step) -> metrics`` for steps ``start+1 .. total``; log, checkpoint every
        ``save_every`` steps and at the end, write ``final/`` and return it."""
        position = data_position or (lambda step: None)
        self.metrics_log.start(self.trainer.name, self.total_steps, self.start_step)
        step = self.start_step
        try:
            for step in range(self.start_step + 1, self.total_steps + 1):
                self._log_step(step, step_fn)
                if step % self.cfg.save_every == 0 or step == self.total_steps:
                    self.save_checkpoint(step, position(step), extra_modules)
        except NonFiniteLoss as exc:
            self._stop_failed(exc, step, position, extra_modules)
        finally:
            self.metrics_log.close()
        return self._finish()

    def _log_step(self, step: int, step_fn: StepFn) -> None:
        """Run one step and log its metrics with the step's time (checkpoint writing excluded), tokens/s,
        ‖θ − θ0‖ and the lr it ran with."""
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        self.updates_this_step = 0
        metrics = step_fn(step)
        metrics["step"] = step
        metrics.update(self.update_stats())
        if self.scaler is not None:
            metrics["loss_scale"] = float(self.scaler.get_scale())
            metrics["skipped_updates"] = self.skipped_updates
        metrics["step_time"] = time.perf_counter() - t0
        ntok = metrics.pop("_tokens", None)
        if ntok is not None:
            metrics["tokens_per_s"] = ntok / max(metrics["step_time"], 1e-9)
        metrics["lr"] = lr
        self.metrics_log.write(metrics)

    def _stop_failed(self, exc: NonFiniteLoss, step: int, position: Callable[[int], Any],
                     extra_modules: ExtraModules | None) -> None:
        """Checkpoint the last good weights if no checkpoint holds them, mark the run failed and raise."""
        good = step - 1
        last_good = self.checkpoints.last_good
        # the weights are still those after step-1 unless an update of this step went through
        if good > 0 and self.updates_this_step == 0 and (last_good is None or last_good.name != f"step-{good}"):
            self.save_checkpoint(good, position(good), extra_modules)
        last_good = self.checkpoints.last_good
        kept = f"; last good checkpoint: {last_good}" if last_good else ""
        self.finish_manifest(status="failed", error=str(exc), failed_step=exc.step)
        raise RlmError(f"{exc}; training stopped{kept}") from None

    def _finish(self) -> Path:
        """Write ``final/``, record every process's weight digest and fail if they differ."""
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
