"""The sweep's W&B Report, built with the Reports API of ``wandb-workspaces`` (``wandb_workspaces.reports.v2``).

The report shows the sweep's runs (the group ``<sweep>``): loss vs N and loss vs aspect ratio over the training
runs' summaries, their training and validation curves, and each stage run's tables (``fit/comparison``,
``fit/parameters``, ``fit/protocol``, ``latency/law``, ``select/choice``, ``verify/verification``, ``plan/plan``,
``plan/inputs``, logged by ``fit/tracking.py``), plus the fit and the plan as static Markdown tables.

Online (``logger.wandb.mode=online`` and ``WANDB_API_KEY``) the report is saved and its URL printed. Offline (the
default) nothing can be saved (the Reports API needs the server): the report's specification, the pydantic model
``Report._to_model()`` that ``save()`` would upload, is written as ``wandb_report.json`` next to the HTML report.
Its run sets name no project of their own, so they show the report's project. To publish it later, after
``wandb sync <results_dir>/<sweep>/wandb``:

    WANDB_API_KEY=... scaling-report sweep=<name> report.publish=<dir>/wandb_report.json \\
        report.entity=<entity> logger.wandb.mode=online
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scaling_lab.conf import UserError

STAGE_TABLES = {"fit": ["comparison", "parameters", "protocol"], "latency": ["law"], "select": ["choice"],
                "verify": ["verification"], "plan": ["plan", "inputs"]}


def _wr():
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise UserError(f"report.wandb=true needs wandb-workspaces (pip install wandb-workspaces): {err}") from None
    return wr


def _online(cfg) -> bool:
    w = (cfg.get("logger") or {}).get("wandb") or {}
    if w.get("mode") != "online":
        return False
    if not os.environ.get("WANDB_API_KEY"):
        raise UserError("logger.wandb.mode=online needs WANDB_API_KEY in the environment (or use mode=offline)")
    return True


def _entity(cfg, online: bool) -> str:
    w = (cfg.get("logger") or {}).get("wandb") or {}
    entity = cfg.report.get("entity") or w.get("entity")
    if entity or not online:
        return entity or ""
    import wandb

    return wandb.Api().default_entity


def report(cfg, study, entity: str = "", runset_project: str = ""):
    """The Report object (not saved). ``runset_project`` empty: run sets show the report's project."""
    import scaling_lab.fit.report.render as render
    import scaling_lab.fit.report.tables as tables

    wr = _wr()
    project = ((cfg.get("logger") or {}).get("wandb") or {}).get("project") or "scaling-lab"
    sweep = study.sweep
    rs_entity = entity if runset_project else ""

    def runset(name: str, filters: str):
        return wr.Runset(entity=rs_entity, project=runset_project, name=name, filters=filters)

    training = runset(f"{sweep}: training runs", f"Group = '{sweep}' and JobType = 'train'")
    ok = study.ok
    blocks = [
        wr.TableOfContents(),
        wr.H1(f"Sweep {sweep}"),
        wr.P(f"{len(study.table)} runs ({len(ok)} done) in the W&B group {sweep}; every stage after training logs "
             f"one run in the same group (job type = the stage) with its tables and its files as artifacts."),
        wr.PanelGrid(runsets=[training], panels=[
            wr.ScatterPlot(title="loss vs N (per token budget: colour by run)", x="params_non_embedding", y="loss",
                           log_x=True, layout=wr.Layout(w=12, h=8)),
            wr.ScatterPlot(title="loss vs aspect ratio R = d_model / n_layers", x="aspect_ratio", y="loss",
                           log_x=True, layout=wr.Layout(x=12, w=12, h=8)),
            wr.LinePlot(title="training and validation loss", y=["train/loss", "val/loss"],
                        layout=wr.Layout(y=8, w=24, h=8)),
        ]),
    ]
    for stage, names in STAGE_TABLES.items():
        blocks += [wr.H2(f"{stage} ({sweep})"),
                   wr.PanelGrid(runsets=[runset(f"{sweep}: {stage}", f"Group = '{sweep}' and JobType = '{stage}'")],
                                panels=[wr.WeavePanelSummaryTable(table_name=f"{stage}/{n}",
                                                                  layout=wr.Layout(y=8 * i, w=24, h=8))
                                        for i, n in enumerate(names)])]
        if stage == "fit" and study.fit is not None:
            blocks.append(wr.MarkdownBlock(render._md_table(render.Table(tables.law_metrics(study.fit),
                                                                         "Fit quality, from fit.json"))))
        if stage == "plan" and study.plan is not None:
            blocks.append(wr.MarkdownBlock(render._md_table(render.Table(tables.plan(study.plan),
                                                                         "The plan ($ and FLOPs), from plan.json"))))
    return wr.Report(entity=entity, project=project, title=f"Scaling study: sweep {sweep}",
                     description=f"sweep -> fit -> plan for the sweep {sweep} (scaling-lab)", blocks=blocks)


def spec_json(rep) -> str:
    """The specification ``Report.save()`` would upload (its pydantic model), as JSON."""
    return rep._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=1)


def load_spec(path: Path):
    """A Report from a specification written offline (validated by the Reports API's own model)."""
    wr = _wr()
    from wandb_workspaces.reports.v2 import internal

    return wr.Report._from_model(internal.ReportViewspec.model_validate_json(Path(path).read_text()))


def build(cfg, study, out: Path) -> dict:
    """Online: save the report, return its URL; offline: write ``out/wandb_report.json``. Returns a message too."""
    online = _online(cfg)
    publish = cfg.report.get("publish")
    if publish:
        if not online:
            raise UserError("report.publish needs logger.wandb.mode=online and WANDB_API_KEY")
        rep = load_spec(Path(str(publish)))
        entity = _entity(cfg, True)
        rep.entity = entity
        for block in rep.blocks:
            for rs in getattr(block, "runsets", []) or []:
                rs.entity, rs.project = entity, rep.project
        rep.save()
        return {"url": rep.url, "message": f"W&B Report saved: {rep.url}"}
    entity = _entity(cfg, online)
    if online:
        project = ((cfg.get("logger") or {}).get("wandb") or {}).get("project") or "scaling-lab"
        rep = report(cfg, study, entity, runset_project=project)
        rep.save()
        return {"url": rep.url, "message": f"W&B Report saved: {rep.url}"}
    rep = report(cfg, study, entity)
    path = out / "wandb_report.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(spec_json(rep))
    os.replace(tmp, path)
    json.loads(path.read_text())
    return {"spec": path, "message": (
        f"W&B Report (offline): its specification is in {path}. To publish it: wandb sync "
        f"{study.results_dir / study.sweep / 'wandb'}, then WANDB_API_KEY=... scaling-report sweep={study.sweep} "
        f"results_dir={study.results_dir} report.wandb=true report.publish={path} report.entity=<entity> "
        f"logger.wandb.mode=online")}
