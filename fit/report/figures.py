"""Every figure of ``scaling-fit`` and ``scaling-report`` (static PNG, one style). The fit's figures (loss vs N per
token budget with each law, predicted vs actual, residuals, loss vs aspect ratio, isoFLOP profiles) read rows in
the fit's column names and a fit.json document: ``scaling-fit`` draws them over its predictions.csv (``draw_fit``),
the report over the sweep's runs (``draw_all``, which adds the report's own figures, each reading a
:class:`~scaling_lab.fit.report.data.Study`). Every figure writes one file, or nothing when its input is absent.
Axes carry units, quantities spanning decades are on log scales with plain tick labels (20, 3k, 1M, 1e18 rather
than 2e+01), and legends sit outside the data. matplotlib is imported when a figure is drawn, not with the module."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from scaling_lab.fit.laws.law import LawConstants

STYLE = {
    "figure.figsize": (7.2, 4.6), "figure.dpi": 110, "savefig.dpi": 130, "savefig.bbox": "tight",
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8, "legend.frameon": False,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.spines.top": False,
    "axes.spines.right": False, "lines.linewidth": 1.6, "lines.markersize": 5,
    "axes.prop_cycle": None,  # set below from PALETTE
}
# Okabe-Ito: distinguishable for colour-blind readers, the same order in every figure.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    return plt, cycler


@contextmanager
def style():
    plt, cycler = _plt()
    with plt.rc_context({**{k: v for k, v in STYLE.items() if v is not None},
                         "axes.prop_cycle": cycler(color=PALETTE)}):
        yield plt


def human(x: float, _pos=None) -> str:
    """A tick label people read: 20, 0.5, 3k, 12M, 1.5B (counts of parameters or tokens)."""
    if x == 0 or not np.isfinite(x):
        return "0"
    a = abs(x)
    if a < 1e-3 or a >= 1e15:
        return exponent(x)
    if a < 1e4:
        return f"{int(round(x))}" if a >= 1 and abs(x - round(x)) < 1e-9 else f"{x:.3g}"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def exponent(x: float, _pos=None) -> str:
    """A tick label for quantities counted in powers of ten (FLOPs): 1e18, 3e20."""
    if x == 0 or not np.isfinite(x):
        return "0"
    exp = int(np.floor(np.log10(abs(x)) + 1e-9))
    mant = x / 10 ** exp
    return f"1e{exp}" if abs(mant - 1) < 1e-6 else f"{mant:.2g}e{exp}"


def log_axis(ax, which: str = "x", labels=None) -> None:
    """A log axis with plain labels at the decades (and at 2 and 5 when it spans less than two decades)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    lo, hi = (ax.get_xlim() if which == "x" else ax.get_ylim())
    span = np.log10(hi / lo) if lo > 0 and hi > lo else 3
    subs = (1.0, 2.0, 5.0) if span < 2 else (1.0, 3.0) if span < 4 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(labels or human))
    axis.set_minor_formatter(NullFormatter())


def plain_axis(ax, which: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter

    (ax.yaxis if which == "y" else ax.xaxis).set_major_formatter(FuncFormatter(human))


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path)
    plt.close(fig)
    return path


def _legend_outside(ax, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _shape_label(r) -> str:
    return f"L{int(r.n_layers)} d{int(r.d_model)} (N {human(r.params_non_embedding)})"


# ----- the report's own figures -----------------------------------------------------------------------------

def grid(study, path: Path) -> Path | None:
    """The sweep's grid: every point at (N, D), coloured by held-out loss, failed or unfinished points marked."""
    t = study.table
    with style() as plt:
        fig, ax = plt.subplots()
        ok = t[t.status == "ok"]
        sc = ax.scatter(ok.params_non_embedding, ok.tokens_budget, c=ok.loss, cmap="viridis", s=60,
                        edgecolor="k", linewidth=0.5, label="done (colour: loss)", zorder=3)
        for _, sub in ok.groupby("group"):  # one label per size class and budget: its shapes, deepest first
            top = sub.loc[sub.tokens_budget.idxmax()]
            shapes = ", ".join(f"L{int(r.n_layers)} R{r.aspect_ratio:.3g}"
                               for r in sub.sort_values("n_layers", ascending=False).itertuples())
            ax.annotate(shapes, (top.params_non_embedding, top.tokens_budget), textcoords="offset points",
                        xytext=(0, 10), fontsize=7, ha="center")
        bad = t[t.status != "ok"]
        if len(bad):
            ax.scatter(bad.params_non_embedding, bad.tokens_budget, marker="x", color=PALETTE[3], s=60,
                       label="failed", zorder=4)
        pending = [p for p in study.planned if p["run_id"] not in set(t.run_id) and p.get("N")]
        for state, marker in (("running", ">"), ("interrupted", "s"), ("pending", "o")):
            pts = [p for p in pending if p["state"] == state]
            if pts:
                ax.scatter([p["N"] for p in pts], [p["D"] for p in pts], marker=marker, facecolor="none",
                           edgecolor="0.4", s=60, label=state)
        fig.colorbar(sc, ax=ax, label="held-out loss (nats/token)", pad=0.02)
        ax.set(xlabel="N, non-embedding parameters", ylabel="D, training tokens",
               title=f"Sweep grid: {len(t)} recorded points")
        ax.margins(0.25)
        log_axis(ax, "x"), log_axis(ax, "y")
        ax.legend(loc="lower right")
        return _save(plt, fig, path)


def curves(study, path: Path) -> Path | None:
    """Training loss (line) and validation loss (markers) against training tokens, one colour per run."""
    runs = [r for r in study.records if r.get("status") == "ok" and (r.get("loss") or {}).get("curve")]
    if not runs:
        return None
    runs.sort(key=lambda r: (r["params"]["non_embedding"], r["shape"]["aspect_ratio"]))
    with style() as plt:
        fig, ax = plt.subplots(figsize=(8.2, 4.8))
        for i, r in enumerate(runs):
            color = PALETTE[i % len(PALETTE)]
            s = r["shape"]
            label = f"L{s['n_layers']} d{s['d_model']}, N {human(r['params']['non_embedding'])}"
            train = np.array(r["loss"].get("train_curve") or [], dtype=float)
            if len(train):
                ax.plot(train[:, 0], train[:, 1], color=color, alpha=0.55, lw=1.1)
            val = np.array(r["loss"]["curve"], dtype=float)
            ax.plot(val[:, 0], val[:, 1], "o-", color=color, ms=4, lw=1.4, label=label)
        ax.plot([], [], color="0.4", alpha=0.55, lw=1.1, label="training loss")
        ax.plot([], [], "o-", color="0.4", ms=4, label="validation loss")
        ax.set(xlabel="training tokens seen", ylabel="loss (nats/token)", title="Training and validation curves")
        log_axis(ax, "x")
        _legend_outside(ax, "run")
        return _save(plt, fig, path)


def frontier(study, path: Path) -> Path | None:
    """The compute-optimal frontier N_opt(C) of our Chinchilla fit with its 95% band, beside the published
    constants' frontiers, the isoFLOP minima (when the sweep is an isoFLOP grid) and the sweep's own runs."""
    from scaling_lab.fit.laws.chinchilla import frontier as closed_form

    law = (study.fit or {}).get("laws", {}).get("chinchilla")
    if not law or not law.get("compute_optimal"):
        return None
    c = law["compute_optimal"]
    ok = study.ok
    run_c = 6 * ok.params_non_embedding * ok.tokens_seen
    budgets = np.geomspace(min(float(run_c.min()), c["budgets"][0]) / 3, max(c["budgets"]) * 3, 60)
    with style() as plt:
        fig, ax = plt.subplots()
        ours = closed_form(law["params"], budgets)
        ax.plot(budgets, ours["N_opt"], color=PALETTE[0], lw=2, label="ours (Chinchilla law fitted here)")
        if c.get("N_opt_ci95"):
            lo, hi = np.asarray(c["N_opt_ci95"], dtype=float)
            ax.fill_between(c["budgets"], lo, hi, color=PALETTE[0], alpha=0.2, lw=0,
                            label="ours, bootstrap 95% band")
        ax.plot(c["budgets"], c["N_opt"], "o", color=PALETTE[0], ms=4)
        names = {"hoffmann2022": "Hoffmann et al. 2022", "epoch2024": "Epoch AI 2024"}
        for i, (key, label) in enumerate(names.items()):
            if key in study.presets:
                pub = closed_form(study.presets[key], budgets)
                ax.plot(budgets, pub["N_opt"], ["--", ":"][i], color=PALETTE[1 + i], label=label)
        iso = (study.fit or {}).get("isoflop")
        if iso and iso.get("optima"):
            pts = [(o["budget"], o["N_opt"]) for o in iso["optima"] if o.get("N_opt")]
            if pts:
                ax.plot(*zip(*pts), "*", color=PALETTE[3], ms=11, label="isoFLOP minima (this sweep)")
        ax.scatter(run_c, ok.params_non_embedding, s=22, color="0.35", zorder=3, label="this sweep's runs")
        ax.set(xlabel="C, training compute (FLOPs = 6 N D)", ylabel="N_opt, parameters",
               title=f"Compute-optimal frontier: N_opt ~ C^{c['a']:.3f}")
        log_axis(ax, "x", exponent), log_axis(ax, "y")
        _legend_outside(ax)
        return _save(plt, fig, path)



def latency(study, path: Path) -> Path | None:
    """Decode latency against depth (n_layers) for each width, measured and the latency law's prediction."""
    from scaling_lab.fit.latency import LatencyModel, reduce_rounds

    rows, section = study.latency_rows, study.latency
    if rows is None or section is None or rows.empty:
        return None
    rows = reduce_rounds(rows, section.get("aggregate", "median"))  # one point per measurement, as the law saw it
    try:
        model = LatencyModel.from_dict(section)
    except (ValueError, KeyError, TypeError):
        model = None
    sub = rows
    if "mode" in sub:
        sub = sub[sub["mode"].astype(str) == "none"] if (sub["mode"].astype(str) == "none").any() else sub
    batch = int(model.batch_size) if model is not None and getattr(model, "batch_size", None) else int(sub.batch.min())
    sub = sub[sub.batch == batch] if (sub.batch == batch).any() else sub
    with style() as plt:
        fig, ax = plt.subplots()
        widths = sorted(sub.d_model.unique())
        for i, d in enumerate(widths):
            color = PALETTE[i % len(PALETTE)]
            w = sub[sub.d_model == d].sort_values("n_layers")
            ax.scatter(w.n_layers, w.decode_ms_per_token, color=color, s=30, zorder=3, label=f"d_model {d}")
            if model is not None:
                L = np.arange(max(1, int(w.n_layers.min())), int(w.n_layers.max()) + 1)
                vocab = int(w.vocab_size.iloc[0]) if "vocab_size" in w else None
                try:
                    ms = model.predict(L, np.full_like(L, d), "decode_ms_per_token", batch, "none", vocab)
                    ax.plot(L, ms, "-", color=color, lw=1.0, alpha=0.8)
                except (KeyError, ValueError):
                    pass
        if model is not None:
            ax.plot([], [], "-", color="0.3", label="latency law")
        ax.set(xlabel="n_layers (depth)", ylabel="decode latency (ms/token)",
               title=f"Decode latency vs depth, batch {batch} ({section.get('device')}, "
                     f"{section.get('threads')} thread(s))")
        if sub.n_layers.max() / max(sub.n_layers.min(), 1) >= 8:
            log_axis(ax, "x")
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(widths) > 8:
            ax.legend(ncol=2, loc="upper left")
        else:
            _legend_outside(ax)
        return _save(plt, fig, path)


def plan(study, path: Path) -> Path | None:
    """The plan: training and inference cost (or FLOPs) of the Chinchilla-style and the optimal model."""
    doc = study.plan
    if doc is None:
        return None
    unit = "cost" if doc.get("objective") == "cost" else "flops"
    keys = (f"train_{unit}", f"inference_{unit}")
    models = [m for m in ("chinchilla", "optimal") if m in doc]
    if not all(k in doc[m] for m in models for k in keys):
        keys, unit = ("train_flops", "inference_flops"), "flops"
    with style() as plt:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        left = np.zeros(len(models))
        for i, (k, label) in enumerate(zip(keys, ("training", "inference"))):
            vals = np.array([doc[m][k] for m in models], dtype=float)
            ax.barh(models, vals, left=left, color=PALETTE[i], label=label)
            left += vals
        for y, m in enumerate(models):
            ax.text(left[y], y, f"  N {human(doc[m]['N'])}, D {human(doc[m]['D'])}", va="center", fontsize=8)
        ax.set(xlabel="lifetime cost ($)" if unit == "cost" else "lifetime FLOPs",
               title=f"Plan: objective {doc.get('objective')}, saving {100 * doc.get('saving', 0):.3g}%")
        plain_axis(ax, "x")
        ax.set_xlim(0, left.max() * 1.45)
        ax.legend(loc="lower right")
        return _save(plt, fig, path)


# ----- the fit's figures: scaling-fit draws them into its out folder, scaling-report into its own -------------------
# ``rows`` carry the fit's column names: N, D and loss, and where known R, group, budget, fit and heldout (bools) and
# each law's pred_<law> with its bootstrap 95% interval pred_<law>_lo and _hi (predictions.csv has them all);
# ``fit`` is a fit.json document, or None.

LINE_STYLES = ["-", "--", ":", "-."]  # one per law, in the fit's order


def _laws(fit: dict | None, rows) -> dict[str, LawConstants]:
    """The fit's laws whose inputs ``rows`` have, in the fit's order (none without a fit)."""
    laws = {name: LawConstants.from_dict(name, entry) for name, entry in ((fit or {}).get("laws") or {}).items()}
    return {name: law for name, law in laws.items() if set(law.law.inputs) <= set(rows.columns)}


def _n_label(fit: dict | None) -> str:
    convention = ((fit or {}).get("provenance") or {}).get("n_convention")
    return {"non_embedding": "N, non-embedding parameters",
            "total": "N, parameters (embeddings included)"}.get(convention, "N, parameters")


def _colors(plt, k: int) -> list:
    """k colours: the palette's while they last, a sequential map beyond (many budgets or groups)."""
    return PALETTE[:k] if k <= len(PALETTE) else list(plt.cm.viridis(np.linspace(0, 0.9, k)))


def _budgets(rows) -> tuple[str, dict[float, np.ndarray]]:
    """Rows per token budget: equal D or equal tokens per parameter D/N (budgets that scale with size, e.g. 20 N
    tokens), to 2 significant digits, whichever makes fewer groups (D on a tie)."""
    by_d = np.array([float(f"{v:.2g}") for v in rows["D"]])
    by_ratio = np.array([float(f"{v:.2g}") for v in rows["D"] / rows["N"]])
    kind, key = ("D", by_d) if len(set(by_d)) <= len(set(by_ratio)) else ("D/N", by_ratio)
    return kind, {k: key == k for k in sorted(set(key))}


def loss_vs_n(rows, fit: dict | None, path: Path) -> Path | None:
    """Loss against N per token budget, the rows and each fitted law (its other inputs at the budget's median)."""
    laws = _laws(fit, rows) if rows is not None and not rows.empty else {}
    if not laws:
        return None
    kind, budgets = _budgets(rows)
    n = np.geomspace(rows["N"].min() / 1.5, rows["N"].max() * 1.5, 100)
    with style() as plt:
        fig, ax = plt.subplots()
        for color, (key, mask) in zip(_colors(plt, len(budgets)), budgets.items()):
            sub = rows[mask]
            label = f"runs, D/N = {key:g}" if kind == "D/N" else f"runs, D = {human(key)} tokens"
            ax.scatter(sub["N"], sub["loss"], color=color, s=36, edgecolor="k", linewidth=0.4, zorder=3,
                       label=label if len(budgets) <= 12 else None)
            d = n * key if kind == "D/N" else np.full_like(n, float(sub["D"].median()))
            for ls, law in zip(LINE_STYLES * len(laws), laws.values()):
                others = {x: np.full_like(n, float(sub[x].median())) for x in law.law.inputs if x not in ("N", "D")}
                ax.plot(n, law.predict(N=n, D=d, **others), ls, color=color, lw=1.2)
        for ls, (name, law) in zip(LINE_STYLES * len(laws), laws.items()):
            others = ", ".join(x for x in law.law.inputs if x not in ("N", "D"))
            ax.plot([], [], ls, color="0.3", label=f"{name} law" + (f" ({others} at median)" if others else ""))
        ax.set(xlabel=_n_label(fit), ylabel="loss (nats/token)",
               title=f"Loss vs N per token budget ({kind}), with the fitted laws")
        log_axis(ax, "x")
        _legend_outside(ax)
        return _save(plt, fig, path)


def predicted_vs_actual(rows, fit: dict | None, path: Path) -> Path | None:
    """Each law's prediction (with its bootstrap 95% interval) against the measured loss; held-out rows open."""
    laws = [n for n in (fit or {}).get("laws", {}) if rows is not None and f"pred_{n}" in rows]
    if not laws:
        return None
    p = rows
    with style() as plt:
        fig, axes = plt.subplots(1, len(laws), figsize=(4.2 * len(laws), 4.0), squeeze=False, sharey=True)
        lims = [np.nanmin([p.loss.min()] + [p[f"pred_{n}"].min() for n in laws]),
                np.nanmax([p.loss.max()] + [p[f"pred_{n}"].max() for n in laws])]
        pad = 0.05 * (lims[1] - lims[0] or 1)
        lims = [lims[0] - pad, lims[1] + pad]
        for ax, name in zip(axes[0], laws):
            held = p.heldout.astype(bool).to_numpy()
            y, pred = p.loss.to_numpy(), p[f"pred_{name}"].to_numpy()
            err = np.abs(np.stack([p[f"pred_{name}_lo"], p[f"pred_{name}_hi"]]) - pred) \
                if f"pred_{name}_lo" in p else None
            for mask, face, label in ((~held, PALETTE[0], "fit rows"), (held, "none", "held-out rows")):
                if mask.any():
                    ax.errorbar(y[mask], pred[mask], yerr=None if err is None else err[:, mask], fmt="o",
                                mfc=face, mec=PALETTE[0], ecolor=PALETTE[0], ms=6, lw=0.8, capsize=2, label=label)
            ax.plot(lims, lims, ":", color="0.3", lw=1, label="predicted = measured")
            ax.set(xlim=lims, ylim=lims, xlabel="measured loss (nats/token)", title=name)
            ax.legend(loc="upper left")
        axes[0][0].set_ylabel("predicted loss (nats/token)")
        fig.suptitle("Predicted vs measured loss (bars: bootstrap 95% interval)", y=1.02)
        return _save(plt, fig, path)


def residuals(rows, fit: dict | None, path: Path) -> Path | None:
    """Each law's relative residual (predicted - measured) / measured against N; held-out rows open."""
    laws = [n for n in (fit or {}).get("laws", {}) if rows is not None and f"pred_{n}" in rows]
    if not laws:
        return None
    held = rows.heldout.astype(bool).to_numpy()
    with style() as plt:
        fig, ax = plt.subplots()
        for i, (marker, name) in enumerate(zip("os^v" * len(laws), laws)):
            rel = ((rows[f"pred_{name}"] - rows.loss) / rows.loss).to_numpy()
            color = PALETTE[i % len(PALETTE)]
            for mask, face, label in ((~held, color, name), (held, "none", f"{name}, held-out rows")):
                if mask.any():
                    ax.scatter(rows.N[mask], rel[mask], marker=marker, facecolor=face, edgecolor=color, s=30,
                               alpha=0.8, label=label)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set(xlabel=_n_label(fit), ylabel="(predicted - measured) / measured", title="Relative residuals")
        log_axis(ax, "x")
        _legend_outside(ax)
        return _save(plt, fig, path)


def isoflop(rows, fit: dict | None, path: Path) -> Path | None:
    """isoFLOP profiles: loss against N at each FLOP budget, the parabola in log N and its minimum."""
    iso = (fit or {}).get("isoflop")
    if rows is None or not iso or not iso.get("optima") or "budget" not in rows or rows["budget"].isna().all():
        return None
    if "fit" in rows:  # the rows the profiles were fitted to
        rows = rows[rows["fit"].astype(bool)]
    with style() as plt:
        fig, ax = plt.subplots()
        for color, o in zip(_colors(plt, len(iso["optima"])), iso["optima"]):
            sub = rows[np.isclose(rows["budget"].astype(float), o["budget"], rtol=0.05)]
            ax.scatter(sub["N"], sub["loss"], color=color, s=30, label=f"C = {human(o['budget'])} FLOPs")
            if len(sub) >= 3:
                x = np.log(sub["N"].to_numpy(dtype=float))
                coef = np.polyfit(x, sub["loss"].to_numpy(dtype=float), 2)
                xs = np.linspace(x.min(), x.max(), 60)
                ax.plot(np.exp(xs), np.polyval(coef, xs), color=color, lw=1.2)
            if o.get("N_opt"):
                ax.plot(o["N_opt"], o["loss_opt"], "*", color="k", ms=10)
            if o.get("N_opt") and o.get("N_opt_ci95"):
                lo, hi = o["N_opt_ci95"]
                ax.errorbar(o["N_opt"], o["loss_opt"], xerr=[[o["N_opt"] - lo], [hi - o["N_opt"]]], fmt="none",
                            color="k", lw=1, capsize=3)
        ax.plot([], [], "*", color="k", ms=10, label="minimum (N_opt, 95% bootstrap interval)")
        ax.set(xlabel=_n_label(fit), ylabel="loss (nats/token)",
               title="isoFLOP profiles" + (f": N_opt ~ C^{iso['a']:.3f}" if iso.get("a") is not None else ""))
        log_axis(ax, "x")
        _legend_outside(ax)
        return _save(plt, fig, path)


def loss_vs_aspect(rows, fit: dict | None, path: Path) -> Path | None:
    """Loss against aspect ratio R = d_model / n_layers at fixed N and D (each group: shapes of one size at one
    budget), with each fitted law at the group's N and D (flat for a law without R)."""
    if rows is None or "R" not in rows or "group" not in rows:
        return None
    series = [(g, sub) for g, sub in rows.groupby("group") if sub["R"].nunique() >= 2]
    if not series:
        return None
    laws = _laws(fit, rows)
    with style() as plt:
        fig, ax = plt.subplots()
        for color, (g, sub) in zip(_colors(plt, len(series)), series):
            ax.scatter(sub["R"], sub["loss"], color=color, s=40, edgecolor="k", linewidth=0.4, zorder=3,
                       label=f"runs, {g}" if len(series) <= 12 else None)
            r = np.geomspace(sub["R"].min() / 1.5, sub["R"].max() * 1.5, 80)
            for ls, law in zip(LINE_STYLES * len(laws), laws.values()):
                inputs = {x: r if x == "R" else np.full_like(r, float(sub[x].median())) for x in law.law.inputs}
                ax.plot(r, law.predict(**inputs) * np.ones_like(r), ls, color=color, lw=1.2)
        for ls, name in zip(LINE_STYLES * len(laws), laws):
            ax.plot([], [], ls, color="0.3", label=f"{name} law at the group's N, D")
        ax.set(xlabel="R = d_model / n_layers (aspect ratio)", ylabel="loss (nats/token)",
               title="Loss vs aspect ratio at fixed N and D")
        log_axis(ax, "x")
        _legend_outside(ax)
        return _save(plt, fig, path)


FIT_FIGURES: dict[str, Callable] = {"loss_vs_n": loss_vs_n, "predicted_vs_actual": predicted_vs_actual,
                                    "residuals": residuals, "loss_vs_aspect_ratio": loss_vs_aspect,
                                    "isoflop_profiles": isoflop}


def draw_fit(fit: dict, folder: Path) -> list[Path]:
    """``scaling-fit``'s figures (``FIT_FIGURES``) from its fit.json document and the predictions.csv beside it in
    ``folder``, as ``folder/<name>.png``; returns the paths drawn."""
    rows = pd.read_csv(folder / "predictions.csv")
    drawn = [draw(rows, fit, folder / f"{name}.png") for name, draw in FIT_FIGURES.items()]
    return [path for path in drawn if path is not None]


def _runs(study) -> pd.DataFrame:
    """The sweep's done runs in the fit's column names, N counted as the fit counts it."""
    total = ((study.fit or {}).get("provenance") or {}).get("n_convention") == "total"
    columns = {"params_total" if total else "params_non_embedding": "N", "tokens_seen": "D", "aspect_ratio": "R",
               "flops_budget": "budget"}
    return study.ok.rename(columns=columns)[[*columns.values(), "loss", "group"]]


def draw_all(study, folder: Path) -> dict[str, Path]:
    """Every figure of the report whose input exists, as ``folder/<name>.png``; returns name -> path. The fit's
    figures are drawn over the sweep's runs (predicted vs actual over the fit's predictions)."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = _runs(study)
    figures = {"grid": (grid, study), "curves": (curves, study), "loss_vs_n": (loss_vs_n, runs, study.fit),
               "predicted_vs_actual": (predicted_vs_actual, study.predictions, study.fit),
               "frontier": (frontier, study), "isoflop": (isoflop, runs, study.fit),
               "loss_vs_aspect_ratio": (loss_vs_aspect, runs, study.fit), "latency": (latency, study),
               "plan": (plan, study)}
    out = {}
    for name, (draw, *inputs) in figures.items():
        path = draw(*inputs, folder / f"{name}.png")
        if path is not None:
            out[name] = path
    return out


# ----- interactive (inline SVG: hover a point for its numbers; no script, no network) ----------------------------

def svg_runs(study, width: int = 720, height: int = 380) -> str | None:
    """Held-out loss against N of every done run as an inline SVG scatter; each point's tooltip (``<title>``) holds
    its run id, shape, N, D and loss. Log x axis with plain labels, one colour per token budget (PALETTE)."""
    import html as _html

    ok = study.ok
    if ok.empty:
        return None
    n, loss = ok.params_non_embedding.to_numpy(float), ok.loss.to_numpy(float)
    left, right, top, bottom = 70, 190, 20, 50
    lx0, lx1 = np.log10(n.min() / 1.3), np.log10(n.max() * 1.3)
    pad = 0.08 * (loss.max() - loss.min() or 1)
    y0, y1 = loss.min() - pad, loss.max() + pad
    X = lambda v: left + (np.log10(v) - lx0) / (lx1 - lx0 or 1) * (width - left - right)
    Y = lambda v: top + (y1 - v) / (y1 - y0 or 1) * (height - top - bottom)
    tpp = (ok.tokens_seen / ok.params_non_embedding).round(1).to_numpy()
    budgets = sorted(set(tpp))
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="loss against N, one point per run" '
             'style="font: 12px system-ui, sans-serif; background: #fff">']
    for e in range(int(np.floor(lx0)), int(np.ceil(lx1)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lx0 <= np.log10(v) <= lx1:
                x = X(v)
                parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" stroke="#e3e6e9"/>'
                             f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{human(v)}</text>')
    from matplotlib.ticker import MaxNLocator

    for v in [v for v in MaxNLocator(5).tick_values(y0, y1) if y0 <= v <= y1]:
        y = Y(v)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e3e6e9"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 10}" text-anchor="middle">'
                 'N, non-embedding parameters (log scale)</text>'
                 f'<text transform="translate(16 {(top + height - bottom) / 2:.0f}) rotate(-90)" '
                 'text-anchor="middle">held-out loss (nats/token)</text>')
    for r, t in zip(ok.itertuples(), tpp):
        color = PALETTE[budgets.index(t) % len(PALETTE)]
        tip = (f"run {r.run_id}: L{int(r.n_layers)} d{int(r.d_model)} R{r.aspect_ratio:.3g}; "
               f"N {r.params_non_embedding:,}; D {int(r.tokens_seen):,} tokens; loss {r.loss:.4f} nats/token")
        parts.append(f'<circle cx="{X(r.params_non_embedding):.1f}" cy="{Y(r.loss):.1f}" r="6" fill="{color}" '
                     f'fill-opacity="0.85" stroke="#222" stroke-width="0.6"><title>{_html.escape(tip)}</title>'
                     '</circle>')
    for i, t in enumerate(budgets):
        y = top + 10 + 18 * i
        parts.append(f'<circle cx="{width - right + 20}" cy="{y}" r="5" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{width - right + 32}" y="{y + 4}">D/N = {t:g}</text>')
    parts.append("</svg>")
    return "".join(parts)
