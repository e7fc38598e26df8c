"""The README's "What the demo runs and finds" block, regenerated from the demo's outputs (nothing is pasted).

    python scripts/demo_findings.py results_dir=results [sweep=demo] [iso=demo_isoflop] [law=inference_efficient]

Reads the isoFLOP study's ``fit/<iso>/fit.json`` and ``plan/<iso>/plan.json`` (``iso=demo_isoflop``), the shape
study's records, ``fit/<sweep>/fit.json``, ``verify/<sweep>/verification.json`` and its selection,
``plan/<sweep>/plan.json``, and, when present, ``lr_scan/lr_scan.md`` and ``bench_wsd/bench_wsd.json``; prints
Markdown. A missing input is named with the command that makes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from scaling_lab.fit.fitting.sources import _groups_of_equal_size
from scaling_lab.fit.io.store import iter_records, load_table


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _ci(pair, spec: str = ".3g") -> str:
    return f" [{pair[0]:{spec}}, {pair[1]:{spec}}]" if pair else ""


def frontier_lines(results_dir: Path, iso_sweep: str) -> list[str]:
    """The isoFLOP study: each budget's optimum, the exponents, tokens per parameter, the held-out budget, the two
    approaches side by side and the plan's ratio."""
    fit = _load(results_dir / "fit" / iso_sweep / "fit.json")
    iso = (fit or {}).get("isoflop")
    if not iso:
        return [f"- no isoFLOP fit: run `scaling-fit sweep={iso_sweep} source.columns.budget=flops_budget ...` (see "
                "the Makefile's demo target)"]
    out = [f"- **Frontier** (isoFLOP study `{iso_sweep}`, Approach 2, N non-embedding; {iso['budgets_used']} budgets "
           f"with an interior minimum): N_opt ~ C^a, a = {iso['a']:.3f}{_ci(iso.get('a_ci95'))}; D_opt ~ C^b, "
           f"b = {iso['b']:.3f}{_ci(iso.get('b_ci95'))}"]
    for r in iso["optima"]:
        out.append(f"  - {r['budget']:.3g} FLOPs: " + (f"dropped ({r['note']})" if r["note"] else
                   f"N_opt {r['N_opt']:.3g}{_ci(r.get('N_opt_ci95'))}, best loss {r['loss_opt']:.4f}, "
                   f"{r['tokens_per_param']:.3g}{_ci(r.get('tokens_per_param_ci95'))} tokens per parameter"))
    conv = (iso.get("middle") or {}).get("conventions") or {}
    if conv:
        out.append("  - tokens per parameter at the middle budget, by how N is counted: " + ", ".join(
            f"{name} {c['tokens_per_param']:.3g}" for name, c in conv.items()))
    hold = iso.get("holdout") or {}
    if hold.get("note"):
        out.append(f"  - held-out budget {hold['budget']:.3g}: no interior minimum ({hold['note']})")
    elif hold:
        out.append(f"  - {'held-out' if hold.get('held_out') else 'largest'} budget {hold['budget']:.3g} predicted "
                   f"from the other {hold['fitted_budgets']}: N_opt {hold['N_opt_predicted']:.3g} predicted, "
                   f"{hold['N_opt']:.3g} found (x{hold['N_opt_ratio']:.2f}, target within 2x); best loss "
                   f"{hold['loss_opt_predicted']:.4f} predicted, {hold['loss_opt']:.4f} found "
                   f"({100 * hold['loss_opt_rel_err']:+.2f}%, target 3%)")
    f = iso.get("frontier")
    if f:
        a3, ok = f["approach3"], f["agreement"]
        out.append(f"  - Approach 3 (the Chinchilla law, E bounded to [0, {a3['E_bounds'][1]:.4g}]): a = {a3['a']:.3f}"
                   f"{_ci(a3.get('a_ci95'))}, {a3['tokens_per_param']:.3g} tokens per parameter, E = {a3['E']:.4g}; "
                   f"|a2 - a3| = {ok['a_diff']:.3f}, ratio x{ok['ratio']:.2f}; the frontier used: "
                   f"{f['use'].replace('approach', 'Approach ')} ({f['why']})")
    p = _load(results_dir / "plan" / iso_sweep / "plan.json")
    if p:
        pf, c = p.get("frontier") or {}, p["chinchilla"]
        out.append(f"  - plan (`scaling-plan constants=<this fit>`): Chinchilla-style N {c['N']:.3g}, "
                   f"{pf.get('tokens_per_param', c['D'] / c['N']):.3g}{_ci(pf.get('tokens_per_param_ci95'))} tokens "
                   f"per parameter (N counted as {pf.get('n_convention')}, frontier from {pf.get('source')})")
    return out


def sweep_lines(results_dir: Path, sweep: str) -> list[str]:
    t = load_table(results_dir, sweep)
    ok = t[t.status == "ok"]
    if ok.empty:
        return [f"- no finished runs in `{results_dir}/{sweep}`: run `make demo`"]
    recs = [r for r in iter_records(results_dir, sweep) if r.get("status") == "ok"]
    classes = _groups_of_equal_size(ok.params_non_embedding.to_numpy(float), np.ones(len(ok)), 0.1)
    sizes = {}
    for label, r in zip(classes, ok.itertuples()):
        sizes.setdefault(label.split(",")[0], set()).add(round(r.aspect_ratio, 2))
    n, d = ok.params_non_embedding, ok.tokens_seen
    spent = sum((r["flops"].get("spent") or r["flops"]["total"]) for r in recs)
    cosine = sum(r["flops"]["total"] for r in recs)
    train_s = float(ok.train_s.sum())
    wall = sum((r.get("timing") or {}).get("wall_s") or 0 for r in recs)
    ev = recs[0]["loss"].get("eval") or {}
    stderr = ok.loss_stderr.dropna()
    shapes = ok.groupby(["n_layers", "d_model"]).ngroups
    lines = [
        f"- **Sweep**: {len(ok)} runs ({shapes} shapes x their budgets, {int((ok.seed != 0).sum())} runs of a second "
        f"seed), corpus `{ok.corpus.iloc[0]}` ({ok.tokenizer.iloc[0]}); N (non-embedding) {n.min():,.0f} to "
        f"{n.max():,.0f} ({n.max() / n.min():.1f}x), D {d.min():,.0f} to {d.max():,.0f} tokens "
        f"({d.max() / d.min():.1f}x), {(d / n).min():.2g} to {(d / n).max():.2g} tokens per parameter.",
        "- **Shapes**: " + "; ".join(f"{k}: {len(v)} aspect ratios ({', '.join(f'{x:g}' for x in sorted(v))})"
                                     for k, v in sorted(sizes.items(), key=lambda kv: float(kv[0][2:]))) + ".",
        f"- **Schedule**: {', '.join(sorted(set(ok.schedule.fillna('cosine'))))}; training FLOPs spent {spent:.3g} vs "
        f"{cosine:.3g} for one cosine run per point ({100 * (1 - spent / cosine):.0f}% saved by the decay branches).",
        f"- **Held-out slice**: {ev.get('windows', '?')} windows, {ev.get('tokens', 0):,} tokens, "
        f"{ev.get('bytes', 0):,} bytes from {ev.get('documents', '?')} of {ev.get('documents_total', '?')} held-out "
        f"documents; standard error of a run's loss {stderr.min():.4f}-{stderr.max():.4f} nats "
        f"({100 * (stderr / ok.loss).median():.2f}% median, and the same tokens for every run).",
        f"- **Time**: training summed over runs {train_s / 60:.1f} min (records' `timing.train_s`); run wall time "
        f"summed {wall / 60:.1f} min (2 runs in parallel).",
    ]
    return lines


def fit_lines(fit: dict | None, law: str) -> list[str]:
    if fit is None:
        return ["- no fit.json: run `scaling-fit sweep=demo ...` (see the Makefile's demo target)"]
    rows = fit["provenance"]["rows"]
    out = [f"- **Fit** ({fit['provenance'].get('protocol')} protocol, N {fit['provenance'].get('n_convention')}, "
           f"{rows['fit']} fit rows, held out: the largest size class, {rows['heldout']} runs):"]
    choice = fit.get("protocol_selection") or {}
    if choice.get("best_law"):
        out.append(f"  - the law the fit chose (from the fit rows alone, `validation.law_rule="
                   f"{choice['rule'].get('law_rule', 'best')}`): `{choice['best_law']}`, {choice.get('best_law_why')}")
    for name, entry in fit["laws"].items():
        m = entry["metrics"]
        pi = m.get("heldout_in_pi95")
        flag = "".join([" (chosen by the fit)" if name == choice.get("best_law") else "",
                        " (the law the selection uses)" if name == law else ""])
        out.append(f"  - `{name}`{flag}: held-out max relative error {100 * m['max_rel_err_heldout']:.2f}%, mean "
                   f"{100 * m['mean_rel_err_heldout']:.2f}% (targets 4% / 2%); R^2 held-out {m['r2_heldout']:.3f}; "
                   + (f"{100 * pi:.0f}% of the held-out runs inside the 95% prediction interval" if pi is not None
                      else "no prediction interval"))
        params = ", ".join(f"{p}={v:.4g}" for p, v in entry["params"].items())
        out.append(f"    parameters: {params}")
        for p, why in (entry.get("not_identified_why") or {}).items():
            out.append(f"    - `{p}` not identified: {why}")
    s = fit.get("seed_spread") or {}
    if s.get("points"):
        out.append(f"- **Seed-to-seed spread** (the noise floor, {s['points']} points trained with 2 seeds): mean "
                   f"{100 * s['mean_rel']:.2f}%, max {100 * s['max_rel']:.2f}% of the loss")
    return out


def verify_lines(results_dir: Path, sweep: str) -> list[str]:
    v = _load(results_dir / "verify" / sweep / "verification.json")
    if v is None:
        return ["- no verification.json: run `scaling-verify sweep=demo ...`"]
    out = [f"- **Verification** at N {v['target_N']:.3g}, D {v['tokens']:,}:"]
    for label, m in v["models"].items():
        err = m["loss_measured"] / m["loss_predicted"] - 1
        out.append(f"  - {label}: n_layers={m['n_layers']} d_model={m['d_model']} (R {m['R']:.3g}): predicted "
                   f"{m['loss_predicted']:.4f}, measured {m['loss_measured']:.4f} ({100 * err:+.2f}%; target 3%)")
    sel = _load(results_dir / "verify" / sweep / "selection" / "selection.json") or {}
    out.append("  - selected depth: " + (sel.get("depth_edge") or "inside the enumerated range, not at its edge"))
    if sel.get("R_edge"):
        out.append(f"  - selected aspect ratio: {sel['R_edge']}")
    c = v["claim"]
    if not c["same_shape"]:
        out.append(f"  - Morph claim (faster at nearly equal loss): {'held' if c['held'] else 'not held'} "
                   f"({c['speedup_measured']:.2f}x faster, loss x{c['loss_ratio_measured']:.4f})")
    return out


def plan_lines(results_dir: Path, sweep: str) -> list[str]:
    p = _load(results_dir / "plan" / sweep / "plan.json")
    if p is None:
        return ["- no plan.json: run `scaling-plan constants=... out=...`"]
    c, o = p["chinchilla"], p["optimal"]
    warn = p["constants"].get("not_identified")
    law = (p["constants"].get("provenance") or {}).get("sweep") or p["constants"].get("preset")
    return [f"- **Plan** on the law of `{law}` (`constants=`): Chinchilla-style N {c['N']:.3g}, D {c['D']:.3g} = "
            f"{c['D'] / c['N']:.3g} tokens per parameter; the demand-aware optimum N {o['N']:.3g}, D {o['D']:.3g} "
            f"({o['D'] / o['N']:.3g} tokens per parameter)"
            + (f"; not identified by the bootstrap: {warn}" if warn else "")
            + ("; it extrapolates the law: " + "; ".join(p["extrapolation"]) if p.get("extrapolation") else "")]


def serving_lines(results_dir: Path, sweep: str, fit: dict | None) -> list[str]:
    """Quantization, speculative decoding, the latency law's held-out errors and the plan's serving mode."""
    out = []
    q = _load(results_dir / "serving" / sweep / "quantization.json")
    if q is None:
        out.append(f"- no quantization.json: run `scaling-quantize sweep={sweep}`")
    else:
        rows = q["rows"]
        parts = []
        for mode in q["modes"]:
            r = [x for x in rows if x["mode"] == mode]
            full = [x for x in r if not x["layers_skipped"]]
            deltas = np.array([x["loss_delta"] for x in r])
            parts.append(f"{mode}: loss {deltas.mean():+.5f} nats on average (max {deltas.max():+.5f}), weight bytes "
                         f"x{np.median([x['bytes_ratio'] for x in r]):.2f}, decode "
                         f"x{np.median([x['decode_speedup'] for x in r]):.2f} as fast as fp32 (medians; "
                         f"{len(full)} of {len(r)} runs fully quantized)")
            pen = (q.get("penalty") or {}).get(mode) or {}
            if pen.get("fitted"):
                a, b = pen["params"]["a"], pen["params"]["b"]
                parts[-1] += (f"; penalty law a {a:.2f} [{pen['ci95']['a'][0]:.2f}, {pen['ci95']['a'][1]:.2f}], "
                              f"b {b:.2f} [{pen['ci95']['b'][0]:.2f}, {pen['ci95']['b'][1]:.2f}]"
                              + (f", not identified: {pen['not_identified']}" if pen.get("not_identified") else ""))
        out.append(f"- **Quantization** ({len({x['run_id'] for x in rows})} runs, `scaling-quantize`): "
                   + "; ".join(parts) + ".")
    s = _load(results_dir / "serving" / sweep / "speculative.json")
    if s is not None and s.get("best"):
        b = max(s["best"], key=lambda x: x["speedup_measured"])
        out.append(f"- **Speculative decoding** (`scaling-speculate`): best measured {b['speedup_measured']:.2f}x "
                   f"(draft {b['draft_run_id']} -> target {b['target_run_id']}, {b['mode']}, k={b['k']}, acceptance "
                   f"{b['acceptance_rate']:.2f}, draft/target cost {b['cost_ratio']:.2f}).")
    latency = (fit or {}).get("latency") or {}
    held = latency.get("heldout") or {}
    if held:
        def errors(h):
            return (f"{100 * h['loso_mape']:.1f}% / {100 * h['largest_mape']:.1f}% (max "
                    f"{100 * h['largest_max_ape']:.1f}%)")
        out.append(f"- **Latency law** (`scaling-latency`, {latency.get('shapes', {}).get('count')} shapes, the "
                   f"{latency.get('aggregate', 'median')} of {latency.get('rounds', 1)} rounds; leave-one-shape-out "
                   f"MAPE / the largest quarter of the shapes predicted from the rest, target 15%): " + "; ".join(
                       f"{m} decode {errors(h['decode_ms_per_token'])}, prefill {errors(h['prefill_ms'])}"
                       for m, h in held.items()
                       if all((h.get(q) or {}).get("largest_mape") is not None
                              for q in ("decode_ms_per_token", "prefill_ms"))) + ".")
    p = _load(results_dir / "plan" / sweep / "plan.json")
    modes = (p or {}).get("serving_modes") or {}
    if modes.get("modes"):
        chosen = modes.get("chosen")
        out.append(f"- **Serving mode chosen by the plan** (`scaling-plan serving.mode={modes.get('requested')}`): "
                   f"{chosen}; total cost vs full precision " + ", ".join(
                       f"{m} {100 * v['cost_vs_none']:.1f}%" for m, v in modes["modes"].items()) + ".")
    return out


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    results_dir = Path(args.get("results_dir", "results"))
    sweep, law = args.get("sweep", "demo"), args.get("law", "inference_efficient")
    iso_sweep = args.get("iso", "demo_isoflop")
    lines = ["### What the demo runs and finds", "",
             "_Generated by `make findings` (`scripts/demo_findings.py results_dir=<DEMO_DIR>`) from the demo's outputs._", ""]
    lines += frontier_lines(results_dir, iso_sweep)
    lines += sweep_lines(results_dir, sweep)
    fit = _load(results_dir / "fit" / sweep / "fit.json")
    lines += fit_lines(fit, law)
    lines += verify_lines(results_dir, sweep)
    lines += plan_lines(results_dir, sweep)
    lines += serving_lines(results_dir, sweep, fit)
    bench = _load(results_dir / "bench_wsd" / "bench_wsd.json")
    if bench:
        lines.append(f"- **WSD vs cosine** (`make bench-wsd`, {bench['points']} points): WSD minus cosine loss "
                     f"{100 * bench['mean_rel_diff']:+.2f}% on average (largest |difference| "
                     f"{100 * bench['max_abs_rel_diff']:.2f}%), {100 * bench['saved']:.0f}% of the training FLOPs saved")
    scan = results_dir / "lr_scan" / "lr_scan.md"
    if scan.is_file():
        lines += ["", "LR scan (`make lr-scan`):", "", scan.read_text().strip()]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
