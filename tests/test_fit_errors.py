"""Bad input gets one clear line before any fitting."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.errors import MissingConfigException

from scaling_lab.fit.fitting.cli import run
from scaling_lab.fit.fitting.sources import FitInputError
from tests.helpers import fit_config


def _csv(tmp_path, frame):
    path = tmp_path / "runs.csv"
    frame.to_csv(path, index=False)
    return path


def _runs(n=12, seed=0):
    rng = np.random.default_rng(seed)
    N, D = np.geomspace(1e7, 1e9, n), np.geomspace(1e9, 1e11, n)[::-1]
    return pd.DataFrame({"N": N, "D": D, "loss": 2 + 400 / N ** 0.34 + 2000 / D ** 0.37 + 0.01 * rng.random(n)})


def _run(tmp_path, path, *overrides):
    return run(fit_config("source=csv", f"source.path={path}", f"out={tmp_path / 'out'}", "bootstrap.n=0",
                          "plots=false", "law=chinchilla", *overrides))


@pytest.mark.parametrize("frame,message", [
    (_runs(4), "5 free parameters but only 4 fit rows"),
    (_runs().assign(loss=3.0), "loss is constant"),
    (_runs().assign(loss=lambda f: f["loss"].where(f.index != 3)), "NaN"),
    (_runs().drop(columns="D"), "missing column"),
    (_runs().assign(N=lambda f: -f["N"]), "must be positive"),
])
def test_degenerate_input(tmp_path, frame, message):
    with pytest.raises(FitInputError, match=message):
        _run(tmp_path, _csv(tmp_path, frame))
    assert not (tmp_path / "out" / "fit.json").exists()


def test_missing_file_and_bad_query(tmp_path):
    with pytest.raises(FitInputError, match="no CSV file"):
        _run(tmp_path, tmp_path / "nope.csv")
    with pytest.raises(FitInputError, match="query"):
        _run(tmp_path, _csv(tmp_path, _runs()), "source.fit_rows=no_such_column")


def test_law_needing_absent_column_is_skipped(tmp_path, capsys):
    doc = run(fit_config("source=csv", f"source.path={_csv(tmp_path, _runs(20))}", f"out={tmp_path / 'out'}",
                         "bootstrap.n=0", "plots=false", "protocol.max_starts=200"))
    assert set(doc["laws"]) == {"chinchilla"} and "inference_efficient" in doc["skipped_laws"]
    assert "skipping law inference_efficient" in capsys.readouterr().out
    with pytest.raises(FitInputError, match="no selected law"):
        _run(tmp_path, _csv(tmp_path, _runs()), "law=inference_efficient")


def test_unknown_law_or_protocol():
    with pytest.raises(MissingConfigException):
        fit_config("law=no_such_law")
    with pytest.raises(MissingConfigException):
        fit_config("protocol=no_such_protocol")


def test_cli_prints_one_line(tmp_path):
    """Through the installed console script when there is one (it runs fit.fitting.cli as a module, not a file)."""
    path = _csv(tmp_path, _runs().assign(loss=3.0))
    script = Path(sys.executable).parent / "scaling-fit"
    command = [str(script)]
    proc = subprocess.run([*command, "source=csv", f"source.path={path}", f"out={tmp_path / 'out'}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    message = "scaling-fit: error: the loss is constant over the fit rows: nothing to fit"
    assert proc.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "outputs").exists()
