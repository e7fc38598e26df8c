"""Files written atomically: a temporary file in the same folder, fsync, then a rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np


def write_atomic(path: str | Path, write: Callable[[IO[str]], None], before_rename=None) -> Path:
    """Write text to ``path`` with ``write(file)`` through a temporary file, fsync and a rename, so readers never see
    half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a full disk: no half-written temp file is left behind; the old file is untouched
        tmp.unlink(missing_ok=True)
        if err.filename is None:
            err.filename = str(path)
        raise
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, doc: Any, before_rename=None) -> Path:
    """Write JSON to ``path`` atomically (``write_atomic``)."""
    def write(f):
        json.dump(doc, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    return write_atomic(path, write, before_rename)


def write_csv_atomic(path: str | Path, table) -> Path:
    """Write a DataFrame to ``path`` as CSV (no index) atomically (``write_atomic``)."""
    return write_atomic(path, lambda f: table.to_csv(f, index=False))


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
