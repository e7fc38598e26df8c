"""The fitted-constant export, ``fit.json``: what the fit stage writes and the select/plan stages read.

fit.json, schema_version 1::

    {"schema_version": 1,
     "created": "<ISO time>", "tool": {"name": "scaling-lab", "version": "..."},
     "provenance": {"source": "...", "rows": {...}, "n_convention": "total|non_embedding", "protocol": "..."},
     "laws": {"<law name>": {"formula": "...", "inputs": [...], "params": {...}, "ci95": {...},
                             "not_identified": [...], "metrics": {...}, ...}},
     "latency": {...}}            # optional, written by the latency model
"""

from __future__ import annotations

import json
from pathlib import Path

from scaling_lab.fit.laws.law import LawConstants

SCHEMA_VERSION = 1


def read_fit_json(path: str | Path) -> dict:
    """Read and validate a fit.json; returns the parsed document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fit file at {path}: run scaling-fit first, or name a preset")
    doc = json.loads(path.read_text())
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is not supported (this tool reads {SCHEMA_VERSION})")
    if not isinstance(doc.get("laws"), dict) or not doc["laws"]:
        raise ValueError(f"{path}: no 'laws' section")
    return doc


def load_law(path: str | Path, law: str, formula: str | None = None, inputs=None, doc: dict | None = None,
             needed_by: str = "this command") -> tuple[LawConstants, dict]:
    """Law ``law`` of a fit.json and the whole document. With ``formula`` (the configured law's), a fit.json whose
    formula differs is refused: the caller's math assumes the configured form. With ``inputs``, so are other inputs.
    """
    doc = read_fit_json(path) if doc is None else doc
    if law not in doc["laws"]:
        raise ValueError(f"{path} has no {law!r} law (it holds {sorted(doc['laws'])}); {needed_by} needs one: fit "
                         f"it with scaling-fit law=[chinchilla,inference_efficient]")
    constants = LawConstants.from_dict(law, doc["laws"][law])
    if formula is not None and "".join(constants.law.formula.split()) != "".join(str(formula).split()):
        raise ValueError(f"{path}: {law} formula {constants.law.formula!r} is not the configured {formula!r}, "
                         f"the form {needed_by} assumes")
    if inputs is not None and set(constants.law.inputs) != set(inputs):
        raise ValueError(f"{path}: law {law!r} has inputs {list(constants.law.inputs)}; {needed_by} needs "
                         f"{list(inputs)}")
    return constants, doc


def load_constants(path: str | Path, law: str) -> LawConstants:
    """The fitted constants of one law from a fit.json."""
    return load_law(path, law)[0]
