"""The fitting protocols.

``huber_grid``: Hoffmann et al. 2022 Approach 3 as replicated by Epoch AI: Huber loss (delta 1e-3) on log-loss
residuals, summed over points, positive parameters as logs (log-sum-exp), L-BFGS from a grid of initialisations.
Every start of the grid is screened in one batch (its objective after ``screen_iter`` batched L-BFGS iterations,
(starts x points) arrays with exact gradients from the law's formula); the ``refine`` best run to convergence in
one batched L-BFGS (``refine: null`` runs every start), then the best is polished with scipy's L-BFGS-B.

``vpnls``: variable projection. Where the law is linear in some parameters at fixed values of the others
(``E + A/N^alpha + B/D^beta`` in E, A, B), those are solved exactly by bounded (non-negative) linear least squares
and only the others are searched: a grid of them screened, the best refined by L-BFGS-B on the projected
objective. The objective is least squares on raw loss, as ``least_squares``.

``least_squares``: unweighted least squares on raw loss by Levenberg-Marquardt from all-ones initial values, as
scipy's ``curve_fit`` does (Bian et al. 2025).

Memory: a batch's objective is evaluated over (starts x points) arrays, in chunks of starts (``chunked``) small
enough that those arrays stay within ``MEMORY_BUDGET`` however many rows the table has (every start at once on
small tables).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from scipy.optimize import least_squares, minimize

from scaling_lab.fit.laws.spec import CompiledLaw


MEMORY_BUDGET = 256 * 2 ** 20     # bytes of (starts x points) float arrays alive at once in one evaluation


def chunked(fn, n_points: int, n_arrays: int, budget: float = MEMORY_BUDGET):
    """``fn(theta (k, P), rows)`` evaluated on consecutive slices of the starts, its outputs (arrays, or a tuple of
    arrays, one row per start) concatenated. A slice holds as many starts as keep ``n_arrays`` (starts x
    ``n_points``) float64 arrays within ``budget`` bytes: every start at once on small tables, as unchunked.
    ``rows`` (default: 0..k-1) travels with each start (which weights row it uses)."""
    size = max(1, int(budget // (8 * n_points * n_arrays)))

    def evaluate(theta, rows=None):
        theta = np.atleast_2d(theta)
        rows = np.arange(len(theta)) if rows is None else np.asarray(rows)
        if len(theta) <= size:
            return fn(theta, rows)
        parts = [fn(theta[i:i + size], rows[i:i + size]) for i in range(0, len(theta), size)]
        if isinstance(parts[0], tuple):
            return tuple(np.concatenate(outputs) for outputs in zip(*parts))
        return np.concatenate(parts)

    return evaluate


def arrays_alive(model: CompiledLaw) -> int:
    """(starts x points) arrays alive at once while an objective is evaluated, roughly: the prediction and one
    derivative per free parameter, plus the formula's shared subexpressions and the objective's temporaries."""
    return model.n_free + 8


@dataclass
class FitResult:
    theta: np.ndarray            # free parameters, fitted space
    objective: float
    n_starts: int                # starts run
    n_best: int                  # starts that reached the best objective (within rel_tol)
    n_grid: int                  # size of the full grid before any subsampling
    converged: bool                # the polish converged and more than one start reached the best objective
    message: str = ""
    n_refined: int = 0             # starts run to convergence after the screen
    seconds: float = 0.0           # wall time of the point fit
    screened: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))  # grid starts kept by the screen
    warning: str = ""              # why ``converged`` is false, for the printed report


def huber_objective(model: CompiledLaw, log_inputs: Mapping[str, np.ndarray], y: np.ndarray, delta: float,
                    weights: np.ndarray | None = None, budget: float = MEMORY_BUDGET):
    """``fg(theta (k, P), rows) -> (objective (k,), gradient (k, P))``, evaluated in chunks of starts within
    ``budget`` bytes; ``weights`` (W, n) are point weights (bootstrap counts), ``rows`` (k,) the row of ``weights``
    each start uses."""
    log_y = np.log(y)[None, :]

    def fg(theta, rows):
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

    return chunked(fg, len(y), arrays_alive(model), budget)


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
    """Refine one start with scipy's L-BFGS-B and exact gradients, to tight tolerances. Returns (x, objective,
    converged, message): converged when scipy reports success, or when it stops on a line-search stall with the
    projected gradient within scipy's default tolerance (1e-5; at the optimum of a sum of Huber terms a stall at
    round-off is the usual ending)."""
    def fun(x):
        f, g = fg(x[None, :], np.zeros(1, dtype=int))
        return f[0], g[0]

    bounds = [(None if np.isinf(a) else a, None if np.isinf(b) else b) for a, b in zip(lower, upper)]
    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
    f, g = fun(res.x)
    at_bound = (res.x <= lower + 1e-12) & (g > 0) | (res.x >= upper - 1e-12) & (g < 0)
    projected = np.where(at_bound, 0.0, g)
    ok = bool(np.isfinite(f)) and (bool(res.success) or np.max(np.abs(projected), initial=0.0) <= 1e-5)
    return res.x, float(res.fun), ok, str(res.message)


def grid_axes(model: CompiledLaw, params, grid: Mapping[str, list], grid_default: list) -> list[np.ndarray]:
    """Initial values of each named free parameter: the law's own grid entries override the protocol's."""
    return [np.asarray(model.spec.grid.get(p, grid.get(p, grid_default)), dtype=float) for p in params]


def start_grid(model: CompiledLaw, grid: Mapping[str, list], grid_default: list, max_starts: int, seed: int,
               params=None):
    """The Cartesian product of each free parameter's initial values (the law's own grid entries override the
    protocol's). Returns (starts, full grid size); a grid larger than ``max_starts`` is subsampled (seeded)."""
    axes = grid_axes(model, model.free if params is None else params, grid, grid_default)
    n_grid = int(np.prod([len(a) for a in axes]))
    if n_grid <= max_starts:
        return np.array(list(itertools.product(*axes))), n_grid
    rng = np.random.default_rng(seed)
    picks = rng.choice(n_grid, size=max_starts, replace=False)
    return np.stack([a[i] for a, i in zip(axes, np.unravel_index(picks, [len(a) for a in axes]))], 1), n_grid


def screen(fg, starts: np.ndarray, lower: np.ndarray, upper: np.ndarray, iters: int):
    """Every start after ``iters`` batched L-BFGS iterations (0: as given), and its objective."""
    if iters > 0:
        x, f, _ = lbfgs_batch(fg, starts, lower, upper, max_iter=iters)
        return x, f
    x = np.clip(starts, lower, upper)
    return x, fg(x, np.arange(len(x)))[0]


def reached(f: np.ndarray, best: float, protocol, n_points: int) -> int:
    """Starts whose objective is within ``rel_tol`` of the best (or within 1e-14 per point of it: a perfect fit,
    where a relative distance means nothing)."""
    return int(np.sum(f <= best + float(protocol.rel_tol) * abs(best) + 1e-14 * n_points))


def _verdict(result: FitResult, polish_ok: bool, what: str) -> FitResult:
    """``converged`` = the polish converged and more than one start reached the best objective."""
    if not polish_ok:
        result.warning = f"the final polish did not converge ({result.message})"
    elif result.n_best <= 1 and result.n_starts > 1:
        result.warning = (f"only one of {result.n_refined or result.n_starts} {what} reached the best objective: "
                          "the optimum may not be global (more starts: protocol.refine=null)")
    result.converged = polish_ok and (result.n_best > 1 or result.n_starts == 1)
    return result


def fit_huber_grid(model: CompiledLaw, log_inputs, y, protocol) -> FitResult:
    t0 = time.perf_counter()
    fg = huber_objective(model, log_inputs, y, float(protocol.delta))
    lower, upper = model.theta_bounds()
    starts, n_grid = start_grid(model, protocol.grid, list(protocol.grid_default), int(protocol.max_starts),
                                int(protocol.seed))
    refine = protocol.get("refine")
    if refine is None or int(refine) >= len(starts):
        kept = np.clip(starts, lower, upper)
    else:
        xs, fs = screen(fg, starts, lower, upper, int(protocol.get("screen_iter") or 0))
        kept = xs[np.argsort(fs, kind="stable")[:int(refine)]]
    theta, obj, ok, msg, n_best = refine_starts(model, fg, kept, lower, upper, protocol, len(y))
    result = FitResult(theta=theta, objective=obj, n_starts=len(starts), n_best=n_best, n_grid=n_grid,
                       converged=ok, message=msg, n_refined=len(kept), screened=kept)
    result.seconds = time.perf_counter() - t0
    return _verdict(result, ok, "refined starts")


def refine_starts(model: CompiledLaw, fg, kept: np.ndarray, lower, upper, protocol, n_points: int):
    """Every kept start to convergence (batched L-BFGS-B), the best polished (kept only if it improved): the
    best point, its objective, whether the polish converged and its message, and how many starts reached it."""
    x, f, _ = lbfgs_batch(fg, kept, lower, upper, max_iter=int(protocol.max_iter))
    if not np.isfinite(f).any():
        raise RuntimeError(f"law {model.spec.name!r}: no start gave a finite objective")
    best = int(np.argsort(f, kind="stable")[0])
    theta, obj, ok, msg = polish(fg, x[best], lower, upper)
    if obj > f[best]:
        theta, obj = x[best], float(f[best])
    return theta, obj, ok, msg, reached(f, obj, protocol, n_points)


def bounded_lstsq(cols: np.ndarray, rhs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """min ||cols @ a - rhs||^2 subject to lower <= a <= upper, for K problems at once: cols (K, n, m), rhs (K, n).
    Exact by enumerating active sets (each coefficient free, at its lower or at its upper bound): the problem is
    convex, so the best feasible candidate is the optimum. Columns are scaled to unit norm first."""
    k, _, m = cols.shape
    scale = np.linalg.norm(cols, axis=1)                                    # (K, m)
    scale[scale == 0] = 1.0
    c = cols / scale[:, None, :]
    lo, hi = lower[None, :] * scale, upper[None, :] * scale
    gram, crhs = np.einsum("knm,knl->kml", c, c), np.einsum("knm,kn->km", c, rhs)
    best_a, best_f = np.full((k, m), np.nan), np.full(k, np.inf)
    choices = [[0] + ([1] if np.isfinite(lower[j]) else []) + ([2] if np.isfinite(upper[j]) else []) for j in range(m)]
    for combo in itertools.product(*choices):
        combo = np.array(combo)
        a = np.where(combo == 1, lo, np.where(combo == 2, hi, 0.0))
        free = np.flatnonzero(combo == 0)
        if free.size:
            fixed = np.flatnonzero(combo != 0)
            r = crhs[:, free] - np.einsum("kfm,km->kf", gram[:, free][:, :, fixed], a[:, fixed])
            g = gram[:, free][:, :, free]
            with np.errstate(all="ignore"):
                try:
                    a[:, free] = np.linalg.solve(g, r[..., None])[..., 0]
                except np.linalg.LinAlgError:          # a singular row (collinear columns): least norm instead
                    a[:, free] = np.einsum("kfg,kg->kf", np.linalg.pinv(g), r)
        ok = np.all((a >= lo - 1e-12 * np.abs(lo)) & (a <= hi + 1e-12 * np.abs(hi)), axis=1) & np.isfinite(a).all(1)
        resid = np.einsum("knm,km->kn", c, a) - rhs
        f = np.where(ok, np.einsum("kn,kn->k", resid, resid), np.inf)
        better = f < best_f
        best_a[better], best_f[better] = a[better], f[better]
    return best_a / scale


class Projection:
    """Variable projection of a least-squares objective (raw loss, optional per-point weights): ``fg(theta_nl
    (K, q), rows)`` solves the linear parameters at each row's other parameters and returns the projected objective
    and its gradient (by the envelope theorem, the full objective's gradient in the searched parameters). ``rows``
    (k,) is the row of ``weights`` (W, n) each start uses; both are evaluated in chunks of starts within ``budget``
    bytes."""

    def __init__(self, model: CompiledLaw, log_inputs, y, weights: np.ndarray | None = None,
                 budget: float = MEMORY_BUDGET):
        self.model, self.log_inputs, self.y, self.weights = model, log_inputs, y, weights
        self.lin = np.array([model.free.index(p) for p in model.natural], dtype=int)
        self.nl = np.array([j for j in range(model.n_free) if j not in set(self.lin)], dtype=int)
        lower, upper = model.theta_bounds()
        self.lin_lower = np.where(np.isinf(lower[self.lin]) & np.isin(np.array(model.free)[self.lin],
                                                                         model.spec.positive), 0.0, lower[self.lin])
        self.lin_upper = upper[self.lin]
        self.nl_lower, self.nl_upper = lower[self.nl], upper[self.nl]
        alive = arrays_alive(model) + 2 * len(self.lin)      # and the linear solve's columns, scaled copies too
        self.full = chunked(self._full, len(y), alive, budget)
        self.fg = chunked(self._fg, len(y), alive, budget)

    def _full(self, theta_nl: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Every free parameter: the searched ones as given, the linear ones solved."""
        full = np.zeros((len(theta_nl), self.model.n_free))
        full[:, self.nl] = theta_nl
        offset, jac = self.model.predict_jac(full, self.log_inputs)     # linear parameters at 0: the offset
        cols = np.stack([jac[j] for j in self.lin], axis=2)
        rhs = self.y[None, :] - offset
        if self.weights is not None:
            sw = np.sqrt(self.weights[rows])
            cols, rhs = cols * sw[:, :, None], rhs * sw
        full[:, self.lin] = bounded_lstsq(cols, rhs, self.lin_lower, self.lin_upper)
        return full

    def _fg(self, theta_nl, rows):
        full = self._full(theta_nl, rows)
        pred, jac = self.model.predict_jac(full, self.log_inputs)
        with np.errstate(all="ignore"):
            r = pred - self.y[None, :]
            w = 1.0 if self.weights is None else self.weights[rows]
            f = np.sum(w * r * r, axis=1)
            grad = np.stack([2.0 * np.einsum("kn,kn->k", w * r, jac[j]) for j in self.nl], axis=1)
        bad = ~np.isfinite(f) | ~np.isfinite(grad).all(1)
        f[bad], grad[bad] = np.inf, 0.0
        return f, grad


def fit_vpnls(model: CompiledLaw, log_inputs, y, protocol) -> FitResult:
    t0 = time.perf_counter()
    if not model.natural:
        result = fit_least_squares(model, log_inputs, y, protocol)
        result.message = (f"law {model.spec.name!r} is not linear in any of its free parameters at fixed values of "
                          f"the others: vpnls fell back to least_squares (Levenberg-Marquardt). {result.message}")
        result.seconds = time.perf_counter() - t0
        return result
    vp = Projection(model, log_inputs, y)
    searched = [model.free[j] for j in vp.nl]
    starts, n_grid = start_grid(model, protocol.grid, list(protocol.grid_default), int(protocol.max_starts),
                                int(protocol.seed), params=searched)
    xs, fs = screen(vp.fg, starts, vp.nl_lower, vp.nl_upper, int(protocol.get("screen_iter") or 0))
    kept = xs[np.argsort(fs, kind="stable")[:int(protocol.get("refine") or len(starts))]]
    theta_nl, obj, ok, msg, n_best = refine_starts(model, vp.fg, kept, vp.nl_lower, vp.nl_upper, protocol, len(y))
    result = FitResult(theta=vp.full(theta_nl)[0], objective=obj, n_starts=len(starts), n_best=n_best, n_grid=n_grid,
                       converged=ok, message=f"linear in {', '.join(model.natural)} (solved by bounded least "
                       f"squares); searched {', '.join(searched)}. {msg}", n_refined=len(kept),
                       screened=vp.full(kept))
    result.seconds = time.perf_counter() - t0
    return _verdict(result, ok, "refined starts")


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


METHODS = ("huber_grid", "least_squares", "vpnls")


def fit(model: CompiledLaw, log_inputs, y, protocol) -> FitResult:
    """Point estimate by the configured protocol."""
    if protocol.method == "huber_grid":
        return fit_huber_grid(model, log_inputs, y, protocol)
    if protocol.method == "vpnls":
        return fit_vpnls(model, log_inputs, y, protocol)
    if protocol.method == "least_squares":
        t0 = time.perf_counter()
        result = fit_least_squares(model, log_inputs, y, protocol)
        result.seconds = time.perf_counter() - t0
        return _verdict(result, result.converged, "starts")
    raise ValueError(f"unknown protocol method {protocol.method!r} ({', '.join(METHODS)})")


def refit(model: CompiledLaw, log_inputs, y, protocol, starts: np.ndarray, weights: np.ndarray,
          n_refine: int = 1) -> np.ndarray:
    """Refit once per row of ``weights`` (point multiplicities, e.g. bootstrap counts), from a screen of
    ``starts`` (S, P), e.g. the point estimate and the grid's other refined optima, in the fitted space: each
    resample's objective is evaluated at every start and its ``n_refine`` best are run to convergence (all
    resamples in one batch); the best result per resample is kept. Returns the free parameters (B, P), NaN rows
    where no start converged to a finite objective."""
    starts = np.atleast_2d(starts)
    b, s = len(weights), len(starts)
    if protocol.method == "least_squares" or (protocol.method == "vpnls" and not model.natural):
        out = np.full((b, model.n_free), np.nan)
        for i, w in enumerate(weights):
            keep = w > 0
            sub = {k: np.repeat(v[keep], w[keep].astype(int)) for k, v in log_inputs.items()}
            res = fit_least_squares(model, sub, np.repeat(y[keep], w[keep].astype(int)), protocol, theta0=starts[0])
            if res.converged:
                out[i] = res.theta
        return out
    n_refine = max(1, min(int(n_refine), s))
    # ``rows`` of these objectives name each start's resample (its row of ``weights``): no copy of the weights per start
    if protocol.method == "vpnls" and model.natural:
        vp = Projection(model, log_inputs, y, weights=weights)
        starts, lower, upper = starts[:, vp.nl], vp.nl_lower, vp.nl_upper
        objective = vp.fg
    elif protocol.method == "huber_grid":
        lower, upper = model.theta_bounds()
        objective = huber_objective(model, log_inputs, y, float(protocol.delta), weights=weights)
    else:
        raise ValueError(f"unknown protocol method {protocol.method!r} ({', '.join(METHODS)})")
    if s > n_refine:
        # the screen: every (resample, start) pair's objective
        f_screen = objective(np.tile(starts, (b, 1)), np.repeat(np.arange(b), s))[0].reshape(b, s)
        pick = np.argsort(f_screen, axis=1, kind="stable")[:, :n_refine]
    else:
        pick = np.tile(np.arange(s), (b, 1))
    x0 = starts[pick.ravel()]
    resample = np.repeat(np.arange(b), pick.shape[1])          # of each row of x0
    x, f, _ = lbfgs_batch(lambda theta, rows: objective(theta, resample[rows]), x0, lower, upper,
                          max_iter=int(protocol.max_iter))
    f = f.reshape(b, -1)
    best = np.argmin(np.where(np.isfinite(f), f, np.inf), axis=1)
    out = x.reshape(b, pick.shape[1], -1)[np.arange(b), best]
    out[~np.isfinite(f[np.arange(b), best])] = np.nan
    if protocol.method == "vpnls":
        out = np.where(np.isnan(out[:, :1]), np.nan, vp.full(out))
    return out
