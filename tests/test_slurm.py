"""Sweeps on a real one-node SLURM cluster (tests/slurm_cluster.py: slurmctld, slurmd, slurmdbd with MariaDB),
through the real ``scaling-train -m ... hydra/launcher=submitit_slurm``: a smoke sweep and its relaunch, a USR2
pre-emption that submitit requeues, a partition pre-emption that SLURM requeues (both resume exactly), and a job
that can never start, which scaling-train reports instead of waiting forever.

Skipped, with the reason, only where SLURM cannot be installed or started (not root, no apt-get)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling_lab.fit.io import store
from tests import slurm_cluster

BIN = Path(sys.executable).parent
# the CPU partition, one core and 1 GB per job; timeout_min <= 10: submitit requeues at any USR2 (a "timeout")
SLURM = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={slurm_cluster.CPU_PARTITION}",
         "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=10", "train.accelerator=cpu", "logger=none"]
# tiny runs: two points of the smoke sweep, without the latency measurement
SMOKE = ["sweep=smoke", "model.params=1e4", "latency.enabled=false", "data.eval_tokens=2048",
         "data.val_curve_tokens=512"]
# one run long enough (400 steps) to be interrupted mid-training, as in tests/test_sweep.py's submitit requeue
TOKENS = 102400
LONG_RUN = ["model.n_layers=2", "model.d_model=32", "model.head_dim=16", "model.seq_len=32", f"train.tokens={TOKENS}",
            "train.batch_size=8", "train.ckpt_every=0", "train.progress_every_s=0", "train.log_every=4",
            "latency.enabled=false", "data.eval_tokens=2048", "data.val_curve_tokens=512"]
SWEEP_TIMEOUT_S = 150


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    try:
        started = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as err:
        pytest.skip(f"no SLURM cluster here: {err}")
    yield started
    started.stop()


@pytest.fixture
def slurm(cluster):
    """The cluster, emptied of this test's jobs afterwards (a failed test leaves none running for the next)."""
    yield cluster
    jobs = cluster.run("squeue", "-h", "-o", "%A").stdout.split()
    if jobs:
        cluster.run("scancel", "--full", *jobs)


def launch(slurm, tmp_path, token_cache, *overrides) -> subprocess.Popen:
    """scaling-train -m on the cluster, in a process group of its own (killed whole if it hangs)."""
    env = {**slurm.env, "SCALING_SUBMITIT_DIR": str(tmp_path / "private")}
    args = [str(BIN / "scaling-train"), "-m", *SLURM, *overrides, f"results_dir={tmp_path / 'results'}",
            f"data.cache_dir={token_cache}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = SWEEP_TIMEOUT_S) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"scaling-train did not end within {timeout} s:\n{err[-3000:]}")


def sweep(slurm, tmp_path, token_cache, *overrides) -> tuple[int, str]:
    proc = launch(slurm, tmp_path, token_cache, *overrides)
    out, err = finish(proc)
    return proc.returncode, out + err


def accounted(slurm, jobs: list[str], timeout: float = 30) -> list[str]:
    """The jobs' states in SLURM's accounting (sacct), once none is running any more (a job whose result is in
    may still be ending)."""
    deadline = time.time() + timeout
    while True:
        states = slurm.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", ",".join(jobs)).stdout.splitlines()
        if (states and not {"PENDING", "RUNNING", "COMPLETING", "REQUEUED"} & set(states)) or time.time() > deadline:
            return states
        time.sleep(0.5)


def job_logs(tmp_path) -> str:
    return "".join(p.read_text() for p in sorted((tmp_path / "private").rglob("*_log.*")))


def wait_in_logs(proc, tmp_path, needle: str, timeout: float = 150) -> str:
    """The job's id, once a log of it shows ``needle``."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for log in (tmp_path / "private").rglob("*_log.out"):
            if needle in log.read_text():
                return log.name.split("_")[0]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no job log showed {needle!r}:\n{proc.communicate()[1][-3000:]}\n{job_logs(tmp_path)[-3000:]}")


def running_job(proc, tmp_path) -> str:
    """The id of the sweep's one SLURM job, once its log shows training under way (step 20)."""
    return wait_in_logs(proc, tmp_path, "step 20/", timeout=120)


def resumed_record(proc, tmp_path, stop: str) -> dict:
    """The sweep ended well, and its one run finished in two attempts of the same SLURM job, the second resumed
    from the checkpoint the first saved at the signal."""
    out, err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    assert "1 finished after resuming from an interruption: " in err and f"(interrupted ({stop}))" in err, err[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results" / "default").glob("*.json")]
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == TOKENS
    first, second = record["attempts"]
    assert [first["ended"], second["ended"]] == [f"interrupted ({stop})", "ok"]
    assert 20 * 8 * 32 <= first["tokens_end"] == record["timing"]["resumed_from_tokens"] < TOKENS
    # the same SLURM job, restarted once by the requeue
    assert first["slurm_job_id"] == second["slurm_job_id"]
    assert (first["slurm_restart_count"], second["slurm_restart_count"]) == (0, 1)
    return record


@pytest.mark.slow
def test_smoke_sweep_on_slurm_then_relaunch_trains_nothing(slurm, tmp_path, token_cache):
    code, output = sweep(slurm, tmp_path, token_cache, *SMOKE)
    assert code == 0, output[-3000:]
    table = store.load_table(tmp_path / "results", "smoke")
    assert len(table) == 2 and set(table.status) == {"ok"}
    assert (table.tokens_seen == table.tokens_budget).all()
    # the jobs went through SLURM, and its accounting knows they completed
    jobs = [p.name.split("_")[0] for p in (tmp_path / "private").rglob("*_log.out")]
    assert accounted(slurm, jobs) == ["COMPLETED", "COMPLETED"]

    records = {p: p.stat().st_mtime for p in (tmp_path / "results" / "smoke").glob("*.json")}
    code, output = sweep(slurm, tmp_path, token_cache, *SMOKE)
    assert code == 0, output[-3000:]
    assert job_logs(tmp_path).count("is already ok") == 2  # each job found its run done, and trained nothing
    assert {p: p.stat().st_mtime for p in records} == records


@pytest.mark.slow
def test_usr2_preemption_is_requeued_by_submitit_and_resumes_exactly(slurm, tmp_path, token_cache):
    """USR2 (what SLURM sends before a time limit, --signal): the run saves at the signal, submitit's handler
    requeues the job (scontrol requeue), and the requeued job resumes from that checkpoint."""
    proc = launch(slurm, tmp_path, token_cache, *LONG_RUN)
    job = running_job(proc, tmp_path)
    signalled = slurm.run("scancel", "--signal=USR2", job)
    assert signalled.returncode == 0, signalled.stderr
    resumed_record(proc, tmp_path, "SIGUSR2 during training")
    assert "Requeued job" in job_logs(tmp_path)


@pytest.mark.slow
def test_partition_preemption_is_requeued_by_slurm_and_resumes_exactly(slurm, tmp_path, token_cache):
    """A job on the higher-priority partition needs the whole node: SLURM pre-empts ours (SIGTERM, then requeue),
    runs the other job, and starts ours again, which resumes from the checkpoint saved at the SIGTERM."""
    proc = launch(slurm, tmp_path, token_cache, *LONG_RUN)
    running_job(proc, tmp_path)
    urgent = slurm.run("sbatch", "--parsable", f"--partition={slurm_cluster.URGENT_PARTITION}",
                       f"--cpus-per-task={slurm.cpus}", f"--output={tmp_path / 'urgent.out'}", "--wrap", "sleep 1")
    assert urgent.returncode == 0, urgent.stderr
    resumed_record(proc, tmp_path, "SIGTERM during training")
    assert accounted(slurm, [urgent.stdout.strip()]) == ["COMPLETED"]


@pytest.mark.slow
def test_a_job_that_can_never_start_ends_the_sweep_with_slurms_reason(slurm, tmp_path, token_cache):
    code, output = sweep(slurm, tmp_path, token_cache, *SMOKE, "model.n_layers=1",
                         f"hydra.launcher.cpus_per_task={slurm.cpus + 1}")
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    (line,) = [x for x in output.splitlines() if "cannot start" in x]
    assert line.startswith("scaling-train: error: job ") and ": PartitionConfig (" in line, line
    assert f"asks for {slurm.cpus + 1} CPUs" in line and "hydra.launcher.cpus_per_task" in line
    # its job was cancelled, not left pending
    job = line.split("job ")[1].split()[0]
    (state,) = accounted(slurm, [job])
    assert state.startswith("CANCELLED"), state
    assert not list((tmp_path / "results").rglob("smoke/*.json"))


@pytest.mark.slow
def test_ddp_wsd_on_two_ranks_preempted_in_the_stable_run_and_the_branch_resumes_exactly(slurm, tmp_path,
                                                                                         token_cache):
    """2 gloo ranks as 2 SLURM tasks (the preset takes tasks_per_node from train.devices), a WSD branch (the stable
    run to step 300, the decay to 400): USR2 in the stable run and again in the branch; each time both ranks save at
    one step, submitit requeues the job, and the run ends at the exact budget with all three attempts."""
    proc = launch(slurm, tmp_path, token_cache, *LONG_RUN, "train.devices=2", "train.strategy=ddp",
                  "train.threads=1", "train.schedule=wsd", "train.warmup_steps=4", "train.decay_frac=0.25")
    job = wait_in_logs(proc, tmp_path, "step 20/")
    assert slurm.run("scancel", "--signal=USR2", job).returncode == 0
    wait_in_logs(proc, tmp_path, "step 320/", timeout=240)  # the requeued job, past the stable run
    assert slurm.run("scancel", "--signal=USR2", job).returncode == 0
    out, err = finish(proc, timeout=240)
    assert proc.returncode == 0, err[-3000:] + job_logs(tmp_path)[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results" / "default").glob("*.json")]
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == TOKENS
    assert record["hardware"]["devices"] == 2
    assert [a["ended"] for a in record["attempts"]] == ["interrupted (SIGUSR2 during training)"] * 2 + ["ok"]
    assert [a["slurm_restart_count"] for a in record["attempts"]] == [0, 1, 2]
    assert 300 * 8 * 32 < record["timing"]["resumed_from_tokens"] < TOKENS  # the branch resumed mid-decay


@pytest.mark.slow
def test_a_cancelled_job_is_reported_with_its_state(slurm, tmp_path, token_cache):
    """scancel of a running job: scaling-train says so in one line with SLURM's state, and the run can resume."""
    proc = launch(slurm, tmp_path, token_cache, *LONG_RUN)
    job = running_job(proc, tmp_path)
    assert slurm.run("scancel", job).returncode == 0
    out, err = finish(proc)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if "a job did not complete" in x]
    assert line.startswith("scaling-train: ") and "(state: CANCELLED" in line, line
