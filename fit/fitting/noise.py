"""The noise floor beside the extrapolation error: the seed-to-seed spread of runs that differ only in seed."""

from __future__ import annotations

import numpy as np

from scaling_lab.fit.fitting.fitlaw import LawFit
from scaling_lab.fit.fitting.sources import Table


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


def block(spread: dict, fits: dict[str, LawFit]) -> str:
    lines = ["== noise floor"]
    if spread.get("points"):
        lines.append(f"   seed-to-seed spread ((max-min)/mean of the loss, {spread['points']} points with >= 2 seeds, "
                     f"{spread['heldout_points']} held out): mean {100 * spread['mean_rel']:.2f}%, "
                     f"max {100 * spread['max_rel']:.2f}% -- the law cannot be trusted to better than this")
    else:
        lines.append("   seed-to-seed spread: no point was trained with >= 2 seeds (train the largest size twice)")
    for name, f in fits.items():
        m = f.metrics
        lines.append(f"   {name}: held-out max rel err {100 * m['max_rel_err_heldout']:.2f}%, mean "
                     f"{100 * m['mean_rel_err_heldout']:.2f}%, held-out runs inside the 95% prediction interval: "
                     f"{100 * (m.get('heldout_in_pi95') or float('nan')):.0f}%")
    return "\n".join(lines)
