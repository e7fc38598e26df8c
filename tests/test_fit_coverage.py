"""Do the 95% bootstrap intervals cover the truth? Synthetic Chinchilla sweeps with known parameters and
realistic noise (0.5% on the loss), fitted on the 5 smaller sizes, held out: the largest (an extrapolation).
Two noise models: independent per run, and shared by the runs of one size and budget (three shapes or seeds per
(N, D), which share e.g. a learning-rate mistuning: 0.4% shared, 0.3% per run), where the rows are not
independent and whole groups must be resampled.

Over 20 data seeds, the fraction of intervals that contain the true parameters, and the fraction of held-out rows
whose interval contains the true (noiseless) loss, must both lie in 85-100%. The same sweep with the old
bootstrap (each resample refitted from the point estimate only) is printed beside it (``pytest -s`` shows both).
"""

import numpy as np
import pandas as pd
import pytest

from scaling_lab.fit.fitting.cli import run
from tests.helpers import fit_config, synthetic_sweep
from tests.test_fit_synthetic import CHINCHILLA

SEEDS = range(20)
NOISE = 0.005
BOOT = ("bootstrap.n=100", "protocol.max_starts=500", "protocol.refine=32")
OLD = ("bootstrap.screen=1", "bootstrap.groups=false")     # refitted from the point estimate alone


def grouped_sweep(seed: int) -> pd.DataFrame:
    """Three runs per (N, D), with one noise draw shared by the three and one per run."""
    rng = np.random.default_rng(seed)
    base = synthetic_sweep(CHINCHILLA, noise=0.0, seed=seed, with_r=False)
    rows = []
    for i, row in base.iterrows():
        shared = 0.004 * rng.standard_normal()
        for k in range(3):
            rows.append({"params": row["params"], "tokens": row["tokens"], "group": f"g{i}",
                         "loss": row["loss"] * np.exp(shared + 0.003 * rng.standard_normal())})
    return pd.DataFrame(rows)


def independent_sweep(seed: int) -> pd.DataFrame:
    return synthetic_sweep(CHINCHILLA, noise=NOISE, seed=seed, with_r=False)


def coverage(tmp_path, make, *extra) -> tuple[float, float, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    params, preds, per_param = [], [], {p: [] for p in CHINCHILLA}
    for seed in SEEDS:
        frame = make(100 + seed)
        path = tmp_path / f"runs{seed}.csv"
        frame.to_csv(path, index=False)
        out = tmp_path / f"out{seed}"
        doc = run(fit_config("source=csv", f"source.path={path}", "source.columns.N=params",
                             "source.columns.D=tokens", "law=chinchilla", 'source.fit_rows="params < 5e9"',
                             f"bootstrap.seed={seed}", "plots=false", f"out={out}", *BOOT, *extra,
                             *(("source.columns.group=group",) if "group" in frame else ())))
        ci = doc["laws"]["chinchilla"]["ci95"]
        for p, v in CHINCHILLA.items():
            per_param[p].append(ci[p][0] <= v <= ci[p][1])
            params.append(per_param[p][-1])
        rows = pd.read_csv(out / "predictions.csv")
        held = rows[rows["heldout"]]
        c = CHINCHILLA
        truth = c["E"] + c["A"] / held["N"] ** c["alpha"] + c["B"] / held["D"] ** c["beta"]
        preds += list((held["pred_chinchilla_lo"] <= truth) & (truth <= held["pred_chinchilla_hi"]))
    return float(np.mean(params)), float(np.mean(preds)), {p: float(np.mean(v)) for p, v in per_param.items()}


@pytest.mark.parametrize("noise", ["independent", "grouped"])
def test_bootstrap_intervals_cover_the_truth(tmp_path, capsys, noise):
    make = independent_sweep if noise == "independent" else grouped_sweep
    new = coverage(tmp_path / "new", make)
    old = coverage(tmp_path / "old", make, *OLD)
    capsys.readouterr()
    with capsys.disabled():
        for label, (p, h, each) in (("screened (new)", new), ("point-estimate start, rows (old)", old)):
            print(f"\n{noise} noise, coverage of 95% intervals over {len(SEEDS)} seeds, {label}: parameters {p:.1%} "
                  f"(" + ", ".join(f"{k} {v:.0%}" for k, v in each.items()) + f"), true held-out loss {h:.1%}")
    assert 0.85 <= new[0] <= 1.0
    assert 0.85 <= new[1] <= 1.0
