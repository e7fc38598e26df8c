"""Checksums beside the files a run reads back: checkpoints, saved weights and the token cache.

Results folders and token caches sit on shared filesystems: a file damaged there (a bad block, a copy cut short, a
colleague's tool writing into it) must stop whatever reads it, in one line naming the file, never be trained or
scored on silently. Each such file gets ``<file>.sha256`` beside it, in ``sha256sum``'s format (so ``sha256sum -c``
checks it by hand), written atomically after the file; a load verifies it first.

This module imports no torch: ``scaling-sweep-status`` lists damage with it on any machine.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

from scaling_lab.conf import UserError
from scaling_lab.fit.io.files import write_atomic

SUFFIX = ".sha256"
DAMAGED = ".damaged"  # a file set aside by ``set_aside``
BLOCK = 1 << 20


class IntegrityError(UserError):
    """A checkpoint, weights or token-cache file that is not what was written, or not plain data."""


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def sha256(path: str | Path) -> str:
    """The file's SHA-256, read in blocks (checkpoints and token streams can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def write_checksum(path: str | Path) -> Path:
    """Write ``path``'s sidecar (atomically) once ``path`` is complete."""
    path = Path(path)
    digest = sha256(path)
    return write_atomic(sidecar(path), lambda f: f.write(f"{digest}  {path.name}\n"))


def replace_checked(tmp: str | Path, path: str | Path) -> Path:
    """Move the finished file ``tmp`` to ``path`` (atomically), then write its checksum. The old checksum goes
    first: a kill in between leaves a file without a checksum (read unverified, like a legacy one), never a file
    beside an older file's checksum (which would read as damaged)."""
    sidecar(path).unlink(missing_ok=True)
    os.replace(tmp, path)
    return write_checksum(path)


def remove(path: str | Path) -> None:
    """Remove a file and its checksum (missing ones are fine)."""
    Path(path).unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def problem(path: str | Path) -> str | None:
    """Why ``path`` is damaged, or None. A file without a sidecar was written before checksums existed (by the
    previous release): it is not verified, so older results folders and token caches stay readable."""
    path = Path(path)
    try:
        expected = sidecar(path).read_text().split()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        return f"its checksum file {sidecar(path).name} cannot be read ({err})"
    try:
        actual = sha256(path)
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if not expected or expected[0] != actual:
        return f"its contents do not match its checksum {sidecar(path).name}"
    return None


def verify(path: str | Path, remedy: str) -> None:
    """Raise ``IntegrityError`` (one line: the file, what is wrong, ``remedy``) if ``path`` is damaged."""
    why = problem(path)
    if why:
        raise IntegrityError(f"{path} is damaged: {why}; {remedy}")


def load_verified(path: str | Path, load, remedy: str):
    """``load(path)`` once ``path``'s checksum is verified. ``load`` reads data only (``torch.load(...,
    weights_only=True)``): a file that asks to run code is refused, in one line (``IntegrityError``)."""
    verify(path, remedy)
    try:
        return load(path)
    except pickle.UnpicklingError as err:  # what torch's data-only loader raises; nothing else in a load does
        raise _not_data(path, err, remedy) from None


def _not_data(path: str | Path, err: Exception, remedy: str) -> IntegrityError:
    """The one-line error for a file torch's data-only loader refused (its message spans many lines; the one that
    names what the file asked to run is kept)."""
    lines = str(err).splitlines() or [""]
    detail = next((line.split("error:", 1)[1] for line in lines if "Unpickler error:" in line), lines[0])
    return IntegrityError(f"{path} is not plain data, so it was not loaded ({detail.strip().split('. ')[0]}); "
                          f"{remedy}")


def set_aside(path: str | Path) -> Path:
    """Rename a damaged file to ``<name>.damaged`` (with its checksum), so that nothing reads it again and it can
    be inspected; ``scaling-sweep-status`` lists it until it is deleted."""
    path = Path(path)
    aside = path.with_name(path.name + DAMAGED)
    os.replace(path, aside)
    if sidecar(path).exists():
        os.replace(sidecar(path), sidecar(aside))
    return aside


def damaged_files(folder: str | Path) -> list[tuple[Path, str]]:
    """Every file under ``folder`` set aside as damaged, or whose checksum fails, with why (this reads every
    checksummed file in full)."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.name.endswith(DAMAGED):
            found.append((path, "set aside as damaged"))
        elif sidecar(path).is_file() and path.is_file():
            why = problem(path)
            if why:
                found.append((path, why))
    return found
