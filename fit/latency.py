"""The latency law: prefill and decode time of a shape from what a forward pass reads and computes, fitted per
device over every serving mode to measurements, with held-out errors. The one latency model of the project
(selection, verification and the planner all read it).

One pass of a batch of ``b`` sequences, ``t`` new tokens each (decode: t = 1; prefill: t = the prompt length),
attending to a context of ``c`` tokens (decode: the prompt plus half the decoded tokens, the mean over the timed
steps; prefill: the prompt), through ``L`` layers of width ``d`` with vocabulary ``V``, takes the sum over the law's
terms of a fitted coefficient times the term. The terms are written once, in ``LAW`` below (what each prices beside
it; ``FORM``, the form fit.json records, is written from it; ``features`` computes them).

The blocks hold ``12 L d^2`` weights (attention 4 d^2, MLP 8 d^2 at ffn_ratio 4). Which of them a mode quantizes,
and the bytes a quantized weight reads, come from the serving modes' table (``conf/serving_mode/<mode>.yaml``, the
entry of the law's device kind; the rule ``pipeline/serving.py`` quantizes by): mode ``none`` quantizes nothing;
``int8`` every block matrix; ``int4`` on the CPU skips a matrix whose input width is not a multiple of the group size
or whose output width is not a multiple of 16, which stays fp32. Embedding and head stay fp32. Any mode of the table
is fitted the same way.

One law over the modes, fitted jointly: the first five terms are the same kernels in every mode (an fp32 matrix
costs what it costs whether or not its neighbours are quantized), so they are shared; the ``quant_*`` terms are
each quantized mode's own (zero in ``none``). A shape that INT4 packs only in part (the demo's widths 40, 56, 72,
...) is priced as its fp32 matrices plus its packed ones, and the fp32 costs are learnt from every mode's
measurements. On CPU the kernels differ by orders of magnitude (INT4's unpacks weights in its inner loop at about
1 GFLOP/s against fp32's 20-100; INT8's quantizes every activation, about 0.13 ms a matrix here), which is why one
FLOP or byte coefficient for all matrices cannot price a mixed shape. Element-wise work per token and layer
(``b t L d``) is not a separate term: at the one context a protocol measures it is proportional to the KV term,
which absorbs it (so a prediction at another context scales it with the context too). All coefficients >= 0,
fitted by least squares on relative errors jointly over batch sizes (so bytes and FLOPs separate), one law per
quantity.

Measurements come in rounds (``scaling-latency measure.rounds``: every shape once a round, interleaved); the law
fits each (shape, mode, batch)'s fastest round (``aggregate="min"``; ``"median"`` is the alternative). Interference
from other processes on a shared machine only ever slows a pass down, so the least-disturbed round is the closest
to the device's own cost, the estimator ``timeit`` recommends for the same reason (what it changed on the demo's
shapes: scripts/output/LOG.md).

Held-out errors per (mode, quantity): leave-one-shape-out (every mode and batch of a shape predicted by the law
fitted on the other shapes) and leave-largest-out (the largest quarter of the shapes by weights, in every mode,
predicted from the rest).

fit.json ``latency`` section, ``model: "roofline"``, ``version: 4``::

    {"model": "roofline", "version": 4, "form": "...", "terms": [...], "device": "cpu:x86_64", "threads": 1,
     "dtype": "float32", "prompt_len": 64, "decode_tokens": 32, "batch_size": 1, "group_size": 32,
     "vocab_size": 257, "rounds": 6, "aggregate": "min",
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

from scaling_lab.conf import UserError, serving_modes
from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.io.files import write_json_atomic

MODEL = "roofline"
VERSION = 4  # 4: one fit over every serving mode; a quantized matrix's call, bytes and FLOPs priced per mode
# The law, written once: each coefficient and the term it multiplies, in the order ``features`` computes them.
LAW = (
    ("call", ""),                                           # a pass's fixed cost
    ("layer", "L"),                                         # a layer's fixed cost (kernel launches)
    ("weight_bytes", "4 (fp32 block weights + V d)"),       # fp32 weights read once a pass, the output head included
    ("matmul_flops", "2 b t (fp32 block weights + V d)"),   # multiply-adds through fp32 matrices
    ("kv", "b t L c d"),                                    # the KV cache read (and scores computed) at context c
    ("quant_matrices", "(quantized block matrices)"),       # a quantized matrix's own kernel: its call,
    ("quant_bytes", "(their bytes)"),                       # the weights it reads (int8: 1 byte a weight, int4: 1/2),
    ("quant_flops", "2 b t (quantized block weights)"),     # its multiply-adds,
    ("quant_acts", "b t (their input widths)"),             # and the activations it (de)quantizes
)
TERMS = tuple(name for name, _ in LAW)
QUANT = tuple(name for name in TERMS if name.startswith("quant_"))  # a quantized matrix's own kernel, per mode
SHARED = tuple(name for name in TERMS if name not in QUANT)  # the same kernels in every mode
FORM = " + ".join(f"{name}*{term}" if term else name for name, term in LAW)
QUANTITIES = ("decode_ms_per_token", "prefill_ms")


def kernel(mode: str, kind: str = "cpu") -> serving_modes.Kernel:
    """The serving modes' table entry that serves ``mode`` on a device of ``kind``."""
    return serving_modes.get(mode).on(kind)


def _block_matrices(n_layers, d_model, mode: str, group_size: int | None = None, packed: str = "measured",
                    kind: str = "cpu"):
    """Per block matrix (qkv d x 3d, proj d x d, MLP d x 4d and 4d x d): its weights and its input widths over all
    layers, and whether ``mode`` quantizes it. ``packed="measured"``: as the kernel of ``kind`` does (its table
    entry's packing rule, at ``group_size`` or the mode's own; INT4 on the CPU keeps a matrix in fp32 when its input
    width is not a multiple of the group size or its output width not a multiple of 16); ``packed="all"``: every
    block matrix, as for a planned shape, whose width is chosen for its mode."""
    if packed not in ("measured", "all"):
        raise ValueError(f"packed must be 'measured' or 'all', got {packed!r}")
    entry = kernel(mode, kind)
    L, d = np.asarray(n_layers, dtype=float), np.asarray(d_model, dtype=float)
    for fan_in, fan_out in ((1, 3), (1, 1), (1, 4), (4, 1)):
        quantized = np.full(np.shape(d), entry.quantizes)
        if entry.quantizes and packed == "measured":
            quantized = np.asarray(entry.packs(fan_in * d, fan_out * d, group_size))
        yield L * fan_in * fan_out * d * d, L * fan_in * d, quantized


def block_weights(n_layers, d_model, mode: str = "none", group_size: int | None = None, packed: str = "measured",
                  kind: str = "cpu"):
    """What the blocks hold in full-precision matrices and in quantized ones: ``(fp32 weights, quantized weights,
    quantized matrices, their input widths)``, each summed over the layers."""
    parts = list(_block_matrices(n_layers, d_model, mode, group_size, packed, kind))
    L = np.asarray(n_layers, dtype=float)
    return (sum(np.where(q, 0.0, w) for w, _, q in parts), sum(np.where(q, w, 0.0) for w, _, q in parts),
            sum(np.where(q, L, 0.0) for *_, q in parts), sum(np.where(q, x, 0.0) for _, x, q in parts))


def features(n_layers, d_model, vocab_size, batch, quantity: str, mode: str, prompt_len: int,
             decode_tokens: int, group_size: int | None = None, context=None, packed: str = "measured",
             kind: str = "cpu") -> np.ndarray:
    """The law's terms (one row per shape), in the order of ``LAW`` (``packed``, ``group_size``, ``kind``: see
    ``_block_matrices``)."""
    if quantity not in QUANTITIES:
        raise ValueError(f"latency quantity must be one of {QUANTITIES}, got {quantity!r}")
    L, d = np.atleast_1d(np.asarray(n_layers, dtype=float)), np.atleast_1d(np.asarray(d_model, dtype=float))
    V = np.broadcast_to(np.asarray(vocab_size, dtype=float), L.shape)
    b = np.broadcast_to(np.asarray(batch, dtype=float), L.shape)
    decode = quantity == "decode_ms_per_token"
    t = 1.0 if decode else float(prompt_len)
    c = context if context is not None else (prompt_len + (decode_tokens - 1) / 2 if decode else prompt_len)
    c = np.broadcast_to(np.asarray(c, dtype=float), L.shape)
    full, quantized, matrices, inputs = block_weights(L, d, mode, group_size, packed, kind)
    full = full + V * d  # the output head (tied or not) stays fp32
    return np.column_stack([np.ones_like(L), L, 4 * full, 2 * b * t * full, b * t * L * c * d, matrices,
                            kernel(mode, kind).bytes_per_weight * quantized, 2 * b * t * quantized, b * t * inputs])


def _fit_terms(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (each row divided by its measured time)."""
    used = int(np.any(X != 0, axis=0).sum())  # a term no measurement has a part in (fp32's quant_*) is not fitted
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
    def kind(self) -> str:
        """The device kind whose table entries price the modes (``cuda`` for a CUDA device, else ``cpu``)."""
        return serving_modes.kind_of(self.device)

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
                mode: str = "none", vocab_size=None, context=None, packed: str = "measured"):
        """Milliseconds: a float for one shape, an array for arrays of shapes. ``packed="all"`` prices every block
        matrix as quantized in ``mode`` (a planned shape, given a width the mode packs whole); ``"measured"``, the
        default, as the kernels pack this very shape."""
        coef = self.coefficients(quantity, mode)
        X = features(n_layers, d_model, vocab_size if vocab_size is not None else self.meta.get("vocab_size", 257),
                     self.batch_size if batch is None else batch, quantity, mode, int(self.meta["prompt_len"]),
                     int(self.meta["decode_tokens"]), _group_size(self.meta), context, packed, self.kind)
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


def _group_size(meta: Mapping[str, Any]) -> int | None:
    """The group size the measurements quantized at (None: each mode's own)."""
    return None if meta.get("group_size") is None else int(meta["group_size"])


def _features_of(rows: pd.DataFrame, quantity: str, mode: str, meta: Mapping[str, Any]) -> np.ndarray:
    return features(rows.n_layers.to_numpy(), rows.d_model.to_numpy(), rows.vocab_size.to_numpy(),
                    rows.batch.to_numpy(), quantity, mode, int(meta["prompt_len"]), int(meta["decode_tokens"]),
                    _group_size(meta), kind=serving_modes.kind_of(meta.get("device", "cpu")))


def _joint_design(rows: pd.DataFrame, quantity: str, meta: Mapping[str, Any]) -> tuple[np.ndarray, list[str]]:
    """One design over every serving mode: the shared terms in common, each quantized mode's ``QUANT`` terms in
    columns of its own (zero in other modes' rows). Returns the matrix and the modes, in column order."""
    modes = [m for m in serving_modes.names() if m in set(rows["mode"])]
    X = np.zeros((len(rows), len(SHARED) + len(QUANT) * len(modes)))
    for i, mode in enumerate(modes):
        mask = (rows["mode"] == mode).to_numpy()
        x = _features_of(rows[mask], quantity, mode, meta)
        X[np.ix_(mask, range(len(SHARED)))] = x[:, :len(SHARED)]
        X[np.ix_(mask, range(len(SHARED) + len(QUANT) * i, len(SHARED) + len(QUANT) * (i + 1)))] = x[:, len(SHARED):]
    return X, modes


def _fit_joint(rows: pd.DataFrame, quantity: str, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The joint fit's coefficients as one ``TERMS`` vector per mode."""
    X, modes = _joint_design(rows, quantity, meta)
    coef = _fit_terms(X, rows[quantity].to_numpy())
    return {m: np.concatenate([coef[:len(SHARED)], coef[len(SHARED) + len(QUANT) * i:][:len(QUANT)]])
            for i, m in enumerate(modes)}


def _apes(coefs: dict[str, np.ndarray], rows: pd.DataFrame, quantity: str, meta: Mapping[str, Any]) -> pd.Series:
    """Absolute relative error of each row's prediction by the coefficients of its own mode."""
    predicted = pd.Series(np.nan, index=rows.index)
    for m, part in rows.groupby("mode"):
        predicted[part.index] = _features_of(part, quantity, str(m), meta) @ coefs[str(m)]
    return (predicted / rows[quantity] - 1).abs()


def heldout_errors(rows: pd.DataFrame, quantity: str, meta: Mapping[str, Any],
                   extrapolate_frac: float = 0.25) -> dict[str, dict]:
    """Per mode: leave-one-shape-out (every mode and batch of a shape predicted by the law fitted on the other
    shapes), and the largest ``extrapolate_frac`` of the shapes (by weights) predicted from the rest."""
    X, modes = _joint_design(rows, quantity, meta)
    out = {m: {"loso_mape": None, "loso_max_ape": None, "largest_mape": None, "largest_max_ape": None,
               "largest_shapes": 0} for m in modes}
    keys = rows[["n_layers", "d_model"]].apply(tuple, axis=1)
    shapes = list(dict.fromkeys(keys))
    used = int(np.any(X != 0, axis=0).sum())

    def report(apes: pd.Series, tested: pd.Series, prefix: str, **extra):
        for m in modes:
            a = apes[(rows["mode"] == m) & tested]
            if len(a):
                out[m].update({f"{prefix}_mape": float(a.mean()), f"{prefix}_max_ape": float(a.max()), **extra})

    if len(rows) - max(keys.value_counts()) >= used and len(shapes) > 2:
        apes = pd.concat([_apes(_fit_joint(rows[keys != s], quantity, meta), rows[keys == s], quantity, meta)
                          for s in shapes])
        report(apes.reindex(rows.index), keys == keys, "loso")
    k = int(round(len(shapes) * extrapolate_frac))
    size = {s: 12 * s[0] * s[1] ** 2 for s in shapes}
    test = keys.isin(sorted(shapes, key=size.get)[len(shapes) - k:]) if k else keys != keys
    if k and (~test).sum() >= used:
        apes = _apes(_fit_joint(rows[~test], quantity, meta), rows, quantity, meta)
        report(apes, test, "largest", largest_shapes=k)
    return out


AGGREGATES = ("min", "median")  # how the law reduces a measurement's rounds (reduce_rounds also takes "max")
MEASURED = ("mode", "n_layers", "d_model", "vocab_size", "batch")  # what a measurement is of; its rounds repeat it


def check_aggregate(aggregate: str, allowed=AGGREGATES) -> str:
    if aggregate not in allowed:
        raise ValueError(f"latency_model.aggregate must be one of {list(allowed)}, got {aggregate!r}")
    return aggregate


def reduce_rounds(table: pd.DataFrame, aggregate: str = "min", by: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per measurement (``MEASURED``, and ``by``): its rounds reduced by ``aggregate`` (``min``: the
    fastest; ``median``; ``max``: the slowest)."""
    check_aggregate(aggregate, (*AGGREGATES, "max"))
    keys = [k for k in (*MEASURED, *by) if k in table.columns]
    quantities = [q for q in QUANTITIES if q in table.columns]
    return table.groupby(keys, as_index=False, sort=False)[quantities].agg(aggregate)


def fit_latency(table: pd.DataFrame, meta: Mapping[str, Any], extrapolate_frac: float = 0.25,
                aggregate: str = "min") -> LatencyModel:
    """The law over every serving mode (column ``mode``, default ``none``) per quantity, from a table of
    measurements (one row per shape, mode, batch and round), with held-out errors. The rounds of a (shape, mode,
    batch) are reduced by ``aggregate``: their fastest (``min``) or their ``median``. ``meta`` needs the protocol's
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
    unknown = sorted(set(map(str, table["mode"])) - set(serving_modes.names()))
    if unknown:
        serving_modes.get(unknown[0])  # a one-line error naming the modes there are
    meta = {**meta, "aggregate": aggregate}
    rows = reduce_rounds(table, aggregate)
    modes: dict[str, dict] = {}
    heldout: dict[str, dict] = {}
    for q in quantities:
        for m, coef in _fit_joint(rows, q, meta).items():
            modes.setdefault(m, {})[q] = {k: float(v) for k, v in zip(TERMS, coef)}
        for m, err in heldout_errors(rows, q, meta, extrapolate_frac).items():
            heldout.setdefault(m, {})[q] = err
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
