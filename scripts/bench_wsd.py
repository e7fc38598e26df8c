"""Benchmark: warmup-stable-decay branches against cosine runs of the same points (Hägele et al. 2024 report that
a ~20% cooldown matches a cosine run of the same length). Trains (or reuses) the sweep's WSD branches of the given
shapes and a cosine run of every same point, then prints the loss difference per point and the compute saved.

    python scripts/bench_wsd.py results_dir=results [sweep=demo] [shapes=2.5e4:2,8e4:3] [budgets=...] [n_jobs=2]

``shapes`` are size:depth pairs of the sweep's grid (model.params:model.n_layers); the budgets are the sweep's
(``budgets=51200,120000`` picks some).
The WSD side goes to the sweep itself (records already there are reused), the cosine side to <sweep>_cosine. The
cosine runs use the same recipe (batch, LR rule, warmup steps) with train.schedule=cosine. Prints a Markdown table
and writes it with a JSON summary to <results_dir>/bench_wsd/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from scaling_lab.fit.io.store import iter_records

BIN = Path(sys.executable).parent


def train(sweep: str, results_dir: str, size: str, depth: str, extra: list[str], n_jobs: int) -> None:
    cmd = [str(BIN / "scaling-train"), "-m", f"sweep={sweep}", f"results_dir={results_dir}", f"model.params={size}",
           f"model.n_layers={depth}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def records(results_dir: str, sweep: str, schedule: str) -> dict[tuple, dict]:
    out = {}
    for r in iter_records(results_dir, sweep):
        if r.get("status") == "ok" and (r.get("schedule") or {}).get("name", "cosine") == schedule:
            s = r["shape"]
            out[(s["n_layers"], s["d_model"], r["tokens"]["budget"], r.get("seed", 0))] = r
    return out


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    results_dir, sweep = args.get("results_dir", "results"), args.get("sweep", "demo")
    n_jobs = int(args.get("n_jobs", 2))
    shapes = [p.split(":") for p in args.get("shapes", "2.5e4:2,8e4:3").split(",")]
    extra = [a for a in argv if a.startswith(("data", "+data"))]
    if args.get("budgets"):
        extra.append(f"train.tokens={args['budgets']}")
    for size, depth in shapes:
        train(sweep, results_dir, size, depth, extra, n_jobs)
        train(sweep, results_dir, size, depth, ["train.schedule=cosine", f"sweep.name={sweep}_cosine", *extra], n_jobs)
    wsd, cos = records(results_dir, sweep, "wsd"), records(results_dir, f"{sweep}_cosine", "cosine")
    points = sorted(set(wsd) & set(cos))
    lines = ["| shape | N | D | cosine loss | WSD loss | WSD - cosine | (%) |", "|---|---|---|---|---|---|---|"]
    diffs = []
    spent_wsd, spent_cos = {}, {}
    for key in points:
        w, c = wsd[key], cos[key]
        d = w["loss"]["final"] - c["loss"]["final"]
        diffs.append(d / c["loss"]["final"])
        lines.append(f"| L{key[0]} d{key[1]} | {w['params']['non_embedding']:,} | {key[2]:,} | "
                     f"{c['loss']['final']:.4f} | {w['loss']['final']:.4f} | {d:+.4f} | {100 * d / c['loss']['final']:+.2f} |")
        shape = key[:2] + key[3:]
        spent_wsd[shape] = spent_wsd.get(shape, 0) + w["flops"].get("spent", w["flops"]["total"])
        spent_cos[shape] = spent_cos.get(shape, 0) + c["flops"]["total"]
    if not points:
        raise SystemExit("no point was trained both ways")
    total_w, total_c = sum(spent_wsd.values()), sum(spent_cos.values())
    summary = {"points": len(points), "mean_rel_diff": float(np.mean(diffs)), "max_abs_rel_diff": float(np.max(np.abs(diffs))),
               "flops_wsd": total_w, "flops_cosine": total_c, "saved": 1 - total_w / total_c}
    lines += ["", f"{len(points)} points: WSD minus cosine loss {100 * summary['mean_rel_diff']:+.2f}% on average "
              f"(largest |difference| {100 * summary['max_abs_rel_diff']:.2f}%); training FLOPs {total_w:.3g} (WSD: one "
              f"stable run per shape + a 20% decay per budget) vs {total_c:.3g} (a cosine run per budget): "
              f"{100 * summary['saved']:.0f}% saved."]
    text = "\n".join(lines)
    out = Path(results_dir) / "bench_wsd"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_wsd.md").write_text(text + "\n")
    (out / "bench_wsd.json").write_text(json.dumps(summary, indent=2))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
