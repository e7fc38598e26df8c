"""``scaling-fit``: fit the configured laws to a sweep or a CSV, print how far each can be trusted, write fit.json.

    scaling-fit sweep=demo results_dir=results out=results/fit/demo
    scaling-fit source=csv source.path=runs.csv source.columns.N=params source.columns.D=tokens protocol=bian2025

``run(cfg)`` does the work (tests call it with a composed config); ``main`` is the Hydra entry point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from scaling_lab.fit import tracking
from scaling_lab.fit.fitting import approaches, choose, export, isoflop, noise, summary
from scaling_lab.conf import compose
from scaling_lab.fit.fitting.fitlaw import BootstrapSettings, compile_law, fit_law
from scaling_lab.fit.fitting.optimize import METHODS
from scaling_lab.fit.laws.spec import load_laws
from scaling_lab.fit.report import figures
from scaling_lab.fit.fitting.sources import FitInputError, load, with_n_convention


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)


# Numeric options and their ranges (inclusive); a value outside is a one-line error before any fitting.
RANGES = {"bootstrap.n": (0, None), "isoflop.min_points": (3, None), "isoflop.budget_rtol": (0, 1),
          "isoflop.n_bootstrap": (0, None), "isoflop.window": (1.5, None), "protocol.max_starts": (1, None),
          "protocol.max_iter": (1, None)}


def check_ranges(cfg: DictConfig) -> None:
    for key, (lo, hi) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise FitInputError(f"{key}={value} is out of range: it must be {bound}")
    budgets = OmegaConf.select(cfg, "allocation.budgets", default=None) or []
    if any(not b > 0 for b in budgets):
        raise FitInputError(f"allocation.budgets must be positive FLOPs, got {list(budgets)}")


def run(cfg: DictConfig) -> dict:
    """Fit every selected law; returns the fit.json document (also written to ``cfg.out``)."""
    check_ranges(cfg)
    protocol = _plain(cfg.protocol)
    if protocol.get("method") not in (*METHODS, "auto"):
        raise FitInputError(f"unknown protocol method {protocol.get('method')!r} ({', '.join(METHODS)} or auto)")
    protocol = OmegaConf.create(protocol)
    try:
        specs = load_laws(_plain(cfg.law))
    except ValueError as err:
        raise FitInputError(str(err)) from None
    table = load(_plain(cfg.source))
    n_fit = int(table.data["fit"].sum())

    # Every check before any fitting: which laws the data can feed, and with enough rows.
    models, skipped = {}, {}
    for name, spec in specs.items():
        missing = [x for x in spec.law.inputs if not table.has(x)]
        if missing:
            hint = ""
            if "R" in missing:
                hint = table.provenance.get("R_dropped") or \
                    "R = d_model / n_layers: set source.columns.d_model and n_layers, or source.columns.R"
                hint = f" ({hint})"
            skipped[name] = f"needs input(s) {missing} the data lacks{hint}"
            print(f"skipping law {name}: {skipped[name]}")
            continue
        # an input that never varies leaves its exponent free: the fit would print a tight interval on nothing
        constant = {x: table.fit_rows[x].iloc[0] for x in spec.law.inputs if np.ptp(table.fit_rows[x]) == 0}
        if constant:
            values = ", ".join(f"{x}={v:g}" for x, v in constant.items())
            skipped[name] = (f"{values} in all {n_fit} fit rows: the effect of a constant input cannot be fitted "
                             "(vary it, or fit a law without it)")
            print(f"skipping law {name}: {skipped[name]}")
            continue
        models[name] = compile_law(spec, protocol)
        if n_fit < models[name].n_free:
            raise FitInputError(f"law {name} has {models[name].n_free} free parameters but only {n_fit} fit rows"
                                + (" (fit fewer laws, e.g. law=chinchilla)" if len(specs) > 1 else ""))
    if not models:
        raise FitInputError("no selected law can be fitted to this data: " + "; ".join(skipped.values()))
    do_isoflop = cfg.isoflop.enabled is True or (cfg.isoflop.enabled == "auto" and "budget" in table.data)
    if do_isoflop and "budget" not in table.data:
        raise FitInputError("isoflop.enabled=true needs source.columns.budget (each row's isoFLOP budget)")

    prov = table.provenance
    print(f"data: {prov['rows']['total']} rows ({prov['rows']['fit']} fit, {prov['rows']['heldout']} held-out)"
          + (f", {prov['rows']['excluded_failed']} failed runs excluded" if "excluded_failed" in prov["rows"] else "")
          + f"; N convention: {prov['n_convention']}; protocol: {protocol.name}"
          + "".join(f"\n      corpus {k}: {v} runs" for k, v in (prov.get("corpora") or {}).items()))

    budgets = list(cfg.allocation.budgets)
    boot = BootstrapSettings.from_config(_plain(cfg.bootstrap))
    selection = None
    if protocol.method == "auto":
        choices, selection = choose.choose({name: specs[name] for name in models}, table, protocol)
        print(choose.table_text(selection))
        fits = {name: fit_law(compile_law(specs[name], c.protocol), with_n_convention(table, c.n_convention),
                              c.protocol, boot, budgets=budgets) for name, c in choices.items()}
    else:
        fits = {name: fit_law(model, table, protocol, boot, budgets=budgets) for name, model in models.items()}
    for name, f in fits.items():
        print(summary.law_block(name, f))
    print(summary.comparison(fits))
    spread = noise.seed_spread(table)
    print(noise.block(spread, fits))

    iso = None
    if do_isoflop:
        snapped = table.data[["N", "D", "loss", "budget"]].assign(budget=isoflop.snap_budgets(
            table.data["budget"].to_numpy(), float(cfg.isoflop.budget_rtol)))
        points, heldout = snapped[table.data["fit"]], snapped[table.data["heldout"] & ~table.data["fit"]]
        iso = isoflop.analyse(points, int(cfg.isoflop.min_points), int(cfg.isoflop.n_bootstrap),
                              int(cfg.bootstrap.seed), heldout=heldout, window=cfg.isoflop.window)
        if iso.get("middle"):
            # tokens per parameter with N counted each way the data allows, and FLOPs-equivalent (6N = the
            # FLOPs per token each point trained at, budget / D)
            counts = {c.split("@", 1)[1]: c for c in table.fit_rows.columns if c.startswith("N@")}
            counted = table.fit_rows[list(counts.values())].assign(
                N=points["N"], **{"N@flops": points["budget"] / points["D"] / 6.0})
            iso["middle"]["conventions"] = isoflop.tokens_per_param(
                iso["middle"]["N_opt"], iso["middle"]["D_opt"], counted, {**counts, "flops_equivalent": "N@flops"})
        iso["reported"] = {"a": cfg.isoflop.reported_a, "b": cfg.isoflop.reported_b}
        print(summary.isoflop_block(iso, iso["reported"]))
        name = next((name for name in fits if specs[name].compute_optimal), None)
        if name is not None and iso.get("middle"):
            # Approach 3 as the law was fitted: its protocol, and its N convention (the one protocol=auto chose)
            law_protocol, law_table = protocol, table
            if selection is not None:
                law_protocol = choices[name].protocol
                law_table = with_n_convention(table, choices[name].n_convention)
            if law_table is table:
                iso["frontier"] = approaches.compare(iso, fits[name], law_table, law_protocol, points,
                                                     int(cfg.isoflop.e_profile))
                print(summary.frontier_block(iso["frontier"]))
            else:
                print(f"   Approach 3 not compared: law {name} counts N as {choices[name].n_convention}, the "
                      f"isoFLOP profiles as {table.provenance.get('n_convention')}")

    doc = export.document(table, fits, _plain(cfg.protocol), skipped, iso, int(cfg.bootstrap.seed), selection)
    doc["seed_spread"] = spread
    path = export.write(cfg.out, doc, table, fits)
    if cfg.plots:
        figures.draw_fit(doc, Path(cfg.out))
    print(f"wrote {path}")
    tracking.log_fit(cfg, doc, cfg.out)
    return doc


def fit_sweep(sweep: str, results_dir: str | Path, out: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    """Fit our own sweep from Python (e.g. a demo script): ``scaling-fit sweep=<sweep>
    results_dir=<dir> out=<dir>`` without the command line."""
    
    cfg = compose("fit", ["source=results", f"sweep={sweep}",
                                                f"results_dir={results_dir}", f"out={out}", *overrides])
    return run(cfg)
