"""Serving modes of a trained model: load a run's saved weights, quantize it (torchao), count its weight bytes,
and score it on the run's fixed held-out slice. Shared by ``scaling-quantize``, ``scaling-speculate`` and
``scaling-latency`` (which times every serving mode).

A serving mode is one file of the serving modes' table (``conf/serving_mode/<name>.yaml``, read by
``conf/serving_modes.py``): per device kind (cpu, cuda), the torchao config that serves it, the Linears it packs,
the tensor class a packed weight has. ``quantize`` takes the entry of the model's own device kind (read from its
parameters), builds the config (``build_config``: the class looked up by name in a whitelist, its arguments checked)
and refuses, in one line and before any compute, a mode with no entry for that kind or a GPU below its
requirement. The modes shipped: ``none`` (the model as served: fp32 on the CPU, bf16 on CUDA), ``int8`` (CPU:
dynamic per-token activations and per-channel weights, an int8 matmul; CUDA: weight-only), ``int4`` (weight-only in
groups of 32 input channels; CPU: ``PrototypeInt4WeightOnlyConfig``, CUDA: tinygemm's ``tile_packed_to_4d``) and
``float8`` (CUDA at compute capability 8.9 or more).

What is quantized: every ``nn.Linear`` of the transformer blocks (attention qkv and output projections, both MLP
matrices) that the mode's packing rule takes. The token embedding, the learned positions, the LayerNorms and the
output head stay in full precision (the head is tied to the embedding here, and usual practice keeps both in full
precision). A Linear whose widths the rule does not take (INT4 on the CPU: in_features a multiple of the group size,
out_features of 16) stays in full precision; ``quantize`` reports every skipped layer and checks the weight types it
produced.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from scaling_lab.conf import UserError, serving_modes
from scaling_lab.fit.io import integrity, store
from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig
from scaling_lab.pipeline import device as devices
from scaling_lab.pipeline import weights


class ServingInputError(UserError):
    """Bad input for a serving command (unknown run, no saved weights, mismatched vocabularies)."""


# ----- runs and their weights ----------------------------------------------------------------------------------

def ok_records(results_dir, sweep: str) -> list[dict]:
    """The sweep's finished records, or a one-line error when there are none."""
    folder = store.sweep_dir(results_dir, sweep)
    if not folder.is_dir():
        raise ServingInputError(f"no results for sweep {sweep!r}: {folder} does not exist")
    records = [r for r in store.iter_records(results_dir, sweep) if r.get("status") == "ok"]
    if not records:
        raise ServingInputError(f"sweep {sweep!r} has no finished (ok) runs in {folder}")
    return records


def pick_records(records: list[dict], run_ids, results_dir, sweep: str, rows: str | None = None) -> list[dict]:
    """The records of ``run_ids`` (all with saved weights if empty), narrowed by ``rows``, a row query over the
    sweep's table (``store.COLUMNS``: comparisons, arithmetic and and/or/not, never code); unknown ids, runs without
    weights and a query that selects nothing are one-line errors, raised before any compute."""
    if rows:
        from scaling_lab.fit.expr import query_mask

        table = store.table_of(records)
        keep = set(table.run_id[query_mask(table, str(rows), "rows")])
        if not keep:
            raise ServingInputError(f"rows={rows!r} selects none of the {len(records)} ok runs of sweep {sweep!r}")
        records = [r for r in records if r["run_id"] in keep]
    by_id = {r["run_id"]: r for r in records}
    if run_ids:
        unknown = [i for i in run_ids if i not in by_id]
        if unknown:
            raise ServingInputError(f"unknown run id(s) {unknown} in sweep {sweep!r} (ok runs: {sorted(by_id)})")
        chosen = [by_id[i] for i in run_ids]
        for r in chosen:
            check_weights(r, results_dir)
        return chosen
    chosen = [r for r in records if r.get("weights") and weights_file(r, results_dir).is_file()]
    if not chosen:
        raise ServingInputError(f"no run of sweep {sweep!r} kept its weights: train it with train.save_model=true")
    return chosen


def weights_file(record: dict, results_dir) -> Path:
    """Where the run's weights are: the file of the format its record names (``pipeline.weights.SUFFIXES``)."""
    path = store.weights_path(results_dir, record["sweep"], record["run_id"])
    fmt = (record.get("weights") or {}).get("format", weights.FORMAT)
    if fmt not in weights.SUFFIXES:
        raise ServingInputError(f"run {record['run_id']}'s weights are in format {fmt!r}; this version reads "
                                f"{sorted(weights.SUFFIXES)}")
    return path.with_suffix(weights.SUFFIXES[fmt])


def check_weights(record: dict, results_dir) -> Path:
    path = weights_file(record, results_dir)
    if not record.get("weights") or not path.is_file():
        raise ServingInputError(f"run {record['run_id']} has no saved weights ({path}): re-run it with "
                                f"train.save_model=true")
    return path


def model_config(record: dict) -> GPTConfig:
    s = record["shape"]
    return GPTConfig(n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"], vocab_size=s["vocab_size"],
                     seq_len=s["seq_len"], ffn_ratio=s["ffn_hidden"] / s["d_model"],
                     tie_embeddings=s.get("tie_embeddings", True))


def load_model(record: dict, results_dir) -> GPT:
    """The run's trained model in eval mode, its weights verified against their checksum (``fit.io.integrity``)
    and read as data only (``pipeline.weights.load``: safetensors, or an older run's state dict through
    ``torch.load(weights_only=True)``; loading a file never runs code)."""
    path = check_weights(record, results_dir)
    remedy = (f"delete it, its {integrity.SUFFIX} and the run's record "
              f"{store.record_path(results_dir, record['sweep'], record['run_id'])}, then relaunch the run with "
              "train.save_model=true")
    state = weights.load(path, remedy)
    model = GPT(model_config(record))
    model.load_state_dict(state)
    return model.eval()


# ----- quantization ------------------------------------------------------------------------------------------

DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float32": torch.float32, "int8": torch.int8, "int4": torch.int4}
GRANULARITIES = ("PerRow", "PerTensor")  # torchao.quantization granularities a config argument may name


def modes() -> list[str]:
    """Every serving mode of the table (the package's and the command's search path's)."""
    return serving_modes.names()


def _torchao(module: str):
    """A torchao module. Its wheel's compiled extensions are CUDA-only: a process without CUDA skips loading them.
    torchao 0.18 registers an Enum with torch's pytree on import, which torch 2.13 logs as deprecated: that line
    would precede every message of a command, so it is held back."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        pytree.setLevel(level)


def _argument(kernel: serving_modes.Kernel, cls, name: str, value):
    """A config argument from its YAML value: an enum by member name or value, a dtype or a granularity by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{kernel.source}: {kernel.kind}.args.{name}"
    if name not in fields:
        raise serving_modes.ServingModeError(f"{where}: {cls.__name__} has no argument {name!r} (it takes "
                                             f"{sorted(n for n in fields if n != 'version')})")
    default = fields[name].default
    if name == "granularity":
        quantization = _torchao("torchao.quantization")
        names = value if isinstance(value, list) else [value]
        if not names or any(n not in GRANULARITIES for n in names):
            raise serving_modes.ServingModeError(f"{where}: a granularity is one of {list(GRANULARITIES)} (or a "
                                                 f"list of two), got {value!r}")
        made = [getattr(quantization, n)() for n in names]
        return made if isinstance(value, list) else made[0]
    if isinstance(default, enum.Enum):
        kind = type(default)
        for member in kind:
            if value in (member.name, member.value):
                return member
        raise serving_modes.ServingModeError(f"{where}: {value!r} is not one of {[m.value for m in kind]}")
    if isinstance(default, torch.dtype):
        if value not in DTYPES:
            raise serving_modes.ServingModeError(f"{where}: a dtype is one of {list(DTYPES)}, got {value!r}")
        return DTYPES[value]
    if default is not None and default is not dataclasses.MISSING and type(value) is not type(default) and not (
            isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
        raise serving_modes.ServingModeError(f"{where}: expected a {type(default).__name__}, got {value!r}")
    return value


def build_config(kernel: serving_modes.Kernel, group_size: int | None = None):
    """The torchao config object of ``kernel`` (None for a full-precision entry), built from the whitelist; the
    group size (``group_size`` or the mode's) is passed as the config's ``group_size``."""
    if not kernel.quantizes:
        return None
    cls = getattr(_torchao(serving_modes.TORCHAO_CONFIGS[kernel.config]), kernel.config)
    kwargs = {name: _argument(kernel, cls, name, value) for name, value in kernel.args.items()}
    group = kernel.group(group_size)
    if group is not None:
        kwargs["group_size"] = group
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise serving_modes.ServingModeError(f"{kernel.source}: {kernel.kind}: {kernel.config}({kwargs}) is refused "
                                             f"by torchao: {' '.join(str(err).split())}") from None


def kernel_for(mode: str, device: torch.device | str) -> serving_modes.Kernel:
    """The table's entry serving ``mode`` on ``device`` (a CUDA device's compute capability checked), or a one-line
    refusal."""
    device = torch.device(device)
    kind, spec = devices.kind(device), serving_modes.get(mode)
    spec.on(kind)  # a kind the mode has no entry for is refused before the device is asked anything
    return spec.on(kind, torch.cuda.get_device_capability(device) if kind == "cuda" else None)


def check_modes(modes: list[str], device: torch.device | str, group_size: int | None = None) -> None:
    """Every mode known, served on ``device`` and its config buildable: one line for the first that is not, before
    any compute."""
    for mode in modes:
        build_config(kernel_for(mode, device), group_size)


def quantize(model: GPT, mode: str, group_size: int | None = None) -> tuple[GPT, dict]:
    """A quantized copy of ``model`` in serving mode ``mode`` on the model's own device, and a report: which Linears
    were quantized, which skipped and why. ``group_size`` replaces the group size of a mode that has one. The model
    must be in the dtype a weight-only entry serves (``pipeline.device.serving_copy`` gives it)."""
    first = next(model.parameters())
    kernel = kernel_for(mode, first.device)
    config = build_config(kernel, group_size)
    dtype = str(first.dtype).replace("torch.", "")
    if kernel.activation in ("float32", "bfloat16", "float16") and dtype != kernel.activation:
        raise serving_modes.ServingModeError(
            f"serving mode {mode} on {kernel.kind} serves {kernel.activation} weights and activations "
            f"({kernel.source}); this model is {dtype}: quantize its pipeline.device.serving_copy")
    model = copy.deepcopy(model).eval()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"}
    report = {"mode": mode, "device": kernel.kind, "config": kernel.config, "group_size": kernel.group(group_size),
              "activation": kernel.activation, "quantized": [], "skipped": {},
              "kept_full_precision": ["wte", "wpe", "head (tied to wte)", "layer norms"]}
    if config is None:
        report["skipped"] = {name: f"mode {mode}" for name in linears}
        return model, report
    for name, m in linears.items():
        why = kernel.why_skipped(m.in_features, m.out_features, group_size)
        if why:
            report["skipped"][name] = why
    quantize_ = _torchao("torchao.quantization").quantize_
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in linears and fqn not in report["skipped"])
    for name, m in model.named_modules():
        if name in linears and name not in report["skipped"]:
            got = type(m.weight).__name__
            if got != kernel.weight_type:
                raise RuntimeError(f"{mode} on {kernel.kind}: {name} has weight type {got}, expected "
                                   f"{kernel.weight_type} ({kernel.source})")
            report["quantized"].append(name)
    return model, report


def _tensor_bytes(t: torch.Tensor) -> int:
    if type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()  # a torchao tensor subclass: its packed data, scales and zero points
    return sum(_tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (a tied tensor once), quantized tensors by their packed contents."""
    return sum(_tensor_bytes(p) for p in model.parameters())


# ----- held-out loss -----------------------------------------------------------------------------------------

def eval_windows(record: dict):
    """The run's fixed held-out slice (``data.eval_tokens`` in windows spread over its corpus's validation split,
    ``pipeline.data.heldout_windows``; the first ones for records older than that slice) as (inputs, targets)
    batches, exactly what the trainer scored."""
    from omegaconf import OmegaConf

    from scaling_lab.pipeline.data import Windows, heldout_windows, prepare_corpus

    data = OmegaConf.create(record["config"]["data"])
    corpus = prepare_corpus(data)
    seq_len = record["shape"]["seq_len"]
    n = int(data.eval_tokens) // seq_len
    if (record.get("loss") or {}).get("eval") is None:
        return corpus, Windows(corpus.tokens("val"), seq_len, np.arange(n))
    windows = heldout_windows(corpus.meta["val_tokens"], seq_len, n, int(data.get("eval_seed", 0)))
    return corpus, Windows(corpus.tokens("val"), seq_len, windows)


@torch.inference_mode()
def heldout_loss(model: GPT, windows, batch_size: int = 32) -> float:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(windows, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count
