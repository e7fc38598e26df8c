"""The review surfaces of a real smoke sweep: the HTML/Markdown report rendered from its stages' outputs, the
offline W&B runs (one per stage, in the sweep's group, with tables and artifacts) read back from disk, the W&B
Report specification, the CSV logger, and a headless-Chromium screenshot where Chromium is installed.

One smoke sweep (6 tiny runs) and its stages run once for the whole module, through the commands users run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.report.sections import SECTION_IDS

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SWEEP = "smoke"


def cli(*args, timeout=600):
    out = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def smoke(token_cache):
    """A 6-point smoke sweep (2 sizes x depths 1, 2, 4) with both loggers, then fit, latency, verify (its select),
    plan and report (with the W&B Report spec, offline); yields the results folder. It lives in its own temporary
    directory, not pytest's numbered ones (which concurrent pytest sessions of the same user rotate away).
    ``SCALING_TEST_REVIEW_RESULTS=<dir>``: stages once into <dir> and keep it, later runs only re-render the report."""
    reuse = os.environ.get("SCALING_TEST_REVIEW_RESULTS")
    with tempfile.TemporaryDirectory(prefix="scaling-review-") as tmp:
        results = Path(reuse) if reuse else Path(tmp) / "results"
        if not (results / SWEEP).is_dir():
            _stages(results, token_cache)
        out = cli("scaling-report", f"sweep={SWEEP}", f"results_dir={results}", "report.wandb=true")
        assert f"report: {results / 'report' / SWEEP / 'report.html'}" in out.stdout
        assert "W&B Report (offline)" in out.stdout and "report.publish=" in out.stdout
        yield results


def _stages(results: Path, token_cache: str) -> None:
    cli("scaling-train", "-m", f"sweep={SWEEP}", "model.n_layers=1,2,4", "logger=[csv,wandb]", "latency.repeats=2",
        "data.eval_tokens=4096", f"results_dir={results}", f"data.cache_dir={token_cache}")
    fit_dir = results / "fit" / SWEEP
    cli("scaling-fit", f"sweep={SWEEP}", f"results_dir={results}", f"out={fit_dir}", "bootstrap.n=20",
        "protocol.ties=[[alpha,beta,gamma]]", "protocol.max_starts=300")
    cli("scaling-latency", f"sweep={SWEEP}", f"results_dir={results}", f"constants={fit_dir / 'fit.json'}",
        f"out={results / 'latency' / SWEEP}", "shapes.n_layers=[]", "measure.repeats=2", "measure.rounds=2")
    cli("scaling-verify", f"sweep={SWEEP}", f"results_dir={results}", f"constants={fit_dir / 'fit.json'}",
        "params_factor=1.0", "tokens_per_param=2", "remeasure_rounds=1",
        f'train_overrides=["data.cache_dir={token_cache}","latency.repeats=2"]')
    e = read_fit_json(fit_dir / "fit.json")["laws"]["chinchilla"]["params"]["E"]  # a reachable target, whatever
    cli("scaling-plan", f"constants={fit_dir / 'fit.json'}", "objective=cost", f"target.loss={1.05 * e}",  # the fit
        "demand.tokens=1e10", f"out={results / 'plan' / SWEEP}")
    serving = results / "serving" / SWEEP  # what scaling-quantize writes (its own tests check its numbers)
    serving.mkdir(parents=True)
    pd.DataFrame({"precision": ["bf16", "int8"], "loss": [3.2, 3.21], "decode_ms_per_token": [1.0, 0.7]}).to_csv(
        serving / "quantization.csv", index=False)


class Page(HTMLParser):
    """The HTML parsed by Python's own parser: section ids, every src/href, scripts and stylesheets."""

    def __init__(self):
        super().__init__()
        self.sections, self.urls, self.scripts, self.stylesheets, self.missing = [], [], 0, 0, []
        self._section, self._in_missing = None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a.get("id")
            self.sections.append(self._section)
        if tag == "p" and a.get("class") == "missing":
            self.missing.append(self._section)
        if tag == "script":
            self.scripts += 1
        if tag == "link" and "stylesheet" in (a.get("rel") or ""):
            self.stylesheets += 1
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(a[key])


@pytest.mark.slow
def test_report_has_every_section_and_needs_nothing_outside_its_folder(smoke):
    folder = smoke / "report" / SWEEP
    page = Page()
    page.feed((folder / "report.html").read_text())
    page.close()
    assert page.sections == SECTION_IDS
    assert page.missing == [], f"sections without their input: {page.missing}"
    assert page.scripts == 0 and page.stylesheets == 0
    images = [u for u in page.urls if not u.startswith("#")]
    assert images and all("://" not in u and not u.startswith("//") for u in images)
    assert all((folder / u).is_file() for u in images), images
    assert {Path(u).name for u in images} >= {"grid.png", "curves.png", "loss_vs_n.png", "predicted_vs_actual.png",
                                              "frontier.png", "loss_vs_aspect_ratio.png", "latency.png", "plan.png"}
    text = (folder / "report.html").read_text()
    fit = read_fit_json(smoke / "fit" / SWEEP / "fit.json")
    assert "inference_efficient" in text and "Hoffmann et al. 2022" in text and "Epoch AI 2024" in text
    assert "verification.json" in text and "int8" in text  # the verification and the serving table
    assert str(fit["provenance"]["rows"]["fit"]) in text
    md = (folder / "report.md").read_text()
    for target in [line.split("](", 1)[1].split(")", 1)[0] for line in md.splitlines() if line.startswith("![")]:
        assert (folder / target).is_file(), target
    runs = pd.read_csv(folder / "runs.csv")
    assert len(runs) == 6 and (runs.status == "ok").all()
    assert pd.read_parquet(folder / "runs.parquet").run_id.tolist() == runs.run_id.tolist()


@pytest.mark.slow
def test_report_of_another_sweep_shows_only_its_own_stages(smoke, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(smoke, results, ignore=shutil.ignore_patterns("wandb"))
    other = results / "other"
    other.mkdir()
    for path in sorted((results / SWEEP).glob("*.json"))[:2]:
        shutil.copy(path, other / path.name)
    cli("scaling-report", "sweep=other", f"results_dir={results}")
    page = Page()
    page.feed((results / "report" / "other" / "report.html").read_text())
    assert {"laws", "protocol", "frontier", "latency", "selection", "serving", "plan"} <= set(page.missing)
    assert "sweep" not in page.missing and "smoke" not in (results / "report" / "other" / "report.html").read_text()


def test_report_of_a_sweep_without_records_is_an_error(tmp_path):
    out = subprocess.run([str(BIN / "scaling-report"), "sweep=nothing", f"results_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("scaling-report: error: sweep 'nothing' has no records") and \
        len(out.stderr.strip().splitlines()) == 1


def read_wandb_run(run_dir: Path) -> dict:
    """An offline W&B run read back from its .wandb log with wandb's own reader: the run record, its artifacts
    (with their manifests and metadata) and its history keys."""
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                         text=True, check=True, timeout=120)
    run, artifacts, keys = None, [], set()
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        if rec["type"] == "run":
            run = rec["run"]
        elif rec["type"] == "artifact":
            a = rec["artifact"]
            a["metadata"] = json.loads(a["metadata"]) if a.get("metadata") else {}
            artifacts.append(a)
        elif rec["type"] == "history":
            keys |= {k.split(".")[0] for k in rec["history"]["item"]}
    return {"run": run, "artifacts": artifacts, "keys": keys}


@pytest.mark.slow
def test_offline_wandb_runs_one_per_stage_with_tables_and_artifacts(smoke):
    runs = [read_wandb_run(d) for d in sorted((smoke / SWEEP / "wandb").glob("offline-run-*"))]
    assert all(r["run"]["run_group"] == SWEEP for r in runs)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r["run"]["job_type"], []).append(r)
    assert len(by_stage.pop("train")) == 6
    assert sorted(by_stage) == ["fit", "latency", "plan", "select", "verify"]
    assert all(len(v) == 1 for v in by_stage.values())

    def artifact(stage):
        (a,) = [a for a in by_stage[stage][0]["artifacts"] if a["type"] == stage]
        assert a["name"] == f"{SWEEP}-{stage}"
        files = {c["path"]: Path(c["local_path"]) for c in a["manifest"]["contents"]}
        staging = smoke / SWEEP / "wandb" / "artifact-staging" / "artifacts" / "staging"
        assert all(p.is_file() and p.parent == staging for p in files.values())  # kept for `wandb sync`
        return a, files

    fit_art, fit_files = artifact("fit")
    assert set(fit_files) == {"fit.json", "predictions.csv"}
    fit = read_fit_json(smoke / "fit" / SWEEP / "fit.json")
    staged = json.loads(fit_files["fit.json"].read_text())
    assert staged["laws"] == fit["laws"]  # the version the fit logged (scaling-latency adds a section later)
    assert "latency" in fit and "latency" not in staged
    assert fit_art["metadata"]["inputs"][0]["artifact"] == f"{SWEEP}-runs"
    assert {"fit/comparison", "fit/parameters", "fit/protocol", "fit/predictions"} <= by_stage["fit"][0]["keys"]
    tables = {a["manifest"]["contents"][0]["path"] for a in by_stage["fit"][0]["artifacts"] if a["type"] == "run_table"}
    assert "fit/comparison.table.json" in tables and "fit/parameters.table.json" in tables
    assert any(k.startswith("fit/figures/") for k in by_stage["fit"][0]["keys"])

    plan_art, plan_files = artifact("plan")
    plan = json.loads((smoke / "plan" / SWEEP / "plan.json").read_text())
    assert json.loads(plan_files["plan.json"].read_text()) == plan
    assert plan["constants"]["fit_json"] == str((smoke / "fit" / SWEEP / "fit.json").resolve())
    (used,) = plan_art["metadata"]["inputs"]  # lineage: the plan names the fit it read
    assert used["artifact"] == f"{SWEEP}-fit" and used["path"] == plan["constants"]["fit_json"]
    assert {"plan/plan", "plan/inputs"} <= by_stage["plan"][0]["keys"]
    assert artifact("latency")[1].keys() == {"latency.csv", "latency.json"}
    assert artifact("select")[1].keys() == {"selection.json", "candidates.csv"}
    assert artifact("verify")[1].keys() == {"verification.json"}
    assert "verify/verification" in by_stage["verify"][0]["keys"]
    assert "select/candidates" in by_stage["select"][0]["keys"]


@pytest.mark.slow
def test_wandb_report_spec_is_valid_for_the_reports_api(smoke):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    from scaling_lab.fit.report.wandb_report import load_spec

    path = smoke / "report" / SWEEP / "wandb_report.json"
    model = internal.ReportViewspec.model_validate_json(path.read_text())
    assert model.project.name == "scaling-lab" and SWEEP in model.display_name
    rep = load_spec(path)
    grids = [b for b in rep.blocks if isinstance(b, wr.PanelGrid)]
    assert any(isinstance(b, wr.TableOfContents) for b in rep.blocks)
    filters = [rs.filters for g in grids for rs in g.runsets]
    assert any("train" in f for f in filters) and any("plan" in f for f in filters)
    panels = [p for g in grids for p in g.panels]
    x = {getattr(p.x, "name", p.x) for p in panels if isinstance(p, wr.ScatterPlot)}  # summary metrics
    assert x == {"params_non_embedding", "aspect_ratio"}
    assert {p.table_name for p in panels if isinstance(p, wr.WeavePanelSummaryTable)} >= {
        "fit/comparison", "fit/parameters", "plan/plan"}
    # what save() would upload, rebuilt from the spec: valid again, the same blocks in the same order
    again = internal.ReportViewspec.model_validate_json(rep._to_model().model_dump_json(by_alias=True))
    assert [type(b).__name__ for b in again.spec.blocks] == [type(b).__name__ for b in model.spec.blocks]


@pytest.mark.slow
def test_csv_logger_keeps_curves_without_wandb(smoke):
    files = sorted((smoke / SWEEP / "csv").glob("*/metrics.csv"))
    assert len(files) == 6
    metrics = pd.read_csv(files[0])
    assert {"train/loss", "val/loss", "train/tokens"} <= set(metrics.columns)
    assert metrics["train/loss"].notna().sum() >= 3


def test_resumed_training_run_continues_its_wandb_run(compose_train):
    """A requeued run gets the same W&B id (from its run id) and resume='allow': no duplicate run."""
    from scaling_lab.pipeline.runspec import plan_run
    from scaling_lab.pipeline.train import _wandb_logger

    cfg = compose_train("sweep.name=unit")
    first, second = (_wandb_logger(cfg, plan_run(cfg)) for _ in range(2))
    assert first._wandb_init["id"] == second._wandb_init["id"] == f"unit-{plan_run(cfg).run_id}"
    assert first._wandb_init["resume"] == "allow" and first._wandb_init["job_type"] == "train"


@pytest.mark.slow
def test_screenshot_in_headless_chromium(smoke, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from screenshot_report import find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium on this machine: `apt-get install chromium` (or `python "
                    "scripts/screenshot_report.py --install <report>`) to run this test")
    shot = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"),
                    str(smoke / "report" / SWEEP / "report.html"), "--out", str(shot), "--height", "2400"],
                   check=True, timeout=180)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert colours and len(colours) > 20  # a rendered page, not a blank one
