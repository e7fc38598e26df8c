"""The report's sections, in reading order, from a :class:`Study` and its drawn figures. A section whose input is
absent is kept, with the command that writes the input, so every report has the same outline."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import scaling_lab.fit.report.tables as tables
from scaling_lab.fit.report.figures import svg_runs
from scaling_lab.fit.report.render import Figure, Inline, Section, Table, fmt

SECTION_IDS = ["sweep", "curves", "laws", "protocol", "frontier", "published", "aspect", "latency", "selection",
               "serving", "plan", "files"]


def _fig(figures: dict, name: str, caption: str) -> Figure | None:
    return Figure(figures[name], caption) if name in figures else None


def sweep(study, figures) -> Section:
    t, ok = study.table, study.ok
    failed = t[t.status != "ok"]
    s = Section("sweep", f"Sweep {study.sweep}: grid and point states")
    first = ok.iloc[0] if len(ok) else None
    pending = [p for p in study.planned if p["run_id"] not in set(t.run_id)]
    s.add(f"{len(t)} recorded runs: {len(ok)} done, {len(failed)} failed"
          + (f"; {len(pending)} launched but not recorded ("
             + ", ".join(f"{sum(p['state'] == k for p in pending)} {k}" for k in ("running", "interrupted", "pending")
                         if any(p['state'] == k for p in pending)) + ")" if pending else "")
          + (f". Corpus `{first.corpus}` (hash {str(first.corpus_hash)[:12]}), tokenizer `{first.tokenizer}`; "
             f"training time summed over runs {fmt(float(ok.train_s.sum()) / 60, 3)} min. Loss is held-out nats per "
             f"token; latency was measured on the trained model ({first.latency_device}, "
             f"{fmt(first.latency_threads)} thread(s))." if first is not None else "."))
    s.add(_fig(figures, "grid", "Every point of the sweep at its N and D, coloured by held-out loss; failed and "
                                "unfinished points marked."))
    svg = svg_runs(study)
    if svg:
        s.add(Inline(svg, "Loss against N, one point per run: hover a point for its run id, shape, N, D and loss "
                          "(interactive in the HTML report)."))
    grid = tables.grid(t, study.planned)
    s.add(Table(grid.drop(columns=[c for c in ("error",) if c in grid and grid[c].isna().all()]),
                "Points of the sweep (from the records; `runs.csv` / `runs.parquet` hold every column)."))
    return s


def curves(study, figures) -> Section:
    s = Section("curves", "Training and validation curves")
    fig = _fig(figures, "curves", "Training loss (thin lines, every `train.log_every` steps) and validation loss "
                                  "(markers, on `data.val_curve_tokens` held-out tokens) against training tokens.")
    if fig is None:
        s.missing = "No run recorded a validation curve."
    s.add(fig)
    csv_dir = study.results_dir / study.sweep / "csv"
    if csv_dir.is_dir():
        s.add(f"Lightning CSVLogger curves (`logger=csv`): `{csv_dir}/<run_id>/metrics.csv`.")
    return s


def laws(study, figures) -> Section:
    s = Section("laws", "Fitted laws, side by side")
    if study.fit is None:
        s.missing = (f"No fit at `{study.paths['constants']}`: run `scaling-fit sweep={study.sweep} "
                     f"results_dir={study.results_dir} out={study.paths['constants'].parent}`.")
        return s
    prov = study.fit.get("provenance", {})
    rows = prov.get("rows", {})
    s.add(f"From `{study.fit_path}`: {rows.get('fit')} fit rows, {rows.get('heldout')} held-out rows "
          f"({rows.get('excluded_failed', 0)} failed runs excluded); N convention `{prov.get('n_convention')}`.")
    s.add(Table(tables.law_metrics(study.fit), "Fit quality of each law (held-out columns: rows not used to fit)."))
    params = tables.law_params(study.fit)
    wide = params.assign(value=[f"{fmt(e)} [{fmt(lo, 3)}, {fmt(hi, 3)}]" if lo is not None and lo == lo else fmt(e)
                                for e, lo, hi in zip(params.estimate, params.ci95_lo, params.ci95_hi)])
    wide = wide.pivot(index="param", columns="law", values="value").reindex(
        list(dict.fromkeys(params.param))).reset_index().fillna("–")
    s.add(Table(wide, "Fitted constants with bootstrap 95% intervals, laws side by side."))
    flagged = params[params.identified != "yes"]
    if len(flagged):
        s.add("Not identified by these data: " + "; ".join(f"{r.law} {r.param} ({r.identified[4:]})"
                                                            for r in flagged.itertuples()) + ".")
    s.add(_fig(figures, "loss_vs_n", "Loss against N per token budget, with each fitted law."),
          _fig(figures, "predicted_vs_actual", "Predicted against measured loss, bootstrap 95% intervals."))
    return s


def protocol(study, figures) -> Section:
    s = Section("protocol", "Fitting protocol")
    if study.fit is None:
        s.missing = "No fit: the protocol is chosen with `scaling-fit protocol=default|bian2025 protocol.ties=...`."
        return s
    s.add("How each law was fitted: the protocol (`default`: Huber loss on log-loss residuals from a grid of starts, "
          "as Epoch AI's replication of Hoffmann et al.; `bian2025`: least squares), the exponent ties, and how many "
          "starts reached the best objective.")
    s.add(Table(tables.protocol(study.fit)))
    return s


def frontier(study, figures) -> Section:
    s = Section("frontier", "isoFLOP profiles and the compute-optimal frontier")
    if study.fit is None:
        s.missing = "No fit: the frontier comes from the fitted Chinchilla law."
        return s
    s.add(_fig(figures, "frontier", "N_opt(C) of the fitted Chinchilla law with its bootstrap 95% band, beside the "
                                    "frontiers of the published constants and the sweep's runs."))
    co = tables.compute_optimal(study.fit)
    if len(co):
        s.add(Table(co, "Compute-optimal allocation at the budgets of `allocation.budgets` (C = 6 N D)."))
    iso = tables.isoflop_optima(study.fit)
    if len(iso):
        s.add(_fig(figures, "isoflop", "Loss against N at each FLOP budget, the parabola in log N and its minimum."))
        s.add(Table(iso, f"isoFLOP minima: N_opt ~ C^{fmt(study.fit['isoflop'].get('a'))}, "
                         f"D_opt ~ C^{fmt(study.fit['isoflop'].get('b'))}."))
    else:
        s.add("No isoFLOP profiles: this sweep is not a fixed-FLOP grid (train one with `scaling-train -m "
              "sweep=isoflop` and fit with `source.columns.budget=flops_budget`).")
    return s


def published(study, figures) -> Section:
    s = Section("published", "Our constants beside the published ones")
    s.add("Chinchilla-law constants L = E + A/N^alpha + B/D^beta: ours (this sweep; small models, so far from the "
          "published regime) beside the presets `scaling-plan constants=<name>` ships. Bian et al. 2025 fit the "
          "inference-efficient law to their own sweep; no preset of their constants exists, so the row is empty "
          "(their data refit: `scaling-fit protocol=bian2025`, see the README).")
    s.add(Table(tables.published(study.fit, study.presets)))
    return s


def aspect(study, figures) -> Section:
    s = Section("aspect", "Loss against aspect ratio at fixed N and D")
    fig = _fig(figures, "loss_vs_aspect_ratio", "Runs of one size class and token budget at different R = "
                                                "d_model / n_layers, with each fitted law's curve at their N and D.")
    if fig is None:
        s.missing = "No size class of this sweep has two aspect ratios."
    return s.add(fig)


def latency(study, figures) -> Section:
    s = Section("latency", "Latency against depth, and the latency law")
    if study.latency is None:
        s.missing = (f"No latency law at `{study.paths['latency']}`: run `scaling-latency sweep={study.sweep} "
                     f"results_dir={study.results_dir} constants={study.paths['constants']} "
                     f"out={study.paths['latency'].parent}`.")
        return s
    s.add(f"From `{study.latency_path}`: ms = {study.latency.get('form')} on "
          f"{study.latency.get('device')} ({study.latency.get('threads')} thread(s), {study.latency.get('dtype')}).")
    s.add(_fig(figures, "latency", "Measured decode latency per width against depth, and the fitted law."))
    s.add(Table(tables.latency_law(study.latency), "Latency-law coefficients and held-out errors."))
    return s


def selection(study, figures) -> Section:
    s = Section("selection", "Shape selection and its verification")
    if study.selection is None and study.verification is None:
        s.missing = (f"No verification at `{study.paths['verify']}`: run `scaling-verify sweep={study.sweep} "
                     f"results_dir={study.results_dir} constants={study.paths['constants']}`.")
        return s
    if study.selection is not None:
        sel = study.selection
        s.add(f"At N in [{fmt(sel['budget'].get('params_min'))}, {fmt(sel['budget'].get('params_max'))}] and D = "
              f"{fmt(sel['tokens'])} tokens: {sel['candidates']} candidate shapes ranked by the "
              f"{sel['law']} law and {sel['latency']['source']} latency.")
        s.add(Table(tables.selection(sel), "The choice."))
        if study.candidates is not None:
            s.add(Table(study.candidates.head(15), "Candidates, best first (all in `candidates.csv`).", 15))
    v = study.verification
    if v is not None:
        c = v["claim"]
        verdict = ("The selection is the conventional shape at this size: no claim to check." if c["same_shape"] else
                   f"Selected vs conventional shape: {c['speedup_measured']:.2f}x faster measured "
                   f"({c['speedup_predicted']:.2f}x predicted), loss x{c['loss_ratio_measured']:.4f} measured "
                   f"(x{c['loss_ratio_predicted']:.4f} predicted): the claim (faster at nearly equal loss, "
                   f"tolerance {v['loss_tolerance']:g}) **{'held' if c['held'] else 'did not hold'}**.")
        s.add(f"Verification at N = {fmt(v['target_N'])}, D = {fmt(v['tokens'])} tokens, both shapes trained: "
              f"{verdict} From `{study.verification_path}`.")
        s.add(Table(tables.verification(v)))
    return s


def serving(study, figures) -> Section:
    s = Section("serving", "Quantization and speculative decoding")
    if not study.serving:
        s.missing = (f"No serving measurements in `{study.paths['serving']}` (`quantization.csv`, "
                     "`speculative.csv`): run `scaling-quantize` and `scaling-speculate` for this sweep.")
        return s
    for kind, found in study.serving.items():
        frame = found["csv"] if found["csv"] is not None else tables.records_table(found["json"])
        s.add(Table(frame, f"{kind.capitalize()} measurements, from `{found['path']}`."))
    return s


def plan(study, figures) -> Section:
    s = Section("plan", "The plan")
    if study.plan is None:
        s.missing = (f"No plan at `{study.paths['plan']}`: run `scaling-plan constants={study.paths['constants']} "
                     f"objective=cost target.chinchilla_params=<N> demand.tokens=<T> out={study.paths['plan'].parent}`.")
        return s
    doc = study.plan
    s.add(f"From `{study.plan_path}`. Costs in US dollars, compute in FLOPs; N in parameters, D in tokens. "
          f"Saving of the optimal model over the Chinchilla-style one in total "
          f"{'cost' if doc.get('objective') == 'cost' else 'FLOPs'}: **{100 * doc.get('saving', 0):.3g}%**.")
    s.add(Table(tables.plan_inputs(doc), "What the plan was asked: target, demand, hardware."))
    s.add(Table(tables.plan(doc), "Chinchilla-style vs inference-aware optimal model ($ and FLOPs)."))
    if doc.get("constants", {}).get("not_identified"):
        s.add(f"The fit did not identify {', '.join(doc['constants']['not_identified'])}: the plan inherits that.")
    return s.add(_fig(figures, "plan", "Lifetime training and inference cost of the two models."))


def files(study, figures, exported: list[Path], extra: list[str]) -> Section:
    s = Section("files", "Data files and W&B")
    rows = [("sweep table", str(p)) for p in exported]
    rows += [(name, str(path)) for name, path in (("records", study.results_dir / study.sweep),
                                                   ("fit", study.fit_path), ("latency", study.latency_path),
                                                   ("verification", study.verification_path),
                                                   ("plan", study.plan_path)) if path is not None]
    wandb_dir = study.results_dir / study.sweep / "wandb"
    if wandb_dir.is_dir():
        rows.append(("W&B runs (offline)", f"{wandb_dir} (upload: wandb sync {wandb_dir})"))
        rows.append(("W&B artifact staging", str(wandb_dir / "artifact-staging")))
    s.add(Table(pd.DataFrame(rows, columns=["what", "where"]), max_rows=100))
    for line in extra:
        s.add(line)
    return s


def build(study, figures: dict, exported: list[Path], extra: list[str]) -> list[Section]:
    out = [f(study, figures) for f in (sweep, curves, laws, protocol, frontier, published, aspect, latency,
                                       selection, serving, plan)]
    out.append(files(study, figures, exported, extra))
    assert [s.id for s in out] == SECTION_IDS
    return out
