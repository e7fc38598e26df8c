"""One command convention: a short --help page per command, bad input as one line `scaling-<cmd>: error: ...` with
exit code 2 and no traceback, old key spellings refused with the new name. Real console scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
COMMANDS = ["scaling-train", "scaling-sweep-status", "scaling-fit", "scaling-latency", "scaling-select",
            "scaling-verify", "scaling-plan", "scaling-report", "scaling-quantize", "scaling-speculate",
            "scaling-prepare", "scaling-export"]


def cli(tmp_path, *args):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_a_short_page_of_its_own(command, tmp_path):
    out = cli(tmp_path, command, "--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"{command}:") and len(lines) <= 80
    assert "Usage:" in out.stdout and "Example" in out.stdout


def test_help_into_a_reader_that_stops_reading_ends_quietly(tmp_path):
    """`scaling-fit --help | head -1`: the reader closes the pipe before the page is written; no traceback."""
    proc = subprocess.Popen([str(BIN / "scaling-fit"), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    proc.stdout.close()                                  # the reader is gone before the first byte
    assert proc.wait(timeout=60) in (0, 1)
    assert b"Traceback" not in proc.stderr.read()


@pytest.mark.parametrize("args", [["--cfg", "job"], ["model.n_layers=2", "--cfg", "job"],
                                  ["--cfg", "job", "model.n_layers=2"]])
def test_hydra_cfg_flag_works_before_and_after_overrides(args, tmp_path):
    out = cli(tmp_path, "scaling-train", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "n_layers: 2" in out.stdout or args == ["--cfg", "job"]
    assert "schedule: cosine" in out.stdout  # a typed choice prints as its value


BAD = {  # one bad input per command, each caught before any compute
    "scaling-train": ["model.n_layers=0"],
    "scaling-sweep-status": ["sweep=nothing_here"],
    "scaling-fit": ["source=csv", "source.path=missing.csv"],
    "scaling-latency": ["constants=missing.json"],
    "scaling-select": ["constants=missing.json", "budget.params=1e5", "budget.tokens=1e6",
                       "select.loss_tolerance=0.01"],
    "scaling-verify": ["constants=missing.json"],
    "scaling-plan": ["target.loss=1.0", "demand.tokens=2e12"],
    "scaling-report": ["sweep=nothing_here", "results_dir=nowhere"],
    "scaling-quantize": ["sweep=nothing_here", "results_dir=nowhere"],
    "scaling-speculate": ["sweep=nothing_here", "results_dir=nowhere"],
    "scaling-prepare": ["data=files", "data.path=nowhere/*.txt"],
    "scaling-export": ["sweep=nothing_here", "run=0123456789ab", "results_dir=nowhere"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_input_is_one_line_and_exit_2(command, tmp_path):
    for args in (BAD[command], ["no_such_key=1"]):
        out = cli(tmp_path, command, *args)
        assert out.returncode == 2, (args, out.stdout[-500:], out.stderr[-2000:])
        assert out.stderr.startswith(f"{command}: error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("old, new, command", [("results.dir", "results_dir", "scaling-train"),
                                               ("source.sweep", "sweep", "scaling-fit"),
                                               ("fitted_sweep", "sweep", "scaling-verify"),
                                               ("sweep_name", "sweep", "scaling-report"),
                                               ("fit", "constants", "scaling-select")])
def test_an_old_key_names_the_new_one(old, new, command, tmp_path):
    out = cli(tmp_path, command, f"{old}=x")
    assert out.returncode == 2 and f"{old} is now {new}" in out.stderr
