"""The Python API (``import scaling_lab``): the same code paths as the commands, without torch; the example script."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import scaling_lab
from tests.helpers import SHARED, shared_reference

ROOT = Path(__file__).resolve().parents[1]


def test_fit_predict_frontier_and_plan(tmp_path):
    rng = np.random.default_rng(0)
    n, d = np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(1e9, 1e11, 5))
    runs = pd.DataFrame({"params": n.ravel(), "tokens": d.ravel()})
    runs["loss"] = (1.7 + 400 / runs.params ** 0.34 + 410 / runs.tokens ** 0.28) * np.exp(rng.normal(0, 0.002, 25))
    fit = scaling_lab.fit_laws(runs, N="params", D="tokens", out=tmp_path / "fit",
                               overrides=["bootstrap.n=20", "plots=false"])
    assert fit.laws == ["chinchilla"] and fit.path == tmp_path / "fit" / "fit.json"
    assert fit.doc["tool"]["commit"].startswith(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                               capture_output=True, text=True).stdout.strip())
    c = fit.constants()
    assert c["alpha"] == pytest.approx(0.34, abs=0.05)
    assert fit.predict(N=1e8, D=1e10) == pytest.approx(c["E"] + c["A"] / 1e8 ** c["alpha"] + c["B"] / 1e10 ** c["beta"])
    frontier = fit.frontier([1e20, 1e22])
    assert list(frontier.source) == ["chinchilla"] * 2 and frontier.N_opt.iloc[1] > frontier.N_opt.iloc[0]
    assert scaling_lab.load_fit(fit.to_json(tmp_path / "copy.json")).constants() == c
    plan = scaling_lab.plan(fit.path, target_params=1e9, demand_tokens=1e12, out=tmp_path / "plan")
    assert plan["chinchilla"]["N"] == pytest.approx(1e9, rel=1e-6) and (tmp_path / "plan" / "plan.json").is_file()
    with pytest.raises(ValueError, match=r"no column\(s\) \['size'\]"):
        scaling_lab.fit_laws(runs, N="size", D="tokens")


def test_import_needs_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, scaling_lab; scaling_lab.load_fit; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    assert (ROOT / "api" / "py.typed").is_file()


def test_example_script_prints_the_frontier(tmp_path):
    shared_reference()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "example_api.py"), str(tmp_path / "f.png")],
                          capture_output=True, text=True, cwd=tmp_path, env={"SCALING_SHARED": str(SHARED),
                                                                            "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["C", "N_opt", "D_opt", "tokens_per_param", "source"] and len(lines) == 5
    assert (tmp_path / "f.png").stat().st_size > 10_000
