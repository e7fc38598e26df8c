"""The noise floor beside the extrapolation error: seed-to-seed spread of runs that differ only in seed, and a 95%
prediction interval for each row (the bootstrap interval of the law's mean prediction, widened by the fit rows'
residual scatter, so a new run, not only the mean, is expected inside it)."""

from __future__ import annotations

import numpy as np

from scaling_lab.fit.fitting.fitlaw import LawFit
from scaling_lab.fit.fitting.sources import Table

Z95 = 1.959964


def seed_spread(table: Table) -> dict:
    """Runs of one (N, D, R) with different seeds: per point the relative spread (max - min) / mean of the loss."""
    data = table.data
    if "seed" not in data or data["seed"].nunique() < 2:
        return {"points": 0}
    keys = [data["N"].round(0), data["D"].round(-2)] + ([data["R"].round(3)] if "R" in data else [])
    spreads, heldout = [], []
    for _, rows in data.groupby(keys):
        if rows["seed"].nunique() >= 2:
            spreads.append(float(np.ptp(rows["loss"]) / rows["loss"].mean()))
            heldout.append(bool(rows["heldout"].all()))
    if not spreads:
        return {"points": 0}
    s = np.array(spreads)
    return {"points": len(s), "mean_rel": float(s.mean()), "max_rel": float(s.max()),
            "heldout_points": int(sum(heldout))}


def prediction_interval(f: LawFit, table: Table) -> dict:
    """Per row a 95% prediction interval; coverage on the held-out rows."""
    data = table.data
    y, pred, fit = data["loss"].to_numpy(), f.pred, data["fit"].to_numpy()
    rel = (y[fit] - pred[fit]) / pred[fit]
    dof = max(1, int(fit.sum()) - f.model.n_free)
    scatter = float(np.sqrt(np.sum(rel ** 2) / dof))  # relative residual sd of the fit rows
    lo_ci, hi_ci = (np.asarray(v, dtype=float) for v in f.pred_ci)
    mean_sd = np.where(np.isfinite(hi_ci - lo_ci), (hi_ci - lo_ci) / (2 * Z95), 0.0)
    half = Z95 * np.sqrt(mean_sd ** 2 + (scatter * pred) ** 2)
    lo, hi = pred - half, pred + half
    inside = (y >= lo) & (y <= hi)
    h = data["heldout"].to_numpy()
    return {"residual_sd_rel": scatter, "lo": lo.tolist(), "hi": hi.tolist(),
            "heldout_inside": int(inside[h].sum()), "heldout_total": int(h.sum()),
            "outside_rows": [int(i) for i in np.flatnonzero(h & ~inside)]}


def block(spread: dict, intervals: dict[str, dict], fits: dict[str, LawFit]) -> str:
    lines = ["== noise floor and prediction intervals"]
    if spread.get("points"):
        lines.append(f"   seed-to-seed spread ((max-min)/mean of the loss, {spread['points']} points with >= 2 seeds, "
                     f"{spread['heldout_points']} held out): mean {100 * spread['mean_rel']:.2f}%, "
                     f"max {100 * spread['max_rel']:.2f}% -- the law cannot be trusted to better than this")
    else:
        lines.append("   seed-to-seed spread: no point was trained with >= 2 seeds (train the largest size twice)")
    for name, pi in intervals.items():
        m = fits[name].metrics
        lines.append(f"   {name}: held-out max rel err {100 * m['max_rel_err_heldout']:.2f}%, mean "
                     f"{100 * m['mean_rel_err_heldout']:.2f}%; 95% prediction interval (bootstrap + fit-row scatter "
                     f"{100 * pi['residual_sd_rel']:.2f}%): {pi['heldout_inside']} of {pi['heldout_total']} held-out "
                     "runs inside")
    return "\n".join(lines)
