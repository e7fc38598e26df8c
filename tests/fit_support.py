"""Helpers shared by the fit tests: a composed scaling-fit config, synthetic sweeps, the published data."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from scaling_lab.conf import CONF_DIR



def fit_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="fit", overrides=list(overrides))


def shared_reference() -> Path:
    shared = Path(os.environ.get("SCALING_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    ref = shared / "reference"
    if not ref.is_dir():
        pytest.skip(f"published reference data not found at {ref} (set SCALING_SHARED)")
    return ref


def synthetic_sweep(params: dict, noise: float, seed: int, with_r: bool) -> pd.DataFrame:
    """Runs over 3 decades of N and D (and 4 aspect ratios), loss from the law with multiplicative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.geomspace(1e7, 1e10, 6):
        for d in np.geomspace(2e8, 2e11, 5):
            for r in ((16, 48, 128, 320) if with_r else (None,)):
                loss = params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]
                if with_r:
                    loss *= 1 + params["epsilon"] * r ** params["gamma"]
                rows.append({"params": n, "tokens": d, "R": r, "loss": loss * np.exp(noise * rng.standard_normal())})
    return pd.DataFrame(rows)
