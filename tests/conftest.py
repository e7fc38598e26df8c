"""Shared fixtures: real configs composed from the package's conf/ and shrunk, and a session-wide token cache."""

from __future__ import annotations

import os

import pytest

from scaling_lab.conf import compose
from tests.helpers import TINY


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core, at most 4) each worker owns one core: its
    process and every process it starts see one core, so training runs take one thread (``default_threads``) and
    workers never fight over the cores (two 2-thread processes on 2 cores run 2-5x slower than 1-thread ones)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= count:
            os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


# The longest test files (`pytest --durations`, summed per file: 90-170 s each), collected first: xdist's
# `--dist loadfile` hands files to idle workers in collection order, so a long file collected last (alphabetically)
# would run alone at the end while the other workers wait.
LONGEST_FIRST = ("test_doc_examples.py", "test_slurm.py", "test_faults.py", "test_sweep.py", "test_ddp.py",
                 "test_commands.py", "test_report.py", "test_hostile.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    """One token cache for the whole test session (tokenizing the stdlib once takes a few seconds)."""
    return os.environ.get("SCALING_TEST_CACHE") or str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, token_cache):
    """Four tiny real runs of one sweep (``serve``), shared by the serving and export tests: a target and a draft
    with saved weights, a run without weights, and a run with another tokenizer (a 300-token BPE) with weights."""
    from scaling_lab.pipeline.train import run as train

    results = tmp_path_factory.mktemp("serving") / "results"
    base = [*TINY, f"results_dir={results}", f"data.cache_dir={token_cache}", "logger=none", "sweep.name=serve"]
    runs = {}
    for name, extra in {"target": ["train.save_model=true", "model.n_layers=2"],
                        "draft": ["train.save_model=true", "train.seed=1", "train.tokens=8192"],
                        "no_weights": ["train.seed=2"],
                        "bpe": ["train.save_model=true", "data.tokenizer=bpe", "data.bpe_vocab_size=300",
                                "data.max_bytes=300000"]}.items():
        record = train(compose("train", base + extra))
        assert record["status"] == "ok", record.get("error")
        runs[name] = record
    return results, runs


@pytest.fixture
def compose_train(tmp_path, token_cache):
    """conf/train.yaml composed with the tiny overrides, a temporary results dir and the session token cache."""

    def _compose(*overrides: str, config_name: str = "train"):
        return compose(config_name, [*TINY, f"results_dir={tmp_path / 'results'}", f"data.cache_dir={token_cache}",
                                     *overrides])

    return _compose
