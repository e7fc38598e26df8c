"""Held-out MSE on Bian et al. 2025's sweep (fit on the paper's 27 rows, scored on the other 49) for each exponent
tie under the default protocol, beside the paper's own protocol. Prints a Markdown table.

    .venv/bin/python scripts/bian_ties.py            # data: $SCALING_SHARED or ../shared next to the repo
"""

import contextlib
import io
import os
from pathlib import Path
from tempfile import TemporaryDirectory


from scaling_lab.fit.fitting.cli import run
from scaling_lab.conf import compose

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCALING_SHARED", ROOT.parent / "shared"))
SOURCE = ["source=csv", f"source.path={SHARED / 'reference' / 'bian2025' / 'losses.csv'}",
          "source.columns.N=N_params", "source.columns.D=D_tokens", "source.columns.R=aspect_ratio_R",
          "source.columns.group=size_class", 'source.fit_rows="in_main_fit_set == 1"', "source.n_convention=total",
          "bootstrap.n=0", "plots=false"]
RUNS = [("default", "none", ["protocol.ties=[]"]),
        ("default", "alpha = beta", ["protocol.ties=[[alpha,beta]]"]),
        ("default", "alpha = beta = gamma", ["protocol.ties=[[alpha,beta,gamma]]"]),
        ("bian2025", "alpha = beta = gamma", ["protocol=bian2025"])]


def main():
    print("| protocol | tie | Chinchilla MSE held-out | inference-efficient MSE held-out | "
          "inference-efficient max rel err held-out | Spearman 1B (Chinchilla / inf.-eff.) |")
    print("|---|---|---|---|---|---|")
    with TemporaryDirectory() as out:
        for protocol, tie, overrides in RUNS:
            cfg = compose("fit", [*SOURCE, f"out={out}", *overrides])
            with contextlib.redirect_stdout(io.StringIO()):
                doc = run(cfg)
            c, i = doc["laws"]["chinchilla"]["metrics"], doc["laws"]["inference_efficient"]["metrics"]
            print(f"| {protocol} | {tie} | {c['mse_heldout']:.6f} | {i['mse_heldout']:.6f} | "
                  f"{i['max_rel_err_heldout']:.4f} | {c['spearman']['1B']:.2f} / {i['spearman']['1B']:.2f} |")


if __name__ == "__main__":
    main()
