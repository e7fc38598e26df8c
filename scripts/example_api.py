"""The Python API in a dozen lines: fit Epoch AI's reconstruction of Chinchilla's isoFLOP runs, print and plot the
compute-optimal frontier (Approach 2's minima beside the fitted law's).

    .venv/bin/python scripts/example_api.py [out.png]      # data: ../shared (or $SCALING_SHARED)
"""

import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

import scaling_lab

shared = Path(os.environ.get("SCALING_SHARED", Path(__file__).resolve().parents[2] / "shared"))
runs = pd.read_csv(shared / "reference" / "isoflops" / "epochai_chinchilla.csv")
fit = scaling_lab.fit_laws(runs, N="params", D="tokens", loss="loss", budget="budget",
                           overrides=["bootstrap.n=50", "isoflop.n_bootstrap=50", "plots=false"])
frontier = fit.frontier([1e19, 1e21, 1e23, 1e25])
print(frontier.to_string(index=False, float_format="%.3g"))
minima = pd.DataFrame([o for o in fit.doc["isoflop"]["optima"] if o["N_opt"]])
plt.loglog(frontier.C, frontier.N_opt, label=f"N_opt ({frontier.source[0]})")
plt.loglog(minima.budget, minima.N_opt, "*", label="isoFLOP minima (Approach 2)")
plt.xlabel("C (FLOPs)"), plt.ylabel("N_opt"), plt.legend()
plt.savefig(sys.argv[1] if len(sys.argv) > 1 else "frontier.png")
