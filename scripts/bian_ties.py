"""The table for Bian et al. 2025's split (fit on the paper's 27 rows, scored on the other 49;
``scripts/output/bian_ties.md``), generated from ``protocol=auto``'s choice: every candidate (objective x exponent
tie) is ranked on the 27 rows alone, by predicting their largest size classes from the smaller ones
(``conf/protocol/auto.yaml``); the held-out MSE on the 49 rows is printed beside it for the record, and is not used to
choose. The paper's own protocol is the last row, for reference. Prints a Markdown table and the choice.

    .venv/bin/python scripts/bian_ties.py            # data: $SCALING_SHARED or ../shared next to the repo
"""

import contextlib
import io
import json
import os
from pathlib import Path
from tempfile import TemporaryDirectory

from scaling_lab.conf import compose
from scaling_lab.fit.fitting.cli import run

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCALING_SHARED", ROOT.parent / "shared"))
SOURCE = ["source=csv", f"source.path={SHARED / 'reference' / 'bian2025' / 'losses.csv'}",
          "source.columns.N=N_params", "source.columns.D=D_tokens", "source.columns.R=aspect_ratio_R",
          "source.columns.group=size_class", 'source.fit_rows="in_main_fit_set == 1"', "source.n_convention=total",
          "bootstrap.n=0", "plots=false"]


def fit(out, *overrides) -> dict:
    cfg = compose("fit", [*SOURCE, f"out={out}", *overrides])
    with contextlib.redirect_stdout(io.StringIO()):
        return run(cfg)


def main():
    with TemporaryDirectory() as out:
        auto = fit(out, "protocol=auto")
        sel = auto["protocol_selection"]
        print(f"Chosen by {sel['rule']['score']} on the largest size class of the 27 fit rows "
              f"({sel['candidates'][0]['n_validation']} rows, fitted on {sel['candidates'][0]['n_train']}); "
              "held-out MSE on the other 49 rows, not used to choose:\n")
        print("| law | objective | tie | validation mean rel err | validation max rel err | MSE held-out (49) | "
              "max rel err held-out | Spearman 1B | chosen |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sel["candidates"]:
            doc = fit(out, f"law={r['law']}", f"protocol={r['protocol']}",
                      f"protocol.ties={json.dumps(r['tie_groups'])}")
            m = doc["laws"][r["law"]]["metrics"]
            print(f"| {r['law']} | {r['objective']} ({r['protocol']}) | {r['ties']} | {r['mean_rel_err']:.4f} | "
                  f"{r['max_rel_err']:.4f} | {m['mse_heldout']:.6f} | {m['max_rel_err_heldout']:.4f} | "
                  f"{m['spearman']['1B']:.2f} | {'**yes**' if r['chosen'] else ''} |")
        paper = fit(out, "protocol=bian2025")
        for law in ("chinchilla", "inference_efficient"):
            m = paper["laws"][law]["metrics"]
            print(f"| {law} | paper (bian2025, Levenberg-Marquardt from 1) | alpha = beta = gamma | - | - | "
                  f"{m['mse_heldout']:.6f} | {m['max_rel_err_heldout']:.4f} | {m['spearman']['1B']:.2f} | |")
        print()
        for law, c in sel["chosen"].items():
            m = auto["laws"][law]["metrics"]
            print(f"- {law}: `protocol=auto` chooses {c['objective']} ({c['protocol']}) with ties {c['ties']}; "
                  f"refitted on the 27 rows its held-out MSE is {m['mse_heldout']:.6f}.")
        print(f"- best law by validation: {sel['best_law']}.")


if __name__ == "__main__":
    main()
