"""The fitted-constant export, ``fit.json`` (schema_version 1), and the per-row predictions table.

Each law entry is ``LawConstants.to_dict()`` (formula, inputs, params, ci95) plus ``not_identified`` (a list of
parameter names) and ``not_identified_why`` (name -> reason), ``ties``,
``fit`` (protocol, objective, starts screened, refined and reaching the best, converged, seconds of fitting,
N convention), ``bootstrap`` (resamples, what was resampled, seconds), ``metrics`` and, for laws with a closed-form frontier,
``compute_optimal``; with ``protocol=auto``, ``protocol_selection`` (rule, candidates and their
validation scores, chosen per law). Planners read it with ``fit.io.fitfile.load_constants(path, law)``.
"""

from __future__ import annotations

import json

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from scaling_lab.fit.io.fitfile import SCHEMA_VERSION
from scaling_lab.fit.io.files import write_csv_atomic, write_json_atomic
from scaling_lab.fit.io.store import tool_commit, tool_version
from scaling_lab.fit.fitting.fitlaw import LawFit
from scaling_lab.fit.fitting.sources import Table


def _clean(obj):
    """JSON has no NaN: write null instead, recursively; numpy scalars to Python."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def law_entry(f: LawFit) -> dict:
    entry = f.constants.to_dict()
    entry.update({
        "not_identified": sorted(f.not_identified, key=list(f.spec.law.params).index),
        "not_identified_why": f.not_identified,
        "ties": f.ties,
        "fit": {"protocol": f.protocol["name"], "method": f.protocol["method"], "objective": f.result.objective,
                "starts": f.result.n_starts, "grid": f.result.n_grid, "refined": f.result.n_refined,
                "reached_best": f.result.n_best, "converged": f.result.converged, "seconds": f.result.seconds,
                "n_convention": f.n_convention, **({"warning": f.result.warning} if f.result.warning else {})},
        "bootstrap": {"n": f.n_boot, "failed": f.n_boot_failed, **f.boot_info},
        "metrics": f.metrics,
    })
    if f.compute_optimal is not None:
        entry["compute_optimal"] = f.compute_optimal
    return entry


def fitted_range(table: Table) -> dict[str, list[float]]:
    """[min, max] of each input over the fit rows (N as the table counts it): where the law was fitted, which a
    selection or a plan past it extrapolates beyond."""
    rows = table.fit_rows
    return {x: [float(rows[x].min()), float(rows[x].max())] for x in ("N", "D", "R") if x in rows and rows[x].notna().all()}


def document(table: Table, fits: Mapping[str, LawFit], protocol: Mapping[str, Any], skipped: Mapping[str, str],
             isoflop: Mapping[str, Any] | None, bootstrap_seed: int,
             protocol_selection: Mapping[str, Any] | None = None) -> dict:
    doc = {"schema_version": SCHEMA_VERSION,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "tool": {"name": "scaling-lab", "version": tool_version(), "commit": tool_commit()},
           "provenance": {**table.provenance, "protocol": protocol["name"], "bootstrap_seed": bootstrap_seed,
                          "fitted_range": fitted_range(table)},
           "laws": {name: law_entry(f) for name, f in fits.items()}}
    if protocol_selection is not None:
        doc["protocol_selection"] = protocol_selection
    if skipped:
        doc["skipped_laws"] = dict(skipped)
    if isoflop is not None:
        doc["isoflop"] = isoflop
    return _clean(doc)


def write(out: str | Path, doc: dict, table: Table, fits: Mapping[str, LawFit]) -> Path:
    """fit.json and predictions.csv (every row, each law's prediction and bootstrap 95% interval).

    A ``latency`` section already in ``<out>/fit.json`` (written by ``scaling-latency``: a property of the device,
    not of the loss data) is carried over, so refitting the laws does not drop it."""
    out = Path(out)
    previous = out / "fit.json"
    if previous.is_file() and "latency" not in doc:
        try:
            latency = json.loads(previous.read_text()).get("latency")
        except (OSError, ValueError):
            latency = None
        if latency is not None:
            doc = {**doc, "latency": latency}
    path = write_json_atomic(out / "fit.json", doc)
    rows = table.data.copy()
    for name, f in fits.items():
        rows[f"pred_{name}"] = f.pred
        rows[f"pred_{name}_lo"], rows[f"pred_{name}_hi"] = f.pred_ci
        rows[f"pred_{name}_pi_lo"], rows[f"pred_{name}_pi_hi"] = f.pred_pi
    write_csv_atomic(out / "predictions.csv", rows)
    return path
