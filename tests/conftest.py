"""Shared fixtures: composed real configs (shrunken), a session-wide token cache, and the ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from scaling_lab.conf import CONF_DIR

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
    """A path under ../shared, or skip the test with the reason when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: put the project's shared data beside the checkout or set SCALING_SHARED")
    return path


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    """One token cache for the whole test session (tokenizing the stdlib once takes a few seconds)."""
    return os.environ.get("SCALING_TEST_CACHE") or str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def compose_train(tmp_path, token_cache):
    """Compose conf/train.yaml with the tiny overrides, a temporary results dir and the session token cache."""

    def _compose(*overrides: str, config_name: str = "train"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=[
                *TINY, f"results_dir={tmp_path / 'results'}", f"data.cache_dir={token_cache}", *overrides])

    return _compose
