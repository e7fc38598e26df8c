"""The results store: one JSON record per run under ``<results_dir>/<sweep>/<run_id>.json``, and the table view.

The store is the source of truth (W&B only mirrors it). Records are written atomically (temp file + rename), so
two processes writing the same sweep never leave a half-written or mixed record, and a reader never sees one.
This module imports neither torch nor Lightning: analysts load tables with it on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from scaling_lab.fit.io.files import write_json_atomic

RECORD_VERSION = 1

# Table column -> path in the nested record. The README documents these columns.
COLUMNS: dict[str, tuple[str, ...]] = {
    "run_id": ("run_id",),
    "sweep": ("sweep",),
    "status": ("status",),
    "error": ("error",),
    "seed": ("seed",),
    "group": ("group",),
    "n_layers": ("shape", "n_layers"),
    "d_model": ("shape", "d_model"),
    "n_heads": ("shape", "n_heads"),
    "head_dim": ("shape", "head_dim"),
    "ffn_hidden": ("shape", "ffn_hidden"),
    "vocab_size": ("shape", "vocab_size"),
    "seq_len": ("shape", "seq_len"),
    "aspect_ratio": ("shape", "aspect_ratio"),
    "params_total": ("params", "total"),
    "params_non_embedding": ("params", "non_embedding"),
    "params_embedding": ("params", "embedding"),
    "tokens_budget": ("tokens", "budget"),
    "tokens_seen": ("tokens", "seen"),
    "flops_per_token": ("flops", "per_token"),
    "flops_total": ("flops", "total"),
    "flops_budget": ("flops", "budget"),
    "loss": ("loss", "final"),
    "loss_bpb": ("loss", "bits_per_byte"),
    "loss_min_val": ("loss", "min_val"),
    "train_loss_last": ("loss", "train_last"),
    "prefill_ms": ("latency", "prefill_ms"),
    "decode_ms_per_token": ("latency", "decode_ms_per_token"),
    "decode_ms_per_token_batch": ("latency", "decode_ms_per_token_batch"),
    "latency_batch": ("latency", "batch_large"),
    "latency_device": ("latency", "device"),
    "latency_threads": ("latency", "threads"),
    "wall_s": ("timing", "wall_s"),
    "train_s": ("timing", "train_s"),
    "tokens_per_s": ("timing", "tokens_per_s"),
    "tokenizer": ("data", "tokenizer"),
    "corpus": ("data", "corpus"),
    "corpus_hash": ("data", "corpus_hash"),
    "weights": ("weights", "path"),
    "finished_at": ("finished_at",),
}


def run_id_for(payload: Mapping[str, Any]) -> str:
    """A stable id from the config fields that change a run's result (the caller chooses them)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def sweep_dir(results_dir: str | Path, sweep: str) -> Path:
    return Path(results_dir) / sweep


def record_path(results_dir: str | Path, sweep: str, run_id: str) -> Path:
    return sweep_dir(results_dir, sweep) / f"{run_id}.json"


def write_record(results_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write one run's record atomically; returns its path."""
    record = {"record_version": RECORD_VERSION, **record}
    return write_json_atomic(record_path(results_dir, record["sweep"], record["run_id"]), record)


def read_record(path: str | Path) -> dict | None:
    """One record, or None if the file is not a record (a stray or foreign file is never fatal to a sweep)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and "run_id" in doc else None


def iter_records(results_dir: str | Path, sweep: str) -> Iterable[dict]:
    for path in sorted(sweep_dir(results_dir, sweep).glob("*.json")):
        record = read_record(path)
        if record is not None:
            yield record


def _get(record: Mapping[str, Any], path: tuple[str, ...]):
    node: Any = record
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def flatten(record: Mapping[str, Any]) -> dict:
    return {column: _get(record, path) for column, path in COLUMNS.items()}


def load_table(results_dir: str | Path, sweep: str) -> pd.DataFrame:
    """All records of a sweep as one table, one row per run, with the columns of ``COLUMNS``."""
    rows = [flatten(r) for r in iter_records(results_dir, sweep)]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values(["params_non_embedding", "tokens_budget", "aspect_ratio"], na_position="last",
                             ignore_index=True)


# ----- run state: a running marker while a process trains a run, its checkpoint while it is unfinished ---------

def checkpoint_path(results_dir: str | Path, sweep: str, run_id: str) -> Path:
    return sweep_dir(results_dir, sweep) / "checkpoints" / f"{run_id}.ckpt"


def weights_path(results_dir: str | Path, sweep: str, run_id: str) -> Path:
    """A finished run's weights (``train.save_model=true``): a torch state dict, read with ``weights_only=True``."""
    return sweep_dir(results_dir, sweep) / "weights" / f"{run_id}.pt"


def marker_path(results_dir, sweep: str, run_id: str) -> Path:
    return sweep_dir(results_dir, sweep) / "running" / f"{run_id}.json"


def mark_running(results_dir, sweep: str, run_id: str) -> Path:
    """Note that this process is training ``run_id`` (removed when the run ends, however it ends)."""
    return write_json_atomic(marker_path(results_dir, sweep, run_id),
                             {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})


def claim_alive(marker: dict) -> bool:
    if marker.get("host") != socket.gethostname():
        return True  # another node's run: trust its marker
    try:
        os.kill(int(marker["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError):
        return False
