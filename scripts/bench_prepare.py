"""Peak memory and wall time of ``scaling-prepare`` (16k BPE) on the 93 MB English corpus ../shared/corpus/gutenberg_en
and on a synthetic corpus many times larger (its paragraphs repeated and shuffled), each in its own process.

    python scripts/bench_prepare.py [--synthetic-bytes 15e9] [--bpe-sample-bytes 2e8] [--synthetic-only]

Before scaling-prepare, preparation held the whole corpus, its documents and its tokens in memory (3.8 GB peak for
the 93 MB corpus). Now memory stays bounded: the BPE learns from a bounded sample (data.bpe_sample_bytes) and the
tokens are written chunk by chunk (data.prepare_chunk_bytes). The target: a peak under 1.5 GB whatever the size.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("SCALING_SHARED", ROOT.parent / "shared")) / "corpus" / "gutenberg_en"
PREPARE = Path(sys.executable).parent / "scaling-prepare"


def prepare(path: str, cache: Path, *extra: str) -> tuple[float, float, str]:
    """Peak memory (GB) and wall time (s) of one ``scaling-prepare`` process, and its last output line."""
    args = [str(PREPARE), "data=files", f"data.path={path}", "data.sample_by=paragraph", "data.tokenizer=bpe",
            "data.bpe_vocab_size=16384", f"data.cache_dir={cache}", *extra]
    start = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak (RUSAGE_CHILDREN would be the max of all)
    if status:
        sys.exit(f"{' '.join(args)} failed (status {status})")
    # scaling-prepare's last line names the cache folder: shown relative to this run's temporary folder
    return usage.ru_maxrss / 1e6, time.time() - start, out.strip().splitlines()[-1].replace(str(cache.parent), "<tmp>")


def synthetic(folder: Path, size: float) -> float:
    """Files of the corpus's paragraphs, shuffled anew for each file, until ``size`` bytes; returns their size."""
    paragraphs = [p for f in sorted(CORPUS.glob("train_*.txt")) for p in f.read_text().split("\n\n")]
    rng, written, i = random.Random(0), 0, 0
    while written < size:
        rng.shuffle(paragraphs)
        for k in range(0, len(paragraphs), 20_000):  # files of a few MB, as corpora ship
            text = "\n\n".join(paragraphs[k:k + 20_000])
            (folder / f"part_{i:05d}.txt").write_text(text)
            written += len(text.encode())
            i += 1
            if written >= size:
                break
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic-bytes", type=float, default=15e9, help="10x the 1.5 GB target by default")
    parser.add_argument("--synthetic-only", action="store_true", help="skip the 93 MB corpus")
    parser.add_argument("--bpe-sample-bytes", type=float, default=None,
                        help="data.bpe_sample_bytes for the synthetic corpus (default: the data default, 1 GB)")
    args = parser.parse_args()
    if not CORPUS.exists():
        print(f"{CORPUS} is absent: put the project's shared data beside the checkout or set SCALING_SHARED")
        return
    print(f"scaling-prepare, 16k BPE, sample_by=paragraph, {os.cpu_count()} cores; peak = the process's max RSS")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.synthetic_only:
            size = sum(f.stat().st_size for f in CORPUS.glob("train_*.txt"))
            peak, wall, line = prepare(str(CORPUS / "train_*.txt"), tmp / "cache",
                                       f"data.val_path={CORPUS}/valid_000.txt")
            print(f"gutenberg_en ({size / 1e6:,.0f} MB): peak {peak:.2f} GB, {wall:,.0f} s\n  {line}", flush=True)
        folder = tmp / "synthetic"
        folder.mkdir()
        size = synthetic(folder, args.synthetic_bytes)
        extra = [f"data.bpe_sample_bytes={int(args.bpe_sample_bytes)}"] if args.bpe_sample_bytes else []
        peak, wall, line = prepare(str(folder), tmp / "cache", "data.val_fraction=0.01", *extra)
        print(f"synthetic ({size / 1e6:,.0f} MB, {' '.join(extra) or 'default BPE sample'}): peak {peak:.2f} GB, "
              f"{wall:,.0f} s\n  {line}")


if __name__ == "__main__":
    main()
