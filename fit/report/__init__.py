"""``scaling-report``: one self-contained report of a sweep and what the later stages made of it.

    scaling-report sweep=demo results_dir=results                 # results/report/demo/report.html, report.md
    scaling-report sweep=demo report.wandb=true                   # and a W&B Report (online: saved; offline: spec)

It reads what the stages wrote for this sweep only (records, ``fit.json`` and ``predictions.csv``,
``latency.json``, the selection and its verification, serving measurements, ``plan.json``; see ``data.py``) and
writes a directory: ``report.html`` (opens from disk, no server, no network), ``report.md``, ``figures/*.png``,
and the sweep's table as ``runs.csv`` and ``runs.parquet``. Nothing here computes a result: every number is read
from a stage's output. Modules: ``data`` (gathering), ``tables`` (outputs as tables), ``figures``, ``sections``
(the outline), ``render`` (Markdown and HTML), ``wandb_report`` (the W&B Report).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig



def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(cfg: DictConfig) -> dict:
    """Gather, draw, render; returns the paths written (``html``, ``md``, ``figures``, ``tables``, ``wandb``)."""
    from scaling_lab.fit.io.store import export_table
    from scaling_lab.fit.report import data, figures, render, sections

    study = data.gather(cfg)
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    drawn = figures.draw_all(study, out / "figures")
    exported = export_table(study.results_dir, study.sweep, out)
    extra, wandb_result = [], None
    if cfg.report.wandb:
        from scaling_lab.fit.report import wandb_report

        wandb_result = wandb_report.build(cfg, study, out)
        extra.append(wandb_result["message"])
    title = f"Scaling report: sweep {study.sweep}"
    intro = (f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `scaling-report` from `{study.results_dir}`; "
             "every number is read from the files the stages wrote for this sweep.")
    outline = sections.build(study, drawn, exported, extra)
    _write(out / "report.md", render.markdown(title, intro, outline, out))
    _write(out / "report.html", render.to_html(title, intro, outline, out))
    return {"html": out / "report.html", "md": out / "report.md", "figures": drawn, "tables": exported,
            "wandb": wandb_result}


def report_command(cfg: DictConfig) -> None:
    result = write_report(cfg)
    if result["wandb"]:
        print(result["wandb"]["message"])
    print(f"report: {result['html']} (and report.md, figures/, runs.csv beside it)")

