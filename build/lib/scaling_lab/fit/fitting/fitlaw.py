"""Fit one law to a table: point estimate by the protocol, bootstrap intervals, metrics, compute-optimal frontier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scaling_lab.fit.laws.chinchilla import frontier
from scaling_lab.fit.fitting.bootstrap import bootstrap, not_identified, percentile_ci
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.laws.spec import CompiledLaw, LawSpec, tie_label
from scaling_lab.fit.fitting.metrics import law_metrics
from scaling_lab.fit.fitting.optimize import FitResult, fit
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


def compile_law(spec: LawSpec, protocol) -> CompiledLaw:
    return CompiledLaw(spec, ties=list(protocol.get("ties") or []), log_space=protocol.method == "huber_grid")


def fit_law(model: CompiledLaw, table: Table, protocol, n_boot: int, seed: int, budgets) -> LawFit:
    spec, data = model.spec, table.data
    fit_data = table.fit_rows
    log_inputs = {x: np.log(fit_data[x].to_numpy()) for x in spec.law.inputs}
    y = fit_data["loss"].to_numpy()
    result = fit(model, log_inputs, y, protocol)

    samples = bootstrap(model, log_inputs, y, protocol, result.theta, n_boot, seed)
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
        pred_samples, _ = model.predict_jac(samples, {x: np.log(v) for x, v in inputs.items()})
        pred_ci = percentile_ci(pred_samples)
    else:
        pred_ci = (np.full(len(data), np.nan), np.full(len(data), np.nan))
    scored = pred if protocol.get("round_predictions") is None else np.round(pred, int(protocol.round_predictions))
    groups = data["group"].to_numpy() if "group" in data else None
    metrics = law_metrics(scored, data["loss"].to_numpy(), data["heldout"].to_numpy(), groups)

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
                  ties=tie_label(spec, list(protocol.get("ties") or [])), compute_optimal=allocation)
