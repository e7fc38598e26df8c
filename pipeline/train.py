"""``scaling-train``: train one model (or, with ``-m``, every point of a sweep) and write its result record.

``train_command`` is what the command runs (``conf/commands.py``); it calls the plain ``run(cfg)`` that tests call
with a composed config. ``run`` reads top to bottom: resolve and check the whole configuration (bad input stops
here, before any compute) -> skip the run if its record says it is finished, if it lies outside the sweep's grid, or
if another process holds its claim -> within one ``Attempt`` (the run's claim, its signal guard, its record)
``train_one``: prepare the tokenized corpus, train with Lightning (resuming from its last checkpoint if one exists;
a WSD branch from its stable run's checkpoint), evaluate the fixed held-out slice, measure inference latency, save
the weights -> the ``Attempt`` writes the record atomically and mirrors it to W&B. A run that raises, runs out of
memory or diverges is recorded as ``failed`` and the sweep goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import secrets
import signal
import sys
import time
import traceback
import warnings
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from scaling_lab.conf import STORAGE_ERRNOS, UserError, storage_message
from scaling_lab.conf.redact import redact, redact_config, run_secrets
from scaling_lab.fit.io import integrity, store
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.pipeline import signals, weights
from scaling_lab.pipeline.data import DataSettings, TokenDataModule, bits_per_byte, prepare_corpus, slice_info
from scaling_lab.pipeline.device import serving_copy
from scaling_lab.pipeline.latency import measure
from scaling_lab.pipeline.module import Checkpointing, LitGPT, Progress, SaveAtStep
from scaling_lab.pipeline.runspec import ConfigError, RunSpec, describe, duration, outside_cells, plan_run, world_size
from scaling_lab.pipeline.sweep import Point, save_launch
from scaling_lab.pipeline.throughput import StepTimes, device_peak

log = logging.getLogger("scaling.train")
# A resumed run's sampler continues where the checkpoint stopped (pipeline.data.GlobalBatches); Lightning cannot see
# that and warns that the dataloader is not resumable.
warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # torch 2.13 vs Lightning 2.6
# Hydra 1.3 still merges our conf/hydra/launcher/submitit_*.yaml presets into the plugin's schema of the same name.
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name.*")
# On a machine with SLURM's tools, Lightning hints at srun for every run outside a job: sweeps reach SLURM through
# submitit (hydra/launcher=submitit_slurm), which starts the job's tasks itself.
warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")

# ----- the run -------------------------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict:
    """Train (or skip, or resume) the run ``cfg`` describes; returns its record. A pre-emption signal (SIGTERM,
    SIGUSR1, SIGUSR2) saves a checkpoint at the signal and raises ``signals.Preempted``: the guard is installed
    before anything else, so a signal while the run is still planned stops it the same way."""
    with signals.Guard() as guard:
        outer, signals.current = signals.current, guard
        try:
            record = _run(cfg)
            guard.phase = "done"
            guard.check()  # a signal while the record was written: the record is in place, the process stops
            return record
        finally:
            signals.current = outer


def _run(cfg: DictConfig) -> dict:
    started = time.time()
    spec = plan_run(cfg)
    skipped = _skip(cfg, spec)
    if skipped is not None:
        return skipped
    claim = None
    if _global_rank() == 0:  # a DDP rank Lightning started follows rank 0, which holds the claim and writes the record
        # an exclusive create; a live claim of another process means it is training this run now
        claim = store.Claim.acquire(cfg.results_dir, spec.sweep, spec.run_id)
        if claim is None:
            return _claimed_elsewhere(cfg, spec)
    with Attempt(cfg, spec, claim, started) as attempt:
        if attempt.finished is not None:  # by another process, between our first look and our claim
            return attempt.finished
        return train_one(cfg, spec, attempt)
    return attempt.record  # the run failed: the attempt recorded why, and the sweep goes on


def _skip(cfg: DictConfig, spec: RunSpec) -> dict | None:
    """What ``run`` returns without training: a note for a run outside the sweep's cells (``sweep.cells``), or the
    run's own record when it is finished (``ok``; ``failed`` too unless ``sweep.retry_failed``). None: train it (an
    ``ok`` run without weights is re-run when ``train.save_model`` asks for them)."""
    path = store.record_path(cfg.results_dir, spec.sweep, spec.run_id)
    previous = store.read_record(path)
    outside = outside_cells(cfg.sweep.cells, spec)
    if outside and not previous:
        log.info("run %s lies outside the grid's cells: %s; not trained", spec.run_id, outside)
        return {"run_id": spec.run_id, "sweep": spec.sweep, "status": "outside", "skipped": True, "reason": outside}
    if previous and previous["status"] == "ok" and cfg.train.save_model and not previous.get("weights"):
        log.info("run %s is ok but kept no weights; re-running it with train.save_model=true", spec.run_id)
        return None
    if _finished(cfg, previous):
        log.info("run %s is already %s (%s); skipping%s", spec.run_id, previous["status"], path,
                 "" if previous["status"] == "ok" else " (sweep.retry_failed=true re-runs it)")
        if previous["status"] == "ok":  # a kill between the record and the checkpoint's removal left it behind
            try:
                integrity.remove(store.checkpoint_path(cfg.results_dir, spec.sweep, spec.run_id))
            except OSError:
                pass  # a read-only results dir: the finished sweep is still read
        return previous
    return None


def _finished(cfg: DictConfig, previous: dict | None) -> bool:
    """Whether a run with this record is not trained again: ``ok`` (unless it kept no weights and
    ``train.save_model`` asks for them), or ``failed`` unless ``sweep.retry_failed``."""
    if not previous:
        return False
    if previous["status"] == "ok":
        return not (cfg.train.save_model and not previous.get("weights"))
    return not cfg.sweep.retry_failed


def _claimed_elsewhere(cfg: DictConfig, spec: RunSpec) -> dict:
    """The note ``run`` returns for a run another live process has claimed (and is training now)."""
    holder = store.read_claim(store.claim_path(cfg.results_dir, spec.sweep, spec.run_id)) or {}
    log.info("run %s is being trained by %s (pid %s); skipping", spec.run_id, holder.get("host"), holder.get("pid"))
    return {"run_id": spec.run_id, "sweep": spec.sweep, "status": "running", "skipped": True,
            "claim": {k: holder.get(k) for k in ("host", "pid", "start", "heartbeat")}}


def _global_rank() -> int:
    """This process's rank in a multi-process run (0 when it is the only one, or before Lightning starts others)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key]) if key != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1 else 0
    return 0


class Attempt:
    """This process's attempt at a run: the context ``train_one`` runs in.

    It holds the run's claim (rank 0's; None on the other ranks of a DDP run, which write nothing) and the run's
    signal guard (``guard.phase``: what the run is doing). On entry the claiming process looks at the record once
    more (``finished``: another process finished the run meanwhile), removes the run's leftover temporary files and
    starts the claim's heartbeat. Once ``begin`` has the record's head, the end of the attempt is recorded: a
    ``train_one`` that returns is ``ok``; one that raises (a crash, an OOM, a divergence) is ``failed``, the error
    kept in the record instead of raised; a signal or Ctrl-C is noted as an interrupted attempt (its checkpoint
    resumes it) and goes on up. The record is in place before the checkpoint is removed (``store.finish_run``), then
    W&B mirrors it; the claim is released last.
    """

    def __init__(self, cfg: DictConfig, spec: RunSpec, claim: store.Claim | None, started: float):
        self.cfg, self.spec, self.claim, self.started = cfg, spec, claim, started
        self.guard = signals.current
        self.previous: dict | None = None  # the run's record as the claiming process found it
        self.finished: dict | None = None
        self.record: dict | None = None  # from ``begin`` on
        self.wandb = None
        self.earlier: list[dict] = []

    def __enter__(self) -> Attempt:
        if self.claim is None:
            return self
        try:
            spec = self.spec
            self.previous = store.read_record(store.record_path(self.cfg.results_dir, spec.sweep, spec.run_id))
            if _finished(self.cfg, self.previous):
                self.finished = self.previous
                return self
            store.sweep_temp_files(self.cfg.results_dir, spec.sweep, spec.run_id)
            self.claim.start_heartbeat()
        except BaseException:
            self.claim.release()
            raise
        return self

    def begin(self, spec: RunSpec, head: dict, wandb_logger) -> dict:
        """From here on the attempt's end is recorded: ``head`` is the record (``spec`` planned for the corpus's
        vocabulary), ``wandb_logger`` its mirror (or None)."""
        self.spec, self.wandb = spec, wandb_logger
        if self.claim is not None:
            self.earlier = store.attempts(self.cfg.results_dir, spec.sweep, spec.run_id, self.previous)
        self.record = head
        return head

    def __exit__(self, kind, error, tb) -> bool:
        try:
            return self.record is not None and self._end(error)
        finally:
            if self.claim is not None:
                self.claim.release()

    def _end(self, error: BaseException | None) -> bool:
        """Record how the attempt ended; True when ``error`` (a failed run) is recorded instead of raised."""
        cfg, spec, record = self.cfg, self.spec, self.record
        status = "failed"
        try:
            if error is None:
                status = "ok"
            elif isinstance(error, (KeyboardInterrupt, SystemExit, signals.Preempted)):
                status = "interrupted"
                if self.claim:
                    how = f"interrupted ({error})" if isinstance(error, signals.Preempted) else "interrupted"
                    store.note_attempt(cfg.results_dir, spec.sweep, spec.run_id,
                                       {**self.claim.attempt(how), "tokens_end": getattr(error, "tokens", None)})
            elif isinstance(error, Exception):  # a crash, an OOM or a divergence fails this run only
                record["error"] = f"{type(error).__name__}: {error}"
                record["traceback"] = "".join(traceback.format_exception(type(error), error, error.__traceback__,
                                                                         limit=20))
                log.error("run %s failed: %s", spec.run_id, record["error"])
        finally:
            if status != "interrupted" and self.claim is not None:  # one writer: the claiming process (rank 0)
                self._write(status)
            try:
                _finish_wandb(self.wandb, record, status)
            except Exception as err:  # noqa: BLE001 - W&B only mirrors the record, which is in place
                log.warning("W&B could not be finished (the record is written): %s: %s", type(err).__name__, err)
        return isinstance(error, Exception)

    def _write(self, status: str) -> None:
        """The record, ended with ``status`` and this attempt; a full or read-only disk is one line (the checkpoint
        stays, nothing is lost)."""
        cfg, spec, record = self.cfg, self.spec, self.record
        self.guard.phase = "finishing"
        record.update(status=status, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        record["timing"]["wall_s"] = time.time() - self.started
        attempt = self.claim.attempt(status)
        if record["error"]:  # kept with the attempt: a relaunch's record still says why it failed
            attempt["error"] = record["error"]
        record["attempts"] = [*self.earlier, attempt]
        # The record is in place before the checkpoint is removed: a kill in between loses nothing.
        try:
            store.finish_run(cfg.results_dir, redact(record, run_secrets()))
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS:
                raise
            ckpt = store.checkpoint_path(cfg.results_dir, spec.sweep, spec.run_id)
            kept = (f"the run's checkpoint {ckpt} is kept: relaunch once there is space" if ckpt.exists() else
                    "no checkpoint was kept")
            store.sweep_temp_files(cfg.results_dir, spec.sweep, spec.run_id)
            raise UserError(storage_message(err, kept)) from None
        log.info("record: %s", store.record_path(cfg.results_dir, spec.sweep, spec.run_id))


def train_one(cfg: DictConfig, spec: RunSpec, attempt: Attempt) -> dict:
    """Train, evaluate and measure the run ``spec`` plans, within ``attempt`` (which writes the record); returns the
    record. On the ranks of a DDP run other than 0 it ends after the fit (evaluation, latency and weights are rank
    0's alone)."""
    t = cfg.train
    # the data: the corpus sets the vocabulary, so the run is planned once more with it
    torch.set_num_threads(spec.threads)
    corpus = prepare_corpus(cfg.data)
    spec = plan_run(cfg, vocab_size=corpus.vocab_size)
    data = TokenDataModule(corpus, data_settings(cfg, spec))
    head = _record_head(cfg, spec, corpus)
    _save_launch(cfg, spec)
    log.info("%s%s", describe(spec), _estimate(cfg, spec))
    record = attempt.begin(spec, head, _wandb_logger(cfg, spec))  # from here on a failure is recorded

    # the model and its trainer; the fit resumes from the run's checkpoint, or a WSD branch from its stable run's
    module = _seeded_module(t, spec)
    ckpt = store.checkpoint_path(cfg.results_dir, spec.sweep, spec.run_id)
    steps = StepTimes()
    checkpointing = Checkpointing(ckpt, t.ckpt_every, claim=attempt.claim)
    callbacks = [checkpointing, steps, *_progress(t)]
    resume, trunk = (ckpt if ckpt.exists() else None), {}
    if resume:
        log.info("resuming run %s from %s", spec.run_id, resume)
    elif spec.schedule == "wsd":
        resume, trunk = _stable_checkpoint(cfg, spec, data)
        log.info("decay branch of run %s starts from the stable run's step %d (%s)", spec.run_id, spec.decay_start,
                 resume)
    loggers = [x for x in (attempt.wandb, _csv_logger(cfg, spec)) if x is not None]
    trainer = build_trainer(t, spec, logger=loggers, callbacks=callbacks, root_dir=ckpt.parent)

    # the fit
    guard = attempt.guard
    guard.phase = "training"
    fit_start = time.time()
    try:
        _fit(trainer, module, data, resume)
    except SIGTERMException:  # Lightning saw the SIGTERM first (at the end of a step); Checkpointing saved there
        stop = signals.Preempted(signal.SIGTERM, "training")
        stop.checkpoint, stop.step, stop.tokens = ckpt, int(trainer.global_step), module.tokens_seen()
        raise stop from None
    finally:  # every rank has read rank 0's plan of the stable run by now (it took part in this fit)
        if trunk and _global_rank() == 0:
            _plan_path(Path(trunk["trunk_checkpoint"]).parent).unlink(missing_ok=True)
    train_s = time.time() - fit_start
    tokens_seen = module.tokens_seen()  # the last collective: evaluation, latency and weights are rank 0's alone
    if trainer.world_size > 1:
        _leave_process_group()
        if not trainer.is_global_zero:
            return record

    # evaluation, latency, weights: a signal now saves the trained state, so the relaunch goes straight here
    guard.phase = "evaluation"
    try:
        guard.check()  # a signal after the last step: saved below like one during evaluation
        if tokens_seen != spec.tokens:
            raise RuntimeError(f"trained on {tokens_seen:,} tokens, budget was {spec.tokens:,}")
        trained_here = tokens_seen - module.tokens_resumed + trunk.get("tokens_trained", 0)
        heldout = module.heldout_loss(data.eval_dataloader())
        loss = heldout["mean"]
        if not math.isfinite(loss):
            raise RuntimeError(f"held-out loss is {loss}")
        slice_ = slice_info(corpus, data.eval_windows, spec.model.seq_len)
        out = {
            "tokens": {"budget": spec.tokens, "seen": tokens_seen, "windows_hash": module.windows_hash},
            "loss": {"final": loss, "stderr": heldout["stderr"],
                     "bits_per_byte": bits_per_byte(heldout["nats_total"], slice_["bytes"]),
                     "eval_tokens": slice_["tokens"], "eval": {**slice_, "seed": cfg.data.eval_seed},
                     "train_last": module.last_train_loss, **_curve_summary(module.val_curve),
                     "train_curve": [[int(n), float(v)] for n, v in module.train_curve]},
            "timing": {"threads": spec.threads, "train_s": train_s + trunk.get("train_s", 0.0),
                       "branch_train_s": train_s, "stable_train_s": trunk.get("train_s", 0.0),
                       "tokens_per_s": (tokens_seen - module.tokens_resumed) / train_s if train_s else None,
                       "resumed_from_tokens": module.tokens_resumed},
            # FLOPs this job spent: a WSD branch's decay plus whatever part of the stable run it trained itself
            "flops": {**record_flops(cfg, spec), "spent": spec.model.flops_per_token * trained_here},
            "hardware": _hardware(trainer, module, t.precision, spec.threads),
        }
        steady = steps.tokens_per_s(spec.batch_size * spec.model.seq_len)
        peak = out["hardware"]["peak_flops"]
        out["timing"]["tokens_per_s_steady"] = steady
        out["timing"]["mfu"] = (spec.model.flops_per_token * steady / (peak * trainer.world_size)
                                if steady and peak else None)
        if spec.schedule == "wsd":
            out["schedule"] = {**_schedule_head(cfg, spec), **{k: v for k, v in trunk.items() if k != "train_s"}}
        if cfg.latency.enabled:
            guard.phase = "latency"
            lat = cfg.latency
            log.info("held-out loss %.4f; measuring inference latency", loss)
            # as served on the training device: a copy in its serving dtype (bf16 on CUDA, fp32 on the CPU),
            # decode graphed on CUDA
            served = serving_copy(module.model, module.device)
            out["latency"] = measure(served, lat.prompt_len, lat.decode_tokens, list(lat.batch_sizes),
                                     lat.warmup, lat.repeats)
            del served
        if t.save_model:
            out["weights"] = save_weights(module.model, store.weights_path(cfg.results_dir, spec.sweep, spec.run_id))
        guard.phase = "finishing"
    except signals.Preempted as stop:
        # The weights are final: the checkpoint taken now lets the relaunch go straight to evaluation. Under DDP the
        # trained weights' checkpoint (on_train_end) is it: a collective save now would wait for ranks the signal
        # did not reach.
        guard.phase = "saving"
        if trainer.world_size == 1:
            checkpointing.save(trainer, reason=stop.name)
        stop.checkpoint, stop.step, stop.tokens = ckpt, int(trainer.global_step), tokens_seen
        raise
    record.update(out)  # the attempt writes the record, then removes the checkpoint (store.finish_run)
    return record


def data_settings(cfg: DictConfig, spec: RunSpec) -> DataSettings:
    """What the run's ``TokenDataModule`` serves: its training windows (the budget's sequences, in the order
    ``train.seed`` gives), its batches and the held-out slices of ``cfg.data``."""
    d = cfg.data
    return DataSettings(seq_len=spec.model.seq_len, batch_size=spec.batch_size,
                        train_sequences=spec.tokens // spec.model.seq_len, eval_tokens=d.eval_tokens,
                        val_curve_tokens=d.val_curve_tokens, seed=cfg.train.seed, num_workers=d.num_workers,
                        eval_seed=d.eval_seed, accumulate=spec.accumulate)


def _record_head(cfg, spec: RunSpec, corpus) -> dict:
    c = spec.model
    counts = c.param_counts()
    return {
        "run_id": spec.run_id, "sweep": spec.sweep, "status": "running", "error": None, "seed": cfg.train.seed,
        "group": _group(cfg, counts["non_embedding"], spec.tokens),
        "identity": spec.identity,  # what the run id hashes (conf/train_schema.py's RUN_IDENTITY)
        "config": redact_config(cfg),  # no credential-named key, no environment secret
        "shape": {"n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads, "head_dim": c.head_dim,
                  "ffn_hidden": c.ffn_hidden, "vocab_size": c.vocab_size, "seq_len": c.seq_len,
                  "aspect_ratio": c.aspect_ratio, "tie_embeddings": c.tie_embeddings},
        "params": counts,
        "tokens": {"budget": spec.tokens, "seen": 0},
        "flops": record_flops(cfg, spec),
        "schedule": _schedule_head(cfg, spec),
        "optim": {"batch_size": spec.batch_size, "lr": spec.lr, "total_steps": spec.total_steps,
                  "warmup_steps": spec.warmup_steps},
        "data": {k: corpus.meta.get(k) for k in ("corpus", "source", "corpus_hash", "tokenizer", "vocab_size",
                                                 "train_tokens", "val_tokens", "python")},
        "timing": {"threads": spec.threads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning": L.__version__, "project": store.tool_version(),
                     "commit": store.tool_commit()},
    }


def _save_launch(cfg, spec: RunSpec) -> None:
    """This run as a launched point of its sweep, so scaling-sweep-status knows it even before its record exists."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    save_launch(cfg.results_dir, spec.sweep, [Point(overrides=overrides).plan(spec)], overrides,
                name=f"run-{spec.run_id}")


def _schedule_head(cfg, spec: RunSpec) -> dict:
    if spec.schedule != "wsd":
        return {"name": spec.schedule, "warmup_steps": spec.warmup_steps}
    return {"name": "wsd", "warmup_steps": spec.warmup_steps, "decay_frac": cfg.train.decay_frac,
            "decay_start_step": spec.decay_start, "decay_steps": spec.decay_steps,
            "stable_tokens": spec.decay_start * spec.batch_size * spec.model.seq_len, "branched_from": spec.trunk_id}


def _estimate(cfg, spec: RunSpec) -> str:
    """About how long the run will train, at the training FLOP/s the sweep's finished runs reached (none yet: the
    progress lines give the time left once training starts)."""
    done = [r for r in store.iter_records(cfg.results_dir, spec.sweep) if r.get("status") == "ok"]
    flops = sum((r.get("flops") or {}).get("total") or 0 for r in done)
    seconds = sum((r.get("timing") or {}).get("train_s") or 0 for r in done)
    if not flops or not seconds:
        return ""
    return f"; about {duration(spec.model.flops_per_token * spec.tokens * seconds / flops)} at this sweep's rate"


def _group(cfg, non_embedding: int, tokens: int) -> str:
    """The run's size and token budget from its actual N and D (two significant figures); the sweep's declared
    class, if any, beside it. The fit groups shapes of equal size from actual N (``sources._groups_of_equal_size``),
    never from the target."""
    m, t = cfg.model, cfg.train
    label = f"N={non_embedding:.2g} D={tokens:.2g}"
    declared = [f"N~{m.params:g}"] if m.params is not None else []
    declared += [f"D/N={t.tokens_per_param:g}"] if t.tokens_per_param is not None else \
        [f"C={t.flops:g}"] if t.flops is not None else []
    return label + (f" (class {' '.join(declared)})" if declared else "")


def _hardware(trainer, module, precision: str, threads: int) -> dict:
    """Where the run trained: the device and its count, the precision, and the device's peak FLOP/s (the MFU's
    denominator, with its source)."""
    name, peak, source = device_peak(module.device, precision, threads)
    return {"accelerator": module.device.type, "device": name, "devices": trainer.world_size,
            "precision": str(precision), "peak_flops": peak, "peak_source": source}


def _leave_process_group() -> None:
    """After a DDP run's last collective every rank leaves the process group (so a rank exits cleanly and no NCCL
    communicator outlives the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def save_weights(model, path: Path) -> dict:
    """The model's state dict as safetensors (``pipeline.weights``: beside ``path``, with that format's suffix),
    written atomically with its checksum; what the record says about it."""
    path = weights.save(model.state_dict(), path.with_suffix(weights.SUFFIXES[weights.FORMAT]))
    return {"path": f"weights/{path.name}", "format": weights.FORMAT, "bytes": path.stat().st_size}


def record_flops(cfg, spec: RunSpec) -> dict:
    """FLOPs of the run as the model counts them; ``budget`` and ``convention``: a train.flops budget and how it
    was turned into tokens (model: ``GPTConfig.flops_per_token``, or 6N)."""
    c = spec.model
    return {"per_token": c.flops_per_token, "total": c.flops_per_token * spec.tokens,
            "six_nd": 6 * c.non_embedding_params * spec.tokens, "budget": cfg.train.flops,
            "convention": spec.flops_convention}


def _stable_checkpoint(cfg, spec: RunSpec, branch: TokenDataModule) -> tuple[Path, dict]:
    """The stable run's checkpoint at this branch's decay start, training the stable run up to it if needed.

    The stable run (``spec.trunk_id``: the shape and recipe without the budget) keeps a checkpoint at every step a
    branch has started from; a branch extends it from the latest one before its own start. A lock serialises the
    branches of one shape (parallel jobs of other shapes are unaffected), and a partial checkpoint every
    ``train.ckpt_every`` steps makes the stable run itself resumable. Under DDP rank 0 alone takes the lock and
    decides; the other ranks follow its plan (``_trunk_plan``), so every rank enters the same fits."""
    folder = store.trunk_dir(cfg.results_dir, spec.sweep, spec.trunk_id)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{spec.decay_start:08d}.ckpt"
    if _global_rank() != 0:
        return _train_trunk(cfg, spec, branch, target, _await_plan(folder))
    with FileLock(str(folder) + ".lock"):
        plan = _trunk_plan(folder, target, spec)
        if world_size(cfg.train) > 1:
            write_json_atomic(_plan_path(folder), plan)
        try:
            return _train_trunk(cfg, spec, branch, target, plan)
        finally:  # a stable run that trained: every rank read the plan to take part (else the branch's fit removes it)
            if plan["train"]:
                _plan_path(folder).unlink(missing_ok=True)


def _trunk_plan(folder: Path, target: Path, spec: RunSpec) -> dict:
    """Rank 0's decision, under the trunk's lock: whether the stable run must train to the branch's start, and from
    which of its checkpoints (the latest before that step)."""
    if target.exists():
        return {"train": False, "start": None, "from_step": spec.decay_start}
    partial = folder / "partial.ckpt"
    steps = {p: int(p.stem.split("_")[1]) for p in folder.glob("step_*.ckpt")}
    if partial.exists():
        saved = _checked(partial, lambda p: torch.load(p, map_location="cpu", weights_only=True))
        steps[partial] = int(saved["global_step"])
    earlier = {p: s for p, s in steps.items() if s < spec.decay_start}
    start = max(earlier, key=earlier.get) if earlier else None
    return {"train": True, "start": str(start) if start else None, "from_step": earlier[start] if start else 0}


def _plan_path(folder: Path) -> Path:
    return folder / f".plan-{launch_token()}.json"


def _await_plan(folder: Path) -> dict:
    """Rank 0's plan for this launch (a rank other than 0 waits for it: rank 0 may first wait for the trunk's lock
    while another job trains the same stable run). A pre-emption signal while waiting stops the run as usual."""
    path, polls = _plan_path(folder), 0
    while not path.exists():
        signals.current.check()
        time.sleep(0.2)
        polls += 1
        if polls % 300 == 0:  # every minute
            log.info("waiting for rank 0's plan of the stable run %s", folder.name)
    return json.loads(path.read_text())


def launch_token() -> str:
    """A value every rank of this launch shares and no other launch has: under SLURM its job, step and restart;
    elsewhere a random token rank 0 puts in its environment before Lightning starts the other ranks (which inherit
    it)."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '')}-{env.get('SLURM_RESTART_COUNT', '0')}"
    return env.setdefault(TOKEN_ENV, secrets.token_hex(8))


TOKEN_ENV = "SCALING_LAB_LAUNCH"


def _train_trunk(cfg, spec: RunSpec, branch: TokenDataModule, target: Path, plan: dict) -> tuple[Path, dict]:
    """Follow ``plan``: train the stable run to the branch's start (saving ``target`` there), or not. The stable run
    serves the branch's data (``branch``) up to that step."""
    info = {"trunk_checkpoint": str(target), "trunk_steps_trained": 0, "tokens_trained": 0, "train_s": 0.0}
    if not plan["train"]:
        return target, info
    t, folder, from_step = cfg.train, target.parent, plan["from_step"]
    log.info("stable run %s: training steps %d to %d (from %s)", spec.trunk_id, from_step, spec.decay_start,
             plan["start"] or "scratch")
    module = _seeded_module(t, spec)
    data = TokenDataModule(branch.corpus, replace(branch.settings, train_sequences=spec.decay_start * spec.batch_size))
    partial = folder / "partial.ckpt"
    callbacks = [SaveAtStep(target, spec.decay_start), Checkpointing(partial, t.ckpt_every), *_progress(t)]
    trainer = build_trainer(t, replace(spec, total_steps=spec.decay_start), callbacks=callbacks, root_dir=folder)
    began = time.time()
    signals.current.phase = "training"  # a signal is acted on at the next step's end: partial.ckpt saved there
    _fit(trainer, module, data, Path(plan["start"]) if plan["start"] else None)
    signals.current.phase = "setup"
    info["train_s"] = time.time() - began
    if not target.exists():
        raise RuntimeError(f"the stable run {spec.trunk_id} stopped before step {spec.decay_start}")
    if trainer.is_global_zero:
        integrity.remove(partial)
    info["trunk_steps_trained"] = spec.decay_start - from_step
    info["tokens_trained"] = (spec.decay_start - from_step) * spec.batch_size * spec.model.seq_len
    return target, info


def _fit(trainer, module, datamodule, ckpt: Path | None) -> None:
    """``trainer.fit``, resuming from ``ckpt`` if given (checked by ``_checked``)."""
    if ckpt is None:
        trainer.fit(module, datamodule=datamodule, weights_only=True)
    else:
        _checked(ckpt, lambda path: trainer.fit(module, datamodule=datamodule, ckpt_path=str(path), weights_only=True))


def _checked(ckpt: Path, load):
    """``load(ckpt)`` once the checkpoint's checksum is verified, reading it as data only (``weights_only=True``:
    a checkpoint in a shared results folder never runs code). A checkpoint that fails either is set aside
    (``<name>.damaged``) and stops the run in one line, so a relaunch trains without it instead of failing on the same
    checkpoint forever."""
    remedy = (f"set aside as {ckpt.name}{integrity.DAMAGED}: a relaunch (sweep.retry_failed=true) trains without it; "
              "delete that file once inspected")
    try:
        return integrity.load_verified(ckpt, load, remedy)
    except integrity.IntegrityError:
        integrity.set_aside(ckpt)
        raise


def _seeded_module(t, spec: RunSpec) -> LitGPT:
    """The run's model, freshly initialised from ``train.seed`` (the same for every launch of the run)."""
    L.seed_everything(t.seed, workers=True, verbose=False)
    return build_module(t, spec)


def build_module(t, spec: RunSpec) -> LitGPT:
    return LitGPT(spec.model, lr=spec.lr, total_steps=spec.total_steps, warmup_steps=spec.warmup_steps,
                  min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                  diverge_loss=t.diverge_loss, check_every=t.log_every, compile=t.compile,
                  decay_start=spec.decay_start, accumulate=spec.accumulate, batch_size=spec.batch_size,
                  sequences=spec.tokens // spec.model.seq_len)


def build_trainer(t, spec: RunSpec, logger=None, callbacks=(), root_dir=None, validate: bool = True):
    """The Lightning Trainer of a run (also used by scripts/bench_train_loop.py, so the benchmark times the same
    loop): exactly ``total_steps`` optimizer steps, our own checkpointing, validation-curve points; on CUDA, TF32."""
    # Lightning's INFO lines (accelerator found, tips, checkpoint loading) drown a sweep's output; warnings still
    # show. Set here, after Lightning's own import has set its level.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # Under SLURM (and submitit) pre-emption is ours (pipeline.signals: checkpoint at the signal, then submitit's
    # own requeue): Lightning's auto-requeue would also catch the signal and call scontrol requeue.
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
    trainer = L.Trainer(
        plugins=plugins, max_steps=spec.total_steps, max_epochs=-1, precision=t.precision, accelerator=t.accelerator,
        devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes, gradient_clip_val=t.grad_clip,
        logger=logger or False, callbacks=list(callbacks), enable_checkpointing=False,
        accumulate_grad_batches=spec.accumulate,  # val_check_interval counts micro-batches
        val_check_interval=(t.val_every or max(1, spec.total_steps // 8)) * spec.accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=None if validate else 0, num_sanity_val_steps=0, use_distributed_sampler=False,
        log_every_n_steps=t.log_every, enable_progress_bar=_show_bar(t), enable_model_summary=False,
        default_root_dir=str(root_dir) if root_dir else None)
    # Training on CUDA (the device the Trainer chose from train.accelerator and train.devices): fp32 matmuls on
    # TF32 tensor cores, for this process (cuDNN's convolutions use TF32 by default)
    if trainer.strategy.root_device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return trainer


def _show_bar(t) -> bool:
    """A progress bar only on a terminal (and when asked for); log files get one line every progress_every_s."""
    return bool(t.progress_bar) and sys.stderr.isatty()


def _progress(t) -> list[Progress]:
    """The progress-line callback, where there is no progress bar."""
    return [] if _show_bar(t) else [Progress(log, t.progress_every_s)]


def _curve_summary(curve: list[tuple[int, float]]) -> dict:
    """The validation curve (on data.val_curve_tokens held-out tokens) as (tokens, loss) points, and its extremes."""
    if not curve:
        return {"curve": []}
    return {"curve": [[int(t), float(v)] for t, v in curve], "last_val": curve[-1][1],
            "min_val": min(v for _, v in curve)}


# ----- W&B -----------------------------------------------------------------------------------------------------

def _wandb_logger(cfg, spec: RunSpec):
    w = cfg.logger.wandb
    if w is None or w.mode == "disabled":
        return None
    if w.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("logger.wandb.mode=online needs WANDB_API_KEY in the environment (or use mode=offline)")
    import wandb  # the [wandb] extra

    save_dir = Path(w.dir or store.sweep_dir(cfg.results_dir, spec.sweep))
    save_dir.mkdir(parents=True, exist_ok=True)
    c = spec.model
    tags = [f"sweep:{spec.sweep}", f"L{c.n_layers}", f"d{c.d_model}", f"R{c.aspect_ratio:g}",
            f"N{_size_class(c.non_embedding_params)}"]
    if cfg.train.tokens_per_param is not None:
        tags.append(f"tpp{cfg.train.tokens_per_param:g}")
    config = redact_config(cfg)
    config["run_id"] = spec.run_id
    return WandbLogger(project=w.project, entity=w.entity, name=spec.run_id, id=f"{spec.sweep}-{spec.run_id}",
                       group=spec.sweep, job_type="train", tags=tags, mode=w.mode, save_dir=str(save_dir), config=config,
                       resume="allow", settings=wandb.Settings(console="off", x_disable_stats=True, silent=True,
                                               x_disable_meta=True))  # its metadata holds the command line


def _csv_logger(cfg, spec: RunSpec):
    """Lightning's CSVLogger (``logger=csv`` or ``logger=[csv,wandb]``): the curves in
    ``<dir>/<run_id>/metrics.csv`` for users without W&B; a resumed run appends to its own file."""
    c = cfg.logger.get("csv")
    if c is None:
        return None
    save_dir = Path(c.dir or store.sweep_dir(cfg.results_dir, spec.sweep) / "csv")
    return CSVLogger(save_dir=str(save_dir), name="", version=spec.run_id)


def _size_class(n: float) -> str:
    return f"{n:.0e}".replace("e+0", "e").replace("e+", "e")  # 98624 -> "1e5"


def _finish_wandb(wandb_logger, record: dict, status: str) -> None:
    if wandb_logger is None:
        return
    import wandb  # the [wandb] extra

    try:
        run = wandb_logger.experiment
        flat = store.flatten(record)
        run.summary.update({k: v for k, v in flat.items() if isinstance(v, (int, float, str)) and v is not None})
        record_dir = Path(run.dir).parent
        log.info("W&B run (%s): %s", run.settings.mode, record_dir)
    finally:
        wandb.finish(exit_code=0 if status == "ok" else 1)


# ----- CLI -----------------------------------------------------------------------------------------------------

def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def train_command(cfg: DictConfig) -> None:
    try:
        record = run(cfg)
    except signals.Preempted as stop:
        where = (f" at step {stop.step} ({stop.tokens:,} tokens)" if stop.step is not None and stop.tokens else "")
        saved = f"checkpoint {stop.checkpoint}" if stop.checkpoint else "no checkpoint needed (nothing trained yet)"
        print(f"interrupted: {stop.name} during {stop.phase}{where}; {saved}; the same command resumes it",
              file=sys.stderr, flush=True)
        signals.forward(stop.signum)  # submitit's checkpoint-and-requeue, if it is the launcher
        sys.exit(stop.exit_code)
    if _global_rank() != 0:  # a DDP rank Lightning started: rank 0 reports (and writes the record)
        return
    if record.get("status") == "outside":
        print(f"outside: run {record['run_id']}: {record['reason']} (sweep.cells); not trained")
        return
    if record.get("skipped"):
        claim = record.get("claim") or {}
        print(f"running: run {record['run_id']} is being trained by pid {claim.get('pid')} on {claim.get('host')}; "
              "skipped")
        return
    loss = record.get("loss") or {}
    result = (f"held-out loss {loss['final']:.4f} nats/token ({loss['bits_per_byte']:.4f} bits/byte)"
              if isinstance(loss.get("final"), float) else record.get("error") or "")
    print(f"{record['status']}: run {record['run_id']}: {result}; "
          f"record {store.record_path(cfg.results_dir, record['sweep'], record['run_id'])}", flush=True)
    if record["status"] != "ok" and not _multirun():  # a multirun sums up at its end (sweep.CheckSweep)
        sys.exit(1)


if __name__ == "__main__":  # python -m scaling_lab.pipeline.train: the same as scaling-train
    from scaling_lab.conf.commands import train

    train()
