"""Shape selection (pure): enumerate the shapes of a size, predict each one's loss and latency, rank, find the
loss-latency Pareto front, and select.

* Enumerate: every n_layers in a range and every d_model that is a multiple of head_dim whose parameter count
  (``count(n_layers, d_model)``, supplied by the caller so it is the one the law was fitted with) falls in
  ``[params_min, params_max]``; optionally only aspect ratios R = d_model / n_layers in a range.
* Predict: loss with the inference-efficient law ``L(N, D, R)`` of a fit.json (``LawConstants.predict``), latency
  with the latency law (``fit/latency.py``) or with measurements the caller made.
* Pareto front: the shapes no other shape beats on both predicted loss and latency (ties on both keep one).
* Select, one rule: the lowest predicted loss within a latency budget, or the fastest shape whose predicted loss is
  within a relative tolerance of the best shape's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.io import fitfile

LAW = "inference_efficient"
SHAPE_INPUTS = ("N", "D", "R")
RULES = ("latency_budget", "loss_tolerance")


def load_law(path: str | Path, law: str = LAW, formula: str | None = None) -> tuple[LawConstants, dict]:
    """The law a selection needs (loss of N, D and R = d_model / n_layers) from a fit.json, and its provenance."""
    constants, doc = fitfile.load_law(path, law, formula, inputs=SHAPE_INPUTS, needed_by="selection")
    return constants, doc.get("provenance", {})


def enumerate_shapes(count: Callable[[int, int], float], params_min: float, params_max: float,
                     n_layers: tuple[int, int], head_dim: int,
                     aspect_ratio: tuple[float | None, float | None] = (None, None)) -> pd.DataFrame:
    """Shapes with ``n_layers`` in the inclusive range, d_model a multiple of ``head_dim`` and ``count`` in
    ``[params_min, params_max]`` (``count`` must grow with d_model); columns n_layers, d_model, n_heads, N, R."""
    lo, hi = int(n_layers[0]), int(n_layers[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= n_layers min <= max, got [{lo}, {hi}]")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    if not 0 < params_min <= params_max:
        raise ValueError(f"need 0 < params_min <= params_max, got {params_min:g}, {params_max:g}")
    r_lo, r_hi = aspect_ratio
    rows = []
    for L in range(lo, hi + 1):
        d = head_dim
        while (n := count(L, d)) <= params_max:
            r = d / L
            if n >= params_min and (r_lo is None or r >= r_lo) and (r_hi is None or r <= r_hi):
                rows.append({"n_layers": L, "d_model": d, "n_heads": d // head_dim, "N": float(n), "R": r})
            d += head_dim
    if not rows:
        raise ValueError(f"no shape has n_layers in [{lo}, {hi}], d_model a multiple of {head_dim}"
                         + (f", R in [{r_lo}, {r_hi}]" if (r_lo, r_hi) != (None, None) else "")
                         + f" and N in [{params_min:.4g}, {params_max:.4g}]")
    return pd.DataFrame(rows)


def given_shapes(pairs: Iterable[Iterable[int]], count: Callable[[int, int], float], head_dim: int) -> pd.DataFrame:
    """The same table for explicit [n_layers, d_model] pairs (d_model a multiple of head_dim)."""
    rows = []
    for pair in pairs:
        L, d = (int(x) for x in pair)
        if L < 1 or d < 1 or d % head_dim:
            raise ValueError(f"shape [{L}, {d}]: n_layers and d_model must be positive and d_model a multiple of "
                             f"head_dim {head_dim}")
        rows.append({"n_layers": L, "d_model": d, "n_heads": d // head_dim, "N": float(count(L, d)), "R": d / L})
    if not rows:
        raise ValueError("no shapes given")
    return pd.DataFrame(rows)


def predict(shapes: pd.DataFrame, constants: LawConstants, tokens: float, latency_ms) -> pd.DataFrame:
    """``shapes`` with predicted ``loss`` (the law at N, D = tokens, R) and ``latency_ms`` (given per shape)."""
    if not tokens > 0:
        raise ValueError(f"the token budget must be > 0, got {tokens}")
    out = shapes.copy()
    out["loss"] = np.asarray(constants.predict(N=out.N.to_numpy(), D=float(tokens), R=out.R.to_numpy()), dtype=float)
    out["latency_ms"] = np.asarray(latency_ms, dtype=float)
    if not np.all(np.isfinite(out.loss)) or not np.all(np.isfinite(out.latency_ms)):
        raise ValueError("a predicted loss or latency is not finite")
    return out


def pareto_front(table: pd.DataFrame) -> pd.Series:
    """True for shapes on the loss-latency Pareto front: no other shape is as fast and strictly better, or
    strictly faster and as good. Of shapes equal on both, the first is kept."""
    order = table.sort_values(["latency_ms", "loss"], kind="stable").index
    front = pd.Series(False, index=table.index)
    best = np.inf
    for i in order:
        if table.at[i, "loss"] < best:
            front[i] = True
            best = table.at[i, "loss"]
    return front


def rank(table: pd.DataFrame) -> pd.DataFrame:
    """Ranked by predicted loss (then latency), with a ``pareto`` column and ``rank`` from 1."""
    out = table.assign(pareto=pareto_front(table))
    out = out.sort_values(["loss", "latency_ms"], kind="stable", ignore_index=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


def check_rule(latency_budget_ms: float | None, loss_tolerance: float | None) -> None:
    """Exactly one rule, with a sensible value."""
    given = [r for r, v in zip(RULES, (latency_budget_ms, loss_tolerance)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one rule: a latency budget (ms/token) or a loss tolerance (relative, e.g. "
                         f"0.01); got {given or 'none'}")
    if latency_budget_ms is not None and not latency_budget_ms > 0:
        raise ValueError(f"the latency budget must be > 0 ms, got {latency_budget_ms}")
    if loss_tolerance is not None and not loss_tolerance >= 0:
        raise ValueError(f"the loss tolerance must be >= 0 (relative), got {loss_tolerance}")


def select(table: pd.DataFrame, latency_budget_ms: float | None = None,
           loss_tolerance: float | None = None) -> dict:
    """Apply one rule to a predicted table. ``latency_budget_ms``: the lowest predicted loss among shapes at most
    that slow. ``loss_tolerance`` (relative, 0.01 = 1%): the fastest shape whose loss is at most (1 + tolerance)
    times the best loss. Returns the rule, the chosen row (a dict) and the best-loss and fastest shapes."""
    check_rule(latency_budget_ms, loss_tolerance)
    if table.empty:
        raise ValueError("no candidate shapes to select from")
    best = table.loc[table.sort_values(["loss", "latency_ms"], kind="stable").index[0]]
    fastest = table.loc[table.sort_values(["latency_ms", "loss"], kind="stable").index[0]]
    if latency_budget_ms is not None:
        eligible = table[table.latency_ms <= latency_budget_ms]
        if eligible.empty:
            raise ValueError(f"no shape meets the latency budget of {latency_budget_ms:g} ms; the fastest "
                             f"(n_layers={fastest.n_layers}, d_model={fastest.d_model}) takes "
                             f"{fastest.latency_ms:.4g} ms")
        chosen = eligible.sort_values(["loss", "latency_ms"], kind="stable").iloc[0]
        rule = {"rule": "latency_budget", "latency_budget_ms": float(latency_budget_ms)}
    else:
        limit = best.loss * (1 + loss_tolerance)
        eligible = table[table.loss <= limit]
        chosen = eligible.sort_values(["latency_ms", "loss"], kind="stable").iloc[0]
        rule = {"rule": "loss_tolerance", "loss_tolerance": float(loss_tolerance), "loss_limit": float(limit)}
    return {**rule, "eligible": int(len(eligible)), "chosen": row_dict(chosen), "best_loss": row_dict(best),
            "fastest": row_dict(fastest),
            "speedup_vs_best_loss": float(best.latency_ms / chosen.latency_ms),
            "loss_increase_vs_best": float(chosen.loss / best.loss - 1)}


def row_dict(row: pd.Series | Mapping) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(row).items()}


def format_table(table: pd.DataFrame, chosen: Mapping | None = None, top: int | None = None) -> str:
    """A ranked table as text; ``*`` marks the chosen shape, ``P`` the Pareto front."""
    shown = table if top is None else table.head(top)
    lines = [f"   {'rank':>4} {'n_layers':>8} {'d_model':>7} {'heads':>5} {'R':>7} {'N':>10} {'loss':>8} "
             f"{'latency ms':>10}  "]
    for row in shown.itertuples():
        mark = ("*" if chosen is not None and (row.n_layers, row.d_model) == (chosen["n_layers"], chosen["d_model"])
                else " ") + ("P" if getattr(row, "pareto", False) else " ")
        lines.append(f"   {getattr(row, 'rank', ''):>4} {row.n_layers:>8} {row.d_model:>7} {row.n_heads:>5} "
                     f"{row.R:>7.4g} {row.N:>10.4g} {row.loss:>8.4f} {row.latency_ms:>10.4g}  {mark}")
    if top is not None and len(table) > top:
        lines.append(f"   ... {len(table) - top} more (all in candidates.csv)")
    return "\n".join(lines)
