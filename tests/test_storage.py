"""Full and read-only disks, for real: a small tmpfs in a private mount namespace (``unshare --mount``) holds the
results dir of the installed ``scaling-train``.

* The disk fills up after training, while the run measures latency: writing the record fails with a one-line error
  that names the file and says the trained checkpoint is kept; once there is space, the relaunch goes straight to
  evaluation (no step retrained) and finishes ``ok``.
* The results dir then turns read-only: relaunching the finished run and launching a new one each give a one-line
  error naming Hydra's output folder (its way out: ``hydra.run.dir``, with which the finished run is skipped), and
  the finished record is intact.

Skipped where the machine does not allow private mounts (not root, or no ``unshare``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TINY

BIN = Path(sys.executable).parent
RUN = [*TINY, "model.n_layers=2", "train.tokens=8192", "train.ckpt_every=0", "logger=none", "train.threads=1",
       "latency.batch_sizes=[1]", "latency.repeats=400"]


def _can_mount() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"private tmpfs mounts are not allowed here: {probe.stderr.strip()}"


def _train(results: Path, cache: str, *extra: str, **kw):
    return subprocess.Popen([str(BIN / "scaling-train"), *RUN, *extra, f"results_dir={results}",
                             f"data.cache_dir={cache}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _ended(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    return {"rc": proc.returncode, "stderr": err, "stdout": out}


def inner(mountpoint: Path, cache: str, report: Path) -> None:
    """Runs inside the private mount namespace; writes what happened to ``report`` (outside the tmpfs)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)], check=True)
    results, out = mountpoint / "results", {}
    ckpts = results / "default" / "checkpoints"
    proc = _train(results, cache)
    while not list(ckpts.glob("*.ckpt")) and proc.poll() is None:  # only the trained weights' (periodic ones off)
        time.sleep(0.02)
    filler = mountpoint / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until ENOSPC
    out["full"] = _ended(proc)
    out["full"]["checkpoints"] = [p.name for p in ckpts.glob("*.ckpt")]
    out["full"]["records"] = [p.name for p in (results / "default").glob("*.json")]
    filler.unlink()
    out["relaunch"] = _ended(_train(results, cache))
    out["record"] = json.loads(next((results / "default").glob("*.json")).read_text())
    subprocess.run(["mount", "-o", "remount,ro", str(mountpoint)], check=True)
    out["readonly_done"] = _ended(_train(results, cache))
    out["readonly_new"] = _ended(_train(results, cache, "train.seed=1"))
    out["readonly_elsewhere"] = _ended(_train(results, cache, f"hydra.run.dir={report.parent / 'hydra'}"))
    out["record_after"] = json.loads(next((results / "default").glob("*.json")).read_text())
    report.write_text(json.dumps(out))


@pytest.mark.slow
def test_full_and_read_only_disks_give_one_line_errors_and_lose_nothing(tmp_path, token_cache):
    why = _can_mount()
    if why:
        pytest.skip(why)
    (tmp_path / "mnt").mkdir()
    report = tmp_path / "report.json"
    done = subprocess.run(["unshare", "--mount", sys.executable, __file__, str(tmp_path / "mnt"), token_cache,
                           str(report)], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(report.read_text())

    def one_line_error(step: str, *needles: str) -> str:
        err = out[step]["stderr"].strip().splitlines()
        assert out[step]["rc"] == 2 and "Traceback" not in out[step]["stderr"], out[step]["stderr"][-3000:]
        assert err[-1].startswith("scaling-train: error: cannot write "), err[-3:]
        for needle in needles:
            assert needle in err[-1], err[-1]
        return err[-1]

    one_line_error("full", "the disk is full", "checkpoint", "is kept")
    assert out["full"]["checkpoints"] and not out["full"]["records"]  # the trained weights wait for the record
    assert out["relaunch"]["rc"] == 0, out["relaunch"]["stderr"][-3000:]
    record = out["record"]
    assert record["status"] == "ok" and record["tokens"]["seen"] == record["tokens"]["budget"] == 8192
    assert record["timing"]["resumed_from_tokens"] == 8192  # nothing retrained
    assert [a["ended"] for a in record["attempts"]][-1] == "ok"
    one_line_error("readonly_done", "read-only", "hydra.run.dir=")
    one_line_error("readonly_new", "read-only", "hydra.run.dir=")
    # Hydra's output folder elsewhere: the finished run is skipped on the read-only results dir
    assert out["readonly_elsewhere"]["rc"] == 0 and "already ok" in out["readonly_elsewhere"]["stdout"]
    assert out["record_after"] == record


if __name__ == "__main__":
    inner(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
