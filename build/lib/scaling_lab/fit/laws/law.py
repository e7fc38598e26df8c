"""A scaling law and its fitted constants: a small value object that evaluates with numpy alone.

A law is a named formula over named inputs (N, D, R, ...) and named parameters (E, A, B, alpha, ...), written once
in configuration (``conf/law/*.yaml``); fitting, prediction, planning and selection all evaluate the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

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
