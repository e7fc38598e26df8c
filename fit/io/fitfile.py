"""The fitted-constant export, ``fit.json``: what the fit stage writes and the select/plan stages read.

fit.json, schema_version 1::

    {"schema_version": 1,
     "created": "<ISO time>", "tool": {"name": "scaling-lab", "version": "..."},
     "provenance": {"source": "...", "rows": {...}, "n_convention": "total|non_embedding", "protocol": "...",
                    "fitted_range": {"N": [min, max], "D": [...], "R": [...]}},   # over the fit rows
     "laws": {"<law name>": {"formula": "...", "inputs": [...], "params": {...}, "ci95": {...},
                             "not_identified": [...], "metrics": {...}, ...}},
     "latency": {...}}            # optional, written by the latency model
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from scaling_lab.conf import CONF_DIR, UserError
from scaling_lab.fit.laws.law import Law, LawConstants

SCHEMA_VERSION = 1


@lru_cache(maxsize=1)
def _shipped_laws() -> dict[str, Law]:
    import yaml

    laws = {}
    for file in sorted((CONF_DIR / "law").glob("*.yaml")):
        for name, spec in (yaml.safe_load(file.read_text()) or {}).items():
            laws[name] = Law.from_dict(name, spec)
    return laws


def configured_laws(specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Law]:
    """The configured laws: ``specs`` (a command's ``cfg.law``: name -> formula, inputs, params) or, without them,
    the laws shipped in ``conf/law/``."""
    if specs is None:
        return _shipped_laws()
    return {name: Law.from_dict(name, dict(spec)) for name, spec in specs.items()}


def check_law(constants: LawConstants, configured: Law, path: str | Path) -> LawConstants:
    """The one check every fit.json reader makes: the file's law is the configured law (the same formula tree and
    inputs), so no command computes with a formula it was not configured for."""
    if not constants.law.same_as(configured):
        raise UserError(f"{path}: law {constants.law.name!r} has formula {constants.law.formula!r} over "
                        f"{list(constants.law.inputs)}, not the configured {configured.formula!r} over "
                        f"{list(configured.inputs)}; refit with this configuration")
    return constants


def read_fit_json(path: str | Path, configured: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Read and validate a fit.json; returns the parsed document. Every law's formula is parsed (never evaluated)
    and a law with a configured name must be the configured law (``configured`` as in ``configured_laws``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fit file at {path}: run scaling-fit first, or name a preset")
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a fit.json (not text)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not a fit.json (invalid JSON: {err})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a fit.json (not a JSON object)")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is not supported (this tool reads {SCHEMA_VERSION})")
    if not isinstance(doc.get("laws"), dict) or not doc["laws"]:
        raise ValueError(f"{path}: no 'laws' section")
    known = configured_laws(configured)
    for name, spec in doc["laws"].items():
        try:
            constants = LawConstants.from_dict(name, spec)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
        if name in known:
            check_law(constants, known[name], path)
    return doc


def load_law(path: str | Path, law: str, formula: str | None = None, inputs=None, doc: dict | None = None,
             needed_by: str = "this command") -> tuple[LawConstants, dict]:
    """Law ``law`` of a fit.json and the whole document (every law parsed and checked: ``read_fit_json``). With
    ``formula`` (the configured law's), a fit.json whose formula differs is refused (``check_law``, the same formula
    tree): the caller's math assumes the configured form. With ``inputs``, so are other inputs.
    """
    doc = read_fit_json(path) if doc is None else doc
    if law not in doc["laws"]:
        raise ValueError(f"{path} has no {law!r} law (it holds {sorted(doc['laws'])}); {needed_by} needs one: fit "
                         f"it with scaling-fit law=[chinchilla,inference_efficient]")
    constants = LawConstants.from_dict(law, doc["laws"][law])
    if formula is not None:
        try:
            wanted = Law(law, str(formula), constants.law.inputs, constants.law.params)
        except UserError:
            wanted = None
        if wanted is None or not constants.law.same_as(wanted):
            raise UserError(f"{path}: {law} formula {constants.law.formula!r} is not the configured {formula!r}, "
                            f"the form {needed_by} assumes")
    if inputs is not None and set(constants.law.inputs) != set(inputs):
        raise ValueError(f"{path}: law {law!r} has inputs {list(constants.law.inputs)}; {needed_by} needs "
                         f"{list(inputs)}")
    return constants, doc


def load_constants(path: str | Path, law: str) -> LawConstants:
    """The fitted constants of one law from a fit.json."""
    return load_law(path, law)[0]
