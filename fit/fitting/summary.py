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


def isoflop_block(iso: Mapping[str, Any], reported: Mapping[str, Any]) -> str:
    ci = lambda k: f" [{_num(iso[k + '_ci95'][0], 3)}, {_num(iso[k + '_ci95'][1], 3)}]" if k + "_ci95" in iso else ""
    rep = lambda k: f"   (source reports {reported[k]})" if reported.get(k) is not None else ""
    lines = [f"== isoFLOP profiles (Approach 2): {iso['budgets_used']} budgets used",
             f"   N_opt ~ C^a: a = {_num(iso['a'], 4)}{ci('a')}{rep('a')}",
             f"   D_opt ~ C^b: b = {_num(iso['b'], 4)}{ci('b')}{rep('b')}"]
    for budget, note in iso["budgets_dropped"].items():
        lines.append(f"   budget {budget} dropped: {note}")
    return "\n".join(lines)
