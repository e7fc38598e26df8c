"""A run's config resolved and checked into its spec: shape, token budget, batch, learning rate, steps, run id.

Every bad value fails here, before any compute; the sweep check (``pipeline.sweep``) plans every point with it
before a multirun launches, and ``pipeline.train`` plans its run with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from omegaconf import DictConfig, OmegaConf

from scaling_lab.fit.io import store
from scaling_lab.models.shapes import GPTConfig, resolve_shape
from scaling_lab.conf import UserError
from scaling_lab.conf.train_schema import BatchRule, FlopsConvention, LrRule, Schedule, identity

class ConfigError(UserError):
    """Bad configuration: raised before any compute is spent."""


@dataclass
class RunSpec:
    """Everything a run needs, resolved from the config and checked."""

    run_id: str
    sweep: str
    model: GPTConfig
    tokens: int  # the training token budget, a whole number of sequences
    batch_size: int
    lr: float
    total_steps: int
    warmup_steps: int
    threads: int
    schedule: Schedule = Schedule.cosine
    decay_start: int | None = None  # wsd: the step the decay branch leaves the stable run (its checkpoint)
    trunk_id: str | None = None  # wsd: the stable run shared by every budget of this shape and recipe
    flops_convention: FlopsConvention | None = None  # how a train.flops budget was turned into tokens
    identity: dict | None = None  # what run_id hashes (run_identity)
    accumulate: int = 1  # micro-batches per step on each rank (train.micro_batch_size)

    @property
    def decay_steps(self) -> int:
        return self.total_steps - self.decay_start if self.decay_start is not None else 0


def world_size(t) -> int:
    """Ranks of a run: train.devices (a count or a list of device ids) x train.num_nodes. A count the planner cannot
    know (``auto``, -1) is refused: the batch is split across the ranks and the budget rounded to them."""
    devices = t.devices
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        n = int(devices)
    else:
        n = 0
    if n < 1 or int(t.num_nodes) < 1:
        raise ConfigError(f"train.devices={devices} x train.num_nodes={t.num_nodes}: give counts (e.g. "
                          "train.devices=4), since the batch is split across the ranks and the budget rounded to them")
    return n * int(t.num_nodes)


def _positive(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


# What each corpus source reads; a setting another source would read is refused rather than silently ignored.
DATA_KEYS = {"stdlib": set(), "files": {"path", "val_path"}, "hub": {"name", "subset"}}


def check_data(data: DictConfig) -> None:
    if data.source not in DATA_KEYS:
        raise ConfigError(f"data.source={data.source!r}: choose data=stdlib, data=files or data=hub")
    for key in sorted(set().union(*DATA_KEYS.values()) - DATA_KEYS[data.source]):
        if data.get(key) is not None:
            owner = next(s for s, keys in DATA_KEYS.items() if key in keys)
            raise ConfigError(f"data.{key} is set but data={data.source} does not read it: add data={owner} "
                              f"(e.g. scaling-train data={owner} data.{key}=...)")


def plan_run(cfg: DictConfig, vocab_size: int | None = None) -> RunSpec:
    """Resolve shape, token budget, batch size, learning rate and steps; every bad value fails here."""
    m, t = cfg.model, cfg.train
    check_data(cfg.data)
    try:
        shape = resolve_shape(n_layers=m.n_layers, d_model=m.d_model, aspect_ratio=m.aspect_ratio, params=m.params,
                              n_heads=m.n_heads, head_dim=m.head_dim, ffn_ratio=m.ffn_ratio)
        model = GPTConfig(**shape, vocab_size=vocab_size or _vocab_size(cfg.data), seq_len=m.seq_len,
                          ffn_ratio=m.ffn_ratio, tie_embeddings=m.tie_embeddings)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    budgets = {k: t[k] for k in ("tokens", "tokens_per_param", "flops") if t[k] is not None}
    if len(budgets) != 1:
        raise ConfigError(f"give exactly one token budget of train.tokens, train.tokens_per_param, train.flops; "
                          f"got {sorted(budgets) or 'none'}")
    for k, v in budgets.items():
        _positive(f"train.{k}", v)
    for k in ("batch_size", "lr", "max_batch_size", "batch_ref_tokens", "lr_max"):
        _positive(f"train.{k}", t[k])
    if not 0 <= t.warmup_frac < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("train.warmup_frac must lie in [0, 1) and train.min_lr_ratio in [0, 1]")
    _check_shape(m, model)
    non_embedding = model.non_embedding_params
    convention = None
    if t.flops is not None:
        convention = t.flops_convention
        per_token = model.flops_per_token if convention == FlopsConvention.model else 6 * non_embedding
    tokens = t.tokens if t.tokens is not None else (
        t.tokens_per_param * non_embedding if t.tokens_per_param is not None else t.flops / per_token)
    sequences = int(tokens // model.seq_len)
    if sequences < 1:
        raise ConfigError(f"token budget {tokens:,.0f} is less than one sequence of model.seq_len={model.seq_len}")
    batch = t.batch_size
    if t.batch_rule == BatchRule.sqrt_tokens:
        batch = int(round(t.batch_size * math.sqrt(tokens / t.batch_ref_tokens)))
    batch = max(1, min(batch, t.max_batch_size, sequences))
    world = world_size(t)
    if world > 1:  # every global batch, the last one included, splits evenly: no rank idles or weighs more
        if batch % world:
            raise ConfigError(f"train.batch_size={batch} (after train.batch_rule) must be a multiple of the "
                              f"{world} ranks of train.devices x train.num_nodes")
        sequences -= sequences % world
        if sequences < world:
            raise ConfigError(f"token budget {tokens:,.0f} gives fewer sequences than the {world} ranks")
    accumulate = 1
    if t.micro_batch_size is not None:
        _positive("train.micro_batch_size", t.micro_batch_size)
        if (batch // world) % t.micro_batch_size:
            raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} must divide each rank's share of the "
                              f"batch, {batch // world} sequences (train.batch_size={batch} over {world} rank(s))")
        accumulate = batch // world // t.micro_batch_size
    lr = t.lr if t.lr_rule == LrRule.constant else t.lr * (t.lr_ref_width / model.d_model) ** t.lr_width_exponent
    if t.lr_max is not None:
        lr = min(lr, t.lr_max)
    lat = cfg.latency
    if lat.enabled and lat.prompt_len + lat.decode_tokens > model.seq_len:
        raise ConfigError(f"latency.prompt_len + latency.decode_tokens must not exceed model.seq_len={model.seq_len}")
    total_steps = math.ceil(sequences / batch)
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    warmup = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_frac * total_steps))
    groups = {g: OmegaConf.to_container(cfg[g], resolve=True, enum_to_str=True) for g in ("data", "train")}
    payload = run_identity(model, sequences * model.seq_len, batch, groups)
    decay_start = trunk_id = None
    if t.schedule == Schedule.wsd:
        decay_start = _wsd(t, total_steps, warmup)
        trunk_id = store.run_id_for(run_identity(model, None, batch, groups, trunk=True))
    return RunSpec(run_id=store.run_id_for(payload), sweep=cfg.sweep.name, model=model,
                   tokens=sequences * model.seq_len, batch_size=batch, lr=lr, total_steps=total_steps,
                   warmup_steps=warmup, threads=t.threads or default_threads(), schedule=t.schedule,
                   decay_start=decay_start, trunk_id=trunk_id, flops_convention=convention,
                   identity=payload, accumulate=accumulate)


def outside_cells(cells, spec: RunSpec) -> str | None:
    """Why ``spec`` lies outside the grid's cells (``sweep.cells``), or None when it trains."""
    ratio = spec.tokens / spec.model.non_embedding_params
    if cells.min_steps is not None and spec.total_steps < cells.min_steps:
        return f"{spec.total_steps} steps < sweep.cells.min_steps={cells.min_steps}"
    if cells.min_tokens_per_param is not None and ratio < cells.min_tokens_per_param:
        return f"{ratio:.3g} tokens per parameter < sweep.cells.min_tokens_per_param={cells.min_tokens_per_param:g}"
    if cells.max_tokens_per_param is not None and ratio > cells.max_tokens_per_param:
        return f"{ratio:.3g} tokens per parameter > sweep.cells.max_tokens_per_param={cells.max_tokens_per_param:g}"
    return None


def run_identity(model: GPTConfig, tokens: int | None, batch: int, groups: dict, trunk: bool = False) -> dict:
    """What a run's id hashes (conf/train_schema.py's RUN_IDENTITY): the resolved shape, the token budget and the
    batch, and the result-changing keys of the data and train groups. ``trunk``: a WSD stable run's, which every
    budget of the shape shares (no budget, no branch-only key)."""
    payload = {"model": identity("model", asdict(model)), "batch_size": batch,
               **{g: identity(g, values, trunk=trunk) for g, values in groups.items()}}
    if not trunk:
        payload["tokens"] = tokens
    return payload


def _wsd(t, total_steps: int, warmup: int) -> int:
    """Warmup-stable-decay: the decay's first step (the stable run's step this budget branches from)."""
    if t.batch_rule != BatchRule.constant:
        raise ConfigError("train.schedule=wsd needs train.batch_rule=constant: every budget of a shape branches from "
                          "one stable run, so the batch must not depend on the budget")
    if t.warmup_steps is None:
        raise ConfigError("train.schedule=wsd needs train.warmup_steps (a number of steps): the warmup belongs to the "
                          "stable run that every budget shares, so it cannot be a fraction of one budget")
    if not 0 < t.decay_frac <= 1:
        raise ConfigError(f"train.decay_frac must lie in (0, 1], got {t.decay_frac}")
    decay_start = total_steps - max(1, int(round(t.decay_frac * total_steps)))
    if decay_start < warmup:
        raise ConfigError(f"train.schedule=wsd: the decay would start at step {decay_start}, before the "
                          f"{warmup} warmup steps end; raise the budget or lower train.warmup_steps")
    return decay_start


def _check_shape(m, model: GPTConfig) -> None:
    """A solved shape must lie within model.params_tolerance of its target N and respect the minimum width and heads
    the config asks for (so the shapes of one size class really are of one size, and none is degenerate)."""
    if m.params is not None and m.params_tolerance is not None:
        ratio = model.non_embedding_params / m.params
        if abs(ratio - 1) > m.params_tolerance:
            raise ConfigError(f"no shape with n_layers={model.n_layers} lies within {100 * m.params_tolerance:g}% of "
                              f"model.params={m.params:g}: the nearest width {model.d_model} gives N="
                              f"{model.non_embedding_params:,} ({100 * (ratio - 1):+.1f}%)")
    if model.d_model < (m.min_d_model or 0) or model.n_heads < (m.min_heads or 0):
        raise ConfigError(f"shape n_layers={model.n_layers} d_model={model.d_model} heads={model.n_heads} is below "
                          f"model.min_d_model={m.min_d_model} / model.min_heads={m.min_heads}")


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else (f"{rem // 60}m{rem % 60:02d}s" if rem >= 60 else f"{rem}s")


def describe(spec: RunSpec) -> str:
    """The run's plan in one line: shape, N, D, steps and batch, FLOPs."""
    m = spec.model
    n, counts = m.non_embedding_params, m.param_counts()
    return (f"run {spec.run_id} ({spec.sweep}): n_layers={m.n_layers} d_model={m.d_model} heads={m.n_heads} "
            f"R={m.aspect_ratio:g}; N={n:,} non-embedding ({counts['total']:,} total); D={spec.tokens:,} tokens "
            f"({spec.tokens / n:.1f} per parameter); {spec.total_steps:,} steps of {spec.batch_size} x {m.seq_len} "
            f"tokens; {m.flops_per_token * spec.tokens:.3g} training FLOPs; {spec.threads} thread(s)")


def _vocab_size(data_cfg) -> int:
    return 257 if data_cfg.tokenizer == "bytes" else int(data_cfg.bpe_vocab_size)


def default_threads() -> int:
    """The machine's cores divided among the jobs the Hydra launcher runs at once (joblib n_jobs, or the cpus a
    submitit task asked for), so parallel sweep jobs split the cores instead of fighting over them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except (ValueError, ImportError):
        return cores
    if launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    if launcher.get("n_jobs"):
        jobs = cores if launcher.n_jobs < 0 else launcher.n_jobs
        return max(1, cores // max(1, jobs))
    return cores
