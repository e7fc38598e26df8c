"""The LightningModule around ``models.gpt.GPT``, its learning-rate schedule, and the checkpointing callback."""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from scaling_lab.fit.io import integrity, store
from scaling_lab.models.gpt import GPT
from scaling_lab.pipeline import signals
from scaling_lab.models.shapes import GPTConfig
from scaling_lab.pipeline.runspec import duration


class DivergenceError(RuntimeError):
    """Training loss became NaN/inf or rose above the configured threshold."""


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay that reaches ``min_ratio`` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, total_steps: int, warmup_steps: int, decay_start: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, constant 1 until ``decay_start``, then linear decay that reaches
    ``min_ratio`` at the last step (Hägele et al. 2024). Up to ``decay_start`` it does not depend on the budget, so
    every budget's decay can branch from one stable run's checkpoint."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    return 1.0 - (1 - min_ratio) * progress


class LitGPT(L.LightningModule):
    def __init__(self, model_config: GPTConfig, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                 weight_decay: float, betas: tuple[float, float], diverge_loss: float, check_every: int,
                 compile: bool = False, decay_start: int | None = None, accumulate: int = 1,
                 batch_size: int = 0, sequences: int = 0):
        super().__init__()
        # micro-batches per step (train.micro_batch_size), and the run's batch and sequences: the last step's batch
        # may be shorter, and its micro-batches' losses are weighted so that the step's gradient is its batch's mean
        self.accumulate, self.batch_size, self.sequences = accumulate, batch_size, sequences
        self.model = GPT(model_config)
        # training and validation steps call forward_model: the model's forward, compiled with train.compile. A
        # function, not a submodule, so the state dict holds model.* alone and a checkpoint resumes either way
        self.forward_model = torch.compile(self.model.forward) if compile else self.model.forward
        self.lr, self.total_steps, self.warmup_steps, self.min_lr_ratio = lr, total_steps, warmup_steps, min_lr_ratio
        self.decay_start = decay_start  # None: warmup + cosine; else warmup-stable-decay
        self.weight_decay, self.betas = weight_decay, betas
        self.diverge_loss, self.check_every = diverge_loss, max(1, check_every)
        self.tokens_resumed = 0  # training tokens of earlier attempts, from the checkpoint (all ranks)
        self.tokens_local = 0  # training tokens this process has seen in this attempt
        self.last_train_loss = float("nan")
        self.windows_hash = ""  # a chained hash of the training windows' indices, step by step (this rank)
        self.val_curve: list[tuple[int, float]] = []  # (training tokens seen, validation-curve loss)
        self.train_curve: list[tuple[int, float]] = []  # (training tokens seen, training loss), every check_every

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.forward_model(x, y)
        self.tokens_local += x.numel()
        self._hash_windows()
        if batch_idx % self.accumulate == 0:  # a step's first (or only) micro-batch: the same one on every rank
            self._check(loss, self._tokens_after_step(x.size(1)))
        if self.accumulate == 1:
            return loss
        # Lightning divides each micro-batch's loss by `accumulate`; weighted by its share of this step's batch on
        # this rank, the step's gradient is that batch's mean, a shorter last batch's included
        share = min(self.batch_size, self.sequences - self.global_step * self.batch_size) // self.trainer.world_size
        return loss * (x.size(0) * self.accumulate / share)

    def _hash_windows(self) -> None:
        """Chain the indices of the windows this batch trained on into ``windows_hash``."""
        fed = getattr(getattr(self.trainer, "datamodule", None), "fed", None)
        if fed:
            windows = np.asarray(fed.popleft(), dtype=np.int64)
            self.windows_hash = hashlib.blake2b(self.windows_hash.encode() + windows.tobytes(),
                                                digest_size=16).hexdigest()

    def _tokens_after_step(self, seq_len: int) -> int:
        """Training tokens seen by all ranks once this step is done (its micro-batches still to come counted)."""
        if self.accumulate == 1:
            return self.tokens_resumed + self.tokens_local * self.trainer.world_size
        return min((self.global_step + 1) * self.batch_size, self.sequences) * seq_len

    def _check(self, loss, tokens: int) -> None:
        """Every check_every-th step (and the last), on every rank together: the training loss logged and the
        divergence decided (not every step: .item() synchronises a GPU)."""
        step = self.global_step
        if step % self.check_every == 0 or step == self.total_steps - 1:
            value = loss.item()
            if os.environ.get(store.FAULT_ENV) == f"nan-loss-rank{self.global_rank}":  # tests: one rank diverges
                value = math.nan
            self.last_train_loss = value
            self.train_curve.append((tokens, value))
            worst = self._worst_loss(value)
            if not math.isfinite(worst) or worst > self.diverge_loss:
                raise DivergenceError(f"diverged at step {step}: training loss {worst:.4g} "
                                      f"(threshold train.diverge_loss={self.diverge_loss})")
            self.log_dict({"train/loss": value, "train/lr": self.lr_schedulers().get_last_lr()[0],
                           "train/tokens": float(tokens)}, prog_bar=True)

    def _worst_loss(self, value: float) -> float:
        """The highest training loss over the ranks at this step (NaN as inf): every rank takes the same decision
        at the same step, so a divergence on one rank ends them all instead of leaving the others waiting in the
        next all-reduce."""
        value = value if math.isfinite(value) else math.inf
        if self.trainer.world_size == 1:
            return value
        import torch.distributed as dist

        worst = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(worst, reduce_op=dist.ReduceOp.MAX).item())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.forward_model(x, y)
        self.log("val/loss", loss, prog_bar=True, batch_size=x.size(0))

    def on_validation_epoch_end(self):
        if "val/loss" in self.trainer.callback_metrics:
            tokens = self.tokens_resumed + self.tokens_local * self.trainer.world_size
            self.val_curve.append((tokens, float(self.trainer.callback_metrics["val/loss"])))

    @torch.inference_mode()
    def heldout_loss(self, loader) -> dict:
        """The fixed final evaluation over every window of ``loader``: mean nats per token, the summed nats, and
        the standard error of the mean from the spread of per-window losses (windows are a stratified sample)."""
        was_training = self.model.training
        self.model.eval()
        per_window = []
        # the loss the fits read is computed in full fp32 (training may run fp32 matmuls on TF32 tensor cores)
        matmul_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            for x, y in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                logits = self.model(x)
                nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
                per_window.append(nll.double().mean(dim=1).cpu())
        finally:
            torch.set_float32_matmul_precision(matmul_precision)
        self.model.train(was_training)
        w = torch.cat(per_window)
        n_tokens = int(w.numel() * loader.dataset.seq_len)
        mean = float(w.mean())
        stderr = float(w.std(unbiased=True) / math.sqrt(w.numel())) if w.numel() > 1 else float("nan")
        return {"mean": mean, "nats_total": mean * n_tokens, "stderr": stderr, "windows": int(w.numel())}

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        # On CUDA the fused AdamW kernel (one launch for every parameter), unless a GradScaler (16-mixed) scales
        # the gradients: Lightning unscales them only for an optimizer that does not do it itself
        fused = (all(p.is_cuda for p in decay + no_decay)
                 and getattr(self.trainer.precision_plugin, "scaler", None) is None)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=self.betas,
                                **({"fused": True} if fused else {}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_multiplier(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients, lest a GradScaler's
        # scaled ones be clipped; a fused AdamW runs without one (configure_optimizers), so its gradients are
        # clipped as they are, by norm (the Trainer's algorithm; train.grad_clip)
        if not optimizer.defaults.get("fused"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:
            self.trainer.precision_plugin.clip_grad_by_norm(optimizer, gradient_clip_val)

    def on_train_start(self):
        # A resumed run takes its optimizer's learning rate from the checkpoint, where the schedule that saved it set
        # it for the next step; a WSD stable checkpoint is shared by runs with other schedules after it, so the
        # step's LR is recomputed from this run's own schedule.
        sched = self.lr_schedulers()
        if sched is not None and self.global_step:
            lrs = [base * self.lr_multiplier(self.global_step) for base in sched.base_lrs]
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs

    def lr_multiplier(self, step: int) -> float:
        if self.decay_start is None:
            return warmup_cosine(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)
        return warmup_stable_decay(step, self.total_steps, self.warmup_steps, self.decay_start, self.min_lr_ratio)

    def tokens_seen(self) -> int:
        """Training tokens seen so far by all ranks, in this attempt and the ones it resumed (a collective call)."""
        local = torch.tensor(self.tokens_local, dtype=torch.int64, device=self.device)  # exact: float32 is not
        return self.tokens_resumed + int(self.trainer.strategy.reduce(local, reduce_op="sum").item())

    def on_save_checkpoint(self, checkpoint):
        checkpoint["tokens_seen"] = self.tokens_seen()
        checkpoint["val_curve"] = self.val_curve
        checkpoint["windows_hash"] = self.windows_hash
        checkpoint["train_curve"] = self.train_curve

    def on_load_checkpoint(self, checkpoint):
        drop_compiled_copies(checkpoint["state_dict"])
        self.tokens_resumed = checkpoint.get("tokens_seen", 0)
        self.val_curve = [tuple(p) for p in checkpoint.get("val_curve", [])]
        self.windows_hash = checkpoint.get("windows_hash", "")
        self.train_curve = [tuple(p) for p in checkpoint.get("train_curve", [])]


def drop_compiled_copies(state: dict) -> None:
    """Drop the second copy of every tensor from a checkpoint's state dict in the older layout, which held the
    forward as a submodule beside the model: ``forward_model.*`` (``forward_model._orig_mod.*`` when compiled), each
    checked to equal its ``model.*`` original. Such a checkpoint then resumes with train.compile on or off."""
    for key in [k for k in state if k.startswith("forward_model.")]:
        original = "model." + key.removeprefix("forward_model.").removeprefix("_orig_mod.")
        copy = state.pop(key)
        if original not in state or not torch.equal(copy, state[original]):
            raise RuntimeError(f"the checkpoint's {key} is not a copy of {original}: it cannot be resumed")


class Progress(Callback):
    """One line of progress every ``every_s`` seconds (step, tokens, training loss, tokens/s, time left): for log
    files and non-terminal output, where a progress bar would write kilobytes of carriage returns."""

    def __init__(self, log, every_s: float = 30.0):
        self.logger_, self.every_s = log, every_s
        self.start = self.last = None
        self.first_step = 0

    def on_train_start(self, trainer, pl_module):
        self.start = self.last = time.time()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now, step, total = time.time(), trainer.global_step, pl_module.total_steps
        if now - self.last < self.every_s and step < total:
            return
        self.last = now
        done = step - self.first_step
        rate = done / (now - self.start) if now > self.start else 0.0
        left = (total - step) / rate if rate else float("nan")
        tokens_this_attempt = pl_module.tokens_local * trainer.world_size
        self.logger_.info("step %d/%d (%.0f%%)  %s tokens  train loss %.4f  %.0f tokens/s  %s left", step, total,
                      100 * step / total, f"{pl_module.tokens_resumed + tokens_this_attempt:,}",
                      pl_module.last_train_loss or float("nan"), tokens_this_attempt / max(now - self.start, 1e-9),
                      duration(left))


class StepEnd(Callback):
    """A callback that acts once per optimizer step: with micro-batches (``Trainer(accumulate_grad_batches=k)``)
    Lightning calls ``on_train_batch_end`` after every micro-batch, and ``stepped`` is true only after the one that
    ended a step (``trainer.global_step`` moved)."""

    def on_train_start(self, trainer, pl_module):
        self.last_step = trainer.global_step

    def stepped(self, trainer) -> bool:
        if trainer.global_step == getattr(self, "last_step", None):
            return False
        self.last_step = trainer.global_step
        return True


class Checkpointing(StepEnd):
    """Saves ``path`` (atomically, then its checksum: ``fit.io.integrity``) every ``every`` steps and at a pre-emption
    signal (SIGTERM, SIGUSR1, SIGUSR2: see ``pipeline.signals``), so a re-launched run resumes where it stopped.

    Under DDP every rank calls ``save`` (``save_checkpoint``: one writer, one rename, a barrier). Lightning's own
    SIGTERM handler is replaced by ours when training starts (``signals.Guard.reclaim``); a signal seen by any rank,
    rank 0 or not, is shared at the steps every rank checks (each ``train.log_every``-th: an all-reduce of the
    signal's number), so every rank saves at the same step and leaves together."""

    def __init__(self, path: Path, every: int, claim=None):
        self.path, self.every, self.claim = Path(path), every, claim
        self.reason = "periodic"
        self.saved_for_signal = False

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if signals.current is not None:
            signals.current.reclaim()
        if self.claim is not None:  # the attempt's resume point, in the claim (kept if this attempt is killed)
            self.claim.info["tokens_resumed"] = int(pl_module.tokens_resumed)
            self.claim.heartbeat()

    def save(self, trainer: L.Trainer, reason: str = "periodic") -> Path:
        self.reason = reason
        save_checkpoint(trainer, self.path)
        self.reason = "periodic"
        return self.path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["saved"] = {"reason": self.reason, "step": int(trainer.global_step)}

    def _signal(self, trainer, pl_module) -> int:
        guard = signals.current
        signum = int(guard.signum or 0) if guard is not None else 0
        if trainer.world_size > 1:  # every rank takes part at the agreed steps: the first signal any rank saw wins
            if trainer.global_step % pl_module.check_every:
                return 0
            import torch.distributed as dist

            seen = torch.tensor([signum], dtype=torch.int64, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(seen, reduce_op=dist.ReduceOp.MAX).item())
        return signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.stepped(trainer):  # mid-step (micro-batches): no checkpoint of half-accumulated gradients
            return
        signum = self._signal(trainer, pl_module)
        if signum:
            self.save_at_signal(trainer, pl_module, signum, "training")
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < pl_module.total_steps:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        # The trained weights, kept until the record is in place: a full disk or a kill during evaluation, latency or
        # the record's write loses no training (the relaunch goes straight to evaluation).
        if trainer.global_step == pl_module.total_steps and not self.saved_for_signal:
            self.save(trainer, reason="trained")

    def save_at_signal(self, trainer, pl_module, signum: int, phase: str):
        """Save the state at the signal and raise ``Preempted`` carrying where it is."""
        name = signals.signal.Signals(signum).name
        self.save(trainer, reason=name)
        self.saved_for_signal = True
        stop = signals.Preempted(signum, phase)
        stop.checkpoint, stop.step, stop.tokens = self.path, int(trainer.global_step), pl_module.tokens_seen()
        raise stop

    def on_exception(self, trainer, pl_module, exception):
        # Lightning raises its own SIGTERMException at the step after a SIGTERM it saw before we did
        if isinstance(exception, SIGTERMException) and not self.saved_for_signal:
            self.save(trainer, reason="SIGTERM")
            self.saved_for_signal = True


class SaveAtStep(StepEnd):
    """Saves ``path`` (atomically, then its checksum) when training reaches step ``step``: the stable run's checkpoint
    a WSD decay branch starts from."""

    def __init__(self, path: Path, step: int):
        self.path, self.step = Path(path), step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stepped(trainer) and trainer.global_step == self.step:
            save_checkpoint(trainer, self.path)


def save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """The trainer's checkpoint at ``path``, atomically, with its checksum. Under DDP every rank calls it
    (Lightning's ``save_checkpoint`` is collective and writes on rank 0 only): one temporary name shared by all
    ranks, one rename by rank 0, then a barrier, so no rank goes on (or exits) before the checkpoint is in place."""
    tmp = path.with_name(f".{path.name}.tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(tmp)
    if trainer.is_global_zero:
        integrity.replace_checked(tmp, path)
    trainer.strategy.barrier("checkpoint-renamed")
