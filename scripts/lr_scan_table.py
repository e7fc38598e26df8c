"""The LR scan behind the demo's learning-rate rule: loss against LR at the smallest and largest demo widths, the
flat region of each scan, and where the rule's LR falls (a Markdown table and a figure to link from the README).

    scaling-train -m sweep=lr_scan hydra/launcher=joblib hydra.launcher.n_jobs=2 results_dir=results
    python scripts/lr_scan_table.py results_dir=results [sweep=lr_scan] [rule_sweep=demo] [out=results/lr_scan]

The rule is read from the demo sweep's config (train.lr x (lr_ref_width / d_model) ^ lr_width_exponent). The flat
region of a scan: the LRs whose loss is within ``flat`` (1%) of the best measured loss, interpolated linearly in
log LR between the scan's points (a region that reaches the scan's end may extend beyond it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from scaling_lab.fit.io.store import load_table


def rule_lr(d_model: float, results_dir: str, sweep: str) -> tuple[float, str]:
    from hydra import compose, initialize_config_dir

    from scaling_lab.conf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        t = compose(config_name="train", overrides=[f"sweep={sweep}"]).train
    if t.lr_rule == "constant":
        return float(t.lr), f"constant {t.lr:g}"
    return (float(t.lr * (t.lr_ref_width / d_model) ** t.lr_width_exponent),
            f"{t.lr:g} x ({t.lr_ref_width} / d_model)^{t.lr_width_exponent:g}")


def preset_tokens(sweep: str) -> float | None:
    from hydra import compose, initialize_config_dir

    from scaling_lab.conf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"sweep={sweep}"]).train.tokens


def flat_region(x: np.ndarray, y: np.ndarray, best: int, flat: float) -> tuple[float, float]:
    """LRs (from log-LR points ``x`` sorted, losses ``y``) whose loss is within ``flat`` of the best measured one:
    the contiguous run of measured points around the best, extended on each side to where the straight line (in
    log LR) to the next point crosses the limit; the scan's end when the run reaches it."""
    limit = y[best] * (1 + flat)
    i = j = best
    while i > 0 and y[i - 1] <= limit:
        i -= 1
    while j < len(y) - 1 and y[j + 1] <= limit:
        j += 1

    def cross(a: int, b: int) -> float:  # a inside, b outside
        return float(x[a] + (x[b] - x[a]) * (limit - y[a]) / (y[b] - y[a]))

    lo = cross(i, i - 1) if i > 0 else float(x[0])
    hi = cross(j, j + 1) if j < len(y) - 1 else float(x[-1])
    return float(np.exp(lo)), float(np.exp(hi))


def scan(results_dir: str, sweep: str, rule_sweep: str, flat: float) -> tuple[list[dict], str]:
    table = load_table(results_dir, sweep)
    table = table[table.status == "ok"]
    tokens = preset_tokens(sweep)
    if tokens is not None:  # only the preset's budget (older scans at other budgets may share the folder)
        table = table[(table.tokens_budget - tokens).abs() < table.seq_len]
    if table.empty:
        raise SystemExit(f"no finished runs of sweep {sweep!r} in {results_dir}: run scaling-train -m sweep={sweep}")
    out = []
    rule_text = ""
    for (d_model, n_layers), rows in table.groupby(["d_model", "n_layers"]):
        rows = rows.sort_values("lr")
        x, y = np.log(rows.lr.to_numpy(float)), rows.loss.to_numpy(float)
        best = int(np.argmin(y))
        lr_rule, rule_text = rule_lr(float(d_model), results_dir, rule_sweep)
        lo, hi = flat_region(x, y, best, flat)
        within = lo <= lr_rule <= hi
        out.append({"d_model": int(d_model), "n_layers": int(n_layers), "N": int(rows.params_non_embedding.iloc[0]),
                    "lrs": rows.lr.tolist(), "losses": y.tolist(), "stderr": rows.loss_stderr.tolist(),
                    "best_lr": float(rows.lr.iloc[best]), "flat": (lo, hi),
                    "rule_lr": lr_rule, "rule_in_flat": within, "tokens": int(rows.tokens_seen.iloc[0])})
    return out, rule_text


def markdown(results: list[dict], rule_text: str, flat: float, figure: str | None) -> str:
    lrs = sorted({lr for r in results for lr in r["lrs"]})
    lines = [f"LR scan (held-out loss, nats/token; {results[0]['tokens']:,} training tokens per run; rule: lr = "
             f"{rule_text}). Flat region: LRs within {100 * flat:g}% of the best measured loss (interpolated in log LR).", "",
             "| shape | N | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best | flat region | rule's LR | in flat |",
             "|---|---|" + "---|" * (len(lrs) + 4)]
    for r in results:
        cells = []
        for lr in lrs:
            if lr in r["lrs"]:
                v = r["losses"][r["lrs"].index(lr)]
                cells.append(f"**{v:.4f}**" if lr == r["best_lr"] else f"{v:.4f}")
            else:
                cells.append("")
        lines.append(f"| L{r['n_layers']} d{r['d_model']} | {r['N']:,} | " + " | ".join(cells)
                     + f" | {r['best_lr']:g} | {r['flat'][0]:.2g}-{r['flat'][1]:.2g} | {r['rule_lr']:.3g} | "
                     + ("yes" if r["rule_in_flat"] else "**no**") + " |")
    se = [s for r in results for s in r["stderr"] if s == s]
    if se:
        lines += ["", f"Standard error of each loss (eval slice): {min(se):.4f}-{max(se):.4f} nats."]
    if figure:
        lines += ["", f"![LR scan]({figure})"]
    return "\n".join(lines)


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in results:
        line, = ax.plot(r["lrs"], r["losses"], "o-", label=f"L{r['n_layers']} d{r['d_model']} (N {r['N']:.2g})")
        ax.axvline(r["rule_lr"], color=line.get_color(), ls="--", lw=1)
        ax.axvspan(*r["flat"], color=line.get_color(), alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("LR scan: dashed = the demo's rule, band = flat region")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    results_dir = args.get("results_dir", "results")
    out = Path(args.get("out", Path(results_dir) / "lr_scan"))
    flat = float(args.get("flat", 0.01))
    results, rule_text = scan(results_dir, args.get("sweep", "lr_scan"), args.get("rule_sweep", "demo"), flat)
    out.mkdir(parents=True, exist_ok=True)
    figure(results, out / "lr_scan.png")
    text = markdown(results, rule_text, flat, "lr_scan.png")
    (out / "lr_scan.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'lr_scan.md'} and {out / 'lr_scan.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
