"""``pip install scaling-lab`` without extras: the torch-free analysis works from a fresh virtual environment (fit a
CSV, plan, the Python API), and a command that needs an extra names it in one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_base_install_has_no_torch_and_fits_and_plans(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheels"),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheels").glob("scaling_lab-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "env")], check=True, timeout=300)
    bin_ = tmp_path / "env" / "bin"
    # the base dependencies at the tested versions, from the package index (or pip's cache)
    subprocess.run([str(bin_ / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    run = lambda *args: subprocess.run([str(a) for a in args], cwd=tmp_path, capture_output=True, text=True,
                                       timeout=300)
    assert "No module named 'torch'" in run(bin_ / "python", "-c", "import torch").stderr

    rows = ["N,D,loss"] + [f"{n:g},{d:g},{1.7 + 400 / n ** 0.34 + 410 / d ** 0.28:.6f}"
                           for n in (1e7, 3e7, 1e8, 3e8, 1e9) for d in (1e9, 3e9, 1e10, 3e10)]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    fit = run(bin_ / "scaling-fit", "source=csv", "source.path=runs.csv", "law=chinchilla", "bootstrap.n=0",
              "plots=false", "out=fit")
    assert fit.returncode == 0 and (tmp_path / "fit" / "fit.json").is_file(), fit.stderr
    plan = run(bin_ / "scaling-plan", "constants=fit/fit.json", "target.chinchilla_params=7e10",
               "demand.tokens=2e12", "out=plan")
    assert plan.returncode == 0 and (tmp_path / "plan" / "plan.json").is_file(), plan.stderr
    api = run(bin_ / "python", "-c", "import sys, pandas, scaling_lab; r = scaling_lab.fit_laws(pandas.read_csv("
              "'runs.csv'), overrides=['bootstrap.n=0', 'plots=false']); print(round(r.constants()['alpha'], 2), "
              "'torch' in sys.modules)")
    assert api.returncode == 0 and api.stdout.split() == ["0.34", "False"], api.stderr

    for command, extra in (("scaling-train", "train"), ("scaling-quantize", "serve")):
        done = run(bin_ / command, "sweep=smoke")
        # the first module of the extra the command imports (torch or lightning: both [train]) is named
        assert done.returncode == 2 and re.fullmatch(
            rf"{command}: error: needs the \[{extra}\] extra \(no module named '(torch|lightning)'\): pip install "
            rf"'scaling-lab\[{extra}\]'", done.stderr.strip()), done.stderr
