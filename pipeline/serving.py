"""Serving modes of a trained model: load a run's saved weights, quantize it (torchao), count its weight bytes,
and score it on the run's fixed held-out slice. Shared by ``scaling-quantize``, ``scaling-speculate`` and
``scaling-latency`` (which times every serving mode).

Modes (``MODES``):

* ``none``: the model as trained (fp32 on CPU).
* ``int8``: torchao ``Int8DynamicActivationInt8WeightConfig``: weights int8 per output channel, activations
  quantized per token at run time; on CPU an int8 matmul (``torchao.kernel.intmm``).
* ``int4``: torchao ``PrototypeInt4WeightOnlyConfig(group_size)``: weights int4 in groups of ``group_size`` input
  channels (packed by ``aten._convert_weight_to_int4pack_for_cpu``), activations fp32.

What is quantized: every ``nn.Linear`` of the transformer blocks (attention qkv and output projections, both MLP
matrices). The token embedding, the learned positions, the LayerNorms and the output head stay in full precision
(the head is tied to the embedding here, and usual practice keeps both in full precision). INT4 skips a Linear
whose in_features is not a multiple of the group size or whose out_features is not a multiple of 16 (the CPU
packing kernel's constraint); ``quantize`` reports every skipped layer and checks the weight types it produced.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # the wheel's .so files are CUDA-only

import numpy as np
import torch
import torch.nn as nn

from scaling_lab.conf import UserError
from scaling_lab.fit.io import integrity, store
from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig

MODES = ("none", "int8", "int4")
# The tensor subclass each mode leaves on a quantized Linear's weight (asserted after quantizing).
WEIGHT_TYPES = {"int8": "Int8Tensor", "int4": "Int4OpaqueTensor"}


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
    return store.weights_path(results_dir, record["sweep"], record["run_id"])


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
    and read as data only (``weights_only=True``: loading a file never runs code)."""
    path = check_weights(record, results_dir)
    remedy = (f"delete it, its {integrity.SUFFIX} and the run's record "
              f"{store.record_path(results_dir, record['sweep'], record['run_id'])}, then relaunch the run with "
              "train.save_model=true")
    state = integrity.load_verified(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), remedy)
    model = GPT(model_config(record))
    model.load_state_dict(state)
    return model.eval()


# ----- quantization ------------------------------------------------------------------------------------------

def _int4_fits(module: nn.Linear, group_size: int) -> bool:
    return module.in_features % group_size == 0 and module.out_features % 16 == 0


def quantize(model: GPT, mode: str, group_size: int = 32) -> tuple[GPT, dict]:
    """A quantized copy of ``model`` and a report: which Linears were quantized, which skipped and why."""
    if mode not in MODES:
        raise ServingInputError(f"unknown serving mode {mode!r}: choose one of {list(MODES)}")
    model = copy.deepcopy(model).eval()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"}
    report = {"mode": mode, "group_size": group_size if mode == "int4" else None, "quantized": [], "skipped": {},
              "kept_full_precision": ["wte", "wpe", "head (tied to wte)", "layer norms"]}
    if mode == "none":
        report["skipped"] = {name: "mode none" for name in linears}
        return model, report
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if mode == "int8":
        config, fits = Int8DynamicActivationInt8WeightConfig(), (lambda m: True)
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        if group_size not in (32, 64, 128):
            raise ServingInputError(f"int4 group size must be 32, 64 or 128 (torchao's CPU kernel), got {group_size}")
        config, fits = PrototypeInt4WeightOnlyConfig(group_size=group_size), (lambda m: _int4_fits(m, group_size))
    for name, m in linears.items():
        if not fits(m):
            report["skipped"][name] = (f"in_features {m.in_features} not a multiple of group size {group_size} or "
                                       f"out_features {m.out_features} not a multiple of 16")
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in linears and fqn not in report["skipped"])
    for name, m in model.named_modules():
        if name in linears and name not in report["skipped"]:
            got = type(m.weight).__name__
            if got != WEIGHT_TYPES[mode]:
                raise RuntimeError(f"{mode}: {name} has weight type {got}, expected {WEIGHT_TYPES[mode]}")
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
    loader = torch.utils.data.DataLoader(windows, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count
