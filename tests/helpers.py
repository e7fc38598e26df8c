"""Helpers shared by the tests: the ../shared data (or a clear skip), tiny run overrides, composed configs, synthetic
sweeps."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling_lab.conf import compose



def fit_config(*overrides: str):
    return compose("fit", list(overrides))


SHARED = Path(os.environ.get("SCALING_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# A tiny but real run: 1 layer of width 32, 16k training tokens, a few latency repeats.
TINY = [
    "model.n_layers=1", "model.d_model=32", "model.head_dim=16", "model.seq_len=32",
    "train.tokens=16384", "train.batch_size=8", "train.log_every=4", "train.progress_bar=false",
    "data.eval_tokens=2048", "data.val_curve_tokens=512",
    "latency.prompt_len=8", "latency.decode_tokens=4", "latency.batch_sizes=[1,2]", "latency.repeats=2",
    "latency.warmup=1",
]


def shared_path(*parts: str) -> Path:
    """A path under ../shared (or $SCALING_SHARED), or skip the test with the reason when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: put the project's shared data beside the checkout or set SCALING_SHARED")
    return path


def shared_reference() -> Path:
    """The published sweeps and results under ../shared/reference."""
    return shared_path("reference")


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


def latency_section(device: str = "cpu", modes=("none",), **coefficients) -> dict:
    """A fit.json latency section (the roofline law of fit/latency.py) with the given decode coefficients (the
    rest 0), the same in every mode; prefill 10x decode."""
    from scaling_lab.fit.latency import TERMS, LatencyModel

    decode = {k: float(coefficients.get(k, 0.0)) for k in TERMS}
    prefill = {k: 10 * v for k, v in decode.items()}
    return LatencyModel(modes={m: {"decode_ms_per_token": decode, "prefill_ms": prefill} for m in modes},
                        meta={"device": device, "threads": 1, "prompt_len": 8, "decode_tokens": 4, "warmup": 1,
                              "repeats": 2, "vocab_size": 257, "batch_size": 1, "batch_sizes": [1]}).to_dict()
