"""Fitted scaling-law constants: a small value object that evaluates with numpy alone, and the fit.json file.

A law is a named formula over named inputs (N, D, R, ...) and named parameters (E, A, B, alpha, ...). The formula
is a Python/numpy expression written once in configuration (``conf/law/*.yaml``); fitting, prediction, planning
and selection all evaluate the same string. ``fit.json`` (schema below) is what the fit stage exports and the
select/plan stages consume.

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
import os
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SCHEMA_VERSION = 1

# The project's Hydra configuration directory; every CLI passes it to @hydra.main(config_path=str(CONF_DIR)).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Names a formula may use besides its inputs and parameters.
_FUNCTIONS = {"exp": np.exp, "log": np.log, "sqrt": np.sqrt, "abs": np.abs, "minimum": np.minimum,
              "maximum": np.maximum, "pi": math.pi}


@dataclass(frozen=True)
class Law:
    """A scaling law: ``formula`` evaluated over ``inputs`` (data columns) and ``params`` (fitted constants)."""

    name: str
    formula: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]

    def __post_init__(self):
        code = compile(self.formula, f"<law {self.name}>", "eval")
        unknown = set(code.co_names) - set(self.inputs) - set(self.params) - set(_FUNCTIONS)
        if unknown:
            raise ValueError(f"law {self.name!r}: formula {self.formula!r} uses undeclared names {sorted(unknown)}; "
                             f"declare them under inputs {list(self.inputs)} or params {list(self.params)}")
        object.__setattr__(self, "_code", code)

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> "Law":
        return cls(name=name, formula=str(spec["formula"]), inputs=tuple(spec["inputs"]), params=tuple(spec["params"]))

    def evaluate(self, params: Mapping[str, Any], **inputs: Any):
        missing = [p for p in self.params if p not in params] + [i for i in self.inputs if i not in inputs]
        if missing:
            raise ValueError(f"law {self.name!r} needs {missing}")
        scope = {**_FUNCTIONS, **{k: params[k] for k in self.params},
                 **{k: np.asarray(inputs[k], dtype=float) for k in self.inputs}}
        return eval(self._code, {"__builtins__": {}}, scope)  # noqa: S307 - formula comes from the user's own config


@dataclass(frozen=True)
class LawConstants:
    """A law with fitted values: ``constants.predict(N=..., D=..., R=...)`` gives the loss."""

    law: Law
    values: Mapping[str, float]
    ci95: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return float(self.values[name])

    def predict(self, **inputs: Any):
        return self.law.evaluate(self.values, **inputs)

    def to_dict(self) -> dict:
        return {"formula": self.law.formula, "inputs": list(self.law.inputs),
                "params": {k: float(v) for k, v in self.values.items()},
                "ci95": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci95.items()}}

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> "LawConstants":
        values = {k: float(v) for k, v in spec["params"].items()}
        law = Law(name=name, formula=spec["formula"], inputs=tuple(spec["inputs"]), params=tuple(values))
        ci = {k: (float(v[0]), float(v[1])) for k, v in (spec.get("ci95") or {}).items()}
        return cls(law=law, values=values, ci95=ci)


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


def load_constants(path: str | Path, law: str) -> LawConstants:
    """The fitted constants of one law from a fit.json."""
    doc = read_fit_json(path)
    if law not in doc["laws"]:
        raise KeyError(f"{path} holds laws {sorted(doc['laws'])}, not {law!r}")
    return LawConstants.from_dict(law, doc["laws"][law])


def write_json_atomic(path: str | Path, doc: Any) -> Path:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
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
