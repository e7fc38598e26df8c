"""Benchmark: the default-protocol fit (batched L-BFGS over Epoch AI's 4500-start grid) against a plain scipy loop
over the same grid, on Epoch AI's reconstruction of the Chinchilla data (240 points: the 5 highest losses dropped).

    .venv/bin/python scripts/bench_fit.py               # plain loop on 450 random starts, time extrapolated
    .venv/bin/python scripts/bench_fit.py --sample 0    # the plain loop over the full grid (minutes)

The plain loop is what most replications run: scipy.optimize.minimize(L-BFGS-B) per start, finite-difference
gradients, the objective written directly in numpy. Data: $SCALING_SHARED or ../shared next to the repo.
"""

import argparse
import itertools
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy.optimize import minimize

from scaling_lab.fit.laws.spec import CompiledLaw, LawSpec
from scaling_lab.fit.fitting.optimize import fit_huber_grid, huber_objective

ROOT = Path(__file__).resolve().parents[1]
EPOCH_REPORTED = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def load_epoch() -> pd.DataFrame:
    shared = Path(os.environ.get("SCALING_SHARED", ROOT.parent / "shared"))
    df = pd.read_csv(shared / "reference" / "epoch2024" / "svg_extracted_data.csv")
    df = df[df["loss"] < df["loss"].nlargest(5).min()]
    return pd.DataFrame({"N": df["Model Size"], "D": df["Training FLOP"] / (6 * df["Model Size"]), "loss": df["loss"]})


def plain_objective(x, log_n, log_d, log_y, delta):
    """Epoch AI's objective as their notebook writes it: log of the sum of the three exponentials, Huber, summed."""
    e, a, b, alpha, beta = x
    pred = np.log(np.exp(a - alpha * log_n) + np.exp(b - beta * log_d) + np.exp(e))
    r = pred - log_y
    return np.sum(np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=450, help="plain loop on this many random starts (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_epoch()
    protocol = OmegaConf.load(ROOT / "conf" / "protocol" / "default.yaml")
    law_conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "law" / "chinchilla.yaml"))
    spec = LawSpec.from_config("chinchilla", law_conf["chinchilla"])
    log_inputs = {"N": np.log(data["N"].to_numpy()), "D": np.log(data["D"].to_numpy())}
    y = data["loss"].to_numpy()
    print(f"Epoch AI Chinchilla data: {len(y)} points; Huber delta {protocol.delta} on log loss, summed; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other work on the machine slows both)")

    t0 = time.perf_counter()
    model = CompiledLaw(spec, ties=[], log_space=True)
    ours = fit_huber_grid(model, log_inputs, y, protocol)
    t_ours = time.perf_counter() - t0
    values = model.values(ours.theta)
    print(f"batched fit: {t_ours:.2f} s for {ours.n_starts} starts (formula compile included); "
          f"{ours.n_best} reached the best objective {ours.objective:.10g}")
    print("  " + ", ".join(f"{k}={float(v):.5g}" for k, v in values.items()))

    # The plain loop, in the order of Epoch AI's grid (e, a, b, alpha, beta).
    grid = protocol.grid
    every = list(itertools.product(grid.E, grid.A, grid.B, grid.alpha, grid.beta))
    pick = np.random.default_rng(args.seed).permutation(len(every))[:args.sample] if args.sample else range(len(every))
    starts = [every[i] for i in sorted(pick)]
    data_args = (log_inputs["N"], log_inputs["D"], np.log(y), protocol.delta)
    results, seconds = [], []
    with np.errstate(all="ignore"):      # the plain objective overflows at some trial points, as in the original
        for s in starts:
            t0 = time.perf_counter()
            results.append(minimize(plain_objective, np.array(s), args=data_args, method="L-BFGS-B"))
            seconds.append(time.perf_counter() - t0)
    t_plain, seconds = sum(seconds), np.sort(seconds)[::-1]
    best = min(results, key=lambda r: r.fun)
    full = len(every)
    t_plain_full = t_plain * full / len(starts)
    reached = sum(r.fun <= best.fun * (1 + float(protocol.rel_tol)) for r in results)
    label = "measured" if len(starts) == full else f"EXTRAPOLATED from {len(starts)} random starts"
    print(f"plain scipy loop: {t_plain:.2f} s for {len(starts)} starts; full grid {t_plain_full:.1f} s ({label}); "
          f"{reached} reached its best objective {best.fun:.10g}")
    top = max(1, len(seconds) // 100)
    print(f"  per start: median {np.median(seconds) * 1e3:.1f} ms, slowest {seconds[0]:.2f} s; the slowest 1% take "
          f"{seconds[:top].sum() / t_plain:.0%} of the loop (a sample extrapolates well only if that is small)")
    bv = dict(zip(["E", "A", "B", "alpha", "beta"], [*np.exp(best.x[:3]), *best.x[3:]]))
    print("  " + ", ".join(f"{k}={v:.5g}" for k, v in bv.items()))
    same = abs(best.fun - ours.objective) <= 1e-6 * ours.objective
    lower = "lower" if ours.objective < best.fun else "not lower"
    print(f"load average now {os.getloadavg()[0]:.1f}; speed-up: {t_plain_full / t_ours:.0f}x; "
          f"same optimum: {'yes' if same else 'NO'} (objective {ours.objective:.10g} vs {best.fun:.10g}; "
          f"batched is {lower})")
    print("Epoch AI reported (Huber-likelihood fit with a fitted scale): "
          + ", ".join(f"{k}={v}" for k, v in EPOCH_REPORTED.items()))
    th = model.theta(EPOCH_REPORTED)
    f_rep, _ = huber_objective(model, log_inputs, y, float(protocol.delta))(th[None, :], np.zeros(1, dtype=int))
    print(f"  this objective at Epoch's reported values: {f_rep[0]:.10g} (optimum {ours.objective:.10g})")


if __name__ == "__main__":
    main()
