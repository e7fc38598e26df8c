"""Approach 3 beside Approach 2: the compute-optimal frontier read from the fitted law and from the isoFLOP minima,
and whether the two agree.

Approach 2 (``fit.fitting.isoflop``) needs no irreducible loss E; Approach 3 (the law ``E + A/N^alpha + B/D^beta``)
does, and over the narrow range of a small sweep E is rarely identified. So the law is refitted with E held at a
grid of values in (0, the lowest observed loss) (its profile): the frontier's exponent a = beta / (alpha + beta)
and the tokens per parameter at the middle budget are read along it, and the E values the data cannot tell apart
(profile likelihood of Gaussian log residuals: n log(SSE(E) / SSE_min) <= 3.84) give their range.

Both approaches are read at the sweep's own budgets in its own FLOPs convention: a budget's optimum under the law
is the minimum of L(N, C / f(N)) over N, where f(N) is the FLOPs per token of the sweep's shapes (from its isoFLOP
points, D = C / f(N)), not 6N.

The agreement check (``../shared/notes/frontier.md``): |a2 - a3| < 0.1, the tokens per parameter at the middle
budget within 0.7-1.4x, and the intervals of a overlapping. The frontier the planner should use is Approach 3's
when it agrees and E is identified, else Approach 2's, with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from scaling_lab.fit.fitting.fitlaw import LawFit, compile_law, fit_law
from scaling_lab.fit.fitting.sources import Table
from scaling_lab.fit.laws.chinchilla import frontier_terms

A_TOLERANCE = 0.1            # |a2 - a3| at most this
RATIO_RANGE = (0.7, 1.4)     # Approach 3's tokens per parameter over Approach 2's
PROFILE_CHI2 = 3.84          # 95% profile-likelihood threshold, one parameter


def flops_per_token(points: pd.DataFrame):
    """f(N): the FLOPs per token of the sweep's shapes as a function of N (log-log line through the isoFLOP points,
    each of which trained D = budget / f(N) tokens)."""
    x, y = np.log(points["N"].to_numpy()), np.log(points["budget"].to_numpy() / points["D"].to_numpy())
    slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (1.0, float(np.mean(y - x)))
    return lambda n: np.exp(intercept + slope * np.log(n))


def law_optimum(predict, budget: float, f, n_range: tuple[float, float]) -> tuple[float, float, float]:
    """(N_opt, D_opt, loss) minimising the law's L(N, budget / f(N)) over N, searched a decade beyond ``n_range``
    on each side (a log grid, then a local refinement)."""
    grid = np.geomspace(n_range[0] / 10, n_range[1] * 10, 2001)
    loss = predict(grid, budget / f(grid))
    i = int(np.nanargmin(loss))
    fine = np.geomspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 201)
    fine_loss = predict(fine, budget / f(fine))
    j = int(np.nanargmin(fine_loss))
    return float(fine[j]), float(budget / f(fine[j])), float(fine_loss[j])


def _frontier_of(values: dict, predict, iso: dict, f, n_range) -> dict:
    """a3 (the law's asymptotic exponent) and the law's optimum at the middle isoFLOP budget."""
    _, a, _ = frontier_terms(values)
    budget = iso["middle"]["budget"]
    n_opt, d_opt, loss = law_optimum(predict, budget, f, n_range)
    return {"a": float(a), "budget": budget, "N_opt": n_opt, "D_opt": d_opt, "loss_opt": loss,
            "tokens_per_param": d_opt / n_opt}


def sse_log(constants, rows: pd.DataFrame) -> float:
    """Sum of squared log residuals of ``constants`` on ``rows``."""
    pred = np.asarray(constants.predict(N=rows["N"].to_numpy(), D=rows["D"].to_numpy()), float)
    return float(np.sum((np.log(rows["loss"].to_numpy()) - np.log(pred)) ** 2))


def e_profile(law: LawFit, table: Table, protocol, iso: dict, f, n_points: int) -> list[dict]:
    """The law refitted with E held at ``n_points`` values spread over (0, the lowest observed loss); ``inside``:
    within the 95% profile threshold of the best of these fits and the law's own."""
    rows = table.fit_rows
    y, n_range = rows["loss"].to_numpy(), (rows["N"].min(), rows["N"].max())
    out = []
    for e in np.linspace(0.02, 0.98, n_points) * y.min():
        bounds = {**law.spec.bounds, "E": (float(e), float(e))}
        spec = dataclasses.replace(law.spec, bounds=bounds)
        try:
            fitted = fit_law(compile_law(spec, protocol), table, protocol, boot=0)
        except RuntimeError as err:       # no start converged at this E: the profile has a gap, and says so
            out.append({"E": float(e), "failed": str(err)})
            continue
        sse = sse_log(fitted.constants, rows)
        point = _frontier_of(fitted.constants.values, lambda n, d: fitted.constants.predict(N=n, D=d), iso, f,
                             n_range)
        out.append({"E": float(e), "sse_log": sse, **{k: v for k, v in fitted.constants.values.items() if k != "E"},
                    **point})
    ok = [p for p in out if "sse_log" in p]
    if ok:
        best = min(min(p["sse_log"] for p in ok), sse_log(law.constants, rows))
        for p in ok:
            p["inside"] = bool(len(y) * np.log(p["sse_log"] / best) <= PROFILE_CHI2) if best > 0 else True
    return out


def compare(iso: dict, law: LawFit, table: Table, protocol, points: pd.DataFrame, profile_points: int) -> dict:
    """Approach 2 beside Approach 3 (the fitted law, its E profile), the agreement check, and which frontier a
    planner should use and why."""
    rows = table.fit_rows
    n_range = (rows["N"].min(), rows["N"].max())
    f = flops_per_token(points)
    values = law.constants.values
    a3 = _frontier_of(values, lambda n, d: law.constants.predict(N=n, D=d), iso, f, n_range)
    a3["a_ci95"] = (law.compute_optimal or {}).get("a_ci95")
    low = float(rows["loss"].min())
    e_lo, e_hi = law.spec.bounds.get("E", (0.0, np.inf))
    e_flags = []
    if values["E"] >= low:
        e_flags.append(f"E = {values['E']:.4g} is not below the lowest observed loss {low:.4g}")
    if np.isclose(values["E"], e_lo, rtol=1e-3) or np.isclose(values["E"], e_hi, rtol=1e-3):
        e_flags.append(f"E = {values['E']:.4g} sits at its bound")
    if "E" in law.not_identified:
        e_flags.append("E is not identified (" + law.not_identified["E"] + ")")
    profile = e_profile(law, table, protocol, iso, f, profile_points) if profile_points else []
    # the profile's range: the grid's points within the threshold, and the law's own optimum
    inside = [p for p in profile if p.get("inside")] + [{"E": values["E"], **a3}] * bool(profile)
    span = lambda key: [min(p[key] for p in inside), max(p[key] for p in inside)] if inside else None
    step = (profile[1]["E"] - profile[0]["E"]) / 2 if len(profile) > 1 else 0.0
    e_span = span("E") and [max(span("E")[0] - step, 0.0), span("E")[1] + step]  # the grid's resolution
    a2, mid = iso["a"], iso["middle"]
    checks = {
        "a_diff": abs(a2 - a3["a"]),
        "a_agree": bool(abs(a2 - a3["a"]) < A_TOLERANCE),
        "ratio": a3["tokens_per_param"] / mid["tokens_per_param"],
        "ratio_agree": bool(RATIO_RANGE[0] <= a3["tokens_per_param"] / mid["tokens_per_param"] <= RATIO_RANGE[1]),
    }
    if iso.get("a_ci95") and a3["a_ci95"]:
        checks["intervals_overlap"] = bool(iso["a_ci95"][0] <= a3["a_ci95"][1] and a3["a_ci95"][0] <= iso["a_ci95"][1])
    disagree = [k for k in ("a_agree", "ratio_agree", "intervals_overlap") if checks.get(k) is False]
    use = "approach3" if not disagree and not e_flags else "approach2"
    why = ("Approach 3 agrees with Approach 2 and its E is identified" if use == "approach3" else
           "; ".join(e_flags + [f"the approaches disagree ({', '.join(disagree)})"] * bool(disagree)))
    return {"approach2": {"a": a2, "a_ci95": iso.get("a_ci95"), "b": iso["b"], "middle": mid,
                          "holdout": iso.get("holdout")},
            "approach3": {**a3, "E": values["E"], "E_flags": e_flags, "E_bounds": [0.0, low],
                          "profile": profile, "profile_E": e_span, "profile_a": span("a"),
                          "profile_tokens_per_param": span("tokens_per_param")},
            "agreement": checks, "use": use, "why": why}
