"""Uncertainty by bootstrap over runs: refit on resampled fit rows, percentile intervals, identifiability flags."""

from __future__ import annotations

import numpy as np

from scaling_lab.fit.laws.spec import CompiledLaw
from scaling_lab.fit.fitting.optimize import refit


def resample_counts(n_rows: int, n: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(n, n_rows) multiplicities: each row of the result is one bootstrap resample of the rows, or, with
    ``groups`` (a label per row), of whole groups: a group drawn k times counts each of its rows k times."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n).astype(float)
    labels, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    drawn = rng.multinomial(len(labels), np.full(len(labels), 1.0 / len(labels)), size=n).astype(float)
    return drawn[:, index]


def bootstrap(model: CompiledLaw, log_inputs, y, protocol, starts: np.ndarray, n: int, seed: int,
              groups: np.ndarray | None = None, n_refine: int = 1) -> np.ndarray:
    """Free parameters refitted on ``n`` resamples (NaN rows: failed). ``starts`` (S, P): the point estimate
    first, then the grid starts the point fit's screen kept; each resample refines its ``n_refine`` best."""
    if n <= 0:
        return np.empty((0, model.n_free))
    return refit(model, log_inputs, y, protocol, starts, resample_counts(len(y), n, seed, groups), n_refine)


def percentile_ci(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        return np.nanpercentile(samples, 2.5, axis=axis), np.nanpercentile(samples, 97.5, axis=axis)


def not_identified(model: CompiledLaw, theta_hat: np.ndarray, ci95: dict[str, tuple[float, float]],
                   log_inputs) -> dict:
    """Parameters the data do not pin down: at a configured bound, without effect on the predictions (a 10% or
    0.1 change moves no fitted loss by 1e-6 relative), or a 95% interval wider than the estimate."""
    lower, upper = model.theta_bounds()
    values = model.values(theta_hat)
    pred, jac = model.predict_jac(theta_hat[None, :], log_inputs)
    flags = {}
    for j, p in enumerate(model.free):
        tol = 1e-6 * (1 + abs(theta_hat[j]))
        step = 0.1 if model.is_log[j] else 0.1 * max(abs(theta_hat[j]), 1e-3)
        if theta_hat[j] - lower[j] <= tol or upper[j] - theta_hat[j] <= tol:
            flags[p] = "at a bound"
        elif np.max(np.abs(jac[j][0] * step / pred[0])) < 1e-6:
            flags[p] = "no effect on the predictions"
    for p in model.spec.law.params:
        if model.rep[p] in flags:
            flags[p] = flags[model.rep[p]]
        elif p in ci95 and np.all(np.isfinite(ci95[p])) and ci95[p][1] - ci95[p][0] > abs(float(values[p])):
            flags[p] = "95% interval wider than the estimate"
        elif p in ci95 and not np.all(np.isfinite(ci95[p])):
            flags[p] = "no bootstrap interval"
    return flags
