"""Latency model: inference time of a shape as a linear function of its depth and width, fitted to measurements.

    time(L, d) = intercept + per_layer * L + per_layer_d2 * L * d^2        (ms; L = n_layers, d = d_model)

A fixed cost (embedding, head, the host's per-step overhead), a cost per layer (kernel launches, norms, the KV cache:
what makes deep models slow at equal size) and a cost per layer weight (the matmuls, 12 d^2 a layer). At a fixed
non-embedding size N = 12 L d^2 the last term is constant, so the model says decode time grows linearly with depth
at fixed N, the finding of Bian et al. 2025. One such model is fitted per quantity (``decode_ms_per_token``,
``prefill_ms``) and per batch size, by least squares on relative errors with non-negative coefficients, from a table
of measurements (``scaling-latency`` writes one: columns n_layers, d_model, batch, decode_ms_per_token, prefill_ms).

Held-out error: leave-one-shape-out (each shape predicted by the model fitted on the others) and extrapolation
(the largest shapes by size predicted by the model fitted on the smaller ones: selection extrapolates upwards).

The fit.json ``latency`` section (``to_dict``/``from_dict``; the planner reads ``model`` and the top-level
``decode_ms_per_token``)::

    {"model": "linear", "form": "intercept + per_layer*n_layers + per_layer_d2*n_layers*d_model^2",
     "device": "cpu:x86_64", "threads": 1, "dtype": "float32", "prompt_len": 64, "decode_tokens": 32,
     "batch_size": 1,                                   # batch of the headline decode_ms_per_token / prefill_ms
     "decode_ms_per_token": {"intercept": c0, "per_layer": c1, "per_layer_d2": c2},
     "prefill_ms": {...},
     "by_batch": {"1": {"decode_ms_per_token": {...}, "prefill_ms": {...}}, "8": {...}},
     "heldout": {"<batch>": {"<quantity>": {"loso_mape": .., "loso_max_ape": .., "extrapolation_mape": ..,
                                            "extrapolation_shapes": k}}},
     "shapes": {"count": 12, "n_layers": [lo, hi], "d_model": [lo, hi]},
     "source": "<latency.csv>"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.conf import UserError

MODEL = "linear"
FORM = "intercept + per_layer*n_layers + per_layer_d2*n_layers*d_model^2"
TERMS = ("intercept", "per_layer", "per_layer_d2")
QUANTITIES = ("decode_ms_per_token", "prefill_ms")
MEASUREMENT_COLUMNS = ("n_layers", "d_model", "batch", *QUANTITIES)


def _features(n_layers, d_model) -> np.ndarray:
    L = np.asarray(n_layers, dtype=float)
    d = np.asarray(d_model, dtype=float)
    return np.column_stack([np.ones_like(L), L, L * d ** 2])


@dataclass(frozen=True)
class LinearLatency:
    """``intercept + per_layer * n_layers + per_layer_d2 * n_layers * d_model^2`` (ms)."""

    intercept: float
    per_layer: float
    per_layer_d2: float

    def predict(self, n_layers, d_model):
        """Milliseconds: a float for one shape, an array for arrays of shapes."""
        ms = _features(n_layers, d_model) @ np.array([self.intercept, self.per_layer, self.per_layer_d2])
        return float(ms[0]) if np.ndim(n_layers) == 0 and np.ndim(d_model) == 0 else ms

    def to_dict(self) -> dict:
        return {k: float(getattr(self, k)) for k in TERMS}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "LinearLatency":
        missing = [k for k in TERMS if k not in spec]
        if missing:
            raise ValueError(f"latency coefficients lack {missing} (have {sorted(spec)})")
        return cls(**{k: float(spec[k]) for k in TERMS})


def fit_linear(n_layers, d_model, ms) -> LinearLatency:
    """Least squares on relative error (each row divided by its measured time), coefficients >= 0."""
    y = np.asarray(ms, dtype=float)
    if len(y) < len(TERMS):
        raise ValueError(f"the latency model has {len(TERMS)} coefficients; need at least {len(TERMS)} shapes, "
                         f"got {len(y)}")
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("latency measurements must be finite and positive")
    X = _features(n_layers, d_model)
    scale = X.max(axis=0)  # columns of very different magnitude (1, L, L d^2): scale for a well-posed solve
    coef, _ = nnls(X / scale / y[:, None], np.ones_like(y))
    return LinearLatency(*(coef / scale))


def _ape(model: LinearLatency, rows: pd.DataFrame, quantity: str) -> np.ndarray:
    return np.abs(model.predict(rows.n_layers, rows.d_model) / rows[quantity].to_numpy() - 1)


def heldout_errors(rows: pd.DataFrame, quantity: str, extrapolate_frac: float = 0.25) -> dict:
    """Leave-one-shape-out error and the error on the largest shapes (by L d^2) fitted on the rest."""
    out: dict[str, Any] = {"loso_mape": None, "loso_max_ape": None, "extrapolation_mape": None,
                           "extrapolation_shapes": 0}
    n = len(rows)
    if n > len(TERMS):
        apes = np.concatenate([_ape(fit_linear(*_xy(rows.drop(index=i), quantity)), rows.loc[[i]], quantity)
                               for i in rows.index])
        out.update(loso_mape=float(apes.mean()), loso_max_ape=float(apes.max()))
    k = int(round(n * extrapolate_frac))
    if k >= 1 and n - k >= len(TERMS):
        order = (rows.n_layers * rows.d_model ** 2).sort_values(kind="stable").index
        train, test = rows.loc[order[:n - k]], rows.loc[order[n - k:]]
        out.update(extrapolation_mape=float(_ape(fit_linear(*_xy(train, quantity)), test, quantity).mean()),
                   extrapolation_shapes=k)
    return out


def _xy(rows: pd.DataFrame, quantity: str):
    return rows.n_layers, rows.d_model, rows[quantity]


@dataclass
class LatencyModel:
    """Linear latency models per batch size and quantity, with their held-out errors and where they were measured."""

    by_batch: dict[int, dict[str, LinearLatency]]
    heldout: dict[int, dict[str, dict]] = field(default_factory=dict)
    batch_size: int | None = None  # the headline batch (default: the smallest)
    meta: dict = field(default_factory=dict)  # device, threads, dtype, prompt_len, decode_tokens, shapes, source

    def __post_init__(self):
        if not self.by_batch:
            raise ValueError("a latency model needs at least one batch size")
        if self.batch_size is None:
            self.batch_size = min(self.by_batch)
        if self.batch_size not in self.by_batch:
            raise ValueError(f"batch size {self.batch_size} was not fitted (have {sorted(self.by_batch)})")

    @property
    def device(self) -> str:
        return str(self.meta.get("device", "unknown"))

    def model(self, quantity: str = "decode_ms_per_token", batch: int | None = None) -> LinearLatency:
        batch = self.batch_size if batch is None else int(batch)
        if batch not in self.by_batch:
            raise ValueError(f"the latency model has batch sizes {sorted(self.by_batch)}, not {batch}")
        if quantity not in self.by_batch[batch]:
            raise ValueError(f"the latency model has {sorted(self.by_batch[batch])} at batch {batch}, not {quantity}")
        return self.by_batch[batch][quantity]

    def predict(self, n_layers, d_model, quantity: str = "decode_ms_per_token", batch: int | None = None):
        return self.model(quantity, batch).predict(n_layers, d_model)

    def to_dict(self) -> dict:
        head = self.by_batch[self.batch_size]
        return {"model": MODEL, "form": FORM, **self.meta, "batch_size": self.batch_size,
                **{q: m.to_dict() for q, m in head.items()},
                "by_batch": {str(b): {q: m.to_dict() for q, m in models.items()}
                             for b, models in sorted(self.by_batch.items())},
                "heldout": {str(b): h for b, h in sorted(self.heldout.items())}}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "LatencyModel":
        if not isinstance(spec, Mapping) or spec.get("model") != MODEL:
            got = spec.get("model") if isinstance(spec, Mapping) else spec
            raise ValueError(f"a latency section needs model {MODEL!r}; got {got!r}")
        batch = spec.get("batch_size")
        if spec.get("by_batch"):
            by_batch = {int(b): {q: LinearLatency.from_dict(c) for q, c in models.items()}
                        for b, models in spec["by_batch"].items()}
        else:  # the minimal section the planner reads: decode at one batch size
            if "decode_ms_per_token" not in spec:
                raise ValueError("a latency section needs decode_ms_per_token {intercept, per_layer, per_layer_d2}")
            batch = int(batch or 1)
            by_batch = {batch: {q: LinearLatency.from_dict(spec[q]) for q in QUANTITIES if q in spec}}
        meta = {k: v for k, v in spec.items()
                if k not in {"model", "form", "batch_size", "by_batch", "heldout", *QUANTITIES}}
        heldout = {int(b): h for b, h in (spec.get("heldout") or {}).items()}
        return cls(by_batch=by_batch, heldout=heldout, batch_size=int(batch) if batch is not None else None,
                   meta=meta)


def fit_latency(table: pd.DataFrame, meta: Mapping[str, Any] | None = None, batch_size: int | None = None,
                extrapolate_frac: float = 0.25) -> LatencyModel:
    """Fit the linear model per batch size and quantity from a table of measurements (one row per shape and batch;
    repeated shapes are averaged), with held-out errors."""
    missing = [c for c in ("n_layers", "d_model", "batch") if c not in table.columns]
    quantities = [q for q in QUANTITIES if q in table.columns]
    if missing or not quantities:
        raise ValueError(f"latency measurements need columns n_layers, d_model, batch and one of {QUANTITIES}; "
                         f"missing {missing or list(QUANTITIES)}")
    by_batch, heldout = {}, {}
    for batch, rows in table.groupby("batch"):
        rows = rows.groupby(["n_layers", "d_model"], as_index=False)[quantities].median()
        by_batch[int(batch)] = {q: fit_linear(*_xy(rows, q)) for q in quantities}
        heldout[int(batch)] = {q: heldout_errors(rows, q, extrapolate_frac) for q in quantities}
    shapes = table[["n_layers", "d_model"]].drop_duplicates()
    info = {**(meta or {}), "shapes": {"count": len(shapes),
                                       "n_layers": [int(shapes.n_layers.min()), int(shapes.n_layers.max())],
                                       "d_model": [int(shapes.d_model.min()), int(shapes.d_model.max())]}}
    return LatencyModel(by_batch=by_batch, heldout=heldout, batch_size=batch_size, meta=info)


class MissingLatency(UserError):
    """The file has no latency section."""


def load_latency(path: str | Path) -> LatencyModel:
    """The latency model in a fit.json's ``latency`` section, or in a latency.json (the section alone)."""
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
