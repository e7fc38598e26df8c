"""The latency law: prefill and decode time of a shape from what a forward pass reads and computes, fitted per
device and serving mode to measurements, with held-out errors. The one latency model of the project (selection,
verification and the planner all read it).

One pass of a batch of ``b`` sequences, ``t`` new tokens each (decode: t = 1; prefill: t = the prompt length),
attending to a context of ``c`` tokens (decode: the prompt plus half the decoded tokens, the mean over the timed
steps; prefill: the prompt), through ``L`` layers of width ``d`` with vocabulary ``V``::

    ms = call + layer * L                                   fixed cost per pass, and per layer (kernel launches)
       + weight_bytes * (bytes of the block weights in this mode + 4 V d)     weights read once a pass, the
                                                                             untied-or-tied output head included
       + matmul_flops * 2 b t (full-precision block weights + V d)         multiply-adds through fp32 matrices
       + quant_flops * 2 b t (quantized block weights)                      multiply-adds through quantized ones
       + kv * b t L c d                                     the KV cache read (and scores computed) at context c

The blocks hold ``12 L d^2`` weights (attention 4 d^2, MLP 8 d^2 at ffn_ratio 4). In mode ``none`` all of them are
full precision; ``int8`` quantizes every block matrix (1 byte a weight); ``int4`` (1/2 byte) skips a matrix whose
input width is not a multiple of the group size or whose output width is not a multiple of 16, which stays fp32
(the same rule as ``pipeline/serving.py``); embedding and head stay fp32. A quantized matrix has its own FLOP cost
because its kernel is another kernel: on CPU, INT4's unpacks the weights in the inner loop and runs at about
1 GFLOP/s against fp32's 20-100, so one FLOP coefficient for both cannot price a shape whose matrices are partly
quantized (one law over both: leave-one-shape-out error 47% on the demo's INT4 decode). Element-wise work per
token and layer (``b t L d``) is not a separate term: at the one context a protocol measures it is proportional
to the KV term, which absorbs it (so a prediction at another context scales it with the context too). All
coefficients >= 0, fitted by least squares on relative errors jointly over batch sizes (so bytes and FLOPs
separate), one law per (mode, quantity).

Held-out errors per (mode, quantity): leave-one-shape-out (every batch of a shape predicted by the law fitted on
the other shapes) and leave-largest-out (the largest quarter of the shapes by weights predicted from the rest).

fit.json ``latency`` section, ``model: "roofline"``, ``version: 3``::

    {"model": "roofline", "version": 3, "form": "...", "terms": [...], "device": "cpu:x86_64", "threads": 1,
     "dtype": "float32", "prompt_len": 64, "decode_tokens": 32, "batch_size": 1, "group_size": 32,
     "vocab_size": 257,
     "modes": {"none": {"decode_ms_per_token": {"call": .., "layer": .., ...}, "prefill_ms": {...}}, "int8": ...},
     "heldout": {"none": {"decode_ms_per_token": {"loso_mape", "loso_max_ape", "largest_mape", "largest_max_ape",
                                                 "largest_shapes"}}},
     "shapes": {"count": 27, "n_layers": [lo, hi], "d_model": [lo, hi]}, "source": "<latency.csv>"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from scaling_lab.conf import UserError
from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.io.files import write_json_atomic

MODEL = "roofline"
VERSION = 3  # 3: the FLOPs through quantized matrices priced apart (quant_flops)
TERMS = ("call", "layer", "weight_bytes", "matmul_flops", "quant_flops", "kv")
FORM = ("call + layer*L + weight_bytes*(block weight bytes + 4 V d) + matmul_flops*2 b t (fp32 block weights + V d)"
        " + quant_flops*2 b t (quantized block weights) + kv*b t L c d")
QUANTITIES = ("decode_ms_per_token", "prefill_ms")
MODES = ("none", "int8", "int4")
BYTES_PER_WEIGHT = {"none": 4.0, "int8": 1.0, "int4": 0.5}


def _block_matrices(n_layers, d_model, mode: str, group_size: int):
    """Per block matrix (qkv d x 3d, proj d x d, MLP d x 4d and 4d x d): its weights over all layers, and whether
    ``mode`` quantizes it (INT4 keeps a matrix in fp32 when its input width is not a multiple of ``group_size`` or
    its output width not a multiple of 16: torchao's CPU packing)."""
    if mode not in BYTES_PER_WEIGHT:
        raise ValueError(f"unknown serving mode {mode!r}: the latency law knows {list(BYTES_PER_WEIGHT)}")
    L, d = np.asarray(n_layers, dtype=float), np.asarray(d_model, dtype=float)
    for fan_in, fan_out in ((1, 3), (1, 1), (1, 4), (4, 1)):
        if mode == "int4":
            quantized = (np.mod(fan_in * d, group_size) == 0) & (np.mod(fan_out * d, 16) == 0)
        else:
            quantized = np.full(np.shape(d), mode != "none")
        yield L * fan_in * fan_out * d * d, quantized


def block_weight_bytes(n_layers, d_model, mode: str = "none", group_size: int = 32):
    """Bytes of the blocks' weight matrices in ``mode`` (a matrix the mode skips stays at 4 bytes a weight)."""
    return sum(w * np.where(q, BYTES_PER_WEIGHT[mode], 4.0)
               for w, q in _block_matrices(n_layers, d_model, mode, group_size))


def block_weights(n_layers, d_model, mode: str = "none", group_size: int = 32):
    """The blocks' weights in full-precision matrices and in quantized ones: ``(fp32, quantized)``."""
    parts = list(_block_matrices(n_layers, d_model, mode, group_size))
    return sum(np.where(q, 0.0, w) for w, q in parts), sum(np.where(q, w, 0.0) for w, q in parts)


def features(n_layers, d_model, vocab_size, batch, quantity: str, mode: str, prompt_len: int,
             decode_tokens: int, group_size: int = 32, context=None) -> np.ndarray:
    """The law's terms (one row per shape), in the order of ``TERMS``."""
    if quantity not in QUANTITIES:
        raise ValueError(f"latency quantity must be one of {QUANTITIES}, got {quantity!r}")
    L, d = np.atleast_1d(np.asarray(n_layers, dtype=float)), np.atleast_1d(np.asarray(d_model, dtype=float))
    V = np.broadcast_to(np.asarray(vocab_size, dtype=float), L.shape)
    b = np.broadcast_to(np.asarray(batch, dtype=float), L.shape)
    decode = quantity == "decode_ms_per_token"
    t = 1.0 if decode else float(prompt_len)
    c = context if context is not None else (prompt_len + (decode_tokens - 1) / 2 if decode else prompt_len)
    c = np.broadcast_to(np.asarray(c, dtype=float), L.shape)
    weight_bytes = block_weight_bytes(L, d, mode, group_size) + 4 * V * d
    full, quantized = block_weights(L, d, mode, group_size)
    return np.column_stack([np.ones_like(L), L, weight_bytes, 2 * b * t * (full + V * d), 2 * b * t * quantized,
                            b * t * L * c * d])


def _fit_terms(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (each row divided by its measured time)."""
    used = int(np.any(X != 0, axis=0).sum())  # a term a mode has no part in (fp32's quant_flops) is not fitted
    if len(y) < used:
        raise ValueError(f"the latency law has {used} terms here; need at least {used} measurements, got {len(y)}")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("latency measurements must be finite and positive")
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(X / scale / y[:, None], np.ones_like(y))
    return coef / scale


@dataclass
class LatencyModel:
    """The fitted law per serving mode and quantity, where it was measured, and its held-out errors."""

    modes: dict[str, dict[str, dict[str, float]]]
    heldout: dict[str, dict[str, dict]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # device, threads, dtype, prompt_len, decode_tokens, vocab_size, ...

    def __post_init__(self):
        if not self.modes:
            raise ValueError("a latency model needs at least one serving mode")
        for k in ("prompt_len", "decode_tokens"):
            if k not in self.meta:
                raise ValueError(f"a latency model needs its protocol's {k}")

    @property
    def device(self) -> str:
        return str(self.meta.get("device", "unknown"))

    @property
    def batch_size(self) -> int:
        return int(self.meta.get("batch_size") or 1)

    def coefficients(self, quantity: str = "decode_ms_per_token", mode: str = "none") -> dict[str, float]:
        if mode not in self.modes:
            raise ValueError(f"the latency law was fitted for serving modes {sorted(self.modes)}, not {mode!r}: "
                             f"measure it with scaling-latency measure.modes=[...,{mode}]")
        if quantity not in self.modes[mode]:
            raise ValueError(f"the latency law has {sorted(self.modes[mode])} for mode {mode}, not {quantity}")
        return self.modes[mode][quantity]

    def predict(self, n_layers, d_model, quantity: str = "decode_ms_per_token", batch: int | None = None,
                mode: str = "none", vocab_size=None, context=None):
        """Milliseconds: a float for one shape, an array for arrays of shapes."""
        coef = self.coefficients(quantity, mode)
        X = features(n_layers, d_model, vocab_size if vocab_size is not None else self.meta.get("vocab_size", 257),
                     self.batch_size if batch is None else batch, quantity, mode, int(self.meta["prompt_len"]),
                     int(self.meta["decode_tokens"]), int(self.meta.get("group_size") or 32), context)
        ms = X @ np.array([coef[k] for k in TERMS])
        return float(ms[0]) if np.ndim(n_layers) == 0 and np.ndim(d_model) == 0 else ms

    def to_dict(self) -> dict:
        return {"model": MODEL, "version": VERSION, "form": FORM, "terms": list(TERMS), **self.meta,
                "modes": self.modes, "heldout": self.heldout}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "LatencyModel":
        if not isinstance(spec, Mapping) or spec.get("model") != MODEL or spec.get("version") != VERSION:
            got = (spec.get("model"), spec.get("version")) if isinstance(spec, Mapping) else spec
            raise ValueError(f"a latency section needs model {MODEL!r} version {VERSION} (re-run scaling-latency); "
                             f"got {got!r}")
        modes = {m: {q: {k: float(c[k]) for k in TERMS} for q, c in qs.items()} for m, qs in spec["modes"].items()}
        meta = {k: v for k, v in spec.items() if k not in {"model", "version", "form", "terms", "modes", "heldout"}}
        return cls(modes=modes, heldout=dict(spec.get("heldout") or {}), meta=meta)


def _design(rows: pd.DataFrame, quantity: str, mode: str, meta: Mapping[str, Any]) -> np.ndarray:
    return features(rows.n_layers.to_numpy(), rows.d_model.to_numpy(), rows.vocab_size.to_numpy(),
                    rows.batch.to_numpy(), quantity, mode, int(meta["prompt_len"]), int(meta["decode_tokens"]),
                    int(meta.get("group_size") or 32))


def _ape(coef, rows, quantity, mode, meta) -> np.ndarray:
    return np.abs(_design(rows, quantity, mode, meta) @ coef / rows[quantity].to_numpy() - 1)


def heldout_errors(rows: pd.DataFrame, quantity: str, mode: str, meta: Mapping[str, Any],
                   extrapolate_frac: float = 0.25) -> dict:
    """Leave-one-shape-out, and the largest ``extrapolate_frac`` of the shapes (by weights) from the rest."""
    out: dict[str, Any] = {"loso_mape": None, "loso_max_ape": None, "largest_mape": None, "largest_max_ape": None,
                           "largest_shapes": 0}
    keys = rows[["n_layers", "d_model"]].apply(tuple, axis=1)
    shapes = list(dict.fromkeys(keys))
    y = rows[quantity].to_numpy()
    used = int(np.any(_design(rows, quantity, mode, meta) != 0, axis=0).sum())

    def fit_on(mask):
        return _fit_terms(_design(rows[mask], quantity, mode, meta), y[mask])

    if len(rows) - max(keys.value_counts()) >= used and len(shapes) > 2:
        apes = np.concatenate([_ape(fit_on((keys != s).to_numpy()), rows[(keys == s).to_numpy()], quantity, mode,
                                    meta) for s in shapes])
        out.update(loso_mape=float(apes.mean()), loso_max_ape=float(apes.max()))
    k = int(round(len(shapes) * extrapolate_frac))
    size = {s: 12 * s[0] * s[1] ** 2 for s in shapes}
    largest = set(sorted(shapes, key=size.get)[len(shapes) - k:]) if k else set()
    test = keys.isin(largest).to_numpy()
    if k and (~test).sum() >= used:
        apes = _ape(fit_on(~test), rows[test], quantity, mode, meta)
        out.update(largest_mape=float(apes.mean()), largest_max_ape=float(apes.max()), largest_shapes=k)
    return out


def fit_latency(table: pd.DataFrame, meta: Mapping[str, Any], extrapolate_frac: float = 0.25) -> LatencyModel:
    """The law per serving mode (column ``mode``, default ``none``) and quantity from a table of measurements (one
    row per shape, batch and mode; repeats averaged by median), with held-out errors. ``meta`` needs the protocol's
    ``prompt_len`` and ``decode_tokens``."""
    table = table.copy()
    if "mode" not in table:
        table["mode"] = "none"
    if "vocab_size" not in table:
        table["vocab_size"] = meta.get("vocab_size", 257)
    missing = [c for c in ("n_layers", "d_model", "batch") if c not in table.columns]
    quantities = [q for q in QUANTITIES if q in table.columns]
    if missing or not quantities:
        raise ValueError(f"latency measurements need columns n_layers, d_model, batch and one of {QUANTITIES}; "
                         f"missing {missing or list(QUANTITIES)}")
    meta = dict(meta)
    modes, heldout = {}, {}
    for mode, rows in table.groupby("mode"):
        rows = rows.groupby(["n_layers", "d_model", "vocab_size", "batch"], as_index=False)[quantities].median()
        modes[str(mode)], heldout[str(mode)] = {}, {}
        for q in quantities:
            coef = _fit_terms(_design(rows, q, str(mode), meta), rows[q].to_numpy())
            modes[str(mode)][q] = {k: float(v) for k, v in zip(TERMS, coef)}
            heldout[str(mode)][q] = heldout_errors(rows, q, str(mode), meta, extrapolate_frac)
    shapes = table[["n_layers", "d_model"]].drop_duplicates()
    meta.setdefault("batch_size", int(table.batch.min()))
    meta.setdefault("vocab_size", int(table.vocab_size.iloc[0]))
    meta["batch_sizes"] = sorted(int(b) for b in table.batch.unique())
    meta["shapes"] = {"count": len(shapes), "n_layers": [int(shapes.n_layers.min()), int(shapes.n_layers.max())],
                      "d_model": [int(shapes.d_model.min()), int(shapes.d_model.max())]}
    return LatencyModel(modes=modes, heldout=heldout, meta=meta)


class MissingLatency(UserError):
    """The file has no latency section."""


def load_latency(path: str | Path) -> LatencyModel:
    """The latency law in a fit.json's ``latency`` section, or in a latency.json (the section alone)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no latency model at {path}: run scaling-latency first")
    doc = json.loads(path.read_text())
    section = doc.get("latency") if "laws" in doc else doc
    if not section:
        raise MissingLatency(f"{path} has no latency section: run scaling-latency constants={path}")
    return LatencyModel.from_dict(section)


def merge_into_fit_json(path: str | Path, section: Mapping[str, Any]) -> Path:
    """Set the ``latency`` section of an existing fit.json (atomically), leaving its laws and the rest untouched."""
    doc = read_fit_json(path)
    doc["latency"] = dict(section)
    return write_json_atomic(path, doc)
