"""Figures (PNG) of a fit: loss vs N per token budget with each law's curve, predicted vs actual (held-out rows
marked), residuals, loss vs aspect ratio at fixed N, and the isoFLOP parabolas."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaling_lab.fit.fitting.fitlaw import LawFit  # noqa: E402
from scaling_lab.fit.fitting.sources import Table  # noqa: E402

STYLES = ["-", "--", ":", "-."]


def _budget_groups(N: np.ndarray, D: np.ndarray) -> tuple[str, dict[str, np.ndarray]]:
    """Rows per token budget: equal D, or equal D/N when budgets scale with size (e.g. 20N tokens)."""
    by_d = np.array([f"{d:.2g}" for d in D])
    if len(set(by_d)) <= 8:
        return "D", {k: by_d == k for k in sorted(set(by_d), key=float)}
    by_ratio = np.array([f"{r:.1g}" for r in D / N])
    return "D/N", {k: by_ratio == k for k in sorted(set(by_ratio), key=float)}


def loss_vs_n(table: Table, fits: Mapping[str, LawFit], path: Path) -> None:
    data = table.data
    fig, ax = plt.subplots(figsize=(7, 5))
    kind, groups = _budget_groups(data["N"].to_numpy(), data["D"].to_numpy())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    n_grid = np.geomspace(data["N"].min(), data["N"].max(), 100)
    for color, (key, rows) in zip(colors, groups.items()):
        sub = data[rows]
        ax.scatter(sub["N"], sub["loss"], color=color, s=14, label=f"{kind}~{key}" if len(groups) <= 12 else None)
        d_grid = n_grid * float(key) if kind == "D/N" else np.full_like(n_grid, sub["D"].median())
        for style, (name, f) in zip(STYLES, fits.items()):
            inputs = {x: np.full_like(n_grid, sub[x].median()) for x in f.spec.law.inputs if x not in ("N", "D")}
            ax.plot(n_grid, f.constants.predict(N=n_grid, D=d_grid, **inputs), style, color=color, lw=1)
    for style, name in zip(STYLES, fits):
        ax.plot([], [], style, color="k", label=name)
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="loss",
           title=f"loss vs N per token budget ({kind}; other inputs at median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def predicted_vs_actual(table: Table, fits: Mapping[str, LawFit], path: Path) -> None:
    y, held = table.data["loss"].to_numpy(), table.data["heldout"].to_numpy()
    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4.5), squeeze=False)
    for ax, (name, f) in zip(axes[0], fits.items()):
        err = np.abs(np.stack(f.pred_ci) - f.pred)
        ax.errorbar(y[~held], f.pred[~held], yerr=err[:, ~held], fmt="o", ms=3, lw=0.5, label="fit/other rows")
        ax.errorbar(y[held], f.pred[held], yerr=err[:, held], fmt="s", ms=3, lw=0.5, mfc="none", label="held-out")
        lims = [min(y.min(), f.pred.min()), max(y.max(), f.pred.max())]
        ax.plot(lims, lims, "k:", lw=1)
        ax.set(xlabel="actual loss", ylabel="predicted loss", title=name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def residuals(table: Table, fits: Mapping[str, LawFit], path: Path) -> None:
    data = table.data
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for marker, (name, f) in zip("os^v", fits.items()):
        rel = (f.pred - data["loss"].to_numpy()) / data["loss"].to_numpy()
        ax.scatter(data["N"], rel, s=14, marker=marker, label=name, alpha=0.7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="(predicted - actual) / actual", title="relative residuals")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_vs_aspect(table: Table, fits: Mapping[str, LawFit], path: Path) -> None:
    data = table.data
    data = data.assign(budget_key=[f"{d / n:.2g}" for d, n in zip(data["D"], data["N"])])  # tokens per parameter
    series = [(key, sub) for key, sub in data.groupby(["group", "budget_key"]) if sub["R"].nunique() >= 2]
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.tab20(np.arange(len(series)) % 20)
    for color, ((g, d), sub) in zip(colors, series):
        ax.scatter(sub["R"], sub["loss"], color=color, s=16, label=f"{g}, D/N~{d}" if len(series) <= 20 else None)
        r_grid = np.geomspace(sub["R"].min(), sub["R"].max(), 50)
        for style, (name, f) in zip(STYLES, fits.items()):
            inputs = {x: np.full_like(r_grid, sub[x].median()) for x in f.spec.law.inputs if x != "R"}
            if "R" in f.spec.law.inputs:
                inputs["R"] = r_grid
            ax.plot(r_grid, f.constants.predict(**inputs) * np.ones_like(r_grid), style, color=color, lw=1)
    for style, name in zip(STYLES, fits):
        ax.plot([], [], style, color="k", label=name)
    ax.set(xscale="log", xlabel="R = d_model / n_layers", ylabel="loss", title="loss vs aspect ratio at fixed N, D")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def isoflop_profiles(table: Table, iso: Mapping, path: Path) -> None:
    data = table.fit_rows
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.plasma(np.linspace(0, 0.9, len(iso["optima"])))
    for color, opt in zip(colors, iso["optima"]):
        sub = data[np.isclose(data["budget"], opt["budget"], rtol=0.05)]
        ax.scatter(sub["N"], sub["loss"], color=color, s=12)
        if len(sub) >= 3:
            x = np.log(sub["N"].to_numpy())
            coef = np.polyfit(x, sub["loss"].to_numpy(), 2)
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(np.exp(xs), np.polyval(coef, xs), color=color, lw=1)
        if opt.get("N_opt") is not None:
            ax.plot(opt["N_opt"], opt["loss_opt"], "k*", ms=8)
            if opt.get("N_opt_ci95"):
                lo, hi = opt["N_opt_ci95"]
                ax.errorbar(opt["N_opt"], opt["loss_opt"], xerr=[[opt["N_opt"] - lo], [hi - opt["N_opt"]]],
                            fmt="none", color="k", lw=1, capsize=3)
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="loss",
           title=f"isoFLOP profiles: N_opt ~ C^{iso['a']:.3f}" if iso["a"] is not None else "isoFLOP profiles")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_all(out: Path, table: Table, fits: Mapping[str, LawFit], iso: Mapping | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "loss_vs_n.png", out / "predicted_vs_actual.png", out / "residuals.png"]
    loss_vs_n(table, fits, paths[0])
    predicted_vs_actual(table, fits, paths[1])
    residuals(table, fits, paths[2])
    if "R" in table.data and "group" in table.data:
        paths.append(out / "loss_vs_aspect_ratio.png")
        loss_vs_aspect(table, fits, paths[-1])
    if iso is not None:
        paths.append(out / "isoflop_profiles.png")
        isoflop_profiles(table, iso, paths[-1])
    return [p for p in paths if p.exists()]
