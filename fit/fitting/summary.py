"""The printed report: per law its parameters with intervals and fit diagnostics, then the laws side by side."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from scaling_lab.fit.fitting.fitlaw import LawFit


def _num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def law_block(name: str, f: LawFit) -> str:
    r = f.result
    if r.n_starts > 1:
        how = (f"{r.n_best} of {r.n_refined} refined starts reached the best objective (screened {r.n_starts}"
               + (f" of a grid of {r.n_grid}, subsampled" if r.n_grid > r.n_starts else "") + ")"
               if r.n_refined < r.n_starts else f"{r.n_best} of {r.n_starts} starts reached the best objective"
               + (f" (grid of {r.n_grid} subsampled)" if r.n_grid > r.n_starts else ""))
    else:
        how = "converged" if r.converged else f"NOT converged: {r.message}"
    boot = f"; bootstrap {f.n_boot}" + (f" ({f.n_boot_failed} failed)" if f.n_boot_failed else "")
    if f.boot_info and f.n_boot:
        boot += f" over {f.boot_info['resampled']}, {f.boot_info['seconds']:.1f} s"
    lines = [f"== {name}: {f.spec.law.formula}",
             f"   protocol {f.protocol.get('name')} ({f.protocol.get('method')}); ties: {f.ties}; "
             f"N: {f.n_convention}; objective {r.objective:.6g}; {how}; fit {r.seconds:.2f} s{boot}"]
    if r.warning:
        lines.append(f"   WARNING: not converged: {r.warning}")
    if "fell back" in r.message:
        lines.append(f"   note: {r.message}")
    lines += [
             f"   {'param':<10}{'estimate':>12}   {'95% interval':<26}"]
    for p in f.spec.law.params:
        lo, hi = f.constants.ci95.get(p, (np.nan, np.nan))
        flag = f"  <- not identified: {f.not_identified[p]}" if p in f.not_identified else ""
        lines.append(f"   {p:<10}{_num(f.constants[p], 5):>12}   [{_num(lo)}, {_num(hi)}]".ljust(52) + flag)
    if f.compute_optimal:
        c = f.compute_optimal
        ci = lambda k: f" [{_num(c[k + '_ci95'][0], 3)}, {_num(c[k + '_ci95'][1], 3)}]" if k + "_ci95" in c else ""
        lines.append(f"   compute-optimal: N_opt ~ C^{_num(c['a'], 3)}{ci('a')}, D_opt ~ C^{_num(c['b'], 3)}{ci('b')}")
        for j, budget in enumerate(c["budgets"]):
            lines.append(f"     C={budget:.0e}: N_opt={_num(c['N_opt'][j], 3)} D_opt={_num(c['D_opt'][j], 3)}")
    return "\n".join(lines)


def comparison(fits: Mapping[str, LawFit]) -> str:
    names = list(fits)
    keys = [("mse", "MSE (all rows)"), ("r2", "R^2 (all rows)"), ("mse_heldout", "MSE (held-out)"),
            ("r2_heldout", "R^2 (held-out)"), ("mean_rel_err_heldout", "mean rel err (held-out)"),
            ("max_rel_err_heldout", "max rel err (held-out)"),
            ("heldout_in_pi95", "held-out in 95% PI")]
    width = max(14, *(len(n) + 2 for n in names))
    first = next(iter(fits.values())).metrics
    lines = [f"== comparison ({first['n_rows']} rows, {first['n_heldout']} held-out)",
             f"   {'metric':<26}" + "".join(f"{n:>{width}}" for n in names)]
    for key, label in keys:
        lines.append(f"   {label:<26}" + "".join(f"{_num(fits[n].metrics[key], 4):>{width}}" for n in names))
    groups = sorted({g for f in fits.values() for g in f.metrics["spearman"]})
    if len(groups) <= 12:
        for g in groups:
            cells = "".join(f"{_num(fits[n].metrics['spearman'].get(g), 3):>{width}}" for n in names)
            lines.append(f"   {'Spearman ' + g:<26}" + cells)
    elif groups:
        for label, reduce in (("mean", np.mean), ("min", np.min)):
            cells = ""
            for n in names:
                rhos = [v for v in fits[n].metrics["spearman"].values() if v is not None]
                cells += f"{_num(float(reduce(rhos)) if rhos else None, 3):>{width}}"
            lines.append(f"   {f'Spearman {label} ({len(groups)} groups)':<26}" + cells)
    return "\n".join(lines)


def _interval(values, digits: int = 3) -> str:
    return f" [{_num(values[0], digits)}, {_num(values[1], digits)}]" if values else ""


def isoflop_block(iso: Mapping[str, Any], reported: Mapping[str, Any]) -> str:
    rep = lambda k: f"   (source reports {reported[k]})" if reported.get(k) is not None else ""
    lines = [f"== isoFLOP profiles (Approach 2): {iso['budgets_used']} budgets used",
             f"   N_opt ~ C^a: a = {_num(iso['a'], 4)}{_interval(iso.get('a_ci95'))}{rep('a')}",
             f"   D_opt ~ C^b: b = {_num(iso['b'], 4)}{_interval(iso.get('b_ci95'))}{rep('b')}",
             *([f"   {iso['boot_note']}"] if iso.get("boot_note") else []),
             f"   {'budget':>9} {'N_opt':>9} {'95% interval':>21} {'D_opt':>9} {'best loss':>9} "
             f"{'D/N':>8} {'95% interval':>19}"]
    for r in iso["optima"]:
        if r["note"]:
            lines.append(f"   {r['budget']:>9.3g} dropped: {r['note']}")
            continue
        lines.append(f"   {r['budget']:>9.3g} {_num(r['N_opt'], 3):>9}{_interval(r.get('N_opt_ci95')):>22} "
                     f"{_num(r['D_opt'], 3):>9} {_num(r['loss_opt'], 4):>9} {_num(r['tokens_per_param'], 3):>8}"
                     f"{_interval(r.get('tokens_per_param_ci95')):>20}")
    hold = iso.get("holdout")
    if hold and hold.get("note"):
        lines.append(f"   the held-out budget {hold['budget']:.3g} has no interior minimum ({hold['note']}): its "
                     "optimum cannot be compared with the prediction")
    elif hold:
        held = "held-out budget" if hold.get("held_out") else "largest budget"
        lines.append(f"   the {held} ({hold['budget']:.3g}) from the other {hold['fitted_budgets']}: N_opt "
                     f"{_num(hold['N_opt_predicted'], 3)} predicted, {_num(hold['N_opt'], 3)} found "
                     f"(x{hold['N_opt_ratio']:.2f}); best loss {_num(hold['loss_opt_predicted'], 4)} predicted, "
                     f"{_num(hold['loss_opt'], 4)} found ({100 * hold['loss_opt_rel_err']:+.2f}%)")
    for name, conv in (iso.get("middle") or {}).get("conventions", {}).items():
        lines.append(f"   tokens per parameter at the middle budget, N counted as {name}: "
                     f"{_num(conv['tokens_per_param'], 3)}")
    return "\n".join(lines)


def frontier_block(frontier: Mapping[str, Any]) -> str:
    a2, a3, ok = frontier["approach2"], frontier["approach3"], frontier["agreement"]
    lines = [f"== the frontier: Approach 2 beside Approach 3 (at the middle budget {a2['middle']['budget']:.3g})",
             f"   Approach 2: a = {_num(a2['a'], 3)}{_interval(a2.get('a_ci95'))}, tokens per parameter "
             f"{_num(a2['middle']['tokens_per_param'], 3)}{_interval(a2['middle'].get('tokens_per_param_ci95'))}",
             f"   Approach 3: a = {_num(a3['a'], 3)}{_interval(a3.get('a_ci95'))}, tokens per parameter "
             f"{_num(a3['tokens_per_param'], 3)}, E = {_num(a3['E'], 4)} (bounded to [0, {_num(a3['E_bounds'][1], 4)}])"]
    if a3.get("profile_E"):
        lines.append(f"   along E's profile (E in {_interval(a3['profile_E'], 3).strip()} fits as well): a in "
                     f"{_interval(a3['profile_a']).strip()}, tokens per parameter in "
                     f"{_interval(a3['profile_tokens_per_param']).strip()}")
    lines.append(f"   agreement: |a2 - a3| = {ok['a_diff']:.3f} ({'<' if ok['a_agree'] else '>='} 0.1), tokens per "
                 f"parameter x{ok['ratio']:.2f} ({'within' if ok['ratio_agree'] else 'outside'} 0.7-1.4)"
                 + (f", intervals of a {'overlap' if ok['intervals_overlap'] else 'do not overlap'}"
                    if "intervals_overlap" in ok else ""))
    lines.append(f"   the frontier to use: {frontier['use'].replace('approach', 'Approach ')} ({frontier['why']})")
    return "\n".join(lines)
