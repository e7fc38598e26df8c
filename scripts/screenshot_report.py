"""Open a report in headless Chromium and save a screenshot (PNG), e.g. for the README or to check a report renders.

    .venv/bin/python scripts/screenshot_report.py results/report/demo/report.html [--out shot.png]
        [--width 1280] [--height 4000] [--install]

Chromium is Debian's package (``apt-get install chromium``; ``--install`` runs that when it is absent, as root).
The browser runs with a fresh profile and no network features (no sync, no component updates, no background
networking), from a file:// URL: the report needs no server. Exit code 3 when no Chromium is found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--mute-audio"]


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_chromium() -> str | None:
    """Debian's chromium package through apt-get (needs root); returns the binary or None."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env, check=False)
    return find_chromium()


def screenshot(report: Path, out: Path, width: int = 1280, height: int = 4000, chromium: str | None = None,
               timeout: float = 120) -> Path:
    """Render ``report`` (an HTML file) with headless Chromium into ``out``; raises FileNotFoundError without one."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium, or run with --install)")
    report, out = Path(report).resolve(), Path(out).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"no report at {report}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out}", report.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: <report dir>/screenshot.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--install", action="store_true", help="apt-get install chromium when it is absent")
    args = parser.parse_args(argv)
    chromium = find_chromium() or (install_chromium() if args.install else None)
    if chromium is None:
        print("screenshot_report: error: no Chromium found; install Debian's package (apt-get install chromium) "
              "or rerun with --install", file=sys.stderr)
        return 3
    out = screenshot(args.report, args.out or args.report.parent / "screenshot.png", args.width, args.height,
                     chromium)
    print(f"screenshot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
