"""Hoffmann et al. 2022 Approach 2: isoFLOP profiles. For each compute budget a parabola of loss in log N (and in
log D), its minimum, then power laws N_opt = k C^a and D_opt = k' C^b through the minima; intervals by bootstrap
over the points of each budget."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def snap_budgets(budget: np.ndarray, rtol: float) -> np.ndarray:
    """Budgets within ``rtol`` of the smallest of their cluster are one budget (its median)."""
    order = np.argsort(budget)
    out = np.empty(len(budget))
    start, members = None, []
    for i in order:
        if start is None or budget[i] > start * (1 + rtol):
            if members:
                out[members] = np.median(budget[members])
            start, members = budget[i], []
        members.append(i)
    if members:
        out[members] = np.median(budget[members])
    return out


def vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """Minimum (x*, y*) of the least-squares parabola y(x), or NaN and the reason it is not usable."""
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return np.nan, np.nan, "not convex"
    xv = -c1 / (2 * c2)
    if not x.min() <= xv <= x.max():
        return np.nan, np.nan, "minimum outside the sampled range"
    return float(xv), float(c0 - c1 * c1 / (4 * c2)), ""


def optima(points: pd.DataFrame, min_points: int) -> pd.DataFrame:
    """One row per budget: N_opt and D_opt from the parabolas, the loss there, and why a budget was dropped."""
    rows = []
    for budget, group in points.groupby("budget"):
        row = {"budget": budget, "points": len(group), "N_opt": np.nan, "D_opt": np.nan, "loss_opt": np.nan, "note": ""}
        if group["N"].nunique() < min_points:
            row["note"] = f"fewer than {min_points} model sizes"
        else:
            xn, loss_n, note_n = vertex(np.log(group["N"].to_numpy()), group["loss"].to_numpy())
            xd, _, note_d = vertex(np.log(group["D"].to_numpy()), group["loss"].to_numpy())
            row.update(N_opt=np.exp(xn), D_opt=np.exp(xd), loss_opt=loss_n, note=note_n or note_d)
        rows.append(row)
    return pd.DataFrame(rows)


def power_law(budget: np.ndarray, value: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of value = coefficient * budget^exponent, least squares in log-log."""
    ok = np.isfinite(value)
    if ok.sum() < 2:
        return np.nan, np.nan
    slope, intercept = np.polyfit(np.log(budget[ok]), np.log(value[ok]), 1)
    return float(slope), float(np.exp(intercept))


def analyse(points: pd.DataFrame, min_points: int, n_boot: int, seed: int) -> dict[str, Any]:
    """``points`` has N, D, loss, budget. Returns the per-budget optima and the exponents a (N) and b (D)."""
    table = optima(points, min_points)
    used = table[table["note"] == ""]
    a, k_n = power_law(used["budget"].to_numpy(), used["N_opt"].to_numpy())
    b, k_d = power_law(used["budget"].to_numpy(), used["D_opt"].to_numpy())
    result = {"a": a, "b": b, "N_coef": k_n, "D_coef": k_d, "budgets_used": int(len(used)),
              "budgets_dropped": {f"{r.budget:.4g}": r.note for r in table.itertuples() if r.note},
              "optima": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                         for r in table.to_dict("records")]}
    if n_boot > 0 and len(used) >= 2:
        rng = np.random.default_rng(seed)
        groups = [g for _, g in points[points["budget"].isin(used["budget"])].groupby("budget")]
        draws = []
        for _ in range(n_boot):
            sample = pd.concat([g.iloc[rng.integers(0, len(g), len(g))] for g in groups])
            t = optima(sample, min_points)
            t = t[t["note"] == ""]
            draws.append((power_law(t["budget"].to_numpy(), t["N_opt"].to_numpy())[0],
                          power_law(t["budget"].to_numpy(), t["D_opt"].to_numpy())[0]))
        draws = np.array(draws)
        with np.errstate(all="ignore"):
            lo, hi = np.nanpercentile(draws, 2.5, axis=0), np.nanpercentile(draws, 97.5, axis=0)
        result.update(a_ci95=[float(lo[0]), float(hi[0])], b_ci95=[float(lo[1]), float(hi[1])],
                      n_boot=n_boot, boot_failed=int(np.isnan(draws).any(axis=1).sum()))
    return result
