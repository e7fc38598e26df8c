"""Benchmark: the peak memory of ``scaling-fit`` on a large CSV. A table drawn from a known Chinchilla law (Epoch
AI's constants) with 1% multiplicative noise is written to a temporary folder and fitted by the installed console
script in a subprocess (source=csv, the default protocol and bootstrap, law=chinchilla, no plots, no logger); the
child's peak resident memory and the fitted constants are printed, first for a small table (where the whole grid is
evaluated at once, as before the chunking) and then for the large one: both should find the true constants.

    .venv/bin/python scripts/bench_fit_memory.py                  # 200,000 rows (minutes)
    .venv/bin/python scripts/bench_fit_memory.py --rows 20000 --small 0
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

TRUE = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}   # Epoch AI's Chinchilla fit
SCRIPT = Path(sys.executable).parent / "scaling-fit"


def write_table(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    N, D = 10 ** rng.uniform(7, 10, rows), 10 ** rng.uniform(9, 12, rows)
    loss = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
    pd.DataFrame({"N": N, "D": D, "loss": loss * np.exp(0.01 * rng.standard_normal(rows))}).to_csv(path, index=False)


def fit(folder: Path, rows: int, seed: int, overrides: list[str]) -> None:
    """Fit a table of ``rows`` rows in a child process and print its peak memory and constants."""
    csv, out = folder / f"runs{rows}.csv", folder / f"fit{rows}"
    write_table(csv, rows, seed)
    t0 = time.perf_counter()
    proc = subprocess.run([str(SCRIPT), "source=csv", f"source.path={csv}", f"out={out}", "law=chinchilla",
                           "plots=false", "logger=none", *overrides], capture_output=True, text=True, cwd=folder)
    seconds = time.perf_counter() - t0
    # ru_maxrss (KiB on Linux) is the largest of the children waited for so far: the small table runs first
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    if proc.returncode != 0:
        print(f"{rows:>8} rows: scaling-fit exited {proc.returncode} after {seconds:.0f} s, peak {peak_gb:.2f} GiB:"
              f" {proc.stderr.strip()[-500:]}")
        return
    law = json.loads((out / "fit.json").read_text())["laws"]["chinchilla"]
    params = "  ".join(f"{p}={v:.4g}" for p, v in law["params"].items())
    ci = law["ci95"].get("alpha")
    interval = f"  alpha 95% [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
    print(f"{rows:>8} rows: peak {peak_gb:.2f} GiB, {seconds:.0f} s;  {params}{interval}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=2_000, help="rows of the small table fitted first (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more scaling-fit overrides, e.g. bootstrap.n=0")
    args = parser.parse_args()
    print("true:", "  ".join(f"{p}={v:.4g}" for p, v in TRUE.items()), f"  (overrides: {args.overrides or 'none'})")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in [args.small, args.rows] if args.small else [args.rows]:
            fit(Path(tmp), rows, args.seed, args.overrides)


if __name__ == "__main__":
    main()
