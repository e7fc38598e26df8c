"""The fitting protocols.

``huber_grid``: Hoffmann et al. 2022 Approach 3 as replicated by Epoch AI: Huber loss (delta 1e-3) on log-loss
residuals, summed over points, positive parameters as logs (log-sum-exp), L-BFGS from every point of a grid of
initialisations. All starts run at once: one batched L-BFGS over a (starts x points) array with exact gradients
from the law's formula, then the best start is polished with scipy's L-BFGS-B.

``least_squares``: unweighted least squares on raw loss by Levenberg-Marquardt from all-ones initial values, as
scipy's ``curve_fit`` does (Bian et al. 2025).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy.optimize import least_squares, minimize

from scaling_lab.fit.laws.spec import CompiledLaw


@dataclass
class FitResult:
    theta: np.ndarray            # free parameters, fitted space
    objective: float
    n_starts: int                # starts run
    n_best: int                  # starts that reached the best objective (within rel_tol)
    n_grid: int                  # size of the full grid before any subsampling
    converged: bool
    message: str = ""


def huber_objective(model: CompiledLaw, log_inputs: Mapping[str, np.ndarray], y: np.ndarray, delta: float,
                    weights: np.ndarray | None = None):
    """``fg(theta (k, P), rows) -> (objective (k,), gradient (k, P))``; ``weights`` (K, n) are per-start point
    weights (bootstrap counts), ``rows`` picks the starts being evaluated."""
    log_y = np.log(y)[None, :]

    def fg(theta, rows=None):
        pred, jac = model.predict_jac(theta, log_inputs)
        with np.errstate(all="ignore"):
            r = np.log(pred) - log_y
            c = np.clip(r, -delta, delta)          # Huber: c * (r - c/2) is r^2/2 inside delta, linear outside
            loss, g = c * (r - 0.5 * c), c / pred
            if weights is not None:
                loss, g = weights[rows] * loss, weights[rows] * g
            f = loss.sum(1)
            grad = np.stack([np.einsum("kn,kn->k", g, j) for j in jac], axis=1)
        bad = ~np.isfinite(f) | ~np.isfinite(grad).all(1)
        f[bad] = np.inf
        grad[bad] = 0.0
        return f, grad

    return fg


def lbfgs_batch(fg, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, memory: int = 10, max_iter: int = 500,
                ftol: float = 1e-10):
    """Minimise K independent problems at once with L-BFGS: the two-loop recursion and a backtracking (Armijo)
    line search run row-wise on arrays, so each iteration costs one batched evaluation of ``fg``. Bounds are kept by
    projection. Rows leave the batch when their objective stops decreasing. Returns (x, f, iterations)."""
    x_out = np.clip(np.array(x0, dtype=float), lower, upper)
    k, p = x_out.shape
    f_out, g = fg(x_out, np.arange(k))
    iters = np.zeros(k, dtype=int)
    rows = np.flatnonzero(np.isfinite(f_out))              # the rows still running; state below is theirs only
    x, f, g = x_out[rows], f_out[rows], g[rows]
    s_hist, y_hist = np.zeros((len(rows), memory, p)), np.zeros((len(rows), memory, p))
    rho = np.zeros((len(rows), memory))
    scale = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-300)      # first step of unit length, as scipy
    for it in range(max_iter):
        if rows.size == 0:
            break
        q = g.copy()
        slots = [(it - 1 - j) % memory for j in range(min(it, memory))]
        alphas = []
        for s in slots:
            a = rho[:, s] * np.einsum("kp,kp->k", s_hist[:, s], q)
            q -= a[:, None] * y_hist[:, s]
            alphas.append(a)
        d = scale[:, None] * q
        for s, a in zip(reversed(slots), reversed(alphas)):
            b = rho[:, s] * np.einsum("kp,kp->k", y_hist[:, s], d)
            d += s_hist[:, s] * (a - b)[:, None]
        d = -d
        uphill = ~(np.einsum("kp,kp->k", g, d) < 0)
        d[uphill] = -g[uphill] * scale[uphill, None]

        step = np.ones(rows.size)
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        moved = np.zeros(rows.size, dtype=bool)
        pending = np.arange(rows.size)
        for trial in range(30):
            xt = np.clip(x[pending] + step[pending, None] * d[pending], lower, upper)
            ft, gt = fg(xt, rows[pending])
            ok = ft <= f[pending] + 1e-4 * np.minimum(np.einsum("kp,kp->k", g[pending], xt - x[pending]), 0.0)
            done = pending[ok]
            x_new[done], f_new[done], g_new[done], moved[done] = xt[ok], ft[ok], gt[ok], True
            pending = pending[~ok]
            if pending.size == 0:
                break
            step[pending] *= 0.5 if trial < 2 else 0.1

        s_vec, y_vec = x_new - x, g_new - g
        sy, yy = np.einsum("kp,kp->k", s_vec, y_vec), np.einsum("kp,kp->k", y_vec, y_vec)
        valid = sy > 1e-12 * np.sqrt(np.einsum("kp,kp->k", s_vec, s_vec) * yy)
        slot = it % memory
        s_hist[:, slot], y_hist[:, slot] = s_vec, y_vec
        rho[:, slot] = np.where(valid, 1.0 / np.where(valid, sy, 1.0), 0.0)
        scale = np.where(valid, sy / np.where(valid, yy, 1.0), scale)
        stop = ~moved | (f - f_new <= ftol * np.maximum(np.abs(f_new), 1e-300))
        x, f, g = x_new, f_new, g_new
        iters[rows] += 1
        x_out[rows], f_out[rows] = x, f
        if stop.any():
            keep = ~stop
            rows, x, f, g = rows[keep], x[keep], f[keep], g[keep]
            s_hist, y_hist, rho, scale = s_hist[keep], y_hist[keep], rho[keep], scale[keep]
    return x_out, f_out, iters


def polish(fg, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray):
    """Refine one start with scipy's L-BFGS-B and exact gradients, to tight tolerances."""
    def fun(x):
        f, g = fg(x[None, :], np.zeros(1, dtype=int))
        return f[0], g[0]

    bounds = [(None if np.isinf(a) else a, None if np.isinf(b) else b) for a, b in zip(lower, upper)]
    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
    return res.x, float(res.fun), bool(res.success), str(res.message)


def start_grid(model: CompiledLaw, grid: Mapping[str, list], grid_default: list, max_starts: int, seed: int):
    """The Cartesian product of each free parameter's initial values (the law's own grid entries override the
    protocol's). Returns (starts, full grid size); a grid larger than ``max_starts`` is subsampled (seeded)."""
    axes = []
    for p in model.free:
        values = model.spec.grid.get(p, grid.get(p, grid_default))
        axes.append(np.asarray(values, dtype=float))
    n_grid = int(np.prod([len(a) for a in axes]))
    if n_grid <= max_starts:
        return np.array(list(itertools.product(*axes))), n_grid
    rng = np.random.default_rng(seed)
    picks = rng.choice(n_grid, size=max_starts, replace=False)
    return np.stack([a[i] for a, i in zip(axes, np.unravel_index(picks, [len(a) for a in axes]))], 1), n_grid


def fit_huber_grid(model: CompiledLaw, log_inputs, y, protocol) -> FitResult:
    fg = huber_objective(model, log_inputs, y, float(protocol.delta))
    lower, upper = model.theta_bounds()
    starts, n_grid = start_grid(model, protocol.grid, list(protocol.grid_default), int(protocol.max_starts),
                                int(protocol.seed))
    x, f, _ = lbfgs_batch(fg, starts, lower, upper, max_iter=int(protocol.max_iter))
    if not np.isfinite(f).any():
        raise RuntimeError(f"law {model.spec.name!r}: no start gave a finite objective")
    best = int(np.argmin(f))
    theta, obj, _, msg = polish(fg, x[best], lower, upper)
    if obj > f[best]:
        theta, obj = x[best], float(f[best])
    ok = bool(np.isfinite(obj))      # polish ends on a line-search stall at the optimum: not a failure
    n_best = int(np.sum(f <= obj + float(protocol.rel_tol) * abs(obj)))
    return FitResult(theta=theta, objective=obj, n_starts=len(starts), n_best=n_best, n_grid=n_grid,
                     converged=ok, message=msg)


def least_squares_fg(model: CompiledLaw, log_inputs, y):
    """Residuals (pred - y) and Jacobian (n, P) for one free vector: raw loss, unweighted."""
    def residual(theta):
        pred, _ = model.predict_jac(theta, log_inputs)
        return pred[0] - y

    def jacobian(theta):
        _, jac = model.predict_jac(theta, log_inputs)
        return np.stack([j[0] for j in jac], axis=1)

    return residual, jacobian


def fit_least_squares(model: CompiledLaw, log_inputs, y, protocol, theta0=None) -> FitResult:
    residual, jacobian = least_squares_fg(model, log_inputs, y)
    if theta0 is None:
        theta0 = model.theta({p: float(protocol.init) for p in model.spec.law.params})
    with np.errstate(all="ignore"):
        res = least_squares(residual, theta0, jac=jacobian, method="lm", max_nfev=int(protocol.max_nfev))
    obj = float(np.sum(res.fun ** 2))
    return FitResult(theta=res.x, objective=obj, n_starts=1, n_best=1, n_grid=1, converged=bool(res.success),
                     message=str(res.message))


def fit(model: CompiledLaw, log_inputs, y, protocol) -> FitResult:
    """Point estimate by the configured protocol."""
    if protocol.method == "huber_grid":
        return fit_huber_grid(model, log_inputs, y, protocol)
    if protocol.method == "least_squares":
        return fit_least_squares(model, log_inputs, y, protocol)
    raise ValueError(f"unknown protocol method {protocol.method!r} (huber_grid or least_squares)")


def refit(model: CompiledLaw, log_inputs, y, protocol, theta0: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Refit once per row of ``weights`` (point multiplicities, e.g. bootstrap counts), warm-started at
    ``theta0``. Returns the free parameters (B, P)."""
    if protocol.method == "huber_grid":
        fg = huber_objective(model, log_inputs, y, float(protocol.delta), weights=weights)
        lower, upper = model.theta_bounds()
        x, f, _ = lbfgs_batch(fg, np.tile(theta0, (len(weights), 1)), lower, upper, max_iter=int(protocol.max_iter))
        x[~np.isfinite(f)] = np.nan
        return x
    out = np.full((len(weights), model.n_free), np.nan)
    for b, w in enumerate(weights):
        keep = w > 0
        sub = {k: np.repeat(v[keep], w[keep].astype(int)) for k, v in log_inputs.items()}
        res = fit_least_squares(model, sub, np.repeat(y[keep], w[keep].astype(int)), protocol, theta0=theta0)
        if res.converged:
            out[b] = res.theta
    return out
