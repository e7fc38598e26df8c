"""Nothing lost, nothing run twice: real signals, real SIGKILLs and concurrent launches of the installed
``scaling-train``, each checked in the store afterwards.

* SIGTERM and SIGUSR2 (submitit's time-limit signal) in the training and the latency phase leave a checkpoint
  taken at the signal (periodic checkpoints are off, and the checkpoint says why it was saved), the process exits
  non-zero saying what happened, and the resumed run equals an uninterrupted one exactly: tokens, the hash of the
  training windows' indices in order, and the held-out loss.
* A tiny sweep SIGKILLed at seeded random moments and relaunched after each kill ends with exactly one valid ``ok``
  record per point, no partial JSON, no temp files, and each run's tokens, windows and loss equal an uninterrupted
  sweep's; a kill at the record's rename (and right after it) loses nothing.
* Two concurrent launches of one sweep train each run once: every record has exactly one attempt, ended ``ok``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaling_lab.fit.io import store
from scaling_lab.pipeline.train import run
from tests.conftest import TINY

BIN = Path(sys.executable).parent


def _popen(args, env=None, **kw):
    return subprocess.Popen([str(BIN / "scaling-train"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True, **kw)


def _wait_for_line(proc, needle: str, timeout: float = 240) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}; output:\n{''.join(lines)[-3000:]}")


TRAIN_PHASE = ["model.n_layers=2", "train.tokens=20480", "train.ckpt_every=0", "train.progress_every_s=0",
               "latency.enabled=false", "logger=none", "train.threads=1"]
LATENCY_PHASE = ["model.n_layers=2", "train.tokens=8192", "train.ckpt_every=0", "logger=none", "train.threads=1",
                 "latency.batch_sizes=[1]"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, token_cache):
    """Uninterrupted runs of both configurations (computed once)."""
    from hydra import compose, initialize_config_dir

    from scaling_lab.conf import CONF_DIR

    out = {}
    for name, args in (("training", TRAIN_PHASE), ("latency", LATENCY_PHASE)):
        results = tmp_path_factory.mktemp(f"straight-{name}")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*TINY, *args, f"results_dir={results}", f"data.cache_dir={token_cache}"])
        out[name] = run(cfg)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig,phase", [(signal.SIGTERM, "training"), (signal.SIGUSR2, "training"),
                                       (signal.SIGUSR2, "latency"), (signal.SIGTERM, "latency")])
def test_signal_saves_at_the_signal_and_the_resume_is_exact(sig, phase, compose_train, tmp_path, token_cache,
                                                            straight):
    args = TRAIN_PHASE if phase == "training" else LATENCY_PHASE
    results = tmp_path / "results"
    extra = ["latency.repeats=5000"] if phase == "latency" else []  # a latency phase long enough to be hit
    proc = _popen([*TINY, *args, *extra, f"results_dir={results}", f"data.cache_dir={token_cache}"])
    seen = _wait_for_line(proc, "step 10/" if phase == "training" else "measuring inference latency")
    if phase == "latency":
        time.sleep(0.5)
    os.kill(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    output = "".join(seen) + output
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, output[-3000:]
    assert f"interrupted: {name} during {phase}" in output and "Traceback" not in output, output[-3000:]
    assert not list((results / "default").glob("*.json")), "an interrupted run writes no record"

    (ckpt,) = (results / "default" / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    total = straight[phase]["optim"]["total_steps"]
    assert saved["saved"]["reason"] == name  # taken at the signal (periodic checkpoints are off)
    if phase == "training":
        assert 10 <= saved["global_step"] < total
    else:
        assert saved["global_step"] == total  # the trained weights, saved during the latency measurement
    assert store.run_state(results, "default", straight[phase]["run_id"]) == "interrupted"

    resumed = run(compose_train(*args))  # the same run, same results_dir, in-process
    ref = straight[phase]
    assert resumed["status"] == "ok"
    assert resumed["timing"]["resumed_from_tokens"] == saved["tokens_seen"] > 0
    assert resumed["tokens"] == ref["tokens"]  # budget, seen, and the hash of the window indices in order
    assert resumed["loss"]["final"] == ref["loss"]["final"]  # exactly
    assert [a["ended"] for a in resumed["attempts"]] == [f"interrupted ({name} during {phase})", "ok"]
    assert not list((results / "default" / "checkpoints").glob("*"))  # removed once the record is in place


SWEEP = ["sweep=smoke", "model.params=1e4", "train.ckpt_every=4", "latency.enabled=false", "logger=none",
         "train.threads=1"]


def _sweep_records(results: Path) -> dict[str, dict]:
    records = {}
    for path in (results / "smoke").glob("*.json"):
        records[path.stem] = json.loads(path.read_text())  # no partial JSON: every file parses
    return records


def _claimed_by(results: Path, pid: int) -> bool:
    claims = (store.read_claim(p) for p in (results / "smoke" / "running").glob("*.json"))
    return any(c and c.get("pid") == pid for c in claims)


def _temp_files(results: Path) -> list[Path]:
    return [p for p in results.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path, token_cache):
    common = [f"data.cache_dir={token_cache}"]
    reference = subprocess.run([str(BIN / "scaling-train"), "-m", *SWEEP, f"results_dir={tmp_path / 'straight'}",
                                *common], capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _sweep_records(tmp_path / "straight")
    assert len(expected) == 2

    rng = random.Random(11)
    kills, rounds = 0, [tmp_path / "results0"]
    for attempt in range(80):
        results = rounds[-1]
        proc = _popen(["-m", *SWEEP, f"results_dir={results}", *common])
        if attempt % 2:  # a moment after the launch (often in start-up) ...
            delay = rng.uniform(1.0, 6.0)
        else:  # ... or once the launch has claimed a run that has a checkpoint (mid-training on any machine speed)
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None and not (
                    _claimed_by(results, proc.pid) and list((results / "smoke" / "checkpoints").glob("*.ckpt"))):
                time.sleep(0.02)
            delay = rng.uniform(0.0, 0.5)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launch and everything it started
            proc.wait()
            kills += 1
        proc.stdout.close()
        done = {k: r for k, r in _sweep_records(results).items() if r.get("status") == "ok"}
        if kills >= 10:  # enough kills: let the sweep finish
            finish = subprocess.run([str(BIN / "scaling-train"), "-m", *SWEEP, f"results_dir={results}", *common],
                                    capture_output=True, text=True, timeout=600)
            assert finish.returncode == 0, finish.stderr[-3000:]
            break
        if len(done) == 2:  # a fast machine finished the sweep between kills: the next kills go to a fresh one
            rounds.append(tmp_path / f"results{len(rounds)}")
    assert kills >= 10

    # A kill at the record's rename, and one right after it (before the checkpoint is removed), lose nothing.
    one_point = [*SWEEP, "model.n_layers=1"]
    for point in ("record-rename", "checkpoint-removal"):
        rerun = tmp_path / f"kill-at-{point}"
        killed = subprocess.run([str(BIN / "scaling-train"), "-m", *one_point, f"results_dir={rerun}", *common],
                                capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                  store.FAULT_ENV: point})
        assert killed.returncode == -signal.SIGKILL
        assert list((rerun / "smoke" / "checkpoints").glob("*.ckpt")), "the checkpoint outlives a failed record"
        again = subprocess.run([str(BIN / "scaling-train"), "-m", *one_point, f"results_dir={rerun}", *common],
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        (record,) = _sweep_records(rerun).values()
        assert record["status"] == "ok" and record["tokens"] == expected[record["run_id"]]["tokens"]
        assert not _temp_files(rerun)
        assert not list((rerun / "smoke" / "checkpoints").glob("*"))

    resumed = False
    for results in rounds:  # every round ends with exactly the uninterrupted sweep's records, nothing left over
        records = _sweep_records(results)
        assert set(records) == set(expected)
        for run_id, record in records.items():
            assert record["status"] == "ok"
            assert record["tokens"] == expected[run_id]["tokens"]  # seen, budget and the window-index hash
            assert record["loss"]["final"] == expected[run_id]["loss"]["final"]
            assert [a["ended"] for a in record["attempts"]][-1] == "ok"
            resumed |= record["timing"]["resumed_from_tokens"] > 0
        assert not _temp_files(results)
        assert not list((results / "smoke" / "checkpoints").glob("*"))
        assert not list((results / "smoke" / "running").glob("*.json"))
    assert resumed, "no kill landed mid-run"


@pytest.mark.slow
def test_two_concurrent_launches_train_each_run_once(tmp_path, token_cache):
    args = ["-m", "sweep=smoke", "latency.enabled=false", "logger=none", "train.threads=1",
            f"results_dir={tmp_path / 'results'}", f"data.cache_dir={token_cache}"]
    procs = [_popen(args) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    records = _sweep_records(tmp_path / "results")
    assert len(records) == 4
    for record in records.values():
        assert record["status"] == "ok"
        assert len(record["attempts"]) == 1 and record["attempts"][0]["ended"] == "ok", record["attempts"]
        assert record["timing"]["resumed_from_tokens"] == 0  # nobody resumed from another's checkpoint
    trained = [out.count("][INFO] - record: ") for out in outputs]  # logged by the process that wrote a record
    assert sum(trained) == 4, outputs
