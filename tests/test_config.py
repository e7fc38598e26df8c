"""Every config group of scaling-train composed (and the launchers instantiated); the sweeps' grids checked."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from scaling_lab.conf import CONF_DIR, compose
from scaling_lab.pipeline.sweep import grid, plan_points
from scaling_lab.pipeline.runspec import plan_run

ROOT = Path(__file__).resolve().parents[1]

EXTRA = {"data=files": ["data.path=/some/dir"], "data=hub": ["data.name=some/dataset"]}


def compose_train(overrides, hydra_config=False):
    return compose("train", overrides, return_hydra_config=hydra_config)


def options(group: str) -> list[str]:
    folder = CONF_DIR / "launch" / group if group == "sweep" else CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "train", "logger"])
def test_every_option_composes_and_plans(group):
    assert options(group)
    for option in options(group):
        override = f"{group}={option}"
        cfg = compose_train([override, *EXTRA.get(override, [])])
        spec = plan_run(cfg)
        assert spec.total_steps >= 1 and spec.run_id


@pytest.mark.parametrize("launcher, cls", [("basic", "BasicLauncher"), ("joblib", "JoblibLauncher"),
                                           ("submitit_local", "LocalLauncher"), ("submitit_slurm", "SlurmLauncher")])
def test_launchers_compose_and_instantiate(launcher, cls):
    cfg = compose_train([f"hydra/launcher={launcher}"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(cls)
    if launcher != "basic":  # Hydra refuses to instantiate its own basic launcher from config
        assert type(instantiate(cfg.hydra.launcher)).__name__ == cls
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize("sweep", options("sweep"))
def test_every_sweep_expands_to_valid_points(sweep):
    cfg = compose_train([f"sweep={sweep}"], hydra_config=True)
    points = plan_points(grid(cfg.hydra.sweeper.get("params"), [f"sweep={sweep}"]), check_data=False)
    assert points and not [p.error for p in points if p.error]
    assert len({p.run_id for p in points}) == len(points)


def test_demo_sweep_can_teach_both_laws():
    cfg = compose_train(["sweep=demo"], hydra_config=True)
    fitted = plan_points(grid(cfg.hydra.sweeper.params, ["sweep=demo"]), check_data=False)
    # the Makefile's demo adds the held-out class (DEMO_HELDOUT) and the smallest shape (a decade below the largest
    # size), at the same budgets
    (line,) = [x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("DEMO_HELDOUT :=")]
    heldout = plan_points(grid(cfg.hydra.sweeper.params, ["sweep=demo", *line.split(":=")[1].split()]),
                          check_data=False)
    small = plan_points(grid(cfg.hydra.sweeper.params, ["sweep=demo", "model.params=2.5e4", "model.n_layers=2"]),
                        check_data=False)
    points = fitted + heldout
    assert not [p.error for p in points + small if p.error]
    assert len(points) >= 24
    n = [p.n_params for p in points + small]
    d = [p.tokens for p in points + small]
    assert max(n) / min(n) >= 10 and max(d) / min(d) >= 9.9
    # the held-out class extrapolates in N only: its aspect ratios lie inside the fitted ones
    aspect = [float(p.shape.split()[-1][1:]) for p in fitted]
    assert all(min(aspect) <= float(p.shape.split()[-1][1:]) <= max(aspect) for p in heldout)
    assert min(p.n_params for p in heldout) > max(p.n_params for p in fitted)
    sizes = {}
    for p in points:
        size = next(o for o in p.overrides if o.startswith("model.params="))
        sizes.setdefault(size, {"R": set(), "D": set(), "N": set()})
        sizes[size]["R"].add(p.shape.split()[-1])
        sizes[size]["D"].add(p.tokens)
        sizes[size]["N"].add(p.n_params)
    assert len(sizes) >= 3
    assert all(len(s["R"]) >= 4 and len(s["D"]) >= 3 for s in sizes.values())
    for size, s in sizes.items():  # every shape within 10% of its class's N, none below 32 wide or 2 heads
        target = float(size.split("=")[1])
        assert all(abs(n / target - 1) <= 0.1 for n in s["N"])
    assert all(int(p.shape.split()[1][1:]) >= 32 for p in points + small)

# the config each console script composes (conf/<name>.yaml)
COMMAND_CONFIGS = {"scaling-train": "train", "scaling-sweep-status": "status", "scaling-fit": "fit",
                   "scaling-latency": "latency_cli", "scaling-quantize": "quantize", "scaling-speculate": "speculate",
                   "scaling-verify": "verify", "scaling-plan": "plan", "scaling-report": "report"}


def test_every_demo_command_composes_on_another_corpus(tmp_path):
    """`make demo DEMO_DATA=...` (the README's own-corpus path): every command the demo runs composes with the
    overrides it is given (scaling-sweep-status was handed data=... it has no key for, and stopped the demo)."""
    import re
    import shlex
    import subprocess

    out = subprocess.run(["make", "-n", "demo", "DEMO_DATA=data=files data.path=/corpus data.val_path=/val",
                          f"DEMO_DIR={tmp_path / 'demo'}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = []
    for line in out.stdout.replace("\\\n", " ").splitlines():
        for part in re.split(r"\s&\s|;", line):
            words = shlex.split(part) if part.strip().startswith(".venv/bin/scaling-") else []
            if words and Path(words[0]).name in COMMAND_CONFIGS:
                commands.append(words)
    assert {Path(w[0]).name for w in commands} == set(COMMAND_CONFIGS)
    for words in commands:
        args = [w for w in words[1:] if w != "-m" and not w.startswith("hydra")]
        if "-m" in words:  # a multirun: its first point
            args = grid(None, args)[0]
        compose(COMMAND_CONFIGS[Path(words[0]).name], args)  # raises on a key the command does not have
