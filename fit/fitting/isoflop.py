"""Hoffmann et al. 2022 Approach 2: isoFLOP profiles. For each compute budget a parabola of loss in log N (and in
log D), its minimum, then power laws N_opt = k C^a and D_opt = k' C^b through the minima. Intervals by a
fixed-design residual bootstrap: the sizes a sweep trains are its design, not a sample, so each resample keeps them
and draws each loss as its budget's parabola plus a residual drawn from the residuals of every budget's parabola
(leverage-corrected, pooled: a budget has 3 to 6 points, too few to resample on their own); each resample refits
every budget's parabolas, so each budget's N_opt, D_opt, best loss and tokens per parameter get an interval, and so
do the exponents. A budget whose minimum is not bracketed
(a parabola that is not convex, or whose vertex lies outside the sizes trained) is named and dropped. With three
budgets or more, the largest is also predicted from the others (its N_opt and best loss), the test of
extrapolation a frontier must pass; when the fit holds rows out and they form a larger budget, that budget is the
one predicted, from every fitted budget."""


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
        return np.nan, np.nan, f"minimum {'below' if xv < x.min() else 'above'} the sampled range"
    return float(xv), float(c0 - c1 * c1 / (4 * c2)), ""


def optima(points: pd.DataFrame, min_points: int, window: float | None = None, edges: bool = True) -> pd.DataFrame:
    """One row per budget: N_opt and D_opt from the parabolas, the loss there, and why a budget was dropped.
    ``window``: each parabola goes through the points within this factor in N of the budget's lowest loss only (a
    parabola in log N describes the profile near its minimum, not sizes a decade away); None: every point.
    ``edges``: a budget whose lowest loss is its smallest or largest size is not bracketed, and is dropped, naming
    the sizes to add (off for resamples, whose parabolas the range check alone judges)."""
    rows = []
    for budget, group in points.groupby("budget"):
        sizes = group["N"].to_numpy()
        edge = sizes[np.argmin(group["loss"].to_numpy())]
        group = near_minimum(group, window)
        row = {"budget": budget, "points": len(group), "N_opt": np.nan, "D_opt": np.nan, "loss_opt": np.nan, "note": ""}
        if edges and len(np.unique(sizes)) >= min_points and edge in (sizes.min(), sizes.max()):
            side = "smallest" if edge == sizes.min() else "largest"
            row["note"] = (f"the lowest loss is at the {side} size trained (not bracketed: add "
                           f"{'smaller' if side == 'smallest' else 'larger'} sizes)")
        elif group["N"].nunique() < min_points:
            row["note"] = f"fewer than {min_points} model sizes"
        else:
            xn, loss_n, note_n = vertex(np.log(group["N"].to_numpy()), group["loss"].to_numpy())
            xd, _, note_d = vertex(np.log(group["D"].to_numpy()), group["loss"].to_numpy())
            row.update(N_opt=np.exp(xn), D_opt=np.exp(xd), loss_opt=loss_n, note=note_n or note_d)
        rows.append(row)
    return pd.DataFrame(rows)


def near_minimum(group: pd.DataFrame, window: float | None) -> pd.DataFrame:
    """The points of one budget within ``window`` in N of its lowest loss (None: every point)."""
    if not window:
        return group
    best = group["N"].to_numpy()[np.argmin(group["loss"].to_numpy())]
    return group[(group["N"] >= best / window) & (group["N"] <= best * window)]


def residual_draws(points: pd.DataFrame, budgets, window: float | None, n_boot: int, rng):
    """``n_boot`` resamples of the points of ``budgets`` (each within its window, chosen once on the data): the same
    N and D, each loss its budget's parabola in log N plus a residual drawn from the pooled, leverage-corrected,
    centred residuals of every budget's parabola. None when no budget has more points than its parabola has
    coefficients (the residuals are then all zero: the noise is not measured)."""
    groups, pool = [], []
    for budget in budgets:
        group = near_minimum(points[points["budget"] == budget], window)
        x, loss = np.log(group["N"].to_numpy()), group["loss"].to_numpy()
        design = np.vander(x, 3)
        fitted = design @ np.linalg.lstsq(design, loss, rcond=None)[0]
        leverage = np.einsum("ij,ji->i", design, np.linalg.pinv(design))
        free = leverage < 1 - 1e-6
        pool.append((loss - fitted)[free] / np.sqrt(1 - leverage[free]))
        groups.append((group, fitted))
    pool = np.concatenate(pool)
    if len(pool) < 2:
        return None
    pool = pool - pool.mean()
    return (pd.concat([g.assign(loss=fitted + rng.choice(pool, len(g))) for g, fitted in groups])
            for _ in range(n_boot))


def power_law(budget: np.ndarray, value: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of value = coefficient * budget^exponent, least squares in log-log."""
    ok = np.isfinite(value)
    if ok.sum() < 2:
        return np.nan, np.nan
    slope, intercept = np.polyfit(np.log(budget[ok]), np.log(value[ok]), 1)
    return float(slope), float(np.exp(intercept))


def _ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _holdout(used: pd.DataFrame, heldout: pd.DataFrame | None = None) -> dict[str, Any] | None:
    """The largest budget predicted from the others: N_opt by the power law through their minima, the best loss by
    a power law of the best loss in C (log-log, the trend of the minima), each against the held-out parabola's.
    ``heldout``: the optima of budgets held out of the fit; the largest of them is predicted from every fitted one
    (a held-out budget without an interior minimum is named, with its reason)."""
    used = used.sort_values("budget")
    if heldout is not None and len(heldout):
        rest, last = used, heldout.sort_values("budget").iloc[-1]
        if last.note:
            return {"budget": float(last.budget), "held_out": True, "note": last.note}
    elif len(used) >= 3:
        rest, last = used.iloc[:-1], used.iloc[-1]
    else:
        return None
    if len(rest) < 2:
        return None
    a, k = power_law(rest["budget"].to_numpy(), rest["N_opt"].to_numpy())
    g, k_loss = power_law(rest["budget"].to_numpy(), rest["loss_opt"].to_numpy())
    n_pred, loss_pred = k * last.budget ** a, k_loss * last.budget ** g
    return {"budget": float(last.budget), "held_out": heldout is not None and len(heldout) > 0,
            "fitted_budgets": int(len(rest)), "a": a,
            "N_opt_predicted": float(n_pred), "N_opt": float(last.N_opt), "N_opt_ratio": float(n_pred / last.N_opt),
            "loss_opt_predicted": float(loss_pred), "loss_opt": float(last.loss_opt),
            "loss_opt_rel_err": float(loss_pred / last.loss_opt - 1)}


def analyse(points: pd.DataFrame, min_points: int, n_boot: int, seed: int,
            heldout: pd.DataFrame | None = None, window: float | None = None) -> dict[str, Any]:
    """``points`` (the fit rows) and ``heldout`` (rows held out of the fit, or None) have N, D, loss, budget.
    Returns the per-budget optima with intervals, the exponents a (N) and b (D) with intervals, tokens per parameter
    (D_opt / N_opt, N as the points count it) at the middle budget, and the held-out prediction of the largest
    budget (a held-out budget larger than every fitted one, else the largest fitted one)."""
    table = optima(points, min_points, window)
    used = table[table["note"] == ""]
    a, k_n = power_law(used["budget"].to_numpy(), used["N_opt"].to_numpy())
    b, k_d = power_law(used["budget"].to_numpy(), used["D_opt"].to_numpy())
    table["tokens_per_param"] = table["D_opt"] / table["N_opt"]
    result = {"a": a, "b": b, "N_coef": k_n, "D_coef": k_d, "budgets_used": int(len(used)),
              "budgets_dropped": {f"{r.budget:.4g}": r.note for r in table.itertuples() if r.note},
              "holdout": _holdout(used, _heldout_budgets(heldout, table, min_points, window)), "window": window}
    extra: dict[float, dict] = {}  # each used budget's intervals
    samples = None
    if n_boot > 0 and len(used):
        samples = residual_draws(points, used["budget"], window, n_boot, np.random.default_rng(seed))
        if samples is None:
            result["boot_note"] = "no interval: every budget's parabola goes through exactly 3 points (no residual)"
    if samples is not None:
        per_budget, exponents = [], []
        for sample in samples:
            t = optima(sample, min_points, edges=False).set_index("budget").reindex(used["budget"])
            per_budget.append(t[["N_opt", "D_opt", "loss_opt"]].to_numpy(dtype=float))
            exponents.append((*power_law(t.index.to_numpy(), t["N_opt"].to_numpy()),
                              *power_law(t.index.to_numpy(), t["D_opt"].to_numpy())))
        # (draw, budget, quantity); (draw, [a, N_coef, b, D_coef])
        per_budget, exponents = np.array(per_budget), np.array(exponents)
        for j, budget in enumerate(used["budget"]):
            n_opt, d_opt, loss = per_budget[:, j, 0], per_budget[:, j, 1], per_budget[:, j, 2]
            extra[budget] = {f"{key}_ci95": _ci(values) for key, values in (
                ("N_opt", n_opt), ("D_opt", d_opt), ("loss_opt", loss), ("tokens_per_param", d_opt / n_opt))}
            extra[budget]["boot_failed"] = int((~np.isfinite(n_opt) | ~np.isfinite(d_opt)).sum())
        ok = np.isfinite(exponents).all(axis=1)
        result.update(a_ci95=_ci(exponents[:, 0]), b_ci95=_ci(exponents[:, 2]), n_boot=n_boot, bootstrap="residual",
                      boot_failed=int((~ok).sum()),
                      # each resample's frontier (a, N_coef, b, D_coef): a planner's intervals anywhere along it
                      draws=exponents[ok].tolist())
    result["optima"] = [{**{k: _plain(v) for k, v in r.items()}, **extra.get(r["budget"], {})}
                        for r in table.to_dict("records")]
    if len(used):
        middle = used.sort_values("budget").iloc[(len(used) - 1) // 2].budget
        result["middle"] = next(r for r in result["optima"] if r["budget"] == middle)
    return result


def _heldout_budgets(heldout: pd.DataFrame | None, fitted: pd.DataFrame, min_points: int,
                     window: float | None) -> pd.DataFrame | None:
    """The optima of the held-out rows' budgets that lie above every fitted budget (others are not a test of
    extrapolation in compute)."""
    if heldout is None or heldout.empty or fitted.empty:
        return None
    beyond = heldout[heldout["budget"] > fitted["budget"].max()]
    return optima(beyond, min_points, window) if len(beyond) else None


def _plain(value):
    """A JSON value: NaN as None, numpy scalars as Python numbers."""
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def tokens_per_param(n_opt: float, d_opt: float, points: pd.DataFrame, conventions: dict[str, str]) -> dict:
    """D_opt / N_opt with N counted in each convention: ``conventions`` maps a convention's name to a column of
    ``points`` holding each row's N in it; N_opt is carried over by interpolating that column against the points'
    own N in log-log (the sweep's shapes relate the two counts)."""
    out = {}
    order = np.argsort(points["N"].to_numpy())
    x = np.log(points["N"].to_numpy()[order])
    for name, column in conventions.items():
        y = np.log(points[column].to_numpy(dtype=float)[order])
        if not np.isfinite(y).all() or not np.isfinite(n_opt):
            continue
        slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (1.0, float(np.mean(y - x)))
        inside = x[0] <= np.log(n_opt) <= x[-1]
        n_conv = np.exp(np.interp(np.log(n_opt), x, y) if inside else intercept + slope * np.log(n_opt))
        out[name] = {"N_opt": float(n_conv), "tokens_per_param": float(d_opt / n_conv)}
    return out
