"""Two gloo ranks on CPU through the real Trainer and the installed ``scaling-train``: the DDP paths of the
checkpoint (one writer, one rename, a barrier) and of pre-emption (every rank saves at the same step and leaves).

A hang here is the failure these tests exist for, so every wait has a timeout and a hung job is killed with its
process group (its output is in the assertion)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaling_lab.fit.io import store
from tests.conftest import TINY
from tests.test_faults import _popen, _temp_files, _wait_for_line

BIN = Path(sys.executable).parent
DDP = ["latency.enabled=false", "logger=none", "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu",
       "train.threads=1"]


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in folder.glob("*.json")]


def _finish(proc, timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"the DDP job hung (no exit {timeout:.0f} s after the signal); output:\n"
                             f"{output[-3000:]}") from None
    return output


@pytest.mark.slow
def test_ddp_two_cpu_ranks_checkpoint_resume_and_finish(tmp_path, token_cache):
    """Periodic checkpoints and the trained weights', a kill at the record's rename, a relaunch that resumes from
    the checkpoint with nothing left to train and ends at the exact token budget."""
    args = [*TINY, *DDP, "train.ckpt_every=16", f"results_dir={tmp_path / 'r'}", f"data.cache_dir={token_cache}"]
    killed = subprocess.run([str(BIN / "scaling-train"), *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, store.FAULT_ENV: "record-rename"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list((tmp_path / "r" / "default" / "checkpoints").glob("*.ckpt"))
    again = subprocess.run([str(BIN / "scaling-train"), *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (record,) = _records(tmp_path / "r" / "default")
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == 16384
    # the periodic checkpoints passed (one writer, one rename, a barrier), then the trained weights' checkpoint,
    # kept until the record is in place: the relaunch retrains nothing
    assert record["timing"]["resumed_from_tokens"] == 16384
    assert [a["ended"] for a in record["attempts"]] == ["killed", "ok"]
    assert not _temp_files(tmp_path / "r")


@pytest.mark.slow
@pytest.mark.parametrize("to", ["job", "rank 0"])
def test_ddp_sigterm_mid_training_every_rank_saves_at_one_step(to, tmp_path, token_cache):
    """SIGTERM mid-training, to the job's process group (both ranks, as a scheduler signals a job step) or to
    rank 0 alone (``kill <pid>``): both ranks save at the same step and exit, nothing hangs; the relaunch resumes
    from that checkpoint and ends at the exact token budget, the record holding both attempts."""
    args = [*TINY, *DDP, "train.tokens=32768", "train.ckpt_every=0", "train.progress_every_s=0",
            f"results_dir={tmp_path / 'r'}", f"data.cache_dir={token_cache}"]
    proc = _popen(args)
    seen = _wait_for_line(proc, "step 40/")
    if to == "job":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    output = "".join(seen) + _finish(proc, timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "interrupted: SIGTERM during training" in output and "Traceback" not in output, output[-3000:]
    (ckpt,) = (tmp_path / "r" / "default" / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["saved"]["reason"] == "SIGTERM" and 40 <= saved["global_step"] < 128
    assert not _temp_files(tmp_path / "r")
    again = subprocess.run([str(BIN / "scaling-train"), *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (record,) = _records(tmp_path / "r" / "default")
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == 32768
    assert record["timing"]["resumed_from_tokens"] == saved["tokens_seen"] > 0
    assert [a["ended"] for a in record["attempts"]] == ["interrupted (SIGTERM during training)", "ok"]
    assert not _temp_files(tmp_path / "r")


WSD = ["train.schedule=wsd", "train.warmup_steps=4", "train.decay_frac=0.25", "train.tokens=32768",
       "train.ckpt_every=16", "train.progress_every_s=0"]


@pytest.mark.slow
@pytest.mark.parametrize("phase, line", [("trunk", "step 40/128 ")])  # the branch: tests/test_slurm.py
def test_ddp_wsd_preempted_in_the_stable_run_or_the_branch_resumes_exactly(phase, line, tmp_path, token_cache):
    """A WSD branch on 2 ranks: rank 0 alone takes the stable run's lock and decides, the other rank follows its
    plan; SIGTERM to the job in the stable run (steps 0-96) or in the decay branch (96-128) saves on both ranks at
    one step, and the relaunch resumes from there and ends at the exact budget with both attempts. (The same run
    pre-empted in both, under SLURM: tests/test_slurm.py.)"""
    args = [*TINY, *DDP, *WSD, f"results_dir={tmp_path / 'r'}", f"data.cache_dir={token_cache}"]
    proc = _popen(args)
    seen = _wait_for_line(proc, line)
    os.killpg(proc.pid, signal.SIGTERM)
    output = "".join(seen) + _finish(proc, timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "interrupted: SIGTERM during training" in output and "Traceback" not in output, output[-3000:]
    (trunk,) = [p for p in (tmp_path / "r" / "default" / "trunks").iterdir() if p.is_dir()]
    saved = list(trunk.glob("partial.ckpt")) if phase == "trunk" else \
        list((tmp_path / "r" / "default" / "checkpoints").glob("*.ckpt"))
    assert saved and not list(trunk.glob(".plan-*"))
    again = subprocess.run([str(BIN / "scaling-train"), *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (record,) = _records(tmp_path / "r" / "default")
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == 32768
    assert [a["ended"] for a in record["attempts"]] == ["interrupted (SIGTERM during training)", "ok"]
    if phase == "trunk":  # the relaunch trained the stable run from the step of the signal, not from scratch
        assert 0 < record["schedule"]["trunk_steps_trained"] < 96 - 40
    else:
        assert record["timing"]["resumed_from_tokens"] > 96 * 8 * 32
    assert not _temp_files(tmp_path / "r") and not list(trunk.glob(".plan-*"))


@pytest.mark.slow
def test_ddp_divergence_on_one_rank_ends_both_at_once(tmp_path, token_cache):
    """Rank 1 alone sees a NaN loss (a fault point): the ranks take the divergence decision together at the same
    step, so both end within seconds and the run is recorded failed (a per-rank decision left rank 0 waiting in the
    next all-reduce until the process group's timeout)."""
    args = [*TINY, *DDP, f"results_dir={tmp_path / 'r'}", f"data.cache_dir={token_cache}"]
    proc = _popen(args, env={store.FAULT_ENV: "nan-loss-rank1"})
    output = _finish(proc, timeout=240)
    assert proc.returncode == 1, output[-3000:]
    (record,) = _records(tmp_path / "r" / "default")
    assert record["status"] == "failed" and "diverged at step 0: training loss inf" in record["error"]


@pytest.mark.slow
def test_ddp_micro_batches_saved_at_a_step_and_resumed_exactly(tmp_path, token_cache):
    """2 ranks, each taking its 4 sequences of a step in 2 micro-batches: SIGTERM saves at the end of a whole step
    (never between micro-batches), and the relaunch ends at the exact budget."""
    args = [*TINY, *DDP, "train.micro_batch_size=2", "train.tokens=32768", "train.ckpt_every=0",
            "train.progress_every_s=0", f"results_dir={tmp_path / 'r'}", f"data.cache_dir={token_cache}"]
    proc = _popen(args)
    seen = _wait_for_line(proc, "step 40/")
    os.killpg(proc.pid, signal.SIGTERM)
    output = "".join(seen) + _finish(proc, timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    (ckpt,) = (tmp_path / "r" / "default" / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["tokens_seen"] == saved["global_step"] * 8 * 32  # whole steps only
    again = subprocess.run([str(BIN / "scaling-train"), *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    (record,) = _records(tmp_path / "r" / "default")
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == 32768
    assert record["timing"]["resumed_from_tokens"] == saved["tokens_seen"]
