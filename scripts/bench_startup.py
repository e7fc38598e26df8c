"""How fast every command answers: ``--help``, a mistyped key (refused by the config's schema), and a bad value its
run refuses (after importing what it runs with), each the median of 5 runs of the installed console script.

    .venv/bin/python scripts/bench_startup.py

A command's own module (torch, pandas, matplotlib) is imported only once its config is composed
(``conf/commands.py``), so the first two never import it; the third does, which is what it costs today.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPEATS = 5
# per command: a key it does not have, and a value its run refuses before any compute
COMMANDS = {
    "scaling-train": ("model.n_layer=3", "data.source=nowhere"),
    "scaling-prepare": ("data.pth=x", "data=files"),
    "scaling-sweep-status": ("sweeps=x", "sweep=no-such-sweep"),
    "scaling-fit": ("sourc=csv", "source=csv source.path=/no/such.csv"),
    "scaling-plan": ("targt.loss=2", "target.loss=0.5 demand.tokens=1e12"),
    "scaling-latency": ("measure.devic=cpu", "measure.device=tpu"),
    "scaling-select": ("selct.top=3", "constants=/no/such/fit.json"),
    "scaling-verify": ("verfy=1", "constants=/no/such/fit.json"),
    "scaling-quantize": ("mode=int8", "sweep=no-such-sweep"),
    "scaling-speculate": ("k=1", "sweep=no-such-sweep"),
    "scaling-report": ("reprt.title=x", "sweep=no-such-sweep"),
    "scaling-export": ("rn=x", "sweep=no-such-sweep run=0123456789ab"),
}


def median_seconds(args: list[str], cwd: str, expect_rc: int) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != expect_rc:
            sys.exit(f"{' '.join(args)}: exit {done.returncode}, expected {expect_rc}\n{done.stderr}")
    return statistics.median(times)


def main() -> None:
    print(f"median of {REPEATS} runs of each installed command, seconds (python {sys.version.split()[0]})")
    print(f"{'command':<22}{'--help':>8}{'bad key':>9}{'bad value':>11}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as cwd:
        for name, (bad_key, bad_value) in COMMANDS.items():
            exe = str(BIN / name)
            row = [median_seconds([exe, "--help"], cwd, 0), median_seconds([exe, bad_key], cwd, 2),
                   median_seconds([exe, *bad_value.split()], cwd, 2)]
            worst = max(worst, *row[:2])
            print(f"{name:<22}{row[0]:>8.2f}{row[1]:>9.2f}{row[2]:>11.2f}")
    print(f"slowest --help or bad key: {worst:.2f} s (target 0.5 s)")


if __name__ == "__main__":
    main()
