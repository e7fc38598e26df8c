"""A results folder on a shared filesystem, written to by careless or hostile co-users: records and launch files
are validated on read (a bad one is skipped with one line naming it, never a traceback, never a stopped sweep), and
a sweep's name cannot lead out of the results folder. The commands are the installed console scripts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_lab.fit.io import store

BIN = Path(sys.executable).parent
TINY_RUN = ["logger=none", "latency.enabled=false", "train.tokens=4096", "model.n_layers=1", "model.d_model=32",
            "train.progress_bar=false", "data.eval_tokens=2048", "data.val_curve_tokens=512"]


def cli(*args, cwd=None):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300, cwd=cwd)


def _plant(results: Path) -> dict[str, str]:
    """Bad files in sweep ``s``: file name -> the reason the status prints."""
    folder = results / "s"
    (folder / "launches").mkdir(parents=True)
    bad = {
        "aaaaaaaaaaaa.json": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        "bbbbbbbbbbbb.json": (json.dumps({"run_id": "bbbbbbbbbbbb", "sweep": "s", "status": "ok",
                                          "loss": {"final": "low"}}), "loss is str, not a number"),
        "cccccccccccc.json": (json.dumps({"run_id": "dddddddddddd", "sweep": "s", "status": "ok"}),
                              "its run_id 'dddddddddddd' is not its file name"),
        "eeeeeeeeeeee.json": (json.dumps({"run_id": "eeeeeeeeeeee", "sweep": "s", "status": "ok",
                                          "schema_version": "2"}), "schema_version '2' is not a version"),
    }
    for name, (text, _) in bad.items():
        (folder / name).write_text(text)
    (folder / "launches" / "x.json").write_text(json.dumps({"points": [{"run_id": "../../etc", "n_params": "a"}]}))
    (folder / "launches" / "y.json").write_text("[" * 100_000)
    return {name: why for name, (_, why) in bad.items()}


def test_bad_records_and_launch_files_are_named_never_fatal(tmp_path):
    results = tmp_path / "results"
    bad = _plant(results)
    status = cli("scaling-sweep-status", "sweep=s", f"results_dir={results}", cwd=tmp_path)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert not list(tmp_path.glob("*.log"))  # the warnings go to stderr, not to a log file
    assert f"{len(bad)} points: {len(bad)} damaged" in status.stdout
    for name, why in bad.items():
        assert f"{results / 's' / name}: {why}" in status.stdout
    assert "warning: skipped the launch file" in status.stderr and "x.json: a point that is not" in status.stderr
    assert "y.json: " in status.stderr and len(status.stderr.strip().splitlines()) == 2

    # the fit refuses to fit around them silently, in one line naming them
    fit = cli("scaling-fit", "sweep=s", f"results_dir={results}", "logger=none", f"out={tmp_path / 'fit'}")
    assert fit.returncode == 2 and "4 damaged record(s)" in fit.stderr and "aaaaaaaaaaaa.json" in fit.stderr
    assert len(fit.stderr.strip().splitlines()) == 1

    # a run of that sweep still trains: its time estimate skips them, each with one warning line
    train = cli("scaling-train", "sweep.name=s", f"results_dir={results}", f"data.cache_dir={tmp_path / 'cache'}",
                *TINY_RUN)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "\nok: run " in train.stdout and "Traceback" not in train.stderr
    assert "skipped" in train.stderr + train.stdout and "JSON nested too deeply" in train.stderr + train.stdout


@pytest.mark.parametrize("name", ["../..", "/tmp/elsewhere", "a/b", "..", ".hidden"])
def test_a_sweep_name_is_a_plain_name(tmp_path, name):
    out = cli("scaling-train", f"sweep.name={name}", f"results_dir={tmp_path / 'results'}", *TINY_RUN, cwd=tmp_path)
    assert out.returncode == 2 and "is not a plain name" in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.rglob("*.json")]
    with pytest.raises(store.UserError, match="not a plain name"):
        store.sweep_dir(tmp_path, name)
