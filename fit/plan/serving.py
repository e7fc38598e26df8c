"""Serving modes in the plan: size, tokens, (shape) and serving mode chosen together, from our measurements.

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

For each mode the trained model must reach ``target + penalty(N, D)``: for every D (and R), N solves
``L(N, D[, R]) + penalty(N, D) = target`` (the smallest such N: a log grid, then a bracketed root); total dollars = training + prefill (2N FLOPs a
token) + decode (latency law x dollars per ms) are minimised over log D (a grid, then a bounded refinement) and,
with a shape, over log R. The chosen mode is the cheapest of the modes asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from scaling_lab.conf import serving_modes
from scaling_lab.fit.plan.planner import Inference, Prices
from scaling_lab.models.shapes import continuous_shape

SPECULATIVE = "speculative"


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

    def loss_penalty(self, n_params: float, tokens: float) -> float:
        if self.penalty is None:
            return self.constant_penalty
        k, a, b = self.penalty
        return k * tokens ** a / n_params ** b


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
    modes = {"none": ServingMode("none", "none", source="full precision")}
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


def _n_for(loss_fn: Callable, mode: ServingMode, target: float, tokens: float, aspect_ratio: float) -> float:
    """The smallest N with ``loss(N, D, R) + penalty(N, D) <= target``, or inf when no N up to 1e16 reaches it.
    (A fitted penalty may grow with N, so the gap need not be monotone: scan a log grid, then bracket.)"""
    def gap(log_n):
        n = math.exp(log_n)
        return float(loss_fn(n, tokens, aspect_ratio)) + mode.loss_penalty(n, tokens) - target

    grid = np.linspace(math.log(10.0), math.log(1e16), 65)
    gaps = [gap(x) for x in grid]
    reached = [i for i, g in enumerate(gaps) if g <= 0]
    if not reached:
        return math.inf
    i = reached[0]
    if i == 0:
        return math.exp(grid[0])
    return math.exp(brentq(gap, grid[i - 1], grid[i], xtol=1e-10))


def _costed(loss_fn, mode: ServingMode, target, tokens, aspect_ratio, inference: Inference, prices: Prices,
            decode_ms: Callable, dollars_per_ms: float) -> dict:
    n = _n_for(loss_fn, mode, target, tokens, aspect_ratio)
    if not math.isfinite(n):
        return {"total_cost": math.inf}
    n_layers, d_model = continuous_shape(n, aspect_ratio)
    ms = float(decode_ms(n_layers, d_model, mode.latency_mode)) * mode.decode_time_factor
    train = 6 * n * tokens * prices.train
    prefill = 2 * n * inference.prefill_tokens * prices.prefill
    decode = inference.decode_tokens * ms * dollars_per_ms
    penalty = mode.loss_penalty(n, tokens)
    return {"mode": mode.name, "N": n, "D": tokens, "tokens_per_param": tokens / n, "R": aspect_ratio,
            "n_layers": n_layers, "d_model": d_model, "loss_trained": target - penalty, "loss_penalty": penalty,
            "decode_ms_per_token": ms, "train_flops": 6 * n * tokens,
            "inference_flops": 2 * n * (inference.prefill_tokens
                                        + inference.decode_tokens * mode.decode_flops_factor),
            "train_cost": train, "inference_cost": prefill + decode, "total_cost": train + prefill + decode,
            "source": mode.source}


def _best_tokens(loss_fn, mode, target, aspect_ratio, inference, prices, decode_ms, dollars_per_ms,
                 log_tokens: tuple[float, float]) -> dict:
    def cost(x):
        return _costed(loss_fn, mode, target, math.exp(x), aspect_ratio, inference, prices, decode_ms,
                       dollars_per_ms)["total_cost"]

    grid = np.linspace(*log_tokens, 49)
    costs = [cost(x) for x in grid]
    i = int(np.argmin(costs))
    if not math.isfinite(costs[i]):
        return {"total_cost": math.inf}
    best = minimize_scalar(cost, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]), method="bounded",
                           options={"xatol": 1e-6})
    x = best.x if best.fun <= costs[i] else grid[i]
    out = _costed(loss_fn, mode, target, math.exp(x), aspect_ratio, inference, prices, decode_ms, dollars_per_ms)
    out["D_at_bound"] = bool(i in (0, len(grid) - 1))
    return out


def mode_optimum(loss_fn, mode: ServingMode, target: float, inference: Inference, prices: Prices,
                 decode_ms: Callable, dollars_per_ms: float, aspect_ratios: tuple[float, float] | None,
                 reference_aspect_ratio: float, log_tokens: tuple[float, float], grid: int = 17) -> dict:
    """The cheapest (N, D[, R]) serving with ``mode`` at ``target`` loss; R fixed at the reference without a range."""
    if aspect_ratios is None:
        return _best_tokens(loss_fn, mode, target, reference_aspect_ratio, inference, prices, decode_ms,
                            dollars_per_ms, log_tokens)

    def at(log_r):
        return _best_tokens(loss_fn, mode, target, math.exp(log_r), inference, prices, decode_ms, dollars_per_ms,
                            log_tokens)

    logs = np.linspace(math.log(aspect_ratios[0]), math.log(aspect_ratios[1]), grid)
    results = [at(x) for x in logs]
    i = int(np.argmin([r["total_cost"] for r in results]))
    if not math.isfinite(results[i]["total_cost"]):
        return results[i]
    refined = minimize_scalar(lambda x: at(x)["total_cost"], method="bounded",
                              bounds=(logs[max(i - 1, 0)], logs[min(i + 1, grid - 1)]), options={"xatol": 1e-3})
    best = at(refined.x) if refined.fun <= results[i]["total_cost"] else results[i]
    best["R_at_bound"] = bool(i in (0, grid - 1))
    return best


def serving_plan(loss_fn, modes: dict[str, ServingMode], wanted: list[str], target: float, inference: Inference,
                 prices: Prices, decode_ms: Callable, dollars_per_ms: float, aspect_ratios, reference_aspect_ratio,
                 log_tokens) -> dict:
    """Every wanted mode's optimum and the cheapest one."""
    optima = {m: mode_optimum(loss_fn, modes[m], target, inference, prices, decode_ms, dollars_per_ms,
                              aspect_ratios, reference_aspect_ratio, log_tokens) for m in wanted}
    reachable = {m: o for m, o in optima.items() if math.isfinite(o["total_cost"])}
    if not reachable:
        raise ValueError(f"no serving mode of {wanted} reaches loss {target:g}")
    chosen = min(reachable, key=lambda m: reachable[m]["total_cost"])
    base = optima.get("none", {}).get("total_cost")
    for o in optima.values():
        o["cost_vs_none"] = (o["total_cost"] / base) if base and math.isfinite(base) else None
    return {"modes": optima, "chosen": chosen}
