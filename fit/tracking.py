"""W&B runs of the stages that are not training runs (fit, latency, select, verify, quantize, speculate, plan).

Every stage calls :func:`log_stage` once, at the end of its ``run(cfg)``, with what it wrote: tables (pandas
DataFrames or lists of dicts) become ``wandb.Table``, figures (PNG paths) ``wandb.Image``, and files we keep
(``fit.json``, ``plan.json``, CSVs) one versioned ``wandb.Artifact`` of the stage (``add_file``, so W&B copies
each file into its staging directory at that moment; a later rewrite of ``fit.json`` by ``scaling-latency`` is
a new version, not a corruption). The run goes to the sweep's group with ``job_type`` = the stage, next to the
sweep's training runs, under ``<results_dir>/<sweep>/wandb/`` (``logger.wandb.dir`` overrides).

Offline (the default) every run stays on disk and uploads later with ``wandb sync <results_dir>/<sweep>/wandb``.
The artifact files are staged under ``<wandb dir>/artifact-staging/artifacts/staging/`` (W&B's
``$WANDB_DATA_DIR/artifacts/staging``; we point ``WANDB_DATA_DIR`` there for the stage's run unless the user set
it): keep that directory until the sync. Online needs ``WANDB_API_KEY`` and ``logger.wandb.mode=online``;
``logger=none`` (or ``mode=disabled``) logs nothing.

Lineage sweep -> fit -> plan: each stage names its inputs (an upstream artifact name and the file it read). Online
the run declares them with ``use_artifact`` (W&B then draws the graph); offline W&B cannot declare inputs
(``use_artifact`` needs the server), so the inputs, with their SHA-256, are written in the artifact's metadata and
the run's config (``inputs``).

A stage that belongs to no sweep (a fit of a CSV, a plan from a preset) has no group to log to and logs nothing.
This module imports neither torch nor the pipeline; wandb is imported only when a run is made.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

STAGES = ("fit", "latency", "select", "verify", "quantize", "speculate", "plan")


def sweep_of_fit(path) -> tuple[str | None, str | None]:
    """(sweep, results_dir) a fit.json was fitted on, or (None, None) for a CSV fit or a missing file."""
    try:
        prov = json.loads(Path(str(path)).read_text()).get("provenance", {})
    except (OSError, ValueError, TypeError):
        return None, None
    if prov.get("source") != "results":
        return None, None
    return prov.get("sweep"), prov.get("results_dir")


def wandb_settings(cfg) -> Mapping[str, Any] | None:
    """``cfg.logger.wandb`` as a plain dict, or None when W&B is off (``logger=none``, ``mode=disabled``)."""
    logger = cfg.get("logger") if hasattr(cfg, "get") else None
    w = logger.get("wandb") if logger is not None else None
    if w is None:
        return None
    w = {k: w.get(k) for k in ("project", "entity", "mode", "dir")}
    if w["mode"] in (None, "disabled"):
        return None
    return w


def wandb_dir(results_dir, sweep: str, settings: Mapping[str, Any] | None = None) -> Path:
    """The folder whose ``wandb/`` holds the sweep's runs (training runs and stage runs alike)."""
    return Path((settings or {}).get("dir") or Path(str(results_dir)) / sweep)


def staging_dir(results_dir, sweep: str, settings: Mapping[str, Any] | None = None) -> Path:
    """Where W&B stages the artifact files of the sweep's stage runs until ``wandb sync`` uploads them."""
    data = os.environ.get("WANDB_DATA_DIR") or wandb_dir(results_dir, sweep, settings) / "wandb" / "artifact-staging"
    return Path(data) / "artifacts" / "staging"


def file_input(sweep: str, stage: str, path) -> dict:
    """An input of a stage: the upstream artifact (``<sweep>-<stage>``, type ``stage``; ``runs`` for the sweep's
    table) and the file read, with its SHA-256."""
    path = Path(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"artifact": artifact_name(sweep, stage), "type": stage, "path": str(path.resolve()), "sha256": digest}


def artifact_name(sweep: str, stage: str) -> str:
    return f"{sweep}-{stage}"


@contextmanager
def _data_dir(path: Path):
    """``WANDB_DATA_DIR`` (W&B's artifact staging root) set to ``path`` for the block, unless the user set it."""
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DATA_DIR"] = str(path)
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


def log_stage(cfg, stage: str, sweep: str | None, results_dir, *, tables: Mapping[str, Any] = (),
              figures: Iterable = (), files: Iterable = (), summary: Mapping[str, Any] = (),
              inputs: Iterable[Mapping] = (), metadata: Mapping[str, Any] = ()) -> Path | None:
    """Log one stage's W&B run; returns its run directory, or None when nothing was logged.

    ``tables``: name -> DataFrame or list of dicts; ``figures``: PNG paths (missing ones skipped); ``files``: paths
    of the files the stage wrote and keeps (one artifact ``<sweep>-<stage>`` of type ``stage``); ``inputs``:
    :func:`file_input` dicts of what it read; ``summary``: scalars."""
    settings = wandb_settings(cfg)
    if settings is None or not sweep:
        if settings is not None:
            print(f"W&B: this {stage} belongs to no sweep (no group to log to); not logged")
        return None
    if settings["mode"] == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ValueError("logger.wandb.mode=online needs WANDB_API_KEY in the environment (or use mode=offline)")
    import pandas as pd
    import wandb

    inputs = [dict(i) for i in inputs]
    root = wandb_dir(results_dir, sweep, settings)
    root.mkdir(parents=True, exist_ok=True)
    config = {"stage": stage, "sweep": sweep, "inputs": inputs}
    if hasattr(cfg, "keys"):
        from omegaconf import OmegaConf
        try:
            config["cfg"] = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an unresolvable interpolation in an unused key must not stop the logging
            config["cfg"] = OmegaConf.to_container(cfg, resolve=False)
    with _data_dir(root / "wandb" / "artifact-staging"):
        run = wandb.init(project=settings["project"], entity=settings["entity"], group=sweep, job_type=stage,
                         name=f"{stage}:{sweep}", dir=str(root), mode=settings["mode"], config=config,
                         tags=[f"sweep:{sweep}", f"stage:{stage}"], reinit="create_new",
                         settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
        try:
            logged = {}
            for name, table in dict(tables).items():
                df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))
                if len(df.columns):
                    logged[f"{stage}/{name}"] = wandb.Table(dataframe=_plain(df), allow_mixed_types=True)
            for path in figures:
                path = Path(path)
                if path.is_file():
                    logged[f"{stage}/figures/{path.stem}"] = wandb.Image(str(path), caption=path.name)
            if logged:
                run.log(logged)
            kept = [Path(p) for p in files if Path(p).is_file()]
            if kept:
                artifact = wandb.Artifact(artifact_name(sweep, stage), type=stage,
                                          metadata={"sweep": sweep, "inputs": inputs, **dict(metadata)})
                for path in kept:
                    artifact.add_file(str(path), name=path.name)
                if settings["mode"] == "online":
                    for i in inputs:
                        if i.get("sha256"):
                            used = wandb.Artifact(i["artifact"], type=i["type"])
                            used.add_file(i["path"])
                            run.use_artifact(used)
                run.log_artifact(artifact)
            run.summary.update({k: v for k, v in dict(summary).items()
                                if isinstance(v, (int, float, str, bool)) and v is not None})
            run_dir = Path(run.dir).parent
        finally:
            run.finish()
    where = (f"offline run {run_dir} (upload: wandb sync {root / 'wandb'}; artifact files staged in "
             f"{staging_dir(results_dir, sweep, settings)})" if settings["mode"] == "offline" else run_dir)
    print(f"W&B {stage} run: {where}")
    return run_dir


def _plain(df):
    """A table W&B can type: object columns holding lists or dicts as JSON strings."""
    df = df.copy()
    for column in df.columns:
        if df[column].dtype == object:
            df[column] = [None if v is None or (isinstance(v, float) and v != v) else
                          json.dumps(v, default=str) if isinstance(v, (list, dict, tuple)) else str(v)
                          for v in df[column]]
    df.columns = [str(c) for c in df.columns]
    return df


# ----- one call per stage: what each stage logs (the stages' run() call these, one line each) ------------------

def _tables():
    import scaling_lab.fit.report.tables as tables

    return tables


def _csv(path):
    import pandas as pd

    path = Path(path)
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def log_fit(cfg, doc: Mapping[str, Any], out) -> Path | None:
    """scaling-fit: comparison, parameters, protocol, predictions, frontier tables; its figures; fit.json and
    predictions.csv; input: the sweep's table (exported as runs.csv / runs.parquet)."""
    if wandb_settings(cfg) is None:
        return None
    prov, out, t = doc.get("provenance", {}), Path(str(out)), _tables()
    sweep = prov.get("sweep") if prov.get("source") == "results" else None
    inputs = []
    if sweep:
        from scaling_lab.fit.io.store import export_table

        inputs.append(file_input(sweep, "runs", export_table(prov["results_dir"], sweep)[0]))
    tables = {"comparison": t.law_metrics(doc), "parameters": t.law_params(doc), "protocol": t.protocol(doc),
              "predictions": _csv(out / "predictions.csv"), "compute_optimal": t.compute_optimal(doc),
              "isoflop_optima": t.isoflop_optima(doc)}
    summary = {f"{law}/{k}": v for law, e in doc["laws"].items() for k, v in (e.get("metrics") or {}).items()}
    summary.update({f"{law}/{k}": v for law, e in doc["laws"].items() for k, v in e["params"].items()})
    return log_stage(cfg, "fit", sweep, prov.get("results_dir"), tables=tables, figures=sorted(out.glob("*.png")),
                     files=[out / "fit.json", out / "predictions.csv"], summary=summary, inputs=inputs)


def log_latency(cfg, section: Mapping[str, Any], out) -> Path | None:
    """scaling-latency: the measurements and the latency law; latency.csv and latency.json; input: the fit."""
    if wandb_settings(cfg) is None:
        return None
    out = Path(str(out))
    sweep, results_dir = cfg.get("sweep"), cfg.get("results_dir")
    if not sweep and cfg.get("constants"):
        sweep, results_dir = sweep_of_fit(cfg.constants)
    inputs = [file_input(sweep, "fit", cfg.constants)] if sweep and cfg.get("constants") else []
    measurements = Path(section.get("source") or out / "latency.csv")  # measured here, or the table refitted
    return log_stage(cfg, "latency", sweep, results_dir,
                     tables={"measurements": _csv(measurements), "law": _tables().latency_law(section)},
                     files=[measurements, out / "latency.json"], inputs=inputs,
                     summary={"device": section.get("device"), "threads": section.get("threads")})


def log_select(cfg, result: Mapping[str, Any], out) -> Path | None:
    """scaling-select: the candidates ranking and the choice; selection.json and candidates.csv."""
    if wandb_settings(cfg) is None:
        return None
    out = Path(str(out))
    sweep, results_dir = sweep_of_fit(cfg.constants)
    chosen = result.get("chosen") or {}
    return log_stage(cfg, "select", sweep, results_dir,
                     tables={"candidates": _csv(out / "candidates.csv"), "choice": _tables().selection(result)},
                     files=[out / "selection.json", out / "candidates.csv"],
                     inputs=[file_input(sweep, "fit", cfg.constants)] if sweep else [],
                     summary={f"chosen/{k}": v for k, v in chosen.items()})


def log_verify(cfg, result: Mapping[str, Any], out) -> Path | None:
    """scaling-verify: predicted vs measured loss and latency of the two shapes; verification.json."""
    if wandb_settings(cfg) is None:
        return None
    out = Path(str(out))
    return log_stage(cfg, "verify", cfg.sweep, cfg.results_dir,
                     tables={"verification": _tables().verification(result)},
                     files=[out / "verification.json"], inputs=[file_input(cfg.sweep, "fit", cfg.constants)],
                     summary={f"claim/{k}": v for k, v in result.get("claim", {}).items()})


def log_plan(cfg, doc: Mapping[str, Any], out) -> Path | None:
    """scaling-plan: the plan and what it was asked; plan.png; plan.json; input: the fit (not for a preset)."""
    if wandb_settings(cfg) is None:
        return None
    out = Path(str(out))
    sweep, results_dir = sweep_of_fit(cfg.constants)
    t = _tables()
    return log_stage(cfg, "plan", sweep, results_dir, tables={"plan": t.plan(doc), "inputs": t.plan_inputs(doc)},
                     figures=[out / "plan.png"], files=[out / "plan.json"],
                     inputs=[file_input(sweep, "fit", cfg.constants)] if sweep else [],
                     summary={"saving": doc.get("saving"), "objective": doc.get("objective")})


def log_serving(cfg, stage: str, sweep: str, results_dir, out) -> Path | None:
    """scaling-quantize / scaling-speculate: every CSV and JSON the stage wrote in ``out`` as tables and files."""
    if wandb_settings(cfg) is None:
        return None
    out = Path(str(out))
    files = sorted(out.glob(f"{'quantization' if stage == 'quantize' else 'speculative'}*.*"))
    tables = {p.stem: _csv(p) for p in files if p.suffix == ".csv"}
    return log_stage(cfg, stage, sweep, results_dir, tables=tables, files=files)
