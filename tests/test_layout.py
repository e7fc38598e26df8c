"""The house: imports run one way (pipeline -> fit -> models.shapes, pipeline -> models, everything -> conf), fit/
needs no torch, no two project modules import each other, and an installed wheel works outside the checkout."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"models": "scaling_lab.models", "pipeline": "scaling_lab.pipeline", "fit": "scaling_lab.fit",
            "conf": "scaling_lab.conf"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([name, *parts])] = path
    return modules


def imports_of(path: Path, module: str) -> set[str]:
    """Every scaling_lab module imported anywhere in the file (deferred imports inside functions too)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {i for i in imports_of(p, m) if i in modules or i.split(".")[0] in ("torch", "lightning")}
            for m, p in modules.items()}


def test_fit_imports_neither_torch_nor_pipeline(graph):
    bad = {m: sorted(i for i in deps if i.startswith(("torch", "lightning", "scaling_lab.pipeline",
                                                       "scaling_lab.models.gpt")))
           for m, deps in graph.items() if m.startswith(("scaling_lab.fit", "scaling_lab.models.shapes"))}
    assert not {m: d for m, d in bad.items() if d}


def test_conf_and_models_import_no_stage(graph):
    for m, deps in graph.items():
        if m.startswith("scaling_lab.conf"):
            assert not [d for d in deps if d.startswith(("scaling_lab.fit", "scaling_lab.pipeline",
                                                         "scaling_lab.models"))], m
        if m.startswith("scaling_lab.models"):
            assert not [d for d in deps if d.startswith(("scaling_lab.fit", "scaling_lab.pipeline"))], m


def test_no_import_cycles(graph):
    modules = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in modules[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [m])


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """Build a wheel, install it into a fresh environment, run commands from a folder that has its own `models/`."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("scaling_lab-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # the licence text ships with the code
        assert any(name.endswith(".dist-info/licenses/LICENSE") for name in archive.namelist())
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # the dependencies (torch, hydra, ...) come from this environment, as a path entry: no editable finder of ours
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for folder in ("models", "pipeline", "fit", "conf"):  # a user's project with folders named like ours
        (tmp_path / "work" / folder).mkdir(parents=True)
        (tmp_path / "work" / folder / "__init__.py").write_text("raise ImportError('the user\\'s own package')\n")
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(name, *args):
        script = (f"import sys; from scaling_lab.conf.commands import {name}; sys.argv = ['x', *sys.argv[1:]]; "
                  f"{name}()")
        return subprocess.run([str(python), "-c", script, *args], cwd=work, capture_output=True, text=True,
                              env=env, timeout=300)

    where = subprocess.run([str(python), "-c", "import scaling_lab.conf as c; print(c.CONF_DIR)"], cwd=work,
                           capture_output=True, text=True, env=env)
    assert where.returncode == 0 and str(site) in where.stdout and str(ROOT) not in where.stdout, where
    assert len(list(Path(where.stdout.strip()).rglob("*.yaml"))) >= 30  # conf/ shipped as package data

    plan = run("plan", "constants=sardana2024", "target.chinchilla_params=7e10", "demand.tokens=2e12",
               f"out={tmp_path / 'plan'}")
    assert plan.returncode == 0, plan.stderr
    assert (tmp_path / "plan" / "plan.json").is_file()

    rows = ["N,D,loss"] + [f"{n:g},{d:g},{1.7 + 400 / n ** 0.34 + 410 / d ** 0.28:.6f}"
                           for n in (1e7, 3e7, 1e8, 3e8, 1e9) for d in (1e9, 3e9, 1e10, 3e10)]
    (work / "runs.csv").write_text("\n".join(rows) + "\n")
    fit = run("fit", "source=csv", "source.path=runs.csv", "law=chinchilla", "bootstrap.n=0",
              "plots=false", f"out={tmp_path / 'fit'}")
    assert fit.returncode == 0, fit.stderr
    assert (tmp_path / "fit" / "fit.json").is_file()

    helped = run("train", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("scaling-train:"), helped.stderr
