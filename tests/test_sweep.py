"""Sweeps through real Hydra multiruns (basic launcher and submitit_local), resume after SIGTERM, failures that
do not stop the sweep, re-launches that train nothing new, the status command, and concurrent record writers."""

import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling_lab.fit.io import store
from scaling_lab.pipeline.sweep import status
from scaling_lab.pipeline.train import run
from tests.test_train import wandb_summary
from tests.writers import write_many

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=400, env=None):
    out = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    return out


@pytest.fixture
def sweep_args(tmp_path, token_cache, monkeypatch):
    monkeypatch.setenv("SCALING_SUBMITIT_DIR", str(tmp_path / "private"))  # submitit's files, not under ~/.cache
    return [f"results_dir={tmp_path / 'results'}", f"data.cache_dir={token_cache}"]


@pytest.mark.slow
def test_smoke_multirun_then_relaunch_trains_nothing(sweep_args, tmp_path):
    out = cli("scaling-train", "-m", "sweep=smoke", *sweep_args)
    assert out.returncode == 0, out.stderr[-3000:]
    table = store.load_table(tmp_path / "results", "smoke")
    assert len(table) == 4 and set(table.status) == {"ok"}
    assert sorted(table.n_layers.tolist()) == [1, 1, 4, 4]
    assert table.aspect_ratio.nunique() == 4 and (table.tokens_seen == table.tokens_budget).all()
    # every run is mirrored to W&B offline, tagged with its sweep and shape
    wandb_runs = list((tmp_path / "results" / "smoke" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 4
    tags = wandb_summary(wandb_runs[0])["tags"]
    assert "sweep:smoke" in tags and any(t.startswith("R") for t in tags)

    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "results" / "smoke").glob("*.json")}
    again = cli("scaling-train", "-m", "sweep=smoke", *sweep_args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("is already ok") == 4  # nothing trained
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert len(list((tmp_path / "results" / "smoke" / "wandb").glob("offline-run-*"))) == 4

    # a later release adds a result-changing train key (at its baseline, today's behaviour): the finished sweep,
    # relaunched with it, trains nothing (tests/extended_schema.py; tests/test_run_identity.py moves the ids)
    later = subprocess.run([sys.executable, "-m", "tests.extended_schema", "-m", "sweep=smoke", *sweep_args],
                           capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert later.returncode == 0, later.stderr[-3000:]
    assert (later.stdout + later.stderr).count("is already ok") == 4
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes

    # status from what was launched: nothing but the sweep's name and the results folder typed again
    shown = cli("scaling-sweep-status", "sweep=smoke", f"results_dir={tmp_path / 'results'}")
    assert shown.returncode == 0, shown.stderr
    assert "4 points: 4 done" in shown.stdout and "left 0" in shown.stdout
    assert [p.state for p in status(tmp_path / "results", "smoke")] == ["done"] * 4


@pytest.mark.slow
def test_submitit_local_two_jobs_one_forced_to_fail(sweep_args, tmp_path):
    # two points: the same tiny model, once with a divergence threshold no run can meet
    out = cli("scaling-train", "-m", "sweep=smoke", "hydra/launcher=submitit_local", "model.params=1e4",
              "model.n_layers=1", "train.diverge_loss=100,0.5", "logger=none", *sweep_args)
    assert out.returncode == 1, out.stderr[-3000:]  # a sweep with a failed run says so, and exits non-zero
    assert "error: sweep smoke: 2 runs: 1 done, 1 failed" in out.stderr and "diverged" in out.stderr
    table = store.load_table(tmp_path / "results", "smoke")
    assert len(table) == 2
    failed = table[table.status == "failed"]
    assert len(failed) == 1 and "diverged" in failed.error.iloc[0]
    assert (table.status == "ok").sum() == 1  # its sibling finished
    # it really went through submitit, whose pickles (unpickled by this launching process) are in a folder only this
    # user can enter, outside the shared results folder: another user cannot swap the result pickle
    (result,) = [p for p in (tmp_path / "private").rglob("*_result.pkl") if p.stat().st_size][:1]
    holder = result.parent.parent
    assert stat.S_IMODE(holder.stat().st_mode) == 0o700 and holder.stat().st_uid == os.getuid()
    assert not list((tmp_path / "results").rglob("*.pkl")) and not list((tmp_path / "results").rglob(".submitit"))
    if os.getuid() == 0 and shutil.which("setpriv"):  # as root (CI), act as the user nobody for the co-user
        swap = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cp", "/etc/hostname",
                               str(result)], capture_output=True, text=True)
        assert swap.returncode != 0 and "Permission denied" in swap.stderr, swap


@pytest.mark.slow
def test_cells_outside_the_grid_are_skipped_and_listed(sweep_args, tmp_path):
    # an isoFLOP-style limit on the grid's cells: the point at 16 tokens per parameter lies outside
    out = cli("scaling-train", "-m", "sweep=smoke", "model.params=1e4", "model.n_layers=1",
              "train.tokens_per_param=4,16", "sweep.cells.max_tokens_per_param=8", "logger=none", *sweep_args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 of 2 sweep points lie outside the grid's cells" in out.stderr
    assert "outside: run" in out.stdout and "> sweep.cells.max_tokens_per_param=8" in out.stdout
    table = store.load_table(tmp_path / "results", "smoke")
    assert len(table) == 1 and table.status.tolist() == ["ok"]
    assert round(table.tokens_seen.iloc[0] / table.params_non_embedding.iloc[0]) == 4
    shown = cli("scaling-sweep-status", "sweep=smoke", f"results_dir={tmp_path / 'results'}")
    assert shown.returncode == 0, shown.stderr
    assert "2 points: 1 done, 1 outside" in shown.stdout and "left 0" in shown.stdout
    assert "tokens per parameter > sweep.cells.max_tokens_per_param=8" in shown.stdout


@pytest.mark.slow
def test_invalid_point_stops_the_sweep_before_any_job(sweep_args, tmp_path):
    out = cli("scaling-train", "-m", "sweep=smoke", "train.tokens_per_param=4,1e6", *sweep_args)
    assert out.returncode != 0
    assert "sweep points are invalid; nothing was launched" in out.stderr
    assert "exceeds the" in out.stderr
    assert not list((tmp_path / "results").rglob("*.json"))


@pytest.mark.slow
def test_sigterm_then_relaunch_resumes_from_checkpoint(compose_train, tmp_path, token_cache):
    results = tmp_path / "results"
    args = ["model.n_layers=2", "model.d_model=32", "model.head_dim=16", "model.seq_len=32", "train.tokens=400000",
            "train.batch_size=8", "train.ckpt_every=20", "train.progress_bar=false", "logger=none",
            "latency.enabled=false", "train.threads=1", "data.eval_tokens=4096"]
    proc = subprocess.Popen([str(BIN / "scaling-train"), *args, f"results_dir={results}",
                             f"data.cache_dir={token_cache}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = results / "default" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpts.glob("*.ckpt")):
        time.sleep(0.5)
    assert list(ckpts.glob("*.ckpt")), "no periodic checkpoint appeared"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert not list((results / "default").glob("*.json")), "an interrupted run must not write a record"
    assert [p.state for p in status(results, "default")] == ["interrupted"]

    cfg = compose_train(*args)  # the same run, in-process now; results_dir is the same tmp_path/results
    resumed = run(cfg)
    assert resumed["status"] == "ok"
    assert 0 < resumed["timing"]["resumed_from_tokens"] < resumed["tokens"]["budget"]
    straight = run(compose_train(*args, f"results_dir={tmp_path / 'straight'}"))
    assert straight["timing"]["resumed_from_tokens"] == 0
    assert resumed["tokens"]["seen"] == straight["tokens"]["seen"] == straight["tokens"]["budget"]
    assert resumed["loss"]["final"] == pytest.approx(straight["loss"]["final"], abs=0.02)


def test_concurrent_writers_never_corrupt_a_record(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    # the writers' module imports only the store (a spawned child imports its target's module)
    procs = [ctx.Process(target=write_many, args=(str(tmp_path), w)) for w in (1, 2)]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):  # read while they write: never a partial file
        for path in (tmp_path / "race").glob("r*.json"):
            json.loads(path.read_text())
            seen += 1
        time.sleep(0.001)  # the writers share this worker's core: leave them most of it
    for p in procs:
        p.join()
        assert p.exitcode == 0
    files = sorted((tmp_path / "race").glob("*.json"))
    assert len(files) == 30 and seen > 0
    assert all(json.loads(f.read_text())["writer"] in (1, 2) for f in files)
    assert not list((tmp_path / "race").glob(".*tmp"))


@pytest.mark.slow
def test_submitit_requeue_resumes_from_the_checkpoint_taken_at_the_signal(sweep_args, tmp_path):
    """SIGUSR2 to a running submitit job (what SLURM sends before a time limit or a pre-emption): the run saves at
    the signal and hands over to submitit's handler, which requeues the job; the requeued job resumes from that
    checkpoint and finishes; the launcher ends normally and the record keeps both attempts."""
    args = ["scaling-train", "-m", "hydra/launcher=submitit_local", "model.n_layers=2", "model.d_model=32",
            "model.head_dim=16", "model.seq_len=32", "train.tokens=204800", "train.batch_size=8",
            "train.ckpt_every=0", "train.progress_every_s=0", "train.log_every=4", "latency.enabled=false",
            "logger=none", "data.eval_tokens=2048", "data.val_curve_tokens=512", *sweep_args]
    launcher = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    hydra_dir = tmp_path / "private"  # submitit's job folders and logs (SCALING_SUBMITIT_DIR)
    deadline, logs = time.time() + 240, []
    while time.time() < deadline and launcher.poll() is None:
        logs = [p for p in hydra_dir.rglob("*_log.out")] if hydra_dir.exists() else []
        if logs and "step 20/" in logs[0].read_text():
            break
        time.sleep(0.1)
    assert logs, "the submitit job never logged its training steps"
    # a local submitit job's id is the pid of its controller, which runs the task as its child (as SLURM runs a step)
    controller = int(logs[0].name.split("_")[0])
    (task,) = [int(p) for p in subprocess.run(["pgrep", "-P", str(controller)], capture_output=True,
                                              text=True).stdout.split()]
    os.kill(task, signal.SIGUSR2)
    out, err = launcher.communicate(timeout=400)
    assert launcher.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    assert "sweep default: 1 runs: 1 done; 1 finished after resuming from an interruption: " in err
    assert "(interrupted (SIGUSR2 during training))" in err, err[-3000:]
    job_log = logs[0].read_text() + logs[0].with_name(logs[0].name.replace("_log.out", "_log.err")).read_text()
    assert "interrupted: SIGUSR2 during training" in job_log and "Requeued job" in job_log, job_log[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results" / "default").glob("*.json")]
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == 204800
    assert 20 * 8 * 32 <= record["timing"]["resumed_from_tokens"] < 204800
    assert [a["ended"] for a in record["attempts"]] == ["interrupted (SIGUSR2 during training)", "ok"]


@pytest.mark.parametrize("extra, message", [
    (["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu"],
     "a DDP sweep needs hydra/launcher=submitit_slurm"),
    (["train.devices=2", "train.strategy=ddp", "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=1"],
     "hydra.launcher.tasks_per_node=1"),
    (["train.devices=auto"], "give counts"),
])
def test_ranks_a_launcher_cannot_start_are_refused_before_any_job(sweep_args, tmp_path, extra, message):
    out = cli("scaling-train", "-m", "sweep=smoke", "model.params=1e4", "model.n_layers=1", *extra, *sweep_args)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "results").rglob("launches/*.json"))  # nothing was launched
    assert not (tmp_path / "private").exists()  # nothing was handed to submitit
