"""What a sweep's report reads: the sweep's records and every file its stages wrote, found by the sweep's name.

Paths follow the stages' defaults under ``results_dir`` (each overridable in ``conf/report.yaml``):
records ``<results_dir>/<sweep>/``, fit ``fit/<sweep>/fit.json`` (+ predictions.csv), latency
``latency/<sweep>/latency.json|csv``, selection and verification ``verify/<sweep>/``, serving measurements
``serving/<sweep>/quantization.csv|json`` and ``speculative.csv|json``, plan ``plan/<sweep>/plan.json``.
Only this sweep's files are read: a section whose file is absent says which command writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from scaling_lab.conf import CONF_DIR, UserError
from scaling_lab.fit.io import store
from scaling_lab.fit.io.fitfile import read_fit_json


@dataclass
class Study:
    sweep: str
    results_dir: Path
    table: pd.DataFrame
    records: list[dict]
    planned: list[dict] = field(default_factory=list)
    fit: dict | None = None
    fit_path: Path | None = None
    predictions: pd.DataFrame | None = None
    latency: dict | None = None
    latency_path: Path | None = None
    latency_rows: pd.DataFrame | None = None
    selection: dict | None = None
    candidates: pd.DataFrame | None = None
    verification: dict | None = None
    verification_path: Path | None = None
    plan: dict | None = None
    plan_path: Path | None = None
    serving: dict[str, dict[str, Any]] = field(default_factory=dict)  # quantization/speculative -> csv, json, path
    presets: dict[str, dict[str, float]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)             # the inputs looked for, found or not

    @property
    def ok(self) -> pd.DataFrame:
        return self.table[self.table.status == "ok"]


def _json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _planned(results_dir: Path, sweep: str) -> list[dict]:
    """Points launched for the sweep (``scaling-train -m`` writes them to ``<sweep>/launches/``), each with its
    state where it has no record yet: running (a marker), interrupted (a checkpoint) or pending."""
    points = {}
    for path in sorted((results_dir / sweep / "launches").glob("*.json")):
        doc = _json(path) or {}
        for p in doc.get("points", []) if isinstance(doc, dict) else []:
            if isinstance(p, dict) and p.get("run_id"):
                points[p["run_id"]] = {"run_id": p["run_id"], "N": p.get("n_params"), "D": p.get("tokens"),
                                       "flops": p.get("flops"), "shape": p.get("shape")}
    for run_id, p in points.items():
        p["state"] = ("running" if store.marker_path(results_dir, sweep, run_id).exists() else
                      "interrupted" if store.checkpoint_path(results_dir, sweep, run_id).exists() else "pending")
    return list(points.values())


def presets() -> dict[str, dict[str, float]]:
    """The published Chinchilla constants the planner ships (conf/plan_presets/default.yaml)."""
    from omegaconf import OmegaConf

    doc = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "plan_presets" / "default.yaml"))
    return {k: dict(v) for k, v in (doc.get("constants") or {}).items()}


def gather(cfg) -> Study:
    """Everything the report of ``cfg.sweep`` shows; a sweep without records is an error."""
    results_dir, sweep = Path(str(cfg.results_dir)), str(cfg.sweep)
    table = store.load_table(results_dir, sweep)
    if table.empty:
        raise UserError(f"sweep {sweep!r} has no records under {results_dir / sweep}: run "
                        f"`scaling-train -m sweep={sweep} results_dir={results_dir}` first")
    paths = {k: Path(str(cfg[k])) for k in ("constants", "latency", "verify", "plan", "serving")}
    study = Study(sweep=sweep, results_dir=results_dir, table=table,
                  records=list(store.iter_records(results_dir, sweep)), planned=_planned(results_dir, sweep),
                  presets=presets(), paths=paths)
    # its laws parsed and checked, as every fit.json reader does
    study.fit = read_fit_json(paths["constants"]) if paths["constants"].is_file() else None
    if study.fit is not None:
        study.fit_path = paths["constants"]
        fitted = study.fit.get("provenance", {}).get("sweep")
        if fitted not in (None, sweep):
            raise UserError(f"{paths['constants']} was fitted on sweep {fitted!r}, not {sweep!r}: "
                            f"give this sweep's fit (constants=...)")
        study.predictions = _csv(paths["constants"].parent / "predictions.csv")
    study.latency = _json(paths["latency"])
    if study.latency is None and study.fit is not None and study.fit.get("latency"):
        study.latency, study.latency_path = study.fit["latency"], paths["constants"]
    elif study.latency is not None:
        study.latency_path = paths["latency"]
    if study.latency_path is not None:  # the measurements the law was fitted to (a refit names another table)
        source = Path(str(study.latency.get("source") or ""))
        study.latency_rows = _csv(source if source.is_file() else paths["latency"].parent / "latency.csv")
    verification = _json(paths["verify"])
    if verification is not None and verification.get("sweep") not in (None, sweep):
        raise UserError(f"{paths['verify']} verifies sweep {verification.get('sweep')!r}, not {sweep!r}")
    study.verification = verification
    study.verification_path = paths["verify"] if verification is not None else None
    selection_dir = paths["verify"].parent / "selection"
    study.selection = _json(selection_dir / "selection.json")
    study.candidates = _csv(selection_dir / "candidates.csv")
    study.plan = _json(paths["plan"])
    study.plan_path = paths["plan"] if study.plan is not None else None
    for kind in ("quantization", "speculative"):
        csv, doc = _csv(paths["serving"] / f"{kind}.csv"), _json(paths["serving"] / f"{kind}.json")
        if csv is not None or doc is not None:
            study.serving[kind] = {"csv": csv, "json": doc, "path": paths["serving"] / f"{kind}.csv"}
    return study
