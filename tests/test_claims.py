"""Claims on runs: a live claim of another process is respected, a requeued SLURM job takes its own earlier claim
over at once (its killed predecessor's heartbeat still looks fresh for STALE_S), and attempts say which job ran."""

import json
import socket
import subprocess
import time

import pytest

from scaling_lab.fit.io import store


@pytest.fixture
def holder():
    """A live process on this host standing in for the run's current trainer (stopped by its pid)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _claim(tmp_path, pid: int, **slurm) -> None:
    path = store.claim_path(tmp_path, "s", "aaaaaaaaaaaa")
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start": now, "heartbeat": now,
                                "token": "t", "tokens_resumed": None, **slurm}))


@pytest.mark.parametrize("ours, theirs, taken", [
    ({}, {}, False),                                                         # two plain processes
    ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, {"slurm_job_id": "77", "slurm_restart_count": 0}, True),
    ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, {"slurm_job_id": "78", "slurm_restart_count": 0}, False),
    ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}, {"slurm_job_id": "77", "slurm_restart_count": 0}, False),
    ({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "2"},
     {"slurm_job_id": "70_3", "slurm_restart_count": 1}, True),
])
def test_a_requeued_job_takes_its_own_claim_over(tmp_path, holder, monkeypatch, ours, theirs, taken):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in ours.items():
        monkeypatch.setenv(key, value)
    _claim(tmp_path, holder, **theirs)
    claim = store.Claim.acquire(tmp_path, "s", "aaaaaaaaaaaa")
    assert (claim is not None) == taken
    if taken:
        (earlier,) = store.attempts(tmp_path, "s", "aaaaaaaaaaaa")
        assert earlier["ended"] == "killed" and earlier["slurm_job_id"] == theirs["slurm_job_id"]
        assert claim.attempt("ok")["slurm_restart_count"] == int(ours["SLURM_RESTART_COUNT"])
        claim.release()
