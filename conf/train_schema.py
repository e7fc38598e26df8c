"""Typed structured configs of ``scaling-train``: the schema that ``conf/train.yaml`` and its groups fill in, and
the run identity: which of its keys change a run's result (``RUN_IDENTITY``).

Registered in Hydra's ConfigStore as ``train_schema`` when this module is imported; any key not declared here is an
error before anything runs, and every value is type-checked (a string choice is an ``Enum``: any other value is
refused with the choices). The YAML presets under ``conf/`` hold the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Optional

from hydra.core.config_store import ConfigStore


class Choice(str, Enum):
    """A string choice of the schema: it compares, prints and serialises as its value (``"wsd"``)."""

    def __str__(self) -> str:
        return self.value


class Schedule(Choice):
    cosine = "cosine"  # linear warmup, then cosine decay to min_lr_ratio * lr at the budget
    wsd = "wsd"  # warmup-stable-decay: the budgets of a shape branch from one stable run


class BatchRule(Choice):
    constant = "constant"
    sqrt_tokens = "sqrt_tokens"  # batch_size * sqrt(D / batch_ref_tokens), in [1, max_batch_size]


class LrRule(Choice):
    constant = "constant"
    inverse_width = "inverse_width"  # lr * (lr_ref_width / d_model) ** lr_width_exponent


# model: GPTConfig.flops_per_token (every matmul, the head and attention); 6N: 6 x non-embedding parameters (Kaplan)
FlopsConvention = Choice("FlopsConvention", {"model": "model", "6N": "6N"}, module=__name__)


@dataclass
class ModelConf:
    # Shape: exactly two of n_layers, d_model, aspect_ratio (= d_model / n_layers) and params (target
    # non-embedding parameters); models.shapes.resolve_shape turns them into a shape.
    n_layers: Optional[int] = 4
    d_model: Optional[int] = 128
    aspect_ratio: Optional[float] = None
    params: Optional[float] = None
    n_heads: Optional[int] = None  # heads from n_heads if given, else d_model / head_dim
    head_dim: Optional[int] = 32
    ffn_ratio: float = 4.0
    seq_len: int = 128
    tie_embeddings: bool = True
    params_tolerance: Optional[float] = 0.1  # a shape solved for `params` must lie within this of it (null: any)
    min_d_model: Optional[int] = None  # refuse shapes narrower than this / with fewer heads (demo: 32 and 2)
    min_heads: Optional[int] = None


@dataclass
class DataConf:
    source: str = "stdlib"  # stdlib | files | hub
    path: Optional[str] = None  # files: a directory or glob of .txt/.md/.py, .jsonl/.json or .parquet files
    val_path: Optional[str] = None  # files: held-out files; else a hash split of documents by val_fraction
    name: Optional[str] = None  # hub: dataset id
    subset: Optional[str] = None
    split: str = "train"
    streaming: bool = True
    text_field: str = "text"
    sample_by: str = "document"  # text files: document | paragraph | line
    max_bytes: Optional[int] = None  # use only the first max_bytes of training text
    val_fraction: float = 0.02
    tokenizer: str = "bytes"  # bytes | bpe
    bpe_vocab_size: int = 2048
    # bpe: the BPE learns from the first bpe_sample_bytes of training text (null: all of it), so preparing a corpus of
    # any size takes bounded memory; a smaller corpus is learnt whole, as it always was
    bpe_sample_bytes: Optional[int] = 1_000_000_000
    # a corpus larger than this (and any hub dataset) is prepared once by scaling-prepare; runs then only read its
    # cache. A smaller one is prepared by the first run that needs it
    prepare_threshold_bytes: int = 100_000_000
    prepare_chunk_bytes: int = 8_000_000  # text tokenized at a time (memory) and between resumable progress records
    eval_tokens: int = 32768  # final held-out loss: windows spread over the whole held-out split, same for every run
    eval_seed: int = 0  # which spread windows (fixed per corpus, tokenizer and seq_len; not the training seed)
    val_curve_tokens: int = 8192  # held-out tokens for the validation curve (windows disjoint from the eval slice)
    cache_dir: str = "${oc.env:SCALING_CACHE,.cache}"
    num_workers: int = 0


@dataclass
class TrainConf:
    # Token budget D: exactly one of tokens, tokens_per_param (x non-embedding params) or flops (D = C / FLOPs per
    # token, counted by flops_convention).
    tokens: Optional[float] = 2_000_000
    tokens_per_param: Optional[float] = None
    flops: Optional[float] = None
    flops_convention: FlopsConvention = FlopsConvention.model  # how a flops budget becomes tokens
    batch_size: int = 32  # sequences per step at the reference budget (see batch_rule)
    # sequences a rank computes at once: each step's batch in micro-batches whose gradients add up to the batch's
    # (null: the rank's whole share at once); the recipe's batch then fits any memory
    micro_batch_size: Optional[int] = None
    batch_rule: BatchRule = BatchRule.constant
    batch_ref_tokens: float = 1_000_000
    max_batch_size: int = 512
    lr: float = 3e-3  # peak learning rate at the reference width (see lr_rule)
    lr_rule: LrRule = LrRule.constant
    lr_ref_width: int = 128
    lr_width_exponent: float = 1.0  # 1: muP-style 1/width; the demo's LR scan measured a steeper fall
    lr_max: Optional[float] = None  # a cap on the LR the rule gives (null: none), where its rise overshoots
    schedule: Schedule = Schedule.cosine
    decay_frac: float = 0.2  # wsd: the decay is this fraction of each budget's steps, to min_lr_ratio * lr
    warmup_frac: float = 0.05  # warmup steps as a fraction of all steps, then cosine decay
    warmup_steps: Optional[int] = None  # instead of warmup_frac (wsd needs it: the stable run is shared)
    min_lr_ratio: float = 0.1  # the schedule ends at min_lr_ratio * lr exactly at the token budget
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "32-true"  # 32-true on CPU; bf16-mixed on GPU
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"  # e.g. ddp on a multi-GPU node
    num_nodes: int = 1
    threads: Optional[int] = None  # torch threads; null: the cores divided among the launcher's parallel jobs
    seed: int = 0
    val_every: int = 0  # steps between validation-curve points; 0: about 8 per run
    log_every: int = 10
    ckpt_every: int = 200  # steps between checkpoints (also on SIGTERM); 0: only on SIGTERM
    diverge_loss: float = 12.0  # a training loss above this (or NaN) fails the run as diverged
    compile: bool = False  # torch.compile the forward (on in train=gpu; tens of seconds to start on a CPU)
    progress_bar: bool = True  # on a terminal only; otherwise one progress line every progress_every_s
    progress_every_s: float = 30.0
    # Keep the finished run's weights beside its record (<results_dir>/<sweep>/weights/<run_id>.safetensors,
    # pipeline/weights.py: plain tensors, so loading never runs code). The serving stage (scaling-quantize,
    # scaling-speculate) and scaling-export need them.
    save_model: bool = False


@dataclass
class LatencyConf:
    enabled: bool = True
    prompt_len: int = 64
    decode_tokens: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 2
    repeats: int = 5


@dataclass
class WandbConf:
    project: str = "scaling-lab"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online (needs WANDB_API_KEY) | disabled
    dir: Optional[str] = None  # default: <results_dir>/<sweep.name>


@dataclass
class CsvConf:
    dir: Optional[str] = None  # default: <results_dir>/<sweep.name>/csv (one <run_id>/metrics.csv per run)


@dataclass
class LoggerConf:
    # conf/logger/: wandb (default), csv (Lightning's CSVLogger), [csv,wandb] (both), none
    wandb: Optional[WandbConf] = None
    csv: Optional[CsvConf] = None


@dataclass
class CellsConf:
    # Which cells of a sweep's grid train: a point outside these limits is skipped before any compute, named by
    # scaling-train and scaling-sweep-status with its reason (null: no limit). An isoFLOP grid of shapes x budgets
    # keeps the cells long enough to leave the early transient and within a range of tokens per parameter.
    min_steps: Optional[int] = None
    min_tokens_per_param: Optional[float] = None  # D / N, N non-embedding
    max_tokens_per_param: Optional[float] = None


@dataclass
class SweepConf:
    name: str = "default"
    retry_failed: bool = False  # re-run points whose record says failed
    cells: CellsConf = field(default_factory=CellsConf)


@dataclass
class TrainAppConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    train: TrainConf = field(default_factory=TrainConf)
    latency: LatencyConf = field(default_factory=LatencyConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    results_dir: str = "results"  # the results folder: records, checkpoints, W&B runs, fits, plans, reports
    sweep: SweepConf = field(default_factory=SweepConf)


ConfigStore.instance().store(name="train_schema", node=TrainAppConf)


@dataclass
class PrepareConf:
    """``scaling-prepare``'s config (``conf/prepare.yaml``): the runs' own data schema, so one cache key for both."""

    data: DataConf = field(default_factory=DataConf)
    progress_every_s: float = 30.0  # seconds between progress lines on stderr


ConfigStore.instance().store(name="prepare_schema", node=PrepareConf)


# ----- run identity: the keys that change a run's result ------------------------------------------------------
#
# A run's id (``pipeline.runspec.plan_run``) hashes the resolved shape, its token budget and batch, and the keys
# of the data and train groups declared in RUN_IDENTITY; the keys in OPERATIONAL (how and where a run executes)
# never enter it. Every key of DataConf, TrainConf and the resolved shape (models.shapes.GPTConfig) is declared in
# exactly one of the two (a test checks it, and an undeclared key stops plan_run). The model group's own keys
# (params, aspect_ratio, head_dim, ...) enter only through the shape they resolve to: two ways of asking for one
# shape are one run.
#
# A key added to the schema after runs were recorded gets a ``baseline``: the value that reproduces the behaviour
# from before it existed. At its baseline it stays out of the hash, so every finished run keeps its id; at any other
# value it makes a new run. Keys declared without one are always hashed (they were there when the ids began).


class _Always:
    def __repr__(self) -> str:
        return "always hashed"


ALWAYS = _Always()


@dataclass(frozen=True)
class Key:
    """How one result-changing key enters the run id."""

    baseline: Any = ALWAYS  # at this value the key is left out of the hash
    when: Optional[Callable[[Mapping[str, Any]], bool]] = None  # hashed only where it acts (given its group)
    branch: bool = False  # wsd: differs between the budgets of one stable run, so left out of the trunk id


def _wsd(group: Mapping[str, Any]) -> bool:
    return group["schedule"] == Schedule.wsd


def _flops_budget(group: Mapping[str, Any]) -> bool:
    return group["flops"] is not None


def _bpe(group: Mapping[str, Any]) -> bool:
    return group["tokenizer"] == "bpe"


RUN_IDENTITY: dict[str, dict[str, Key]] = {
    "model": {k: Key() for k in ("n_layers", "d_model", "n_heads", "seq_len", "ffn_ratio", "tie_embeddings")},
    "data": {
        **{k: Key() for k in ("source", "path", "val_path", "name", "subset", "split", "text_field", "sample_by",
                              "max_bytes", "val_fraction", "tokenizer", "bpe_vocab_size", "eval_tokens", "eval_seed")},
        # Added with scaling-prepare. Before it, the BPE learnt from the whole corpus, held in memory (data=hub capped
        # at 100 MB): at this baseline any corpus under 1 GB is still learnt whole, so its tokens and run ids stay.
        "bpe_sample_bytes": Key(baseline=1_000_000_000, when=_bpe),
    },
    "train": {
        **{k: Key(branch=True) for k in ("tokens", "tokens_per_param", "flops", "min_lr_ratio", "warmup_frac")},
        "flops_convention": Key(when=_flops_budget, branch=True),
        **{k: Key() for k in ("batch_size", "batch_rule", "batch_ref_tokens", "max_batch_size", "lr", "lr_rule",
                              "lr_ref_width", "lr_width_exponent", "warmup_steps", "weight_decay", "beta1", "beta2",
                              "grad_clip", "precision", "seed", "diverge_loss")},
        "schedule": Key(baseline=Schedule.cosine),  # added with wsd: cosine runs keep the ids they had before
        "lr_max": Key(baseline=None),  # added with the isoFLOP study: runs without a cap keep their ids
        "decay_frac": Key(when=_wsd, branch=True),
    },
}

OPERATIONAL: dict[str, set[str]] = {
    "model": {"vocab_size"},  # fixed by data.tokenizer and data.bpe_vocab_size, which are hashed
    "data": {"cache_dir", "num_workers", "val_curve_tokens", "streaming", "prepare_threshold_bytes",
             "prepare_chunk_bytes"},
    "train": {"threads", "progress_bar", "progress_every_s", "log_every", "ckpt_every", "val_every", "compile",
              "accelerator", "devices", "strategy", "num_nodes", "save_model",
              "micro_batch_size"},  # the same gradient per step, summed in parts (equal up to rounding)
}


def identity(group: str, values: Mapping[str, Any], trunk: bool = False) -> dict:
    """The part of one group's resolved settings that enters the run id (with ``trunk``: a WSD stable run's id)."""
    declared, operational = RUN_IDENTITY[group], OPERATIONAL[group]
    undeclared = sorted(set(values) - set(declared) - operational)
    if undeclared:
        raise RuntimeError(f"{group}.{undeclared[0]} is declared neither in RUN_IDENTITY nor in OPERATIONAL "
                           "(conf/train_schema.py): say whether it changes a run's result, and its baseline")
    hashed = {}
    for name, value in values.items():
        key = declared.get(name)
        if key is None or (trunk and key.branch) or (key.when is not None and not key.when(values)):
            continue
        if key.baseline is not ALWAYS and value == key.baseline:
            continue
        hashed[name] = value
    return hashed
