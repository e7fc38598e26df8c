"""Files written atomically: a temporary file in the same folder, fsync, then a rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_json_atomic(path: str | Path, doc: Any, before_rename=None) -> Path:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
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


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
