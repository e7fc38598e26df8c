"""Fit one law to a table: point estimate by the protocol, bootstrap intervals, metrics, compute-optimal frontier."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from scaling_lab.fit.laws.chinchilla import frontier
from scaling_lab.fit.fitting.bootstrap import bootstrap, not_identified, percentile_ci
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.laws.spec import CompiledLaw, LawSpec, linear_params, tie_label
from scaling_lab.fit.fitting.metrics import law_metrics
from scaling_lab.fit.fitting.optimize import MEMORY_BUDGET, FitResult, arrays_alive, fit
from scaling_lab.fit.fitting.sources import Table


@dataclass
class LawFit:
    spec: LawSpec
    model: CompiledLaw
    result: FitResult
    constants: LawConstants
    not_identified: dict[str, str]
    metrics: dict[str, Any]
    pred: np.ndarray                 # point prediction on every row of the table
    pred_ci: tuple[np.ndarray, np.ndarray]
    n_boot: int
    n_boot_failed: int
    ties: str
    compute_optimal: dict[str, Any] | None
    pred_pi: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))   # 95% prediction interval, every row
    boot_info: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)     # the protocol this law was fitted with
    n_convention: str = ""


@dataclass
class BootstrapSettings:
    """How resamples are drawn and refitted (conf/fit.yaml ``bootstrap``)."""
    n: int = 200
    seed: int = 0
    screen: int = 32        # starts each resample screens: the point estimate, then the grid starts the fit kept
    refine: int = 2         # of which the best this many are refitted
    groups: Any = "auto"    # resample whole groups: auto (when min_groups exist) | true | false
    min_groups: int = 10

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BootstrapSettings":
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


def compile_law(spec: LawSpec, protocol) -> CompiledLaw:
    """The law in the protocol's parametrisation: positive parameters as logs except for least squares; for
    vpnls, the parameters it solves linearly stay natural."""
    ties = list(protocol.get("ties") or [])
    natural = linear_params(spec, ties) if protocol.method == "vpnls" else ()
    return CompiledLaw(spec, ties=ties, log_space=protocol.method != "least_squares", natural=natural)


def bootstrap_groups(table: Table, boot: BootstrapSettings) -> np.ndarray | None:
    """The group label of each fit row when resamples draw whole groups, else None (resample rows)."""
    if boot.groups is False or str(boot.groups).lower() == "false" or "group" not in table.data:
        return None
    labels = table.fit_rows["group"].to_numpy()
    if boot.groups is True or str(boot.groups).lower() == "true" or len(set(labels)) >= int(boot.min_groups):
        return labels
    return None


def fit_law(model: CompiledLaw, table: Table, protocol, boot: BootstrapSettings | int, seed: int | None = None,
            budgets=()) -> LawFit:
    """``boot``: BootstrapSettings (or a number of resamples, with ``seed``)."""
    if not isinstance(boot, BootstrapSettings):
        boot = BootstrapSettings(n=int(boot), seed=int(seed or 0))
    spec, data = model.spec, table.data
    fit_data = table.fit_rows
    log_inputs = {x: np.log(fit_data[x].to_numpy()) for x in spec.law.inputs}
    y = fit_data["loss"].to_numpy()
    result = fit(model, log_inputs, y, protocol)

    t0 = time.perf_counter()
    groups = bootstrap_groups(table, boot)
    starts = np.vstack([result.theta[None, :], result.screened.reshape(-1, model.n_free)])[:max(1, boot.screen)]
    samples = bootstrap(model, log_inputs, y, protocol, starts, boot.n, boot.seed, groups, boot.refine)
    boot_info = {"seconds": time.perf_counter() - t0, "screen": int(len(starts)), "refine": int(boot.refine),
                 "resampled": f"{len(set(groups))} groups" if groups is not None else f"{len(y)} rows"}
    failed = int(np.isnan(samples).any(axis=1).sum()) if len(samples) else 0
    samples = samples[~np.isnan(samples).any(axis=1)]
    values = {p: float(v) for p, v in model.values(result.theta).items()}
    sample_values = model.values(samples)
    ci95 = {}
    if len(samples):
        for p in spec.law.params:
            lo, hi = percentile_ci(sample_values[p])
            ci95[p] = (float(lo), float(hi))
    constants = LawConstants(law=spec.law, values=values, ci95=ci95)

    inputs = {x: data[x].to_numpy() for x in spec.law.inputs}
    pred = np.asarray(constants.predict(**inputs), dtype=float)
    if len(samples):
        fit_pred = np.asarray(constants.predict(**{x: fit_data[x].to_numpy() for x in spec.law.inputs}), float)
        residuals = y / fit_pred if protocol.method == "huber_grid" else y - fit_pred
        pred_ci, pred_pi = prediction_bands(model, samples, inputs, residuals, protocol.method == "huber_grid",
                                            boot.seed + 1)
    else:
        pred_ci = pred_pi = (np.full(len(data), np.nan), np.full(len(data), np.nan))
    scored = pred if protocol.get("round_predictions") is None else np.round(pred, int(protocol.round_predictions))
    groups = data["group"].to_numpy() if "group" in data else None
    heldout = data["heldout"].to_numpy()
    metrics = law_metrics(scored, data["loss"].to_numpy(), heldout, groups)
    loss = data["loss"].to_numpy()
    inside = (loss >= pred_pi[0]) & (loss <= pred_pi[1])
    metrics["heldout_in_pi95"] = float(inside[heldout].mean()) if heldout.any() and len(samples) else float("nan")

    allocation = None
    if spec.compute_optimal:
        point = frontier(values, budgets)
        boot = frontier(sample_values, budgets) if len(samples) else None
        allocation = {"budgets": [float(c) for c in budgets]}
        for key in ("a", "b", "G", "N_opt", "D_opt"):
            allocation[key] = np.asarray(point[key]).tolist()
            if boot is not None:
                lo, hi = percentile_ci(boot[key])
                allocation[f"{key}_ci95"] = [np.asarray(lo).tolist(), np.asarray(hi).tolist()]

    return LawFit(spec=spec, model=model, result=result, constants=constants,
                  not_identified=not_identified(model, result.theta, ci95, log_inputs), metrics=metrics, pred=pred,
                  pred_ci=pred_ci, n_boot=len(samples), n_boot_failed=failed,
                  ties=tie_label(spec, list(protocol.get("ties") or [])), compute_optimal=allocation,
                  pred_pi=pred_pi, boot_info=boot_info,
                  protocol={k: v for k, v in dict(protocol).items() if k in ("name", "method", "ties")},
                  n_convention=str(table.provenance.get("n_convention", "")))


def prediction_bands(model: CompiledLaw, samples: np.ndarray, inputs: Mapping[str, np.ndarray],
                     residuals: np.ndarray, relative: bool, seed: int) -> tuple[tuple, tuple]:
    """95% bands over the resampled laws at every row, and 95% prediction intervals: each resample's law plus a
    residual of the point fit drawn at random (a ratio for a log objective, ``relative``; else a difference).
    Computed block of rows by block, so the (resamples x rows) arrays stay within ``MEMORY_BUDGET`` however many
    rows the table has (one block, as unchunked, on small tables)."""
    n = len(next(iter(inputs.values())))
    block = max(1, int(MEMORY_BUDGET // (8 * len(samples) * arrays_alive(model))))
    rng = np.random.default_rng(seed)
    ci, pi = ([], []), ([], [])
    for i in range(0, n, block):
        part = {x: np.log(v[i:i + block]) for x, v in inputs.items()}
        pred, _ = model.predict_jac(samples, part)
        noise = residuals[rng.integers(0, len(residuals), size=pred.shape)]
        for out, band in ((ci, percentile_ci(pred)), (pi, percentile_ci(pred * noise if relative else pred + noise))):
            out[0].append(band[0])
            out[1].append(band[1])
    return (np.concatenate(ci[0]), np.concatenate(ci[1])), (np.concatenate(pi[0]), np.concatenate(pi[1]))
