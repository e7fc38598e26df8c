"""The stages' outputs as tables (pandas DataFrames), one function per table: the HTML/Markdown report, the W&B
stage runs (``wandb.Table``) and the W&B Report all show the same tables. Every number is read from a stage's
output document (``fit.json``, ``latency.json``, ``selection.json``, ``verification.json``, ``plan.json``) or the
sweep's records; nothing is recomputed here except the published presets' frontier (a closed form)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

GRID_COLUMNS = ["run_id", "status", "group", "n_layers", "d_model", "aspect_ratio", "params_non_embedding",
                "tokens_budget", "tokens_seen", "flops_total", "loss", "loss_bpb", "decode_ms_per_token",
                "train_s", "error"]


def grid(table: pd.DataFrame, planned: list[dict] | None = None) -> pd.DataFrame:
    """Every point of the sweep with its state: the records' status, plus points launched but not recorded."""
    rows = table[[c for c in GRID_COLUMNS if c in table]].copy()
    rows["state"] = rows["status"].map(lambda s: "done" if s == "ok" else s)
    known = set(rows["run_id"])
    extra = [{"run_id": p["run_id"], "state": p.get("state", "pending"), "status": None,
              "params_non_embedding": p.get("N"), "tokens_budget": p.get("D"), "flops_total": p.get("flops")}
             for p in planned or [] if p.get("run_id") not in known]
    if extra:
        rows = pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
    return rows[["state"] + [c for c in rows.columns if c not in ("state", "status")]]


def law_metrics(fit: Mapping[str, Any]) -> pd.DataFrame:
    """The fitted laws side by side: fit quality on all rows and on the held-out rows."""
    rows = []
    for name, law in fit["laws"].items():
        m = law.get("metrics", {})
        rho = [v for v in (m.get("spearman") or {}).values() if v is not None]
        rows.append({"law": name, "formula": law["formula"], "ties": law.get("ties"),
                     "MSE": m.get("mse"), "R2": m.get("r2"), "MSE held-out": m.get("mse_heldout"),
                     "R2 held-out": m.get("r2_heldout"), "mean rel. err held-out": m.get("mean_rel_err_heldout"),
                     "max rel. err held-out": m.get("max_rel_err_heldout"),
                     "mean Spearman": float(np.mean(rho)) if rho else None, "groups": len(rho),
                     "not identified": ", ".join(law.get("not_identified") or []) or "-"})
    return pd.DataFrame(rows)


def law_params(fit: Mapping[str, Any]) -> pd.DataFrame:
    """Every fitted constant with its bootstrap 95% interval, one column per law (laws side by side)."""
    rows = []
    for name, law in fit["laws"].items():
        ci = law.get("ci95") or {}
        flagged = law.get("not_identified_why") or {}
        for param, value in law["params"].items():
            lo, hi = ci.get(param, (None, None))
            rows.append({"law": name, "param": param, "estimate": value, "ci95_lo": lo, "ci95_hi": hi,
                         "identified": "no: " + flagged[param] if param in flagged else "yes"})
    return pd.DataFrame(rows)


def protocol(fit: Mapping[str, Any]) -> pd.DataFrame:
    """How each law was fitted: protocol, method, exponent ties, starts, convergence, bootstrap, data rows."""
    prov = fit.get("provenance", {})
    rows = []
    for name, law in fit["laws"].items():
        f, b = law.get("fit", {}), law.get("bootstrap", {})
        rows.append({"law": name, "protocol": f.get("protocol", prov.get("protocol")), "method": f.get("method"),
                     "ties": law.get("ties"), "objective": f.get("objective"), "starts": f.get("starts"),
                     "reached best": f.get("reached_best"), "converged": f.get("converged"),
                     "bootstrap": b.get("n"), "bootstrap failed": b.get("failed"),
                     "fit rows": prov.get("rows", {}).get("fit"), "held-out rows": prov.get("rows", {}).get("heldout"),
                     "N convention": prov.get("n_convention")})
    for name, why in (fit.get("skipped_laws") or {}).items():
        rows.append({"law": name, "protocol": "skipped: " + why})
    return pd.DataFrame(rows)


def compute_optimal(fit: Mapping[str, Any]) -> pd.DataFrame:
    """N_opt and D_opt per FLOP budget of every law with a closed-form frontier, with 95% intervals."""
    rows = []
    for name, law in fit["laws"].items():
        c = law.get("compute_optimal")
        if not c:
            continue
        n_ci, d_ci = c.get("N_opt_ci95"), c.get("D_opt_ci95")
        for j, budget in enumerate(c["budgets"]):
            rows.append({"law": name, "C (FLOPs)": budget, "N_opt": c["N_opt"][j], "D_opt": c["D_opt"][j],
                         "N_opt lo": n_ci[0][j] if n_ci else None, "N_opt hi": n_ci[1][j] if n_ci else None,
                         "D_opt lo": d_ci[0][j] if d_ci else None, "D_opt hi": d_ci[1][j] if d_ci else None,
                         "a": c.get("a"), "b": c.get("b")})
    return pd.DataFrame(rows)


def isoflop_optima(fit: Mapping[str, Any]) -> pd.DataFrame:
    iso = fit.get("isoflop")
    if not iso:
        return pd.DataFrame()
    return pd.DataFrame([{"C (FLOPs)": o["budget"], "points": o.get("points"), "N_opt": o.get("N_opt"),
                          "D_opt": o.get("D_opt"), "loss at N_opt": o.get("loss_opt"), "note": o.get("note")}
                         for o in iso.get("optima", [])])


def published(fit: Mapping[str, Any] | None, presets: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Our Chinchilla constants beside the published ones (the planner's presets), with the frontier exponents
    a = beta / (alpha + beta), b = alpha / (alpha + beta) each implies. Bian et al. 2025 have no preset: their
    inference-efficient law is fitted to their data (``scaling-fit protocol=bian2025``), not shipped as constants."""
    from scaling_lab.fit.laws.chinchilla import frontier_terms

    rows = []
    ours = (fit or {}).get("laws", {}).get("chinchilla")
    sources = [("ours (this sweep)", ours["params"])] if ours else []
    names = {"hoffmann2022": "Hoffmann et al. 2022", "sardana2024": "Sardana et al. 2024 (Hoffmann, unrounded)",
             "epoch2024": "Epoch AI 2024 (Besiroglu et al.)"}
    sources += [(names.get(k, k), v) for k, v in presets.items()]
    for label, p in sources:
        _, a, b = frontier_terms({k: float(p[k]) for k in ("A", "B", "alpha", "beta")})
        rows.append({"source": label, **{k: float(p[k]) for k in ("E", "A", "B", "alpha", "beta")},
                     "a (N_opt ~ C^a)": float(a), "b (D_opt ~ C^b)": float(b)})
    rows.append({"source": "Bian et al. 2025", "E": None, "A": None, "B": None, "alpha": None, "beta": None,
                 "a (N_opt ~ C^a)": None, "b (D_opt ~ C^b)": None})
    return pd.DataFrame(rows)


def latency_law(latency: Mapping[str, Any]) -> pd.DataFrame:
    """The latency law's coefficients per serving mode and quantity, with its held-out errors."""
    rows = []
    for mode, quantities in (latency.get("modes") or {}).items():
        for quantity, c in quantities.items():
            err = (latency.get("heldout") or {}).get(mode, {}).get(quantity, {})
            rows.append({"mode": mode, "quantity": quantity, **{k: v for k, v in c.items()},
                         "leave-one-shape-out MAPE": err.get("loso_mape"),
                         "largest shapes MAPE": err.get("largest_mape")})
    return pd.DataFrame(rows)


def verification(doc: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"model": label, "L": m["n_layers"], "d": m["d_model"], "R": m["R"], "N": m["N"],
                          "predicted loss": m["loss_predicted"], "measured loss": m["loss_measured"],
                          "predicted decode ms/tok": m["latency_predicted_ms"],
                          "measured decode ms/tok": m["latency_remeasured_ms"], "run": m.get("run_id")}
                         for label, m in doc["models"].items()])


def selection(doc: Mapping[str, Any]) -> pd.DataFrame:
    """The chosen shape and the rule that chose it."""
    chosen = doc.get("chosen") or {}
    row = {"rule": _rule(doc), **{k: v for k, v in chosen.items() if not isinstance(v, (dict, list))}}
    row.update(speedup_vs_best_loss=doc.get("speedup_vs_best_loss"), loss_increase_vs_best=doc.get("loss_increase_vs_best"))
    return pd.DataFrame([row])


def _rule(doc: Mapping[str, Any]) -> str:
    keys = ("latency_budget_ms", "loss_tolerance", "loss_limit", "eligible")
    return f"{doc.get('rule')}: " + ", ".join(f"{k}={doc[k]:.4g}" if isinstance(doc[k], float) else f"{k}={doc[k]}"
                                            for k in keys if doc.get(k) is not None)


PLAN_KEYS = ["N", "D", "train_flops", "inference_flops", "total_flops", "train_cost", "inference_cost", "total_cost"]


def plan(doc: Mapping[str, Any]) -> pd.DataFrame:
    """The Chinchilla-style and the inference-aware optimal model: N, D, FLOPs and dollars, and their ratio."""
    rows = []
    for name in ("chinchilla", "optimal"):
        if name in doc:
            rows.append({"model": name, **{k: doc[name].get(k) for k in PLAN_KEYS if k in doc[name]}})
    ratios = doc.get("ratios") or {}
    if ratios:
        rows.append({"model": "optimal / chinchilla", **{k: ratios.get(k) for k in PLAN_KEYS if k in ratios}})
    return pd.DataFrame(rows)


def plan_inputs(doc: Mapping[str, Any]) -> pd.DataFrame:
    """What the plan was asked: target, demand, hardware, serving, objective, constants (with units)."""
    t, d, h = doc.get("target", {}), doc.get("demand", {}), doc.get("hardware", {})
    tr, inf = h.get("train", {}), h.get("inference", {})
    c = doc.get("constants", {})
    rows = [("objective", doc.get("objective"), "flops: minimise FLOPs; cost: minimise $"),
            ("constants", c.get("preset") or c.get("fit_json"), ""),
            ("target", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.items()),
             "loss in nats/token"),
            ("demand: prefill tokens", d.get("prefill_tokens"), "tokens over the model's lifetime"),
            ("demand: decode tokens", d.get("decode_tokens"), "tokens over the model's lifetime"),
            ("train hardware", f"{tr.get('gpu')} {tr.get('dtype')}, MFU {tr.get('mfu')}", ""),
            ("train price", tr.get("price_per_hour"), "$ per GPU-hour"),
            ("train peak", tr.get("peak_flops"), "FLOP/s"),
            ("inference hardware", f"{inf.get('gpu')} {inf.get('dtype')}, MFU prefill {inf.get('mfu_prefill')}, "
                                   f"decode {inf.get('mfu_decode')}", ""),
            ("inference price", inf.get("price_per_hour"), "$ per GPU-hour"),
            ("inference peak", inf.get("peak_flops"), "FLOP/s"),
            ("serving", _serving(doc.get("serving") or {}), "")]
    return pd.DataFrame(rows, columns=["input", "value", "unit"])


def _serving(s: Mapping[str, Any]) -> str:
    spec = s.get("speculative") or {}
    text = (f"mode {s.get('mode')}" if s.get("mode") is not None else "") + \
        (f" quantization {s.get('quantization')}" if s.get("quantization") is not None else "")
    if spec.get("enabled"):
        text += (f"; speculative decoding (acceptance {spec.get('acceptance_rate')}, {spec.get('draft_tokens')} "
                 f"draft tokens, draft cost ratio {spec.get('draft_cost_ratio')})")
    return text


def records_table(doc: Mapping[str, Any] | list) -> pd.DataFrame:
    """A stage's JSON rows (e.g. a serving measurement) as a table; nested values flattened one level."""
    rows = doc if isinstance(doc, list) else doc.get("rows") or doc.get("results") or [doc]
    return pd.json_normalize(rows, max_level=1)
