"""Shared fixtures: real configs composed from the package's conf/ and shrunk, and a session-wide token cache."""

from __future__ import annotations

import os

import pytest

from scaling_lab.conf import compose
from tests.helpers import TINY


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    """One token cache for the whole test session (tokenizing the stdlib once takes a few seconds)."""
    return os.environ.get("SCALING_TEST_CACHE") or str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def compose_train(tmp_path, token_cache):
    """conf/train.yaml composed with the tiny overrides, a temporary results dir and the session token cache."""

    def _compose(*overrides: str, config_name: str = "train"):
        return compose(config_name, [*TINY, f"results_dir={tmp_path / 'results'}", f"data.cache_dir={token_cache}",
                                     *overrides])

    return _compose
