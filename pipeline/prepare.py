"""``scaling-prepare``: tokenize a corpus into its token cache once, in bounded memory, before the runs that use it.

A corpus larger than ``data.prepare_threshold_bytes`` (or any hub dataset) is not tokenized by the runs: each of them,
and a sweep's pre-launch check, would otherwise stream and tokenize it again. This command takes the same ``data``
settings as ``scaling-train`` and writes the cache those runs read (``pipeline.data.prepare_cache``): on a CPU node
or as a SLURM job; killed, it continues where it stopped when launched again.
"""

from __future__ import annotations

import sys
import time

from omegaconf import DictConfig

from scaling_lab.pipeline.data import prepare_cache


def prepare_command(cfg: DictConfig) -> None:
    """The whole ``scaling-prepare`` job (its config: ``conf/prepare.yaml``, schema ``PrepareConf``)."""
    start = last = time.time()

    def report(progress: dict) -> None:
        nonlocal last
        if time.time() - last >= cfg.progress_every_s:
            last = time.time()
            done = sum(progress[s]["bytes"] for s in ("train", "val"))
            tokens = sum(progress[s]["tokens"] for s in ("train", "val"))
            print(f"scaling-prepare: {progress['documents']:,} documents, {done / 1e6:,.0f} MB, {tokens:,} tokens "
                  f"({time.time() - start:,.0f} s)", file=sys.stderr, flush=True)

    corpus = prepare_cache(cfg.data, on_chunk=report)
    meta = corpus.meta
    print(f"{corpus.dir}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} held-out tokens "
          f"({meta['tokenizer']}, {meta['train_documents']:,} + {meta['val_documents']:,} documents)")
