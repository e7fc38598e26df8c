"""How far a fitted law can be trusted: errors on all rows and on held-out rows, and rank agreement in groups."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import spearmanr


def mse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((pred - y) ** 2)) if len(y) else float("nan")


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    if len(y) < 2:
        return float("nan")
    total = np.sum((y - y.mean()) ** 2)
    return float(1.0 - np.sum((pred - y) ** 2) / total) if total > 0 else float("nan")


def spearman_by_group(pred: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> dict[str, float | None]:
    """Spearman rank correlation of predicted vs actual loss within each group of at least 3 rows (None where
    the ranks are undefined, e.g. a constant prediction)."""
    if groups is None:
        return {}
    out = {}
    for g in sorted(set(groups), key=str):
        rows = groups == g
        if rows.sum() < 3:
            continue
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")          # a constant input: undefined, reported as None below
            rho = spearmanr(pred[rows], y[rows]).statistic
        out[str(g)] = None if not np.isfinite(rho) else float(rho)
    return out


def law_metrics(pred: np.ndarray, y: np.ndarray, heldout: np.ndarray, groups: np.ndarray | None) -> dict:
    """The metrics block of fit.json: ``pred`` and ``y`` over all rows, ``heldout`` a boolean mask."""
    rel = np.abs(pred - y) / y
    h = heldout
    return {"mse": mse(pred, y), "r2": r2(pred, y),
            "mse_heldout": mse(pred[h], y[h]), "r2_heldout": r2(pred[h], y[h]),
            "mean_rel_err_heldout": float(rel[h].mean()) if h.any() else float("nan"),
            "max_rel_err_heldout": float(rel[h].max()) if h.any() else float("nan"),
            "n_rows": int(len(y)), "n_heldout": int(h.sum()),
            "spearman": spearman_by_group(pred, y, groups)}
