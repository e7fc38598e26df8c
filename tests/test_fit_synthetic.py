"""Known parameters are recovered, within their bootstrap intervals, from noisy synthetic sweeps of both laws."""

import json

import pytest

from scaling_lab.fit.fitting.cli import run
from scaling_lab.fit.io.fitfile import load_constants
from tests.helpers import fit_config, synthetic_sweep

CHINCHILLA = {"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.34, "beta": 0.37}
INFERENCE = {"E": 2.0, "A": 500.0, "B": 3000.0, "alpha": 0.35, "beta": 0.4, "epsilon": 0.01, "gamma": 0.5}


def _fit(tmp_path, frame, law, *extra):
    path = tmp_path / "runs.csv"
    frame.to_csv(path, index=False)
    cfg = fit_config("source=csv", f"source.path={path}", "source.columns.N=params", "source.columns.D=tokens",
                     f"law={law}", f"out={tmp_path / 'out'}", "bootstrap.n=40", "plots=false", *extra)
    return run(cfg)


@pytest.mark.parametrize("law,truth,extra", [
    ("chinchilla", CHINCHILLA, ()),
    # its full grid is 18000 starts: a seeded subsample keeps the test fast
    ("inference_efficient", INFERENCE, ("source.columns.R=R", "protocol.max_starts=1500")),
])
def test_recovers_known_parameters(tmp_path, law, truth, extra):
    # 95% intervals over 5-7 parameters miss one now and then by design (over data seeds 1-8 each law had one
    # seed with one miss, at bootstrap.n=100); the seed is pinned so the test is deterministic.
    frame = synthetic_sweep(truth, noise=0.003, seed=2, with_r=law == "inference_efficient")
    doc = _fit(tmp_path, frame, law, *extra)
    entry = doc["laws"][law]
    for name, value in truth.items():
        lo, hi = entry["ci95"][name]
        assert lo <= value <= hi, f"{name}={value} outside [{lo}, {hi}] (estimate {entry['params'][name]})"
    assert entry["params"]["alpha"] == pytest.approx(truth["alpha"], rel=0.1)
    assert entry["params"]["beta"] == pytest.approx(truth["beta"], rel=0.1)
    assert entry["metrics"]["r2"] > 0.99
    assert entry["fit"]["reached_best"] >= 1
    # the export is what planners read back
    constants = load_constants(tmp_path / "out" / "fit.json", law)
    assert constants["E"] == pytest.approx(entry["params"]["E"])
    assert json.loads((tmp_path / "out" / "fit.json").read_text())["schema_version"] == 1


def test_tie_and_user_law_from_config(tmp_path):
    """alpha = beta ties are configuration; a law added in configuration (no code) is fitted."""
    truth = {**CHINCHILLA, "beta": CHINCHILLA["alpha"]}
    frame = synthetic_sweep(truth, noise=0.002, seed=2, with_r=False)
    doc = _fit(tmp_path, frame, "chinchilla", "protocol.ties=[[alpha,beta]]")
    params = doc["laws"]["chinchilla"]["params"]
    assert params["alpha"] == params["beta"] == pytest.approx(0.34, rel=0.05)
    assert doc["laws"]["chinchilla"]["ties"] == "alpha = beta"

    # A Kaplan-style law on N alone, supplied on the command line as configuration.
    kaplan = frame[frame["tokens"] == frame["tokens"].max()]
    doc = _fit(tmp_path, kaplan, "chinchilla", "~law",
               "+law.kaplan_n.formula='E + A / N**alpha'", "+law.kaplan_n.inputs=[N]",
               "+law.kaplan_n.params=[E,A,alpha]", "+law.kaplan_n.positive=[E,A]")
    assert set(doc["laws"]) == {"kaplan_n"}
    assert doc["laws"]["kaplan_n"]["params"]["alpha"] == pytest.approx(0.34, rel=0.15)
