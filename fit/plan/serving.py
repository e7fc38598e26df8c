"""The plan's one cost-optimal search: size, tokens, shape and serving mode chosen together, from our measurements.

A served model of a target loss costs its training and its serving over the lifetime demand, priced by
``planner.lifetime`` with decode at the latency law's time for the model's shape (``Problem.cost``).
``Problem.optimum`` finds the cheapest (N, D[, R]) serving with one mode; ``shape_plan``
(``shape.enabled=true``) is that search for the full-precision mode (``FULL_PRECISION``) beside the Chinchilla-style
model, and ``serving_plan`` (``serving.mode``) the same search for every mode asked for, the cheapest chosen.

A serving mode changes two things (both measured on our own models, never assumed):

* the loss the served model gives up, ``penalty(N, D)``: the penalty law ``k D^a / N^b`` that ``scaling-quantize``
  fitted per quantization mode (``<serving>/quantization.json``, ``penalty``); a mode whose law could not be fitted,
  or was fitted without identifying its constants, uses its mean measured delta over the runs it quantized entirely
  (at least 0), and says so: extrapolating an unidentified power law far outside the sweep means nothing. An
  explicit ``serving.loss_penalty`` replaces the measurement of the one mode asked for. Speculative decoding is
  exact: no penalty.
* the decode time of a token: the latency law of the fit.json, fitted over the serving modes (``scaling-latency
  measure.modes=[none,int8,int4]``), at the shape's (n_layers, d_model), every block matrix priced as quantized (a
  planned model is given a width its mode packs whole, e.g. a multiple of INT4's group size); speculative decoding
  divides the target's time by the best measured wall-clock speedup (``<serving>/speculative.json``) and multiplies
  its FLOPs by the measured ``(k + 1 + k c) / tokens per target step``.

The quantized modes are the serving modes' table (``conf/serving_mode/``, ``conf/serving_modes.py``): a mode added
there as one file, measured by ``scaling-quantize`` and ``scaling-latency``, is priced here with no code change.

The search: for every D (and R), N solves ``L(N, D[, R]) + penalty(N, D) = target`` (the smallest such N: a log
grid, then a bracketed root); the lifetime cost is minimised over log D (a grid over ``TOKEN_RANGE`` around the
Chinchilla-style D, then a bounded refinement) and, given a range of aspect ratios, over log R (a grid, then a
bounded refinement). An optimum within 1% of a searched range's edge is flagged (``D_at_bound``, ``R_at_bound``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from scaling_lab.conf import serving_modes
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.plan.planner import REPORTED, Inference, Prices, chinchilla_style_for_loss, compare, lifetime
from scaling_lab.models.shapes import continuous_shape

SPECULATIVE = "speculative"
TOKEN_RANGE = (-4.0, 8.0)  # log D searched: e^-4 to e^8 times the Chinchilla-style model's D
TOKEN_GRID, RATIO_GRID = 49, 33  # grid points in log D and in log R before the bounded refinement
EDGE = 0.01  # an optimum this close (in log) to its search range's edge is at its bound
# What a shaped model adds to the reported quantities; `ratios` in a shape plan covers both.
SHAPE_REPORTED = ("R", "n_layers", "d_model", "decode_ms_per_token")


def planned_modes() -> list[str]:
    """Every mode the plan can price: the serving modes' table, then speculative decoding."""
    return [*serving_modes.names(), SPECULATIVE]


@dataclass(frozen=True)
class ServingMode:
    """What one mode does to loss and decode, and where each number came from."""

    name: str
    latency_mode: str                                  # the latency law's mode (a mode of the table)
    penalty: tuple[float, float, float] | None = None  # (k, a, b) of k D^a / N^b
    constant_penalty: float = 0.0                      # when no law was fitted
    decode_time_factor: float = 1.0                    # speculative: 1 / measured speedup
    decode_flops_factor: float = 1.0
    source: str = ""

    def loss_penalty(self, n_params, tokens: float):
        if self.penalty is None:
            return self.constant_penalty
        k, a, b = self.penalty
        return k * tokens ** a / n_params ** b


FULL_PRECISION = ServingMode("none", "none", source="full precision")


def measured_penalty(quantization: dict | None, mode: str) -> tuple[float, int] | None:
    """The mean measured loss delta of ``mode`` over the runs it quantized entirely (all of its runs if none was),
    at least 0, and how many runs that is; None when ``quantization.json`` has no row of the mode."""
    rows = [r for r in (quantization or {}).get("rows", []) if r["mode"] == mode]
    if not rows:
        return None
    full = [r for r in rows if not r.get("layers_skipped")] or rows
    return max(0.0, float(np.mean([r["loss_delta"] for r in full]))), len(full)


def modes_from_measurements(quantization: dict | None, speculative: dict | None,
                            penalties: dict[str, float] | None = None) -> dict[str, ServingMode]:
    """The serving modes our measurements support (``none`` always); ``penalties`` (mode -> delta) replace a
    mode's measured penalty, measured or not."""
    modes = {"none": FULL_PRECISION}
    measured = [m for m in (quantization or {}).get("modes", []) if m != "none"]
    for mode in dict.fromkeys([*measured, *(penalties or {})]):
        if mode in (penalties or {}):
            modes[mode] = ServingMode(mode, mode, constant_penalty=float(penalties[mode]),
                                      source=f"serving.loss_penalty={penalties[mode]:g} (given)")
            continue
        fit = (quantization.get("penalty") or {}).get(mode) or {}
        mean, runs = measured_penalty(quantization, mode) or (0.0, 0)
        if fit.get("fitted") and not fit.get("not_identified"):
            p = fit["params"]
            modes[mode] = ServingMode(mode, mode, penalty=(p["k"], p["a"], p["b"]),
                                      source=f"penalty law fitted on {fit['rows']} runs ({fit['fit_json']})")
        else:
            why = (f"its penalty law did not identify {fit['not_identified']}" if fit.get("fitted")
                   else f"no penalty law: {fit.get('why', 'not fitted')}")
            modes[mode] = ServingMode(mode, mode, constant_penalty=mean,
                                      source=f"mean measured delta {mean:.3g} over {runs} fully quantized runs "
                                             f"({why})")
    if speculative and speculative.get("best"):
        best = max(speculative["best"], key=lambda r: r["speedup_measured"])
        rows = [r for r in speculative["rows"] if r["draft_run_id"] == best["draft_run_id"] and
                r["target_run_id"] == best["target_run_id"] and r["mode"] == best["mode"] and r["k"] == best["k"]]
        row = rows[0] if rows else best
        k, c = int(best["k"]), float(best["cost_ratio"])
        tokens = float(row.get("tokens_per_target_step") or 1.0)
        modes[SPECULATIVE] = ServingMode(
            SPECULATIVE, "none", decode_time_factor=1.0 / float(best["speedup_measured"]),
            decode_flops_factor=(k + 1 + k * c) / tokens,
            source=f"best measured: draft {best['draft_run_id']} -> target {best['target_run_id']}, {best['mode']}, "
                   f"k={k}, speedup {best['speedup_measured']:.3g}x (applied as a constant factor)")
    return modes


def token_range(constants: LawConstants, loss: float) -> tuple[float, float]:
    """The log D the search covers: ``TOKEN_RANGE`` around the D of the Chinchilla-style model of ``loss``."""
    log_d = math.log(chinchilla_style_for_loss(constants, loss)[1])
    return log_d + TOKEN_RANGE[0], log_d + TOKEN_RANGE[1]


def _minimise(cost: Callable[[float], float], grid: np.ndarray, xatol: float) -> tuple[float | None, bool]:
    """The x of ``grid``'s range where ``cost`` is least (a grid, then a bounded refinement between the best grid
    point's neighbours), and whether it sits at the range's edge; None when no grid point has a finite cost."""
    costs = [cost(x) for x in grid]
    i = int(np.argmin(costs))
    if not math.isfinite(costs[i]):
        return None, False
    best = minimize_scalar(cost, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]), method="bounded",
                           options={"xatol": xatol})
    x = best.x if best.fun <= costs[i] else grid[i]
    return x, bool(min(abs(x - grid[0]), abs(x - grid[-1])) < EDGE)


# Milliseconds of one decode step of a shape in a latency mode, ``decode_ms(n_layers, d_model, latency_mode)``: the
# latency law of a fit.json (``fit.latency.LatencyModel.predict``), bound to a decode batch by the caller.
DecodeMs = Callable[[float, float, str], float]


@dataclass(frozen=True)
class Problem:
    """What the search is asked: the cheapest model whose served loss is ``target``, trained to the loss law
    ``law`` (of N, D and, where the law has it, R = d_model / n_layers), serving ``inference`` at ``prices``, a
    decode step timed by ``decode_ms`` and priced at ``dollars_per_ms``, D searched over ``log_tokens``."""

    law: LawConstants
    target: float
    inference: Inference
    prices: Prices
    decode_ms: DecodeMs
    dollars_per_ms: float
    log_tokens: tuple[float, float]

    def loss(self, n_params, tokens: float, aspect_ratio: float):
        """The law's loss of the trained model (R only where the law has it)."""
        shape = {"R": aspect_ratio} if "R" in self.law.law.inputs else {}
        return self.law.predict(N=n_params, D=tokens, **shape)

    def n_params(self, mode: ServingMode, tokens: float, aspect_ratio: float) -> float:
        """The smallest N whose loss plus ``mode``'s penalty reaches the target, or inf when no N up to 1e16 does.
        (A fitted penalty may grow with N, so the gap need not be monotone: scan a log grid, then bracket.)"""
        def gap(n):
            return self.loss(n, tokens, aspect_ratio) + mode.loss_penalty(n, tokens) - self.target

        grid = np.linspace(math.log(10.0), math.log(1e16), 65)
        reached = np.flatnonzero(gap(np.exp(grid)) <= 0)
        if not reached.size:
            return math.inf
        i = int(reached[0])
        if i == 0:
            return math.exp(grid[0])
        return math.exp(brentq(lambda x: float(gap(math.exp(x))), grid[i - 1], grid[i], xtol=1e-10))

    def cost(self, mode: ServingMode, tokens: float, aspect_ratio: float) -> dict:
        """The model of ``tokens`` and ``aspect_ratio`` serving with ``mode``: its shape, loss and lifetime cost."""
        n = self.n_params(mode, tokens, aspect_ratio)
        if not math.isfinite(n):
            return {"total_cost": math.inf}
        n_layers, d_model = continuous_shape(n, aspect_ratio)
        ms = float(self.decode_ms(n_layers, d_model, mode.latency_mode)) * mode.decode_time_factor
        served = dataclasses.replace(self.inference, decode_flops_per_token=self.inference.decode_flops_per_token
                                     * mode.decode_flops_factor)
        return {"mode": mode.name, **lifetime(n, tokens, served, self.prices, ms * self.dollars_per_ms),
                "R": aspect_ratio, "n_layers": n_layers, "d_model": d_model, "decode_ms_per_token": ms,
                "loss": float(self.loss(n, tokens, aspect_ratio)), "loss_penalty": mode.loss_penalty(n, tokens),
                "source": mode.source}

    def best_tokens(self, mode: ServingMode, aspect_ratio: float) -> dict:
        """The cheapest model of this aspect ratio serving with ``mode``, D searched over ``log_tokens``."""
        x, at_bound = _minimise(lambda x: self.cost(mode, math.exp(x), aspect_ratio)["total_cost"],
                                np.linspace(*self.log_tokens, TOKEN_GRID), xatol=1e-9)
        if x is None:
            return {"total_cost": math.inf}
        return {**self.cost(mode, math.exp(x), aspect_ratio), "D_at_bound": at_bound}

    def optimum(self, mode: ServingMode, aspect_ratios: tuple[float, float] | None,
                reference_aspect_ratio: float) -> dict:
        """The cheapest (N, D[, R]) serving with ``mode``: R searched over ``aspect_ratios``, or fixed at the
        reference without a range."""
        if aspect_ratios is None:
            return self.best_tokens(mode, reference_aspect_ratio)
        grid = np.linspace(math.log(aspect_ratios[0]), math.log(aspect_ratios[1]), RATIO_GRID)
        x, at_bound = _minimise(lambda x: self.best_tokens(mode, math.exp(x))["total_cost"], grid, xatol=1e-6)
        if x is None:
            return {"total_cost": math.inf}
        return {**self.best_tokens(mode, math.exp(x)), "R_at_bound": at_bound}


def _chinchilla_tokens(constants: LawConstants, loss: float, aspect_ratio: float) -> float | None:
    """D of the Chinchilla-style model of ``loss`` at this aspect ratio under the inference-efficient law; None if
    no model reaches it there."""
    target = loss / (1 + constants["epsilon"] * aspect_ratio ** constants["gamma"])
    return chinchilla_style_for_loss(constants, target)[1] if target > constants["E"] else None


def shape_plan(problem: Problem, aspect_ratios: tuple[float, float], reference_aspect_ratio: float) -> dict:
    """The Chinchilla-style model at ``reference_aspect_ratio`` against the search for the full-precision mode at
    that R (``optimal_at_reference_shape``) and over ``aspect_ratios`` (``optimal``), with the optimal/Chinchilla
    ratios; ``problem.law`` is the inference-efficient law."""
    for name in ("epsilon", "gamma"):
        if name not in problem.law.values:
            raise ValueError(f"shape planning needs the inference-efficient law's {name}")
    lo, hi = aspect_ratios
    if not 0 < lo <= reference_aspect_ratio <= hi:
        raise ValueError(f"need 0 < aspect_ratio_min <= reference_aspect_ratio <= aspect_ratio_max, got "
                         f"{lo}, {reference_aspect_ratio}, {hi}")
    optimal = problem.optimum(FULL_PRECISION, aspect_ratios, reference_aspect_ratio)
    if not math.isfinite(optimal["total_cost"]):
        raise ValueError(f"no aspect ratio in [{lo}, {hi}] reaches loss {problem.target:g} under the "
                         f"inference-efficient law")
    d_ref = _chinchilla_tokens(problem.law, problem.target, reference_aspect_ratio)
    if d_ref is None:
        raise ValueError(f"no model reaches loss {problem.target:g} at the reference aspect ratio "
                         f"{reference_aspect_ratio:g}")
    result = {"chinchilla": problem.cost(FULL_PRECISION, d_ref, reference_aspect_ratio),
              "optimal_at_reference_shape": problem.optimum(FULL_PRECISION, None, reference_aspect_ratio),
              "optimal": optimal}
    return {**compare(result, "total_cost", REPORTED + SHAPE_REPORTED), "R_at_bound": optimal["R_at_bound"]}


def serving_plan(problem: Problem, modes: dict[str, ServingMode], wanted: list[str],
                 aspect_ratios: tuple[float, float] | None, reference_aspect_ratio: float) -> dict:
    """Every wanted mode's optimum and the cheapest one."""
    optima = {m: problem.optimum(modes[m], aspect_ratios, reference_aspect_ratio) for m in wanted}
    reachable = {m: o for m, o in optima.items() if math.isfinite(o["total_cost"])}
    if not reachable:
        raise ValueError(f"no serving mode of {wanted} reaches loss {problem.target:g}")
    chosen = min(reachable, key=lambda m: reachable[m]["total_cost"])
    base = optima.get("none", {}).get("total_cost")
    for o in optima.values():
        o["cost_vs_none"] = (o["total_cost"] / base) if base and math.isfinite(base) else None
    return {"modes": optima, "chosen": chosen}
