"""The results store: one JSON record per run under ``<results_dir>/<sweep>/<run_id>.json``, and the table view.

The store is the source of truth (W&B only mirrors it). Records are written atomically (temp file + rename), so
two processes writing the same sweep never leave a half-written or mixed record, and a reader never sees one.
This module imports neither torch nor Lightning: analysts load tables with it on any machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from scaling_lab.conf import UserError
from scaling_lab.fit.io import integrity
from scaling_lab.fit.io.files import write_csv_atomic, write_json_atomic

# The run record's schema. Readers take every version up to this one through ``upgrade_record`` and refuse a newer
# one (a newer scaling-lab wrote it) with the release to upgrade to. CHANGELOG.md says what each version changed.
#   1: the first records ("record_version": 1, or no version key)
#   2: "schema_version"; "identity": the settings its run id hashes (conf/train_schema.py's RUN_IDENTITY)
RECORD_SCHEMA_VERSION = 2
# A record is a few kilobytes; a file far larger than that is not one of ours (and would be slow to parse).
MAX_RECORD_BYTES = 16 * 2**20

log = logging.getLogger("scaling.store")


class RecordVersionError(UserError):
    """A record written by a newer scaling-lab than this one."""


def tool_version() -> str:
    """This scaling-lab's version (``unknown`` when it runs from a checkout that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scaling-lab")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def tool_commit() -> str | None:
    """The git commit of the checkout this code runs from, ``+dirty`` when its tracked files differ from it; None
    for an installed wheel (no checkout). Recorded beside the version, so a record says which code wrote it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def upgrade_record(doc: dict, path: str | Path = "a run record") -> dict:
    """A record of any known schema version in the current shape (older ones migrated, step by step); a newer
    version raises ``RecordVersionError``, a version that is no version raises ``ValueError`` (a damaged record)."""
    version = doc.get("schema_version", doc.get("record_version", 1))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: schema_version {version!r} is not a version")
    if version > RECORD_SCHEMA_VERSION:
        writer = (doc.get("versions") or {}).get("project")
        upgrade = (f"pip install -U 'scaling-lab>={writer}'" if isinstance(writer, str) and writer[:1].isdigit()
                   else "upgrade scaling-lab (CHANGELOG.md lists the record versions)")
        raise RecordVersionError(f"{path}: a run record of schema_version {version}, written by scaling-lab "
                                 f"{writer or 'of a later release'}; this scaling-lab {tool_version()} reads "
                                 f"schema_version 1 to {RECORD_SCHEMA_VERSION}: {upgrade}")
    if version == 1:  # the settings hashed into its id were not kept
        doc = {"schema_version": 2, **{k: v for k, v in doc.items() if k != "record_version"}, "identity": None}
    return doc

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
    "loss_stderr": ("loss", "stderr"),
    "loss_bpb": ("loss", "bits_per_byte"),
    "eval_documents": ("loss", "eval", "documents"),
    "eval_bytes": ("loss", "eval", "bytes"),
    "loss_min_val": ("loss", "min_val"),
    "train_loss_last": ("loss", "train_last"),
    "prefill_ms": ("latency", "prefill_ms"),
    "decode_ms_per_token": ("latency", "decode_ms_per_token"),
    "decode_ms_per_token_batch": ("latency", "decode_ms_per_token_batch"),
    "latency_batch": ("latency", "batch_large"),
    "latency_device": ("latency", "device"),
    "latency_threads": ("latency", "threads"),
    "lr": ("optim", "lr"),
    "schedule": ("schedule", "name"),
    "branched_from": ("schedule", "branched_from"),
    "flops_convention": ("flops", "convention"),
    "wall_s": ("timing", "wall_s"),
    "train_s": ("timing", "train_s"),
    "tokens_per_s": ("timing", "tokens_per_s"),
    "tokens_per_s_steady": ("timing", "tokens_per_s_steady"),
    "mfu": ("timing", "mfu"),
    "device": ("hardware", "device"),
    "world_size": ("hardware", "devices"),
    "precision": ("hardware", "precision"),
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


# A sweep's name is a folder name inside the results folder, never a path out of it (``../..``, ``/abs``).
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def sweep_dir(results_dir: str | Path, sweep: str) -> Path:
    if not isinstance(sweep, str) or not PLAIN_NAME.fullmatch(sweep) or ".." in sweep:
        raise UserError(f"sweep name {sweep!r} is not a plain name: use letters, digits, '.', '_' and '-' (no path "
                        "separators and no '..'); it names a folder inside results_dir")
    return Path(results_dir) / sweep


def record_path(results_dir: str | Path, sweep: str, run_id: str) -> Path:
    return sweep_dir(results_dir, sweep) / f"{run_id}.json"


def write_record(results_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write one run's record atomically; returns its path."""
    record = {"schema_version": RECORD_SCHEMA_VERSION, **record}
    return write_json_atomic(record_path(results_dir, record["sweep"], record["run_id"]), record,
                             before_rename=lambda: fault_point("record-rename"))


FAULT_ENV = "SCALING_LAB_KILL_AT"


def fault_point(name: str) -> None:
    """Fault injection for the tests: ``SCALING_LAB_KILL_AT=<name>`` SIGKILLs this process at that point (the
    record's rename, the checkpoint's removal), the worst moments for a kill to land."""
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def read_record(path: str | Path) -> dict | None:
    """One record in the current schema, or None if the file is missing or not a valid record (a stray, damaged or
    foreign file is never fatal to a sweep); a record from a newer scaling-lab raises ``RecordVersionError``."""
    return record_file_state(path)[1]


def scan_records(results_dir: str | Path, sweep: str) -> tuple[list[dict], dict[Path, str]]:
    """One read of every record file of a sweep: its valid records, and the damaged files with why."""
    records, damaged = [], {}
    for path in sorted(sweep_dir(results_dir, sweep).glob("*.json")):
        kind, record, why = _load_record(path)
        if record is not None:
            records.append(record)
        elif kind == "damaged":
            damaged[path] = why
    return records, damaged


def iter_records(results_dir: str | Path, sweep: str) -> Iterable[dict]:
    """The sweep's valid records; each file that is not one is skipped with one warning line naming it and why."""
    records, damaged = scan_records(results_dir, sweep)
    for path, why in damaged.items():
        log.warning("skipped %s: %s", path, why)
    return records


def _get(record: Mapping[str, Any], path: tuple[str, ...]):
    node: Any = record
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def flatten(record: Mapping[str, Any]) -> dict:
    return {column: _get(record, path) for column, path in COLUMNS.items()}


def table_of(records) -> pd.DataFrame:
    """Records as one table, one row per run, with the columns of ``COLUMNS``."""
    return pd.DataFrame([flatten(r) for r in records], columns=list(COLUMNS))


def load_table(results_dir: str | Path, sweep: str) -> pd.DataFrame:
    """All records of a sweep as one table, one row per run, with the columns of ``COLUMNS``."""
    table = table_of(iter_records(results_dir, sweep))
    return table.sort_values(["params_non_embedding", "tokens_budget", "aspect_ratio"], na_position="last",
                             ignore_index=True)


def export_table(results_dir: str | Path, sweep: str, out: str | Path | None = None) -> list[Path]:
    """The sweep's table as files people load anywhere: ``runs.csv`` and ``runs.parquet`` (when pyarrow or
    fastparquet is installed) in ``out`` (default: the sweep's folder). Returns the paths written."""
    table = load_table(results_dir, sweep)
    out = Path(out) if out is not None else sweep_dir(results_dir, sweep)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "runs.csv"]
    write_csv_atomic(paths[0], table)
    try:
        tmp = out / f".runs.parquet.{os.getpid()}.tmp"
        table.astype({c: "string" for c in TEXT_COLUMNS}).to_parquet(tmp, index=False)
        os.replace(tmp, out / "runs.parquet")
        paths.append(out / "runs.parquet")
    except ImportError:
        pass
    return paths


# ----- run state: a claim while a process trains a run, its checkpoint while it is unfinished ----------------
#
# Before training, a process claims the run: ``<sweep>/running/<run_id>.json`` created with O_CREAT | O_EXCL
# (host, pid, start, a random token, a heartbeat a thread refreshes every HEARTBEAT_S). Another process skips a run
# whose claim is alive and takes over a stale one (same host and a dead pid, or no heartbeat for STALE_S); the
# taken-over attempt is kept in ``<sweep>/attempts/<run_id>.json`` and ends up in the record's ``attempts``.

HEARTBEAT_S = 10.0
STALE_S = 120.0
STATES = ("done", "running", "interrupted", "failed", "pending", "damaged")


def checkpoint_path(results_dir: str | Path, sweep: str, run_id: str) -> Path:
    return sweep_dir(results_dir, sweep) / "checkpoints" / f"{run_id}.ckpt"


def weights_path(results_dir: str | Path, sweep: str, run_id: str) -> Path:
    """Where a finished run's weights go (``train.save_model=true``); the file takes its format's suffix
    (``pipeline.weights.SUFFIXES``: ``.safetensors``, or ``.pt`` for weights saved before that format)."""
    return sweep_dir(results_dir, sweep) / "weights" / f"{run_id}.pt"


def trunk_dir(results_dir: str | Path, sweep: str, trunk_id: str) -> Path:
    """Checkpoints of one WSD stable run, one per step a decay branch starts from (``step_<n>.ckpt``)."""
    return sweep_dir(results_dir, sweep) / "trunks" / trunk_id


def marker_path(results_dir, sweep: str, run_id: str) -> Path:
    """The run's claim file (``running/<run_id>.json``)."""
    return sweep_dir(results_dir, sweep) / "running" / f"{run_id}.json"


claim_path = marker_path


def attempts_path(results_dir, sweep: str, run_id: str) -> Path:
    return sweep_dir(results_dir, sweep) / "attempts" / f"{run_id}.json"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except PermissionError:
        return True   # someone else's process
    except (OSError, ValueError, TypeError):
        return False


def claim_alive(marker: Mapping[str, Any], now: float | None = None, stale_s: float | None = None) -> bool:
    """A claim is alive while its heartbeat is fresh, and (on this host) its process exists."""
    now = time.time() if now is None else now
    stale_s = STALE_S if stale_s is None else stale_s
    beat = marker.get("heartbeat", marker.get("started"))
    try:
        fresh = now - float(beat) < stale_s
    except (TypeError, ValueError):
        fresh = False
    if marker.get("host") == socket.gethostname():
        return fresh and _pid_alive(marker.get("pid"))
    return fresh


def read_claim(path: str | Path) -> dict | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class Claim:
    """This process's claim on one run: ``Claim.acquire`` or None; ``heartbeat()`` (a thread calls it);
    ``release()``. ``info`` holds the attempt (host, pid, start, tokens resumed from), written with each beat."""

    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info
        self._stop = None
        self._thread = None

    @classmethod
    def acquire(cls, results_dir, sweep: str, run_id: str, stale_s: float | None = None) -> "Claim | None":
        import fcntl
        import secrets

        path = claim_path(results_dir, sweep, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "start": now, "started": now, "heartbeat": now,
                "token": secrets.token_hex(8), "tokens_resumed": None, **slurm_job()}
        # The check-and-take-over is serialised by a lock file, so two processes never both take over one stale
        # claim; the claim itself is an exclusive create.
        with open(path.with_name(f".{run_id}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                for _ in range(2):
                    try:
                        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        old = read_claim(path)
                        if old is not None and claim_alive(old, stale_s=stale_s) and not _earlier_try(old, info):
                            return None
                        if old is not None:
                            _append_attempt(results_dir, sweep, run_id, {
                                **_attempt_of(old), "end": old.get("heartbeat"), "ended": "killed"})
                        path.unlink(missing_ok=True)
                        continue
                    with os.fdopen(fd, "w") as f:
                        json.dump(info, f)
                        f.flush()
                        os.fsync(f.fileno())
                    return cls(path, info)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return None

    def owned(self) -> bool:
        current = read_claim(self.path)
        return current is not None and current.get("token") == self.info["token"]

    def heartbeat(self) -> None:
        """Refresh the heartbeat (and ``info``) if the claim is still ours."""
        if not self.owned():
            return
        self.info["heartbeat"] = time.time()
        try:
            write_json_atomic(self.path, self.info)
        except OSError:
            pass  # a full disk must not kill the run; the claim just looks older

    def start_heartbeat(self, every_s: float | None = None) -> "Claim":
        import threading

        every = HEARTBEAT_S if every_s is None else every_s
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(every):
                self.heartbeat()

        self._thread = threading.Thread(target=beat, name="claim-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)

    def attempt(self, ended: str) -> dict:
        return {**_attempt_of(self.info), "end": time.time(), "ended": ended}


def slurm_job() -> dict:
    """The SLURM job this process runs in (an array task as ``<array job>_<task>``) and how often SLURM has
    restarted it (a requeue keeps the job's id and counts up SLURM_RESTART_COUNT); {} outside SLURM."""
    env = os.environ
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}" if env.get("SLURM_ARRAY_JOB_ID")
           else env.get("SLURM_JOB_ID"))
    if not job:
        return {}
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    return {"slurm_job_id": job, "slurm_restart_count": int(restarts) if restarts.isdigit() else 0}


def _earlier_try(old: Mapping[str, Any], ours: Mapping[str, Any]) -> bool:
    """The claim is this SLURM job's own, from before a requeue: a requeued job that starts (on another node)
    while its killed predecessor's heartbeat still looks fresh takes its claim over instead of skipping its run."""
    restarts = old.get("slurm_restart_count")
    return (ours.get("slurm_job_id") is not None and old.get("slurm_job_id") == ours["slurm_job_id"]
            and isinstance(restarts, int) and restarts < ours["slurm_restart_count"])


def _attempt_of(claim: Mapping[str, Any]) -> dict:
    return {"host": claim.get("host"), "pid": claim.get("pid"), "start": claim.get("start", claim.get("started")),
            "tokens_resumed": claim.get("tokens_resumed"),
            **{k: claim[k] for k in ("slurm_job_id", "slurm_restart_count") if k in claim}}


def _append_attempt(results_dir, sweep: str, run_id: str, attempt: dict) -> None:
    path = attempts_path(results_dir, sweep, run_id)
    previous = read_claim(path) or {}
    write_json_atomic(path, {"attempts": [*previous.get("attempts", []), attempt]})


def attempts(results_dir, sweep: str, run_id: str, previous_record: Mapping | None = None) -> list[dict]:
    """Earlier attempts of a run: those of a record being re-run, then those noted when a claim was taken over
    or a run was interrupted."""
    earlier = list((previous_record or {}).get("attempts") or [])
    noted = (read_claim(attempts_path(results_dir, sweep, run_id)) or {}).get("attempts", [])
    return earlier + [a for a in noted if a not in earlier]


def note_attempt(results_dir, sweep: str, run_id: str, attempt: dict) -> None:
    """Keep an attempt that ends without a record (interrupted by a signal) for the record that follows."""
    _append_attempt(results_dir, sweep, run_id, attempt)


def sweep_temp_files(results_dir, sweep: str, run_id: str) -> list[Path]:
    """Remove this run's leftover temporary files (a record's or checkpoint's half-written ``.tmp``, an old claim's
    temp file): called by the process that holds the run's claim, so no live writer owns them."""
    folder = sweep_dir(results_dir, sweep)
    patterns = [(folder, f".{run_id}.json.*.tmp"), (folder / "checkpoints", f".{run_id}.ckpt*.tmp"),
                (folder / "running", f".{run_id}.json.*.tmp"), (folder / "attempts", f".{run_id}.json.*.tmp")]
    removed = []
    for where, pattern in patterns:
        for p in where.glob(pattern) if where.is_dir() else ():
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def finish_run(results_dir, record: Mapping[str, Any]) -> Path:
    """The end of a run, in the order that loses nothing: the record is written (atomically), then the run's
    checkpoint and its noted attempts are removed; a kill at any point leaves either the checkpoint or the record."""
    path = write_record(results_dir, record)
    fault_point("checkpoint-removal")
    if record.get("status") == "ok":
        integrity.remove(checkpoint_path(results_dir, record["sweep"], record["run_id"]))
    attempts_path(results_dir, record["sweep"], record["run_id"]).unlink(missing_ok=True)
    return path


# ----- what state a run is in (scaling-sweep-status and the fit read it here) ---------------------------------

# Record columns that hold text; every other column of COLUMNS holds a number (or null).
TEXT_COLUMNS = {"run_id", "sweep", "status", "error", "group", "latency_device", "schedule", "branched_from",
                "flops_convention", "tokenizer", "corpus", "corpus_hash", "weights", "finished_at", "device",
                "precision"}


def read_json(path: Path) -> Any:
    """A small JSON file of the results folder (a record, a launch file): ``ValueError`` saying why when it is too
    large for one, not JSON, or nested too deeply to parse (``FileNotFoundError`` when it is missing)."""
    size = path.stat().st_size
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"{size:,} bytes, more than a record's {MAX_RECORD_BYTES:,}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"not JSON ({type(err).__name__})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _load_record(path: Path) -> tuple[str, dict | None, str]:
    """("missing" | "damaged" | "record", the record in the current schema, why it is damaged)."""
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return "missing", None, ""
    except OSError as err:
        return "damaged", None, f"unreadable ({err.strerror or err})"
    except ValueError as err:
        return "damaged", None, str(err)
    if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str) or not isinstance(doc.get("status"), str):
        return "damaged", None, "not a run record (no run_id and status)"
    if doc["run_id"] != path.stem:
        return "damaged", None, f"its run_id {doc['run_id']!r} is not its file name"
    try:
        doc = upgrade_record(doc, path)
    except RecordVersionError:
        raise
    except ValueError as err:
        return "damaged", None, str(err)
    for column, value in flatten(doc).items():
        wanted = str if column in TEXT_COLUMNS else (int, float)
        if value is not None and (not isinstance(value, wanted) or isinstance(value, bool)):
            return "damaged", None, f"{column} is {type(value).__name__}, not {'text' if wanted is str else 'a number'}"
    return "record", doc, ""


def record_file_state(path: str | Path) -> tuple[str, dict | None]:
    """("missing" | "damaged" | "record", the record): a record file that exists but is empty, truncated, too large
    or too deep, or not a record of the expected shape is damaged (never silently pending)."""
    kind, doc, _ = _load_record(Path(path))
    return kind, doc


def run_state(results_dir, sweep: str, run_id: str) -> str:
    """done | running | interrupted | failed | pending | damaged, from the store alone."""
    return run_state_and_record(results_dir, sweep, run_id)[0]


def run_state_and_record(results_dir, sweep: str, run_id: str) -> tuple[str, dict | None]:
    """The run's state (``run_state``) and its record, if one was readable, from one read of the record file."""
    kind, record = record_file_state(record_path(results_dir, sweep, run_id))
    if kind == "damaged":
        return "damaged", None
    if record is not None and record.get("status") in ("ok", "failed"):
        return ("done" if record["status"] == "ok" else "failed"), record
    claim = read_claim(claim_path(results_dir, sweep, run_id))
    if claim is not None and claim_alive(claim):
        return "running", record
    if checkpoint_path(results_dir, sweep, run_id).exists() or claim is not None:
        return "interrupted", record
    return "pending", record


def damaged_records(results_dir, sweep: str) -> list[Path]:
    """Record files of a sweep that are empty, truncated or not records."""
    return list(scan_records(results_dir, sweep)[1])
