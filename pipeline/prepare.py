"""``scaling-prepare``: tokenize a corpus into its token cache once, in bounded memory, before the runs that use it.

A corpus larger than ``data.prepare_threshold_bytes`` (or any hub dataset) is not tokenized by the runs: each of them,
and a sweep's pre-launch check, would otherwise stream and tokenize it again. This command takes the same ``data``
settings as ``scaling-train`` and writes the cache those runs read (``pipeline.data.prepare_cache``): on a CPU node
or as a SLURM job; killed, it continues where it stopped when launched again.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from scaling_lab.conf import command
from scaling_lab.conf.train_schema import DataConf


@dataclass
class PrepareConf:
    data: DataConf = field(default_factory=DataConf)  # the runs' own data schema: one cache key for both
    progress_every_s: float = 30.0  # seconds between progress lines on stderr


ConfigStore.instance().store(name="prepare_schema", node=PrepareConf)


def _prepare_command(cfg: DictConfig) -> None:
    from scaling_lab.pipeline.data import prepare_cache

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


main = command("scaling-prepare", "prepare", _prepare_command)
